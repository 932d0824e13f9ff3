"""What the engine is built from: a model's config, its weights by HF name, its generation config.

Three sources give the same shape: a loaded HF model (tests, and callers that
already hold one), a safetensors checkpoint folder (read one tensor at a time,
so quantizing never holds the whole float model), and a GGUF file (its
quantized blocks kept quantized, see :mod:`.gguf_weights`); a vision-language
checkpoint's text decoder is seen under the decoder's own names
(:class:`RenamedWeights`). The model runner
takes each weight out of ``weights`` as it builds its layers, so the float
originals are freed as soon as their engine form exists.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch


@dataclass
class ModelSource:
    config: Any  # transformers PretrainedConfig
    weights: MutableMapping[str, Any]  # HF name -> torch.Tensor or quantization.Weight
    generation_config: Any  # transformers GenerationConfig

    @classmethod
    def from_hf_model(cls, hf_model: torch.nn.Module) -> "ModelSource":
        weights = {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}
        if not getattr(hf_model.config, "architectures", None):  # as save_pretrained records it
            hf_model.config.architectures = [type(hf_model).__name__]
        return cls(hf_model.config, weights, hf_model.generation_config)


class SafetensorsWeights(MutableMapping):
    """A checkpoint folder's tensors, each read from its file when taken (``pop``)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [path.name for path in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise ValueError(f"{folder.name} has no .safetensors weights (other formats are not read)")
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in files}
        self._where = {key: name for name, handle in self._handles.items() for key in handle.keys()}

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("checkpoint weights are read-only")

    def __delitem__(self, key: str) -> None:
        del self._where[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class RenamedWeights(MutableMapping):
    """The weights whose names start with one of ``prefixes[p]``, seen as ``p`` + the rest."""

    def __init__(self, weights: MutableMapping[str, Any], prefixes: dict[str, tuple[str, ...]]):
        self._weights = weights
        self._sources: dict[str, str] = {}
        for source in weights:
            for target, options in prefixes.items():
                prefix = next((option for option in options if source.startswith(option)), None)
                if prefix is not None:
                    self._sources[target + source[len(prefix):]] = source
                    break

    def __contains__(self, key: object) -> bool:
        return key in self._sources

    def __getitem__(self, key: str) -> Any:
        return self._weights[self._sources[key]]

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("checkpoint weights are read-only")

    def __delitem__(self, key: str) -> None:
        del self._weights[self._sources.pop(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)
