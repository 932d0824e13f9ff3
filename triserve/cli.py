"""``triserve serve|chat|bench ...``: command-line arguments and logging setup.

``chat`` and ``bench`` are clients (``triserve/tools/``), imported only when asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import triserve
from triserve.deploy.commands import COMMANDS as DEPLOY_COMMANDS
from triserve.deploy.commands import add_commands as add_deploy_commands
from triserve.options import (
    API_KEY_ENV, DEFAULT_REPOSITORY, MODEL_CONTROL_KEY_ENV, Access, Limits, ServerOptions, Tls,
)
from triserve.tools import arguments

_SIZE = re.compile(r"\s*(\d+)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def _size(text: str) -> int:
    """A byte count: ``67108864``, ``64MiB``, ``64M`` (decimal) or ``1GiB``."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 1048576, 64MiB, 1GiB)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return size


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _add_limits(serve: argparse.ArgumentParser) -> None:
    default = Limits()
    group = serve.add_argument_group(
        "limits", "Bounds on one request; a request past one is refused with a 4xx (gRPC "
                  "RESOURCE_EXHAUSTED or INVALID_ARGUMENT) that names the limit.")
    group.add_argument("--max-request-body", type=_size, default=default.max_request_body, metavar="SIZE",
                       help="largest HTTP request body, as sent (default: 64MiB)")
    group.add_argument("--max-decompressed-body", type=_size, default=default.max_decompressed_body,
                       metavar="SIZE", help="largest gzip/deflate request body once inflated (default: 64MiB)")
    group.add_argument("--max-json-depth", type=_positive_int, default=default.max_json_depth, metavar="N",
                       help=f"deepest nesting of JSON arrays/objects in a request (default: {default.max_json_depth})")
    group.add_argument("--max-tensor-elements", type=_positive_int, default=default.max_tensor_elements,
                       metavar="N", help=f"most elements in one input tensor (default: {default.max_tensor_elements})")
    group.add_argument("--grpc-max-message", type=_size, default=default.grpc_max_message, metavar="SIZE",
                       help="largest gRPC message received or sent (default: 64MiB)")
    group.add_argument("--grpc-max-stream-in-flight", type=_positive_int,
                       default=default.grpc_max_stream_in_flight, metavar="N",
                       help="requests of one gRPC ModelStreamInfer stream running at once "
                            f"(default: {default.grpc_max_stream_in_flight})")
    group.add_argument("--request-body-timeout", type=_positive_float, default=default.request_body_timeout,
                       metavar="SECONDS", help="time an HTTP request head, then its body, may take to arrive "
                                               f"(default: {default.request_body_timeout:g})")


def _add_access(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "access control and TLS",
        "With an API key, every HTTP, gRPC and metrics call must carry 'Authorization: Bearer KEY' "
        "(the OpenAI clients' api_key, tritonclient's headers=) or is refused with 401/UNAUTHENTICATED.")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help=f"the key every call must carry (default: ${API_KEY_ENV}; none: no key needed)")
    group.add_argument("--model-control-key", default=None, metavar="KEY",
                       help="the key that repository load/unload calls must carry instead "
                            f"(default: ${MODEL_CONTROL_KEY_ENV}); with --api-key and no model control "
                            "key, load/unload are refused to everyone")
    group.add_argument("--open-health", action="store_true",
                       help="health checks (/v2/health/*, gRPC ServerLive/ServerReady, grpc.health.v1) "
                            "need no key")
    group.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                       help="serve HTTP, gRPC and metrics over TLS with this certificate (chain)")
    group.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key")
    group.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                       help="require client certificates signed by this CA (mutual TLS)")


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
    serve.add_argument("--grpc-server", choices=["native", "grpcio"], default="native",
                       help="native (default): triserve's own HTTP/2 gRPC server on the event loop, about "
                            "half the server CPU per call; grpcio: grpc.aio, the reference implementation")
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
    serve.add_argument("--stream-stall-timeout", type=_seconds, default=60.0, metavar="S",
                       help="a streamed request whose client reads none of its responses for S seconds "
                            "while the model is held back (16 MiB or 1024 responses waiting) is "
                            "cancelled with an error; 0 = never (default: 60)")
    serve.add_argument("--busy-poll-us", type=_microseconds, default=200.0, metavar="US",
                       help="after writing to or reading from a Python model's process, the event loop "
                            "polls without sleeping for US microseconds, so the answer and the client's "
                            "next request need no wake-up: lower latency for a lone client, at most one "
                            "core of CPU while requests flow; 0 = off (default: 200)")
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
    _add_limits(serve)
    _add_access(serve)
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
    add_deploy_commands(commands)
    return parser


def parse_options(argv: Sequence[str] | None = None) -> ServerOptions:
    parser = build_parser()
    return _server_options(parser, parser.parse_args(argv))


def _server_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerOptions:
    if args.load_model and args.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode explicit (in mode 'none' every model loads)")
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository} is not a directory")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--tls-client-ca", args.tls_client_ca)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path} is not a file")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    control_key = (args.model_control_key if args.model_control_key is not None
                   else os.environ.get(MODEL_CONTROL_KEY_ENV) or None)
    if "" in (api_key, control_key):
        parser.error("an empty key would let anyone in: give a non-empty --api-key / --model-control-key")
    return ServerOptions(
        model_repository=args.model_repository.resolve(),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        grpc_server=args.grpc_server,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        log_verbose=args.log_verbose,
        strict_readiness=args.strict_readiness,
        chatglm_model=args.chatglm_model,
        drain_timeout=args.drain_timeout,
        stream_stall_timeout=args.stream_stall_timeout,
        busy_poll_us=args.busy_poll_us,
        initialize_timeout=args.initialize_timeout,
        finalize_timeout=args.finalize_timeout,
        execute_timeout=args.execute_timeout,
        max_instance_restarts=args.max_instance_restarts,
        instance_restart_window=args.instance_restart_window,
        allowed_model_roots=tuple(root.resolve() for root in args.allowed_model_root),
        limits=Limits(
            max_request_body=args.max_request_body,
            max_decompressed_body=args.max_decompressed_body,
            max_json_depth=args.max_json_depth,
            max_tensor_elements=args.max_tensor_elements,
            grpc_max_message=args.grpc_max_message,
            grpc_max_stream_in_flight=args.grpc_max_stream_in_flight,
            request_body_timeout=args.request_body_timeout,
        ),
        access=Access(api_key=api_key, model_control_key=control_key, open_health=args.open_health),
        tls=Tls(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca),
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value:g}")
    return value


def _microseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of microseconds, got {text!r}") from None
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected microseconds from 0 to 1000000, got {value:g}")
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
    if args.command in DEPLOY_COMMANDS:
        from triserve.deploy.commands import run as run_command

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return run_command(args)
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
