"""Multi-turn chat conversations as load: what every server in the LLM benchmark is given.

N concurrent clients each hold one conversation: every turn sends the history
so far plus a new question and appends the reply. Questions ask for long
answers, so greedy decoding rarely stops before the token bound (none of the
APIs can ignore EOS); tokens are counted from the reply text with the model's
own tokenizer, one definition for every server. Loads are bounded in turns and
in time: at the deadline the unfinished turns are cancelled and reported.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from transformers import AutoTokenizer

from bench.llm.clients import ChatClient, Turn
from bench.llm.weights import GGUF_FILE, weights_dir
from bench.report import percentile

TOPICS = [
    "the Roman Empire", "the printing press", "the steam engine", "the Silk Road",
    "the French Revolution", "the history of medicine", "the exploration of space",
    "the Renaissance in Italy", "the invention of electricity", "ancient Egypt",
    "the Industrial Revolution", "the history of mathematics", "the Ming dynasty",
    "the history of aviation", "the age of sail", "the history of the internet",
]
FOLLOW_UPS = [
    "Write a long, detailed essay about {topic}.",
    "Continue with a long, detailed section about the economy and trade of {topic}.",
    "Now write a long, detailed section about the culture, people and legacy of {topic}.",
    "Describe in detail the most important events connected to {topic}.",
    "Write a long explanation of the technology involved in {topic}.",
    "Explain in detail how {topic} changed everyday life.",
    "Write a detailed section about the famous people connected to {topic}.",
    "Describe at length the problems and conflicts connected to {topic}.",
    "Write a long comparison of {topic} with a similar development elsewhere.",
    "Finish with a long, detailed summary of everything about {topic}.",
]


class Tokens:
    """The model's tokenizer and chat template, for lengths as the servers see them."""

    def __init__(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(weights_dir(), gguf_file=GGUF_FILE)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_length(self, prompt: str, history: list[str]) -> int:
        messages = []
        for i in range(0, len(history), 2):
            messages += [{"role": "user", "content": history[i]},
                         {"role": "assistant", "content": history[i + 1]}]
        messages.append({"role": "user", "content": prompt})
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"])


@dataclass
class LoadResult:
    label: str
    streams: bool
    turns: list[Turn] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # per turn, counted from the text
    errors: list[str] = field(default_factory=list)
    planned_turns: int = 0
    wall_s: float = 0.0
    timed_out: bool = False
    peak_rss_kb: int = 0

    def summary(self) -> dict:
        ttft = [t.ttft_s * 1000 for t in self.turns]
        latency = [t.latency_s * 1000 for t in self.turns]
        reported = [t.server_completion_tokens for t in self.turns]
        return {
            "label": self.label, "streams": self.streams,
            "turns": f"{len(self.turns)}/{self.planned_turns}",
            "errors": len(self.errors), "timed_out": self.timed_out,
            "tokens": sum(self.tokens),
            "server_tokens": sum(reported) if reported and None not in reported else "n/a",
            "tokens_per_s": sum(self.tokens) / self.wall_s if self.wall_s else float("nan"),
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "latency_p50_ms": percentile(latency, 50), "latency_p99_ms": percentile(latency, 99),
            "peak_rss_mb": self.peak_rss_kb / 1024,
        }


async def run_conversations(label: str, make_client: Callable[[], ChatClient], tokens: Tokens,
                            clients: int, turns: int, new_tokens: int, deadline_s: float) -> LoadResult:
    """``clients`` conversations of ``turns`` turns at once; bounded by ``deadline_s``."""
    chat_clients = [make_client() for _ in range(clients)]
    result = LoadResult(label, chat_clients[0].streams, planned_turns=clients * turns)
    started = time.perf_counter()

    async def conversation(index: int, client: ChatClient) -> None:
        topic = TOPICS[index % len(TOPICS)]
        history: list[str] = []
        for turn in range(turns):
            prompt = FOLLOW_UPS[turn % len(FOLLOW_UPS)].format(topic=topic)
            max_length = tokens.prompt_length(prompt, history) + new_tokens
            try:
                reply = await client.chat(prompt, history, new_tokens, max_length)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                result.errors.append(f"client {index} turn {turn}: {exc!r}")
                print(f"[{label}] error: client {index} turn {turn}: {exc!r}", flush=True)
                return
            result.turns.append(reply)
            result.tokens.append(tokens.count(reply.text))
            history += [prompt, reply.text]
            print(f"[{label}] {len(result.turns)}/{result.planned_turns} turns, "
                  f"{sum(result.tokens)} tokens, {time.perf_counter() - started:.1f} s", flush=True)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(conversation(i, c) for i, c in enumerate(chat_clients))), deadline_s)
    except asyncio.TimeoutError:
        result.timed_out = True
        print(f"[{label}] deadline of {deadline_s:.0f} s reached; unfinished turns cancelled", flush=True)
    finally:
        result.wall_s = time.perf_counter() - started
        for client in chat_clients:
            await client.close()
    return result
