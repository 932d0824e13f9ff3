"""The seed-style memory table, one row per weight format, measured in-process on the engine.

The seed printed ChatGLM2-6B's memory per quantization (fp16 13 GB, int8 8 GB, int4 5.5 GB).
This is ours for SmolLM2-135M-Instruct: each format is loaded in its own process (so peak RSS is
its own), then measured:

  weight bytes     what the engine holds for its weights (packed int4/int8, scales, norms)
  RSS              after load, and the peak over the whole measurement
  tokens/s         decode steps of batch 1 (one user alone) and batch 16 (16 clients), 64-token context
  quality          over bench/llm/quality_text.txt (a fixed text shipped in the repo), teacher-forced:
                   agreement of each position's greedy token with the bf16 reference, and perplexity

The bf16 reference is the GGUF dequantized by transformers and saved as safetensors (the checkpoint a
user would have); int8/int4 are that checkpoint with ``quantization`` set; "GGUF Q4_1" is the file as
shipped, its blocks kept as they are.

    .venv/bin/python -m bench.llm.quantization_table [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from bench.llm.weights import GGUF_FILE, weights_dir
from bench.report import markdown_table, results_dir
from triserve.backends.llm.engine import EngineConfig, LLMEngine
from triserve.backends.llm.loader import LLMSettings, load_model
from triserve.cache import cache_dir, file_sha256

TEXT = Path(__file__).resolve().parent / "quality_text.txt"
#: label -> (model: "gguf" | "dense", dtype, quantization, head_quantization, cpu_kernels)
FORMATS = {
    "bf16 (reference)": ("dense", "bfloat16", "none", "none", "torch"),
    "float32": ("dense", "float32", "none", "none", "torch"),
    "int8 (quantization: int8), torch's kernel": ("dense", "bfloat16", "int8", "none", "torch"),
    "int4 (quantization: int4), torch's kernel": ("dense", "bfloat16", "int4", "none", "torch"),
    "int4, head int4, torch's kernel": ("dense", "bfloat16", "int4", "int4", "torch"),
    "GGUF Q4_1, head Q8_0 as stored (int8), torch's kernel": ("gguf", "bfloat16", "none", "none", "torch"),
    "GGUF Q4_1, head int4 (head_quantization: int4), torch's kernel": ("gguf", "bfloat16", "none", "int4", "torch"),
    "GGUF Q4_1, head ranked in int8, torch's kernel": ("gguf", "bfloat16", "none", "int8", "torch"),
    "int8 (quantization: int8), VNNI kernels": ("dense", "bfloat16", "int8", "none", "vnni"),
    "int4 (quantization: int4), VNNI kernels": ("dense", "bfloat16", "int4", "none", "vnni"),
    "GGUF Q4_1, head ranked in int8, VNNI kernels (the default)": ("gguf", "bfloat16", "none", "int8", "vnni"),
}


def dense_checkpoint() -> Path:
    """The GGUF dequantized to a safetensors folder by transformers, made once."""
    gguf = weights_dir() / GGUF_FILE
    target = cache_dir("bench") / f"dense-{file_sha256(gguf)}"
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print(f"dequantizing {gguf.name} into {target} (once)", flush=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True))
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def measure_one(label: str, threads: int, logits_path: Path) -> dict:
    kind, dtype, quantization, head_quantization, cpu_kernels = FORMATS[label]
    model = weights_dir() / GGUF_FILE if kind == "gguf" else dense_checkpoint()
    torch.set_num_threads(threads)
    config = EngineConfig(max_model_len=1024, max_num_seqs=16, dtype=dtype, quantization=quantization,
                          head_quantization=head_quantization, cpu_kernels=cpu_kernels, kv_cache_bytes=1 << 30)
    settings = LLMSettings(model, config)
    started = time.monotonic()
    source, tokenizer = load_model(settings, logging.getLogger("bench"))
    engine = LLMEngine(source, config)
    del source
    load_s = time.monotonic() - started
    rss_loaded = psutil.Process().memory_info().rss
    runner, cache = engine.runner, engine.kv_cache
    text_ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"][: config.max_model_len]
    rates = {}
    with torch.inference_mode():
        logits = runner.prompt_logits(cache, text_ids)
        torch.save(logits, logits_path)
        for batch in (1, 16):
            from triserve.backends.llm.model_runner import PrefillChunk

            context = 64
            runner.prefill(cache, [PrefillChunk(slot, text_ids[:context], 0) for slot in range(batch)])
            times = []
            for step in range(24):
                started = time.perf_counter()
                runner.decode(cache, [text_ids[context + step]] * batch, [context + step] * batch).argmax(-1)
                times.append(time.perf_counter() - started)
            times.sort()
            rates[batch] = batch / times[len(times) // 2]
    return {"label": label, "weight_bytes": runner.weight_bytes, "load_s": load_s,
            "rss_loaded_bytes": rss_loaded,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kv_reserved_bytes": cache.bytes_reserved, "tokens_s_1": rates[1], "tokens_s_16": rates[16],
            "text_tokens": len(text_ids)}


def quality(logits: torch.Tensor, reference: torch.Tensor, token_ids: list[int]) -> tuple[float, float]:
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    targets = torch.tensor(token_ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets).item()
    return agreement, math.exp(nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--formats", nargs="+", type=int, metavar="INDEX",
                        help="only these rows (0-based; the bf16 reference, row 0, is always measured)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure one format
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.threads, Path(args.logits))))
        return
    out = results_dir("quantization")
    dense_checkpoint()
    print(f"results: {out}; load average {os.getloadavg()}", flush=True)
    rows = []
    for index, label in enumerate(FORMATS):
        if args.formats and index and index not in args.formats:
            continue
        logits_path = out / f"logits-{index}.pt"
        child = subprocess.run([sys.executable, "-m", "bench.llm.quantization_table", "--one", label,
                                "--threads", str(args.threads), "--logits", str(logits_path)],
                               capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{label}: {result}", flush=True)
        rows.append((result, logits_path))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense_checkpoint())
    text_ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"][:1024]
    reference = torch.load(rows[0][1])
    table = []
    for result, logits_path in rows:
        agreement, perplexity = quality(torch.load(logits_path), reference, text_ids)
        result.update(agreement=agreement, perplexity=perplexity)
        table.append([result["label"], result["weight_bytes"] / 1e6, result["rss_loaded_bytes"] / 1e6,
                      result["peak_rss_bytes"] / 1e6, result["tokens_s_1"], result["tokens_s_16"],
                      100 * agreement, perplexity])
    summary = markdown_table(
        ["weights", "weight MB", "RSS after load MB", "peak RSS MB", "tokens/s batch 1", "tokens/s batch 16",
         "greedy agreement with bf16 %", "perplexity"], table, [0, 1, 0, 0, 1, 1, 1, 2])
    summary += (f"\n\n{len(text_ids)} tokens of bench/llm/quality_text.txt; {args.threads} thread(s); "
                f"load average at end {os.getloadavg()}\n")
    (out / "raw.json").write_text(json.dumps([r for r, _ in rows], indent=2))
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
