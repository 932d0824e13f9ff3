"""The command-line arguments of ``triserve chat`` and ``triserve bench`` (standard library only,
so that ``triserve serve`` and ``--help`` import nothing of the tools themselves)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="a running server (http://host:port, or its /v1); "
                                      "default: start one on --model-repository and stop it on exit")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="without --url: the repository to serve (default: the packaged chat model)")
    parser.add_argument("--model", help="the chat model (default: the server's first chat model)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--system", default="", help="the system prompt to start with")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling (default: the server's)")
    parser.add_argument("--max-tokens", type=int, help="the longest reply, in tokens")
    parser.add_argument("--seed", type=int, help="a sampling seed, for repeatable replies")


def _concurrency(text: str) -> list[int]:
    """``1,4,16`` or perf_analyzer's ``start:end[:step]``."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError(text)
            start, end, step = parts if len(parts) == 3 else (*parts, 1)
            values = list(range(start, end + 1, step)) if step > 0 else []
        else:
            values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected 1,4,16 or start:end[:step], each >= 1")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("endpoint")
    where.add_argument("-i", "--protocol", choices=["http", "grpc", "openai"], default="http",
                       help="KServe v2 over HTTP or gRPC (tritonclient), or OpenAI /v1/chat/completions "
                            "(default: http)")
    where.add_argument("-u", "--url", help="host:port (KServe; default 127.0.0.1:8000, gRPC 8001) or "
                                           "http://host:port (OpenAI; default http://127.0.0.1:8000)")
    where.add_argument("-m", "--model", help="the model (OpenAI: default the server's first)")
    where.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (HTTP header, gRPC metadata)")
    where.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                       help="stream each reply (gRPC ModelStreamInfer, HTTP /generate_stream, OpenAI SSE) "
                            "and measure TTFT and inter-token latency; default: OpenAI and decoupled "
                            "KServe models stream")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_concurrency, default=[1, 2, 4], metavar="1,2,4|START:END[:STEP]",
                      help="concurrent requests, one level after the other (default: 1,2,4)")
    load.add_argument("-c", "--requests", type=_positive, default=20, metavar="N",
                      help="requests per concurrency level (the seed's send_count; default: 20)")
    load.add_argument("--warmup", type=int, default=1, metavar="N",
                      help="requests sent first and not counted (default: 1)")
    load.add_argument("--timeout", type=float, default=600.0, metavar="S",
                      help="seconds one request may take (default: 600)")
    inputs = parser.add_argument_group("inputs (default: the seed's chat request)")
    inputs.add_argument("--input-data", type=Path, metavar="FILE.json",
                        help="requests in perf_analyzer's JSON format, sent in turn")
    inputs.add_argument("--prompt", default="请给出一个具体示例", help="the seed request's prompt")
    inputs.add_argument("-t", "--temperature", default="0.01", help="the seed's temperature (default: 0.01)")
    inputs.add_argument("--max-token", default="16000",
                        help="the seed's max_token: prompt and reply tokens (default: 16000)")
    inputs.add_argument("--history-len", default="10", help="the seed's history_len (default: 10)")
    inputs.add_argument("--max-tokens", type=_positive, metavar="N",
                        help="cap each reply at N new tokens (chat models: max_new_tokens; OpenAI: max_tokens)")
    inputs.add_argument("--ignore-eos", action="store_true",
                        help="every reply runs to --max-tokens past the model's end of turn (vLLM's and "
                             "llama.cpp's ignore_eos), so that each request generates the same number of tokens")
    out = parser.add_argument_group("output")
    out.add_argument("--report", type=Path, metavar="FILE.json", help="write every figure as JSON")
    out.add_argument("--plots", type=Path, metavar="DIR",
                     help="write latency_distribution.png and concurrency.png (matplotlib)")
