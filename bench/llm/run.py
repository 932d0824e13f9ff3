"""The LLM benchmark: triserve's engine against two baselines, side by side in one run.

Servers run one at a time (each alone on the machine), each given the same
multi-turn chat load:

  triserve      the default repository's ``smollm2`` (backend "llm"), streamed over gRPC
  fastapi       bench/llm/fastapi_baseline.py: FastAPI + uvicorn + one transformers generate per request
  seed          bench/llm/seed_style_repository: the seed's Python-backend model.py, served by triserve

then triserve alone for: a num_threads sweep, batch-1 decode speed against the
memory-bandwidth floor, and time to first token over a long conversation with
the prefix cache on and off (repository copies with the parameter changed).

    .venv/bin/python -m bench.llm.run            # the full run (see bench/README.md for timings)
    .venv/bin/python -m bench.llm.run --clients 2 --turns 2 --new-tokens 16 --kv-turns 3   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from google.protobuf import text_format

from bench.llm.bandwidth import read_bandwidth_gb_s, weight_bytes
from bench.llm.clients import ChatClient, FastAPIClient, SeedStyleClient, TriserveStreamClient, Turn
from bench.llm.workload import FOLLOW_UPS, TOPICS, LoadResult, Tokens, run_conversations
from bench.procs import PeakRss, ServerProcess, free_port, triserve_server
from bench.report import fmt, markdown_table, ratio, results_dir
from triserve.backends.llm.loader import LLMSettings
from triserve.core.config import CONFIG_FILENAME, parse_config, read_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPOSITORY = REPO_ROOT / "triserve" / "model_repository"
LLM_MODEL = "smollm2"
SEED_REPOSITORY = Path(__file__).resolve().parent / "seed_style_repository"
SEED_MODEL = "smollm2_seed"
ClientFactory = Callable[[], ChatClient]
KV_TOPIC = "the history of chess"  # no load conversation uses it, so its turns start uncached


def repository_copy(source: Path, dest: Path, model: str, parameters: dict[str, str]) -> Path:
    """A copy of ``source`` whose ``model`` config has ``parameters`` set (added or replaced)."""
    shutil.copytree(source, dest)
    path = dest / model / CONFIG_FILENAME
    config = parse_config(path.read_text(), str(path))
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    path.write_text(text_format.MessageToString(config))
    return dest


def fastapi_server(log_dir: Path, env: dict[str, str]) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name="fastapi", command=[sys.executable, "-m", "bench.llm.fastapi_baseline", "--port", str(port)],
        ready_url=f"http://127.0.0.1:{port}/health", log_path=log_dir / "fastapi.log", env=env,
        http_port=port)


class Bench:
    """One benchmark run: its settings, its tokenizer, and where its results go."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = results_dir("llm")
        self.tokens = Tokens()
        self.raw: dict = {"args": vars(args), "sweep": [], "failures": {}}
        self.loads: list[LoadResult] = []
        # torch in both baselines takes its thread count from OMP_NUM_THREADS (default: all cores)
        self.baseline_env = {"OMP_NUM_THREADS": str(args.baseline_threads)} if args.baseline_threads else {}
        print(f"results: {self.out}", flush=True)

    def run_phase(self, name: str, phase: Callable[[], None]) -> None:
        """Run one server's measurements; a failure is recorded and the other servers still run."""
        try:
            phase()
        except Exception as exc:  # noqa: BLE001 - reported in the summary, the run goes on
            self.raw["failures"][name] = repr(exc)
            print(f"[{name}] FAILED: {exc!r}", flush=True)

    def triserve_default(self) -> None:
        """The default repository: the load, batch-1 decode and the floor, the long conversation."""
        with triserve_server(DEFAULT_REPOSITORY, self.out, "triserve") as server:
            make = self.triserve_client(server)
            self.loads.append(self.load("triserve", server, make))
            if self.args.decode_runs:
                self.raw["decode"] = self.decode_speed(make)
                self.raw["floor"] = decode_floor(self.raw["decode"])  # bandwidth measured now, as decode was
            if self.args.kv_turns:
                self.raw["kv_on"] = self.long_conversation(make, "prefix cache on")

    def triserve_prefix_cache_off(self) -> None:
        repository = repository_copy(DEFAULT_REPOSITORY, self.out / "repo-prefix-off", LLM_MODEL,
                                     {"prefix_cache_mb": "0"})
        with triserve_server(repository, self.out, "triserve-prefix-off") as server:
            self.raw["kv_off"] = self.long_conversation(self.triserve_client(server), "prefix cache off")

    def triserve_threads(self, threads: int) -> None:
        repository = repository_copy(DEFAULT_REPOSITORY, self.out / f"repo-threads-{threads}", LLM_MODEL,
                                     {"num_threads": str(threads)})
        with triserve_server(repository, self.out, f"triserve-threads-{threads}") as server:
            result = self.load(f"triserve num_threads={threads}", server, self.triserve_client(server))
            self.raw["sweep"].append({"threads": threads, **result.summary()})

    def fastapi(self) -> None:
        with fastapi_server(self.out, self.baseline_env) as server:
            self.loads.append(self.load("fastapi", server,
                                        lambda: FastAPIClient(server.http_url, self.args.request_timeout_s)))

    def seed_style(self) -> None:
        with triserve_server(SEED_REPOSITORY, self.out, "seed-style", env=self.baseline_env) as server:
            self.loads.append(self.load(
                "seed-style (triserve python backend)", server,
                lambda: SeedStyleClient(server.grpc_url, SEED_MODEL, self.args.request_timeout_s)))

    def triserve_client(self, server: ServerProcess) -> ClientFactory:
        return lambda: TriserveStreamClient(server.grpc_url, LLM_MODEL, self.args.request_timeout_s)

    def load(self, label: str, server: ServerProcess, make_client: ClientFactory) -> LoadResult:
        """The multi-turn load against a running server, after one short warm-up turn."""
        args = self.args
        self.turn(make_client, "Say hello.", [], new_tokens=8)
        with PeakRss(server.pid) as rss:
            result = asyncio.run(run_conversations(
                label, make_client, self.tokens, args.clients, args.turns, args.new_tokens,
                args.deadline_s))
        result.peak_rss_kb = rss.peak_kb
        return result

    def turn(self, make_client: ClientFactory, prompt: str, history: list[str], new_tokens: int) -> Turn:
        """One turn on a fresh client (warm-ups and single-sequence measurements)."""
        async def one() -> Turn:
            client: ChatClient = make_client()
            try:
                max_length = self.tokens.prompt_length(prompt, history) + new_tokens
                return await asyncio.wait_for(client.chat(prompt, history, new_tokens, max_length),
                                              self.args.request_timeout_s)
            finally:
                await client.close()
        return asyncio.run(one())

    def decode_speed(self, make_client: ClientFactory) -> list[dict]:
        """Batch-1 decode tokens/s: (tokens - 1) / (latency - time to first token), one sequence alone."""
        runs = []
        for i in range(self.args.decode_runs):
            prompt = FOLLOW_UPS[0].format(topic=TOPICS[-1 - i % len(TOPICS)])
            t = self.turn(make_client, prompt, [], self.args.new_tokens)
            n = t.server_completion_tokens or self.tokens.count(t.text)
            runs.append({"tokens": n, "ttft_s": t.ttft_s, "latency_s": t.latency_s,
                         "decode_tok_s": (n - 1) / (t.latency_s - t.ttft_s) if n > 1 else math.nan})
            print(f"[decode] run {i + 1}: {runs[-1]['decode_tok_s']:.1f} tokens/s", flush=True)
        return runs

    def long_conversation(self, make_client: ClientFactory, label: str) -> list[dict]:
        """Time to first token of every turn of one ``kv_turns``-turn conversation."""
        history: list[str] = []
        turns = []
        for i in range(self.args.kv_turns):
            prompt = FOLLOW_UPS[i % len(FOLLOW_UPS)].format(topic=KV_TOPIC)
            prompt_tokens = self.tokens.prompt_length(prompt, history)
            t = self.turn(make_client, prompt, history, self.args.new_tokens)
            history += [prompt, t.text]
            turns.append({"turn": i + 1, "prompt_tokens": prompt_tokens, "ttft_s": t.ttft_s,
                          "cached_tokens": t.cached_tokens})
            print(f"[{label}] turn {i + 1}: prompt {prompt_tokens} tokens, TTFT {t.ttft_s * 1000:.0f} ms, "
                  f"cached {t.cached_tokens}", flush=True)
        return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", choices=["triserve", "fastapi", "seed"],
                    default=["triserve", "fastapi", "seed"])
    ap.add_argument("--clients", type=int, default=16, help="concurrent conversations")
    ap.add_argument("--turns", type=int, default=3, help="turns per conversation")
    ap.add_argument("--new-tokens", type=int, default=64, help="reply bound per turn (greedy)")
    ap.add_argument("--deadline-s", type=float, default=1800, help="time bound of each load")
    ap.add_argument("--request-timeout-s", type=float, default=900)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2],
                    help="engine num_threads values to sweep (none: skip)")
    ap.add_argument("--baseline-threads", type=int, default=None,
                    help="torch threads of fastapi and seed-style (default: torch's, all cores)")
    ap.add_argument("--decode-runs", type=int, default=3, help="batch-1 decode measurements (0: skip)")
    ap.add_argument("--kv-turns", type=int, default=10, help="turns of the prefix-cache conversation (0: skip)")
    args = ap.parse_args()
    bench = Bench(args)
    if "triserve" in args.targets:
        bench.run_phase("triserve", bench.triserve_default)
        if args.kv_turns:
            bench.run_phase("triserve prefix cache off", bench.triserve_prefix_cache_off)
        for threads in args.threads:
            bench.run_phase(f"triserve num_threads={threads}", lambda: bench.triserve_threads(threads))
    if "fastapi" in args.targets:
        bench.run_phase("fastapi", bench.fastapi)
    if "seed" in args.targets:
        bench.run_phase("seed-style", bench.seed_style)

    raw = bench.raw
    raw["loads"] = [{**r.summary(), "errors": r.errors, "turns_raw": [asdict(t) for t in r.turns],
                     "tokens_raw": r.tokens} for r in bench.loads]
    raw["load_average"] = os.getloadavg()
    (bench.out / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
    text = summary(raw, bench.loads, args)
    (bench.out / "summary.md").write_text(text)
    print("\n" + text + f"\nresults in {bench.out}", flush=True)


def decode_floor(decode_runs: list[dict]) -> dict:
    model_dir = DEFAULT_REPOSITORY / LLM_MODEL
    settings = LLMSettings.from_config(read_config(model_dir), model_dir)
    weights = weight_bytes(settings)
    threads = settings.engine.threads
    bandwidth = read_bandwidth_gb_s(threads)
    floor_ms = weights.bytes_per_token / (bandwidth * 1e9) * 1000
    measured = statistics.median(r["decode_tok_s"] for r in decode_runs)
    return {"parameters": weights.parameters, "dtype": weights.dtype, "quantization": weights.quantization,
            "weight_mb_per_token": weights.bytes_per_token / 1e6, "threads": threads,
            "read_bandwidth_gb_s": bandwidth, "floor_ms_per_token": floor_ms,
            "ceiling_tok_s": 1000 / floor_ms, "measured_tok_s": measured,
            "fraction_of_ceiling": measured * floor_ms / 1000}


def summary(raw: dict, loads: list[LoadResult], args: argparse.Namespace) -> str:
    parts = []
    rows = [r.summary() for r in loads]
    ours = next((r for r in rows if r["label"] == "triserve"), None)
    parts.append(f"## {args.clients} concurrent {args.turns}-turn conversations, {args.new_tokens} new tokens "
                 "a turn (triserve ÷ baseline)\n\n"
                 "TTFT for the non-streaming servers (fastapi, seed-style) is the full latency. "
                 f"Baselines' torch threads: {args.baseline_threads or f'torch default ({os.cpu_count()} cores)'}"
                 "; triserve's engine: its num_threads (default all cores but one).\n\n" +
                 markdown_table(
                     ["server", "streams", "turns", "errors", "tokens", "server-reported tokens", "tokens/s",
                      "TTFT p50 ms",
                      "TTFT p99 ms", "e2e p50 ms", "e2e p99 ms", "peak RSS MB",
                      "triserve ÷ this tokens/s", "triserve ÷ this RSS"],
                     [[r["label"], "yes" if r["streams"] else "no (TTFT = e2e)", r["turns"], r["errors"],
                       r["tokens"], r["server_tokens"], r["tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                       r["latency_p50_ms"], r["latency_p99_ms"], r["peak_rss_mb"],
                       ratio(ours["tokens_per_s"], r["tokens_per_s"]) if ours else math.nan,
                       ratio(ours["peak_rss_mb"], r["peak_rss_mb"]) if ours else math.nan]
                      for r in rows],
                     digits=[0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 2]))
    if raw.get("sweep"):
        base = raw["sweep"][0]
        parts.append("## triserve engine num_threads sweep (same load)\n\n" + markdown_table(
            ["num_threads", "turns", "tokens/s", f"÷ num_threads={base['threads']}", "TTFT p50 ms",
             "e2e p50 ms", "peak RSS MB"],
            [[s["threads"], s["turns"], s["tokens_per_s"], ratio(s["tokens_per_s"], base["tokens_per_s"]),
              s["ttft_p50_ms"], s["latency_p50_ms"], s["peak_rss_mb"]] for s in raw["sweep"]],
            digits=[0, 0, 1, 2, 0, 0, 0]))
    if "floor" in raw:
        f = raw["floor"]
        parts.append("## Batch-1 decode against the memory-bandwidth floor\n\n" + markdown_table(
            ["parameters", "dtype / quantization", "weight MB per token", "threads", "read bandwidth GB/s",
             "floor ms/token", "ceiling tokens/s", "measured tokens/s (median)", "fraction of ceiling"],
            [[f["parameters"], f"{f['dtype']} / {f['quantization']}", f["weight_mb_per_token"], f["threads"],
              f["read_bandwidth_gb_s"], f["floor_ms_per_token"], f["ceiling_tok_s"], f["measured_tok_s"],
              f["fraction_of_ceiling"]]],
            digits=[0, 0, 0, 0, 1, 1, 1, 1, 2]))
    if raw.get("kv_on") and raw.get("kv_off"):
        on, off = raw["kv_on"], raw["kv_off"]
        later_on = [t["ttft_s"] * 1000 for t in on[1:]]
        later_off = [t["ttft_s"] * 1000 for t in off[1:]]
        mean_on = statistics.fmean(later_on) if later_on else math.nan
        mean_off = statistics.fmean(later_off) if later_off else math.nan
        parts.append(
            f"## KV reuse: time to first token over a {len(on)}-turn conversation\n\n"
            f"Turns 2-{len(on)}: mean TTFT {fmt(mean_on, 0)} ms with the prefix cache, {fmt(mean_off, 0)} ms "
            f"without (prefix_cache_mb=0); on ÷ off = {fmt(ratio(mean_on, mean_off))}.\n\n" + markdown_table(
                ["turn", "prompt tokens", "TTFT ms (cache on)", "cached tokens", "TTFT ms (cache off)",
                 "on ÷ off"],
                [[a["turn"], a["prompt_tokens"], a["ttft_s"] * 1000,
                  a["cached_tokens"] if a["cached_tokens"] is not None else "n/a",
                  b["ttft_s"] * 1000, ratio(a["ttft_s"], b["ttft_s"])] for a, b in zip(on, off)],
                digits=[0, 0, 0, 0, 0, 2]))
    if raw["failures"]:
        parts.append("## Failures\n\n" + "\n".join(f"- {name}: {error}" for name, error in raw["failures"].items()))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
