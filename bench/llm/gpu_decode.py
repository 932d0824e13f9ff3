"""The decode step on a GPU with and without CUDA graphs, side by side, in-process.

    .venv/bin/python -m bench.llm.gpu_decode                       # SmolLM2-135M's shape, bfloat16
    .venv/bin/python -m bench.llm.gpu_decode --batch 1 8 16 --context 512 --dtype float16

The default model's checkpoint is a quantized GGUF, which runs on the CPU only, so the model
here is a randomly initialised Llama of SmolLM2-135M-Instruct's shape (30 layers, 576 wide, 9
query and 3 KV heads, 49152 tokens): step times depend on the shapes, not on the values. Two
engines are loaded (``cuda_graphs`` false, then true), each prefills ``--context`` tokens per
sequence and times ``--steps`` decode steps (median; rounds alternate the engines). Before
timing, the two engines' greedy tokens over 16 steps are compared (float32 only: in reduced
precision the padded step's sums may differ in the last bits). Prints the card's name.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.llm.decode_step import step_times
from triserve.backends.llm.engine import EngineConfig, LLMEngine
from triserve.backends.llm.model_runner import PrefillChunk

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def greedy(engine: LLMEngine, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of one sequence in slot 0, through the runner (prefill, then decode steps)."""
    runner, cache = engine.runner, engine.kv_cache
    with torch.inference_mode():
        token = int(runner.prefill(cache, [PrefillChunk(0, prompt, 0)])[0].argmax())
        tokens = [token]
        for step in range(steps - 1):
            token = int(runner.decode(cache, [token], [len(prompt) + step])[0].argmax())
            tokens.append(token)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    engines = {}
    for graphs in (False, True):
        engine = LLMEngine(model, EngineConfig(max_num_seqs=max(args.batch), max_model_len=args.max_model_len,
                                               dtype=args.dtype, device=args.device, cuda_graphs=graphs,
                                               kv_cache_bytes=4 << 30))
        engines[graphs] = engine
        print(f"cuda_graphs {str(graphs).lower()}: captured sizes "
              f"{engine.runner.graphs.sizes if engine.runner.graphs else None}", flush=True)
    if args.dtype == "float32":
        prompt = list(range(1000, 1000 + args.context))
        same = greedy(engines[False], prompt, 16) == greedy(engines[True], prompt, 16)
        print(f"greedy tokens equal with and without graphs: {same}", flush=True)
    results: dict[tuple[int, bool], list[float]] = {}
    for _ in range(args.rounds):
        for batch in args.batch:
            for graphs, engine in engines.items():
                results.setdefault((batch, graphs), []).extend(step_times(engine, batch, args.context,
                                                                          args.steps)[5:])
    for batch in args.batch:
        eager = statistics.median(results[(batch, False)])
        graphed = statistics.median(results[(batch, True)])
        print(f"batch {batch:2d}: eager {eager * 1e3:6.2f} ms/step ({batch / eager:7.1f} tokens/s), "
              f"graphs {graphed * 1e3:6.2f} ms/step ({batch / graphed:7.1f} tokens/s): {eager / graphed:.2f}x",
              flush=True)
    print(f"graph replays: {engines[True].runner.graph_steps}")


if __name__ == "__main__":
    main()
