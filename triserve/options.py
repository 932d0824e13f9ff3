"""``ServerOptions``: how one triserve process is configured (filled from the CLI).

The limits, access keys and TLS files are grouped in their own dataclasses, so each
frontend receives only what it enforces, and every default is defined once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The repository served when --model-repository is not given: the packaged chat model.
DEFAULT_REPOSITORY = Path(__file__).parent / "model_repository"

MiB = 1 << 20

# Environment variables read when the flags are not given (a key on the command line is
# visible to every user of the machine in `ps`).
API_KEY_ENV = "TRISERVE_API_KEY"
MODEL_CONTROL_KEY_ENV = "TRISERVE_MODEL_CONTROL_KEY"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make the server hold; each is a CLI option."""

    # HTTP request body as sent (Triton's --http-max-input-size default is the same 64 MiB).
    max_request_body: int = 64 * MiB
    # A gzip/deflate body once inflated (inflation stops at this size: never inflated first).
    max_decompressed_body: int = 64 * MiB
    # Nesting of JSON arrays/objects (KServe data nests one level per dimension; OpenAI
    # bodies a few levels): checked on the raw text before any parser builds objects.
    max_json_depth: int = 64
    # Elements of one input tensor, checked while decoding, before its array is built
    # (16 Mi: 64 MiB of FP32, so numeric tensors that fit the body limit pass).
    max_tensor_elements: int = 1 << 24
    # gRPC messages received and sent (Triton allows 2 GiB; 64 MiB matches the HTTP limit).
    grpc_max_message: int = 64 * MiB
    # Requests of one gRPC ModelStreamInfer stream running at once; beyond it the stream
    # answers that request with an error (and reading the stream waits for the client to read).
    grpc_max_stream_in_flight: int = 256
    # Seconds an HTTP request head, then its body, may take to arrive (a trickled one gets 408).
    request_body_timeout: float = 60.0


@dataclass(frozen=True)
class Access:
    """Who may call: API keys (compared in constant time) and which calls stay open."""

    api_key: str | None = field(default=None, repr=False)
    # Repository load/unload. None while api_key is set: model control is refused to everyone.
    model_control_key: str | None = field(default=None, repr=False)
    # Health endpoints (/v2/health/*, gRPC ServerLive/ServerReady, grpc.health.v1) need no key.
    open_health: bool = False

    @property
    def enabled(self) -> bool:
        return self.api_key is not None or self.model_control_key is not None


@dataclass(frozen=True)
class Tls:
    """TLS for the HTTP, gRPC and metrics ports, from PEM files."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None  # when set, clients must present a certificate it signed

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class ServerOptions:
    model_repository: Path = DEFAULT_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    grpc_server: str = "native"  # "native": triserve's own HTTP/2 (frontends/grpc/h2.py) | "grpcio": grpc.aio
    metrics_port: int = 8002
    model_control_mode: str = "none"  # "none" | "explicit"
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*" = all)
    log_verbose: int = 0
    strict_readiness: bool = True  # Triton's default: not ready while a startup model failed to load
    chatglm_model: str | None = None  # the model behind ChatGLM's ``POST /``; None: the first chat model
    drain_timeout: float = 30.0  # SIGTERM: seconds running requests get to finish
    stream_stall_timeout: float = 60.0  # a stream whose client reads nothing while it is held back
    busy_poll_us: float = 200.0  # the loop polls without sleeping this long after model-process I/O
    initialize_timeout: float = 600.0  # deadline of one instance's load/initialize
    finalize_timeout: float = 30.0  # deadline of one instance's finalize
    execute_timeout: float = 0.0  # deadline of one execute call; 0 = none
    max_instance_restarts: int = 5  # crashes of one instance within the window before the model fails
    instance_restart_window: float = 60.0
    allowed_model_roots: tuple[Path, ...] = ()  # where load-request config overrides may point
    limits: Limits = field(default_factory=Limits)
    access: Access = field(default_factory=Access)
    tls: Tls = field(default_factory=Tls)
