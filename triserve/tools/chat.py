"""``triserve chat``: talk to a chat model in the terminal.

Over the OpenAI routes (``/v1/chat/completions``, streamed) of a running server
(``--url``), or of one it starts itself on a model repository (the default one
unless ``--model-repository`` says otherwise) and stops on exit. The whole
conversation is sent with every turn. Commands: ``/reset``, ``/system TEXT``,
``/exit`` (also Ctrl-D); Ctrl-C stops a reply midway.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape

from triserve.tools import openai_http
from triserve.tools.embedded import EmbeddedServer

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone: show it; /system - : none)
  /exit           leave (also /quit, Ctrl-D); Ctrl-C stops a reply midway"""


@dataclass
class Conversation:
    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns, {"role": "user", "content": prompt}]


@dataclass
class Reply:
    text: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    first_token_s: float | None = None
    seconds: float = 0.0
    stopped: bool = False


class Chat:
    def __init__(self, client: httpx.Client, model: str, sampling: dict[str, Any], console: Console):
        self.client = client
        self.model = model
        self.sampling = sampling
        self.console = console
        self.conversation = Conversation()

    def ask(self, prompt: str) -> Reply:
        """Stream the model's reply to stdout as it comes; Ctrl-C stops it (what came is kept)."""
        body = {"model": self.model, "messages": self.conversation.messages(prompt), "stream": True,
                "stream_options": {"include_usage": True}, **self.sampling}
        reply = Reply()
        started = time.monotonic()
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise RuntimeError(openai_http.error_text(response))
                for chunk in openai_http.sse_chunks(response.iter_lines()):
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
                    reply.usage = chunk.get("usage") or reply.usage
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if reply.first_token_s is None:
                                reply.first_token_s = time.monotonic() - started
                            reply.text += piece
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                        reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
        except KeyboardInterrupt:  # closing the stream tells the server to stop generating
            reply.stopped = True
        reply.seconds = time.monotonic() - started
        sys.stdout.write("\n")
        self.conversation.turns += [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": reply.text}]
        return reply

    def summary(self, reply: Reply) -> str:
        parts = []
        if reply.stopped:
            parts.append("stopped")
        if reply.usage:
            completion = reply.usage["completion_tokens"]
            parts.append(f"{completion} tokens, {completion / max(reply.seconds, 1e-6):.1f} tokens/s, "
                         f"prompt {reply.usage['prompt_tokens']} tokens")
        if reply.first_token_s is not None:
            parts.append(f"first token {reply.first_token_s * 1000:.0f} ms")
        if reply.finish_reason:
            parts.append(f"finish: {reply.finish_reason}")
        return " · ".join(parts)

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.conversation.turns.clear()
            self.console.print("[dim]conversation forgotten[/dim]", highlight=False)
        elif name == "/system":
            if argument == "-":
                self.conversation.system = ""
                self.console.print("[dim]no system prompt[/dim]")
            elif argument:
                self.conversation.system = argument
                self.console.print("[dim]system prompt set[/dim]")
            else:
                self.console.print(f"[dim]system prompt: {self.conversation.system or '(none)'}[/dim]",
                                   highlight=False, markup=False)
        else:
            self.console.print(HELP, highlight=False, markup=False)
        return True

    def loop(self) -> None:
        self.console.print(f"[bold]triserve chat[/bold] with [cyan]{escape(self.model)}[/cyan] "
                           f"(/help for commands, /exit to leave)", highlight=False)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                sys.stdout.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            sys.stdout.write(f"{self.model}> ")
            sys.stdout.flush()
            try:
                reply = self.ask(line)
            except (RuntimeError, httpx.HTTPError) as exc:
                self.console.print(f"[red]error:[/red] {escape(str(exc))}")
                continue
            self.console.print(f"[dim]{self.summary(reply)}[/dim]", highlight=False)


def run(args: argparse.Namespace) -> int:
    if args.url and args.model_repository:
        raise SystemExit("triserve chat: give --url (a running server) or --model-repository, not both")
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?'
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console(highlight=False)
    sampling = {key: value for key, value in (("temperature", args.temperature), ("top_p", args.top_p),
                                              ("max_tokens", args.max_tokens), ("seed", args.seed))
                if value is not None}
    with contextlib.ExitStack() as stack:
        if args.url:
            url = openai_http.root_url(args.url)
        else:
            from triserve.options import DEFAULT_REPOSITORY

            repository = args.model_repository or DEFAULT_REPOSITORY
            if not repository.is_dir():
                raise SystemExit(f"triserve chat: --model-repository {repository} is not a directory")
            try:
                url = stack.enter_context(EmbeddedServer(repository, console)).url
            except RuntimeError as exc:
                console.print(f"[red]error:[/red] {escape(str(exc))}")
                return 1
        client = stack.enter_context(httpx.Client(base_url=url, headers=openai_http.headers(args.api_key),
                                                  timeout=httpx.Timeout(10, read=None)))
        try:
            models = openai_http.chat_models(client)
        except (RuntimeError, httpx.HTTPError) as exc:
            console.print(f"[red]error:[/red] {url}: {escape(str(exc))}")
            return 1
        model = args.model or (models[0] if models else None)
        if model not in models:
            wanted = f"named {escape(model)!r}" if model else "at all"
            console.print(f"[red]error:[/red] {url} serves no chat model {wanted}; "
                          f"its chat models: {escape(', '.join(models)) or 'none'}")
            return 1
        chat = Chat(client, model, sampling, console)
        chat.conversation.system = args.system
        chat.loop()
    return 0
