"""The HTTP frontend (KServe v2 REST, generate, OpenAI, the seed's JSON predict,
ChatGLM's api.py); :func:`triserve.frontends.http.app.create_app` builds it.

uvicorn's package imports ``watchfiles``, when it is installed, for its ``--reload``, which
triserve never runs; that costs the server about 1 MB of memory. The first import of uvicorn,
here, hides it, so uvicorn settles for its stat-based reloader (never used either); it is
visible again right after, for anyone else in the process.
"""

import sys


def _import_uvicorn_without_watchfiles() -> None:
    hide = "uvicorn" not in sys.modules and "watchfiles" not in sys.modules
    if hide:
        sys.modules["watchfiles"] = None  # type: ignore[assignment]  # makes its import fail
    try:
        import uvicorn  # noqa: F401
    finally:
        if hide:
            del sys.modules["watchfiles"]


_import_uvicorn_without_watchfiles()
