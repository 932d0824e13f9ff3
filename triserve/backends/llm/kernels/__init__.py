"""The engine's own CPU kernels: int4 and int8 weights times int8 activations on AVX-512 VNNI.

torch ships no quantized CPU kernel that multiplies without first widening every weight
(``_weight_int4pack_mm_for_cpu`` unpacks each nibble to bfloat16, ``_weight_int8pack_mm``
each byte), which at one row and one thread, not the memory, sets the decode step's speed.
``vnni.cpp`` does what llama.cpp does on x86: activations quantized to int8 in blocks of
32, the weights multiplied by them as stored with VPDPBUSD. It is compiled with torch's C++
extension builder (gcc and ninja, ~10-20 s; ``scripts/install.sh`` does it, else the first
load of a quantized model) into
``~/.cache/triserve/kernels/<torch version>-<python>/`` (a new torch builds it anew: a build
against other torch headers is never loaded; ``TRISERVE_CACHE_DIR`` moves it), and registered as the
operators ``torch.ops.triserve.int4_vnni_linear`` and ``int8_vnni_linear``, which
``torch.compile`` calls like any other. :func:`load` says why when they cannot be used (no
AVX-512 VNNI, no compiler), and the engine then keeps torch's kernels.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import torch

from triserve.backends.llm.quantization import GROUP, TILE
from triserve.cache import cache_dir

SOURCE = Path(__file__).with_name("vnni.cpp")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp"]

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "error": why the kernel cannot run (None: it runs)
log = logging.getLogger("triserve.llm.kernels")


def _missing_cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(_CPU_FLAGS)
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in _CPU_FLAGS if flag not in present]
    return list(_CPU_FLAGS)


def build_directory() -> Path:
    """Where the kernel is built and cached: one folder per torch version and Python."""
    return cache_dir("kernels") / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def load() -> str | None:
    """Build (once per machine) and load the kernel; None when it runs, else why it cannot."""
    with _lock:
        if "error" in _state:
            return _state["error"]
        _state["error"] = _build()
        return _state["error"]


def _build() -> str | None:
    missing = _missing_cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if hasattr(torch.ops.triserve, "int8_vnni_linear"):
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
        build = build_directory()
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.info("building the VNNI kernels (once per torch version, ~10-20 s) in %s", build)
        cpp_extension.load(name="triserve_vnni", sources=[str(SOURCE)], extra_cflags=_FLAGS,
                           build_directory=str(build), is_python_module=False, verbose=False)
        torch.library.register_fake("triserve::int4_vnni_linear", _int4_shape)
        torch.library.register_fake("triserve::int8_vnni_linear", _int8_shape)
    except Exception as error:  # no compiler, no ninja, a failed build: torch's kernel instead
        log.warning("the VNNI kernels could not be built: %s", error)
        return "it could not be built (the server log says why)"
    return None


def _int4_shape(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """What torch.compile traces the operator as (shape and dtype, no computation)."""
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _int8_shape(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Weights ``q * scales + mins`` (``q`` uint8 [N, K] in 0..15; scales and mins [N, K / 32]) in
    the int4 kernel's layout: uint8 [N / 16, K / 32, 320] (see vnni.cpp)."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    # [tile, row j, group, chunk c, half h, i] where input = 32 group + 8 c + 4 h + i
    nibbles = q.to(torch.uint8).reshape(tiles, TILE, groups, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).reshape(tiles, groups, 256)

    def per_tile(values: torch.Tensor) -> torch.Tensor:
        halves = values.to(torch.float16).reshape(tiles, TILE, groups).permute(0, 2, 1).contiguous()
        return halves.view(torch.uint8)

    return torch.cat((packed, per_tile(scales), per_tile(mins)), dim=-1).contiguous()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 weights ``q`` [N, K] in the int8 kernel's layout: uint8 [N / 16, K / 32, 512], chunk c
    of a group holding inputs 4 c .. 4 c + 3 of the tile's 16 rows, 4 bytes a row (see vnni.cpp)."""
    n, k = q.shape
    tiles, groups = n // TILE, k // GROUP
    # [tile, row j, group, chunk c, i] -> [tile, group, c, j, i] where input = 32 group + 4 c + i
    chunks = q.view(torch.uint8).reshape(tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4)
    return chunks.reshape(tiles, groups, 8 * TILE * 4).contiguous()
