"""One triserve process: the core, HTTP (uvicorn), gRPC (triserve's own HTTP/2, or grpc.aio) and
/metrics in one event loop.

The endpoints listen before any model loads, so clients can watch
``/v2/health/ready`` (false until the startup models were loaded).

SIGTERM and SIGINT stop gracefully: readiness turns false and new requests are
refused with UNAVAILABLE at once; running requests get ``--drain-timeout``
seconds to finish, then the rest end with an UNAVAILABLE error (a stream gets
it as its final event or status, not a cut connection); the frontends then
close, every model is unloaded (finalize, ending the models' processes) and the
process exits 0. A second signal skips what is left of the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Iterator
from typing import Any, Callable

import triserve.frontends.http  # noqa: F401  (first: it imports uvicorn without watchfiles)
import uvicorn

import triserve
from triserve.core import busypoll
from triserve.core.api import Core
from triserve.core.backend import Lifecycle
from triserve.core.server import InferenceServer
from triserve.frontends.auth import Gate
from triserve.frontends.grpc.service import create_grpc_server, create_native_grpc_server
from triserve.frontends.http.app import create_app
from triserve.frontends.http.auth import AuthMiddleware
from triserve.frontends.http.protocol import bounded_protocol
from triserve.frontends.metrics import create_metrics_app
from triserve.options import ServerOptions

logger = logging.getLogger("triserve")

# Seconds the frontends get, after the core's drain, to send the final responses
# (already produced) before connections close.
GRACEFUL_SHUTDOWN_S = 5


class StartupError(RuntimeError):
    """triserve cannot start (a port is taken); the message says which and why."""


class _EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to :func:`serve`, which stops all servers together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn(app, options: ServerOptions, port: int) -> _EmbeddedUvicorn:
    tls = options.tls
    return _EmbeddedUvicorn(uvicorn.Config(
        # access lines at --log-verbose 1, for both servers: uvicorn has one "uvicorn.access"
        # logger, which a Config with access_log=False silences for every server in the process
        app, host=options.host, port=port, log_config=None, access_log=options.log_verbose > 0,
        lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # per-request work nobody here needs: no reverse proxy headers, no Server/Date headers
        proxy_headers=False, server_header=False, date_header=False,
        ssl_certfile=tls.cert, ssl_keyfile=tls.key, ssl_ca_certs=tls.client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
        # httptools with a bounded request head (size and time), plain KServe infer answered by
        # triserve: frontends/http/protocol.py
        http=bounded_protocol(options.limits),
    ))


def _listen(host: str, port: int, what: str) -> socket.socket:
    """Bind a port up front, so a taken port is one clear error before any model loads."""
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise StartupError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None


async def _start_uvicorn(server: _EmbeddedUvicorn, listener: socket.socket) -> asyncio.Task:
    """Start serving on ``listener`` and return once uvicorn has started."""
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped while starting")
        await asyncio.sleep(0.01)
    return task


def _access_summary(options: ServerOptions) -> str:
    access = options.access
    if not access.enabled:
        return "no API key: every call is allowed (--api-key to require one)"
    parts = ["API key required" if access.api_key else "no API key"]
    parts.append("model control with its own key" if access.model_control_key
                 else "model control disabled" if access.api_key else "")
    if access.open_health:
        parts.append("health checks open")
    return ", ".join(part for part in parts if part)


def _freeze_startup_objects(_: asyncio.Task) -> None:
    """Keep what startup built (modules, models, configs) out of every later GC pass.

    Requests allocate many short-lived containers, so collections run often; without
    this, each older-generation pass walks the whole startup heap again.
    """
    gc.freeze()


class Frontends:
    """HTTP, gRPC and /metrics over any :class:`triserve.core.api.Core`.

    ``triserve serve`` runs them over the in-process core; a cluster deployment's front
    door (``triserve.deploy``) runs the same frontends over its Ray Serve facade.
    """

    def __init__(self, core: Core, options: ServerOptions,
                 metrics_registry: Callable[[], Any] | None = None):
        self.options = options
        self.grpc_address = f"{options.host}:{options.grpc_port}"
        self._http = _uvicorn(create_app(core, options), options, options.http_port)
        metrics_app = create_metrics_app(*([metrics_registry] if metrics_registry else []))
        # the middleware passes everything when no key is set
        self._metrics = _uvicorn(AuthMiddleware(metrics_app, Gate(options.access)), options,
                                 options.metrics_port)
        # Bound up front, so a taken port is one clear error before any model loads.
        self._http_listener = _listen(options.host, options.http_port, "HTTP")
        self._metrics_listener = _listen(options.host, options.metrics_port, "metrics")
        if options.grpc_server == "native":
            self._grpc = create_native_grpc_server(core, _listen(options.host, options.grpc_port, "gRPC"),
                                                   options.limits, options.access, options.tls)
        else:
            try:
                self._grpc = create_grpc_server(core, self.grpc_address, options.limits, options.access,
                                                options.tls)
            except RuntimeError as exc:  # grpc.aio raises RuntimeError when it cannot bind
                raise StartupError(f"cannot listen for gRPC on {self.grpc_address}: {exc}") from None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self._grpc.start()
        self._tasks = [await _start_uvicorn(self._http, self._http_listener),
                       await _start_uvicorn(self._metrics, self._metrics_listener)]

    async def stop(self) -> None:
        """Stop accepting; running requests get ``GRACEFUL_SHUTDOWN_S`` to finish."""
        self._http.should_exit = self._metrics.should_exit = True
        await asyncio.gather(*self._tasks, self._grpc.stop(GRACEFUL_SHUTDOWN_S),
                             return_exceptions=True)


async def serve(options: ServerOptions) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""
    lifecycle = Lifecycle(
        initialize_timeout=options.initialize_timeout, finalize_timeout=options.finalize_timeout,
        execute_timeout=options.execute_timeout, max_instance_restarts=options.max_instance_restarts,
        instance_restart_window=options.instance_restart_window)
    core = InferenceServer(options.model_repository, options.model_control_mode, options.load_models,
                           drain_timeout=options.drain_timeout, strict_readiness=options.strict_readiness,
                           lifecycle=lifecycle, allowed_roots=options.allowed_model_roots,
                           stream_stall_timeout=options.stream_stall_timeout)
    frontends = Frontends(core, options)

    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: end the drain now
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    busypoll.enable(asyncio.get_running_loop(), options.busy_poll_us / 1e6)
    await frontends.start()
    logger.info("triserve %s: HTTP%s on %s:%d, gRPC (%s) on %s, metrics on %s:%d/metrics; "
                "model repository %s; %s", triserve.__version__, "S" if options.tls.enabled else "",
                options.host, options.http_port, options.grpc_server, frontends.grpc_address, options.host,
                options.metrics_port,
                options.model_repository, _access_summary(options))

    def stop_if_loading_failed(task: asyncio.Task) -> None:
        """A failed start would otherwise leave the server up but never ready, its error unseen."""
        if not task.cancelled() and task.exception() is not None:
            logger.error("loading the startup models failed", exc_info=task.exception())
            stop.set()

    loading = asyncio.create_task(core.start())
    loading.add_done_callback(_freeze_startup_objects)
    loading.add_done_callback(stop_if_loading_failed)
    await stop.wait()
    core.begin_shutdown()
    if not loading.done():
        loading.cancel()
    active = core.active_requests
    logger.info("stopping: refusing new requests; %d running request(s) get up to %g s to finish",
                active, options.drain_timeout)
    if active:
        drain = asyncio.create_task(core.drain(options.drain_timeout))
        hurried = asyncio.create_task(hurry.wait())
        await asyncio.wait({drain, hurried}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            logger.warning("second signal: ending the running requests now")
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
            await core.drain(0)
        hurried.cancel()
    await frontends.stop()
    busypoll.enable(None, 0)
    await core.stop()
    logger.info("triserve stopped")
    if loading.done() and not loading.cancelled() and loading.exception() is not None:
        raise StartupError(f"triserve stopped because loading the startup models failed: "
                           f"{loading.exception()}")


def run(options: ServerOptions) -> None:
    """Run :func:`serve` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(options))
