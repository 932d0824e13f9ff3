"""The cost of constrained decoding per token: the same prompt with and without a JSON
schema, on one triserve serving the default model, in the same run.

Each round streams the prompt twice, greedy, alternating which goes first: once free,
once with ``response_format`` ``json_schema``. The figure is the time per generated token
after the first (inter-token time: decode steps, mask included, not the prefill), median
over the rounds, and the ratio constrained / free.

    python -m bench.guided_decoding [--rounds 8] [--max-tokens 48]

Writes bench/results/guided_decoding-<stamp>/summary.md and raw.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import openai

from bench.procs import REPO_ROOT, triserve_server
from bench.report import markdown_table, ratio, results_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "mood", "hobbies", "address"],
}
PROMPT = [{"role": "user", "content": "Describe a person: name, age, mood, hobbies and city."}]


def one_run(client: openai.OpenAI, max_tokens: int, guided: bool) -> dict[str, float]:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}} \
        if guided else {}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                **extra):
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
    return {"tokens": tokens, "ttft_s": (first or start) - start,
            "inter_token_ms": (last - first) / max(tokens - 1, 1) * 1e3 if first else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    out = results_dir("guided_decoding")
    runs: dict[str, list[dict[str, float]]] = {"free": [], "json_schema": []}
    with triserve_server(REPO_ROOT / "triserve" / "model_repository", out) as server, \
            openai.OpenAI(base_url=f"http://{server.http_url}/v1", api_key="unused", timeout=300) as client:
        for warmup in (False, True):
            one_run(client, 8, warmup)
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for guided in order:
                result = one_run(client, args.max_tokens, guided)
                runs["json_schema" if guided else "free"].append(result)
                print(f"round {round_ + 1}/{args.rounds} {'json_schema' if guided else 'free':11} "
                      f"{result['tokens']:3d} tokens, {result['inter_token_ms']:.1f} ms/token", flush=True)
    medians = {name: statistics.median(r["inter_token_ms"] for r in results) for name, results in runs.items()}
    rows = [[name, statistics.median(r["tokens"] for r in results), medians[name],
             statistics.median(r["ttft_s"] for r in results) * 1e3] for name, results in runs.items()]
    summary = (f"# Constrained decoding cost ({args.rounds} rounds, greedy, max_tokens {args.max_tokens})\n\n"
               + markdown_table(["run", "tokens (median)", "ms/token after the first (median)", "TTFT ms (median)"],
                                rows, [0, 0, 2, 1])
               + f"\n\nratio json_schema / free, per token: **{ratio(medians['json_schema'], medians['free']):.2f}**\n")
    (out / "summary.md").write_text(summary)
    (out / "raw.json").write_text(json.dumps(runs, indent=1))
    print(summary)


if __name__ == "__main__":
    main()
