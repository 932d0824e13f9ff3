"""What a client hears about a server bug: that it happened, and a reference, nothing more.

An unexpected exception's text can hold file paths, configuration or data of the
server (a traceback's ``/home/...``, a file's contents in a parse error). The log
keeps the whole exception with its traceback under a short reference; the client
gets the exception's type and that reference, so a report can be matched to the log.
"""

from __future__ import annotations

import logging
import secrets


def report_bug(logger: logging.Logger, what: str, exc: BaseException) -> str:
    """Log ``exc`` (with its traceback) and return the message for the client."""
    reference = secrets.token_hex(4)
    logger.error("internal error %s while %s", reference, what, exc_info=exc)
    return f"internal error ({type(exc).__name__}); the server log has the details under reference {reference}"
