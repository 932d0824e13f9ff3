"""``triserve serve|chat|bench ...``: command-line arguments and logging setup.

``chat`` and ``bench`` are clients (``triserve/tools/``), imported only when asked for.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import triserve
from triserve.options import DEFAULT_REPOSITORY, ServerOptions
from triserve.tools import arguments


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triserve", description="A Triton-compatible inference server for chat LLMs."
    )
    parser.add_argument("--version", action="version", version=f"triserve {triserve.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve a model repository over HTTP, gRPC and /metrics",
        description="Serve a Triton model repository: KServe v2 over HTTP and gRPC, "
                    "OpenAI and ChatGLM routes for chat models, Prometheus metrics.",
    )
    serve.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                       help="the model repository folder (default: the packaged chat model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--http-port", type=_port, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port (default: 8001)")
    serve.add_argument("--metrics-port", type=_port, default=8002,
                       help="Prometheus /metrics port (default: 8002)")
    serve.add_argument("--model-control-mode", choices=["none", "explicit"], default="none",
                       help="none: load every model at start; explicit: load the --load-model "
                            "ones, and load/unload at runtime through the repository API")
    serve.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="explicit mode: a model to load at start ('*' = all); repeatable")
    serve.add_argument("--log-verbose", type=int, choices=[0, 1], default=0,
                       help="1: debug logs and HTTP access logs")
    serve.add_argument("--strict-readiness", type=_boolean, default=True, metavar="true|false",
                       help="true (default, as Triton): /v2/health/ready stays false while a model "
                            "failed to load; false: ready once every model was tried")
    serve.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="S",
                       help="at SIGTERM/SIGINT: seconds running requests get to finish before "
                            "they end with an error (default: 30)")
    serve.add_argument("--initialize-timeout", type=_seconds, default=600.0, metavar="S",
                       help="deadline of a model instance's load/initialize; 0 = none (default: 600)")
    serve.add_argument("--finalize-timeout", type=_seconds, default=30.0, metavar="S",
                       help="deadline of a model instance's finalize at unload; 0 = none (default: 30)")
    serve.add_argument("--execute-timeout", type=_seconds, default=0.0, metavar="S",
                       help="deadline of one execute call of a Python model: past it the "
                            "request fails and the instance is restarted; 0 = none (default)")
    serve.add_argument("--max-instance-restarts", type=int, default=5, metavar="N",
                       help="an instance process that dies more than N times within "
                            "--instance-restart-window marks its model failed (default: 5)")
    serve.add_argument("--instance-restart-window", type=_seconds, default=60.0, metavar="S",
                       help="the window of --max-instance-restarts, seconds (default: 60)")
    serve.add_argument("--allowed-model-root", action="append", default=[], type=Path, metavar="DIR",
                       help="a folder that config overrides of load requests may point into, "
                            "besides the model's own folder; repeatable")
    serve.add_argument("--chatglm-model", default=None, metavar="NAME",
                       help="the model that answers ChatGLM's POST / (default: the first chat model)")
    chat = commands.add_parser(
        "chat", help="chat with a model in the terminal (a running server's, or one it starts)",
        description="A terminal chat with any chat model, over the OpenAI routes, streamed. "
                    "Commands: /reset, /system TEXT, /exit.",
    )
    arguments.add_chat_arguments(chat)
    bench = commands.add_parser(
        "bench", help="measure latency and throughput of a KServe v2 or OpenAI endpoint",
        description="Send requests at a range of concurrencies to any KServe v2 (HTTP or gRPC) "
                    "or OpenAI endpoint; print the seed's cnt/max/min/avg line, percentiles, "
                    "requests/s, tokens/s, TTFT and inter-token latency; write a JSON report "
                    "and PNG plots.",
    )
    arguments.add_bench_arguments(bench)
    return parser


def parse_options(argv: Sequence[str] | None = None) -> ServerOptions:
    parser = build_parser()
    return _server_options(parser, parser.parse_args(argv))


def _server_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerOptions:
    if args.load_model and args.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode explicit (in mode 'none' every model loads)")
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository} is not a directory")
    return ServerOptions(
        model_repository=args.model_repository.resolve(),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        log_verbose=args.log_verbose,
        strict_readiness=args.strict_readiness,
        chatglm_model=args.chatglm_model,
        drain_timeout=args.drain_timeout,
        initialize_timeout=args.initialize_timeout,
        finalize_timeout=args.finalize_timeout,
        execute_timeout=args.execute_timeout,
        max_instance_restarts=args.max_instance_restarts,
        instance_restart_window=args.instance_restart_window,
        allowed_model_roots=tuple(root.resolve() for root in args.allowed_model_root),
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value:g}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # uvicorn's per-connection and access lines are noise at the default level
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "chat":
        from triserve.tools import chat

        return chat.run(args)
    if args.command == "bench":
        from triserve.tools import bench

        return bench.run(args)
    options = _server_options(parser, args)
    setup_logging(options.log_verbose)
    # imported here, so that --help and usage errors skip importing the frontends
    from triserve.server import StartupError, run

    try:
        run(options)
    except StartupError as exc:
        logging.getLogger("triserve").error("%s", exc)
        return 1
    return 0
