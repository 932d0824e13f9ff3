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
