"""Batch-N decode step of the engine, measured in-process (no server): ms per step and where it goes.

    .venv/bin/python -m bench.llm.decode_step                      # the default repository's smollm2
    .venv/bin/python -m bench.llm.decode_step --batch 1 16 --threads 1 2 --profile
    .venv/bin/python -m bench.llm.decode_step --set quantization=int4 --set dtype=bfloat16
    .venv/bin/python -m bench.llm.decode_step --batch 1 --threads 1 2 --bandwidth --rounds 3

Each measurement prefills ``--context`` tokens per sequence, then times ``--steps``
decode steps (median step time). ``--bandwidth`` puts each batch-1 step against the
memory-bandwidth ceiling measured in the same run: the weight bytes the step reads over the
read bandwidth of memory (a buffer past the cache) and over that of a buffer of the weights'
own size (the ceiling where they stay in the last-level cache). ``--profile`` prints torch.profiler's top operators
of a batch-1 step. Figures and findings: bench/llm/NOTES.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from bench.llm.bandwidth import read_bandwidth_gb_s
from triserve.backends.llm.loader import LLMSettings, load_model
from triserve.backends.llm.engine import LLMEngine
from triserve.backends.llm.model_runner import PrefillChunk
from triserve.core.config import CONFIG_FILENAME, parse_config

REPOSITORY = Path(__file__).resolve().parents[2] / "triserve" / "model_repository" / "smollm2"


def load_engine(overrides: dict[str, str]) -> LLMEngine:
    path = REPOSITORY / CONFIG_FILENAME
    config = parse_config(path.read_text(), str(path))
    for key, value in overrides.items():
        config.parameters[key].string_value = value
    settings = LLMSettings.from_config(config, REPOSITORY)
    model, _ = load_model(settings, logging.getLogger("bench"))
    return LLMEngine(model, settings.engine)


def step_times(engine: LLMEngine, batch: int, context: int, steps: int,
               profiler: torch.profiler.profile | None = None) -> list[float]:
    runner, cache = engine.runner, engine.kv_cache
    prompt = list(range(1000, 1000 + context))
    with torch.inference_mode():
        if hasattr(cache, "reserve"):  # the growing cache of the first release
            cache.reserve(batch, context + steps)
        runner.prefill(cache, [PrefillChunk(slot, prompt, 0) for slot in range(batch)])
        times = []
        if profiler is not None:  # the decode steps only, not the prefill
            profiler.start()
        for step in range(steps):
            positions = [context + step] * batch
            started = time.perf_counter()
            logits = runner.decode(cache, [1000 + step] * batch, positions)
            logits.argmax(dim=-1).tolist()
            times.append(time.perf_counter() - started)
        if profiler is not None:
            profiler.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every variant this many times, alternating (A B A B ...)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--bandwidth", action="store_true",
                        help="batch-1 steps as a fraction of the memory-bandwidth ceiling (same run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config parameter of the default repository's smollm2 (all variants)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="a second (third, ...) engine with these overrides, measured side by side "
                             "with the first (ratios to it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common = dict(item.split("=", 1) for item in args.set)
    variants = [("base", common)] + [
        (text, {**common, **dict(item.split("=", 1) for item in text.split(","))}) for text in args.variant]
    engines = []
    for name, overrides in variants:
        started = time.monotonic()
        engine = load_engine(overrides)
        runner = engine.runner
        engines.append(engine)
        print(f"[{name}] loaded in {time.monotonic() - started:.1f} s: {runner.architecture}, weights "
              f"{runner.weight_bytes / 1e6:.1f} MB, KV reserved {engine.kv_cache.bytes_reserved / 1e6:.0f} MB",
              flush=True)
    results: dict[tuple[int, int, int], list[float]] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            for batch in args.batch:
                for index, engine in enumerate(engines):
                    torch.set_num_threads(threads)
                    times = step_times(engine, batch, args.context, args.steps)[5:]
                    results.setdefault((threads, batch, index), []).extend(times)
    for threads in args.threads:
        for batch in args.batch:
            base = None
            for index, (name, _) in enumerate(variants):
                times = results[(threads, batch, index)]
                median = statistics.median(times)
                base = base or median
                print(f"threads {threads} batch {batch:2d} [{name}]: step {median * 1e3:6.1f} ms "
                      f"(min {min(times) * 1e3:.1f}) = {batch / median:6.1f} tokens/s, "
                      f"{base / median:.2f}x base", flush=True)
    if args.bandwidth and 1 in args.batch:
        for threads in args.threads:
            memory = read_bandwidth_gb_s(threads)
            for index, (name, _) in enumerate(variants):
                weight_mb = engines[index].runner.weight_bytes / 1e6
                same_size = read_bandwidth_gb_s(threads, max(1, round(weight_mb)))
                step_ms = statistics.median(results[(threads, 1, index)]) * 1e3
                print(f"threads {threads} [{name}]: {weight_mb:.1f} MB a step in {step_ms:.2f} ms = "
                      f"{weight_mb / step_ms:.1f} GB/s; memory read bandwidth {memory:.1f} GB/s (floor "
                      f"{weight_mb / memory:.2f} ms): {weight_mb / memory / step_ms:.0%} of the ceiling; "
                      f"a {weight_mb:.0f} MB buffer read warm {same_size:.1f} GB/s: "
                      f"{weight_mb / same_size / step_ms:.0%}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.profile:
        for (name, _), engine in zip(variants, engines):
            torch.set_num_threads(args.threads[0])
            step_times(engine, 1, args.context, 5)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            step_times(engine, 1, args.context, 10, prof)
            print(f"[{name}] batch 1, 10 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
