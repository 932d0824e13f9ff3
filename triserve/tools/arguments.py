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


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    pass
