"""``ServerOptions``: how one triserve process is configured (filled from the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The repository served when --model-repository is not given: the packaged chat model.
DEFAULT_REPOSITORY = Path(__file__).parent / "model_repository"


@dataclass(frozen=True)
class ServerOptions:
    model_repository: Path = DEFAULT_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "none"  # "none" | "explicit"
    load_models: tuple[str, ...] = ()  # explicit mode: loaded at start ("*" = all)
    log_verbose: int = 0
    strict_readiness: bool = True  # Triton's default: not ready while a startup model failed to load
    chatglm_model: str | None = None  # the model behind ChatGLM's ``POST /``; None: the first chat model
    drain_timeout: float = 30.0  # SIGTERM: seconds running requests get to finish
    initialize_timeout: float = 600.0  # deadline of one instance's load/initialize
    finalize_timeout: float = 30.0  # deadline of one instance's finalize
    execute_timeout: float = 0.0  # deadline of one execute call; 0 = none
    max_instance_restarts: int = 5  # crashes of one instance within the window before the model fails
    instance_restart_window: float = 60.0
    allowed_model_roots: tuple[Path, ...] = ()  # where load-request config overrides may point
