"""EXECUTION_ENV_PATH: the Python environment a model's processes run in.

Triton users ship a conda-pack (or venv-pack) ``.tar.gz`` next to their model
(the seed's ``python-3-8.tar.gz``). Unpacking a multi-GB env on every start is
slow, so an archive is unpacked once into a cache keyed by its content hash,
``$TRISERVE_CACHE_DIR/envs/<sha256>/`` (default ``~/.cache/triserve``),
atomically: into a temporary folder, then renamed. A folder path is used as is.
The env must run the server's Python major.minor (the stub and the server
exchange pickles) and import numpy; otherwise loading fails with a message
that names the env and the problem.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from triserve import progress
from triserve.cache import cache_dir, file_sha256
from triserve.core.errors import InferError

PARAMETER = "EXECUTION_ENV_PATH"
_READY_MARKER = ".triserve-unpacked"
_PROBE = "import sys, numpy; print('%d.%d' % sys.version_info[:2])"
# Deadlines of the env's helper processes: the probe starts Python and imports numpy;
# conda-unpack rewrites prefixes in every file of a multi-GB env.
PROBE_TIMEOUT_S = 60.0
CONDA_UNPACK_TIMEOUT_S = 900.0


def prepare_python(env_path: str, probe_timeout: float = PROBE_TIMEOUT_S) -> Path:
    """The checked ``bin/python`` of the env at ``env_path`` (an archive or a folder).

    Blocking (hashing, unpacking, a probe process): call it off the event loop.
    """
    path = Path(env_path)
    if path.is_dir():
        env_dir = path
    elif path.is_file():
        env_dir = unpack_archive(path)
    else:
        raise InferError.unavailable(f"{PARAMETER} '{env_path}' does not exist")
    python = find_python(env_dir, env_path)
    check_python(python, env_path, probe_timeout)
    return python


def unpack_archive(archive: Path) -> Path:
    """The env unpacked from ``archive``, from the cache when it was unpacked before."""
    envs = cache_dir("envs")
    envs.mkdir(parents=True, exist_ok=True)
    target = envs / file_sha256(archive)
    # One process unpacks; a second server, or a second model sharing the env, waits for it.
    with open(envs / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _READY_MARKER).exists():
            return target
        shutil.rmtree(target, ignore_errors=True)  # left by a crash between rename and marker
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=envs))
        try:
            with progress.reading(archive, f"unpacking {archive.name}") as file, \
                    tarfile.open(fileobj=file, mode="r:*") as tar:
                tar.extractall(staging, filter="tar")
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise InferError.unavailable(
                f"{PARAMETER} '{archive}' cannot be unpacked as a .tar.gz archive: {exc}"
            ) from None
        staging.rename(target)
        run_conda_unpack(target, archive)
        (target / _READY_MARKER).touch()
    return target


def run_conda_unpack(env_dir: Path, archive: Path) -> None:
    """conda-pack archives fix their hard-coded prefixes with the bundled ``conda-unpack``."""
    conda_unpack = env_dir / "bin" / "conda-unpack"
    if not conda_unpack.exists():
        return
    try:
        result = subprocess.run([str(env_dir / "bin" / "python"), str(conda_unpack)],
                                capture_output=True, text=True, timeout=CONDA_UNPACK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        shutil.rmtree(env_dir, ignore_errors=True)
        raise InferError.unavailable(
            f"{PARAMETER} '{archive}': conda-unpack did not finish within {CONDA_UNPACK_TIMEOUT_S:g} s"
        ) from None
    if result.returncode != 0:
        shutil.rmtree(env_dir, ignore_errors=True)
        raise InferError.unavailable(
            f"{PARAMETER} '{archive}': conda-unpack failed: {result.stderr.strip()}"
        )


def find_python(env_dir: Path, env_path: str) -> Path:
    """``bin/python`` at the env's root, or inside the archive's single top folder."""
    candidates = [env_dir / "bin" / "python", *sorted(env_dir.glob("*/bin/python"))]
    for python in candidates:
        if python.exists():
            return python
    raise InferError.unavailable(f"{PARAMETER} '{env_path}' has no bin/python")


def check_python(python: Path, env_path: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Run the env's Python once: it must start, import numpy, and match our version."""
    try:
        result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True,
                                env=foreign_env(os.environ), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InferError.unavailable(
            f"{PARAMETER} '{env_path}': its Python did not start and import numpy within "
            f"{timeout:g} s"
        ) from None
    if result.returncode != 0:
        problem = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise InferError.unavailable(
            f"{PARAMETER} '{env_path}': its Python cannot run the model stub: {problem}"
        )
    version = result.stdout.strip()
    expected = "%d.%d" % sys.version_info[:2]
    if version != expected:
        raise InferError.unavailable(
            f"{PARAMETER} '{env_path}' has Python {version}, but triserve runs Python {expected}: "
            f"pack the env with Python {expected}"
        )


def foreign_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """Process environment for an env's Python: none of our import paths leak into it."""
    return {key: value for key, value in environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
