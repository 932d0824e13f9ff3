"""torch's int4 kernel against triserve's VNNI kernel, side by side, on SmolLM2-135M's shapes.

    .venv/bin/python -m bench.llm.cpu_kernelss                   # threads 1 2, rows 1 4 16 512
    .venv/bin/python -m bench.llm.cpu_kernelss --threads 1 --rows 1

One "step" multiplies the activations by the int4 projections of all 30 layers (q/k/v fused,
o, gate/up fused, down: 66 MB at 5 bits a weight, distinct random weights per layer, so they are
read from memory or the last-level cache as a decode step reads them), once with
``_weight_int4pack_mm_for_cpu`` (bfloat16 activations) and once with
``torch.ops.triserve.int4_vnni_linear`` (int8 activations), alternating; median of the steps.
Rows: 1 is a stream alone, 4 and 16 a batch of sequences decoding together, 512 a prefill chunk.
Findings: bench/llm/NOTES.md ("Fourth pass").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from triserve.backends.llm import kernels
from triserve.backends.llm.quantization import Int4Linear, Int4Weight, Int8Linear, Int8Weight

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]: qkv, o, gate_up, down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 512])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    why = kernels.load()
    if why is not None:
        raise SystemExit(f"the VNNI kernel cannot run here: {why}")
    for kind in args.kinds:
        measure(kind, args)


def measure(kind: str, args: argparse.Namespace) -> None:
    weight_kind, linear_kind = (Int4Weight, Int4Linear) if kind == "int4" else (Int8Weight, Int8Linear)
    torch.manual_seed(0)
    print(f"quantizing {LAYERS} layers of random weights to {kind} ...", flush=True)
    layers = []
    for _ in range(LAYERS):
        for out, inputs in SHAPES:
            weight = weight_kind.quantize(torch.randn(out, inputs))
            layers.append((inputs, linear_kind(weight, None, torch.bfloat16, "torch"),
                           linear_kind(weight, None, torch.bfloat16, "vnni")))
    megabytes = sum(vnni.nbytes for _, _, vnni in layers) / 1e6
    print(f"{megabytes:.1f} MB of {kind} weights a step (either kernel's layout); load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in SHAPES}}
            steps = max(3, args.steps if rows <= 16 else args.steps // 10)
            times: dict[str, list[float]] = {"torch": [], "vnni": []}
            for step in range(steps + 2):
                for name, index in (("torch", 1), ("vnni", 2)):
                    started = time.perf_counter()
                    for layer in layers:
                        layer[index](inputs[layer[0]])
                    if step >= 2:  # the first two warm up
                        times[name].append(time.perf_counter() - started)
            torch_ms, vnni_ms = (statistics.median(times[k]) * 1e3 for k in ("torch", "vnni"))
            print(f"{kind} threads {threads} rows {rows:4d}: torch {torch_ms:7.2f} ms ({megabytes / torch_ms:5.1f} GB/s)  "
                  f"vnni {vnni_ms:7.2f} ms ({megabytes / vnni_ms:5.1f} GB/s)  vnni is {torch_ms / vnni_ms:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
