"""Triton's Python backend: model.py files run unmodified, one process per instance.

Each instance of the config's ``instance_group`` is a ``stub/runner.py`` process
started by file path with the model's Python (ours, or the EXECUTION_ENV_PATH
env's), so the model never imports triserve. This module decides where the
instances run (placement), runs the model's ``auto_complete_config`` and is the
:class:`Backend`; ``instance.py`` runs and supervises the processes, ``ipc.py``
is the wire between them (length-prefixed pickle frames over socketpairs: a
request costs no thread, one write, and no await per frame received).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from triserve.backends.python import environment
from triserve.backends.python.instance import RUNNER, InstancePool, InstanceSpec, Launch
from triserve.core.backend import Backend, Job, ModelContext
from triserve.core.config import config_to_json
from triserve.core.errors import InferError

# Deadlines of the short helper processes (auto-complete, the CUDA probe).
AUTO_COMPLETE_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 60.0

logger = logging.getLogger("triserve.backends.python")


def pipeline_depth(config: model_config_pb2.ModelConfig) -> int:
    """Batches an instance process may hold at once: 2 (the one it runs, the next sent behind it,
    so it never waits for the server between two) for a model that takes one request a batch and
    answers it when execute returns; 1 for the others. A batching model keeps 1, so that requests
    arriving meanwhile wait in the scheduler and join a larger batch; one with a dynamic_batching
    block, so that its priority levels and queue policies order every request; a decoupled one, so
    that one request's held-back stream (core/flow.py) never holds another's responses; a
    sequence-batched one, so that a sequence's requests run in order on one instance as Triton runs
    them. A request sent behind a running batch still honours its queue timeout and a cancellation
    (the process refuses it before its execute, with the scheduler's errors)."""
    if (config.max_batch_size > 0 or config.model_transaction_policy.decoupled
            or config.HasField("sequence_batching") or config.HasField("dynamic_batching")):
        return 1
    return 2


class PythonBackend(Backend):
    """One loaded Python model version: its instance processes and a pool of idle ones."""

    def __init__(self, context: ModelContext):
        super().__init__(context)
        self._pool: InstancePool | None = None

    @classmethod
    def auto_complete_config(
        cls, config: model_config_pb2.ModelConfig, model_dir: Path
    ) -> model_config_pb2.ModelConfig:
        """Run the model's static ``auto_complete_config`` in a short-lived process.

        Only a model.py that mentions it pays for the process.
        """
        model_file = latest_version_dir(model_dir) / model_filename(config)
        if not model_file.is_file() or "auto_complete_config" not in model_file.read_text(
                encoding="utf-8", errors="replace"):
            return config
        python, env = model_python(config, model_dir)
        where = f"{model_dir.name}/{model_file.relative_to(model_dir)}"
        try:
            result = subprocess.run(
                [str(python), str(RUNNER), "--auto-complete", str(model_file)],
                input=json.dumps(config_to_json(config)), capture_output=True, text=True, env=env,
                timeout=AUTO_COMPLETE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise InferError.unavailable(f"auto_complete_config of {where} did not finish within "
                                         f"{AUTO_COMPLETE_TIMEOUT_S:g} s") from None
        if result.returncode != 0:
            raise InferError.unavailable(
                f"auto_complete_config of {where} failed: {_last_line(result.stderr)}")
        completed = model_config_pb2.ModelConfig()
        json_format.ParseDict(json.loads(result.stdout), completed, ignore_unknown_fields=True)
        return completed

    async def load(self) -> None:
        config = self.context.config
        initialize_timeout = self.context.lifecycle.initialize_timeout
        probe_timeout = min(environment.PROBE_TIMEOUT_S, initialize_timeout or environment.PROBE_TIMEOUT_S)
        python, env = await asyncio.to_thread(model_python, config, self.context.model_dir, probe_timeout)
        specs = await asyncio.to_thread(instance_specs, self.context, python, env)
        model_file = self.context.version_dir / model_filename(config)
        if not model_file.is_file():
            raise InferError.unavailable(
                f"{self.context.model_dir.name}/{self.context.version}/{model_filename(config)} not found")
        launch = Launch(python, env, model_file, json.dumps(config_to_json(config)))
        self._pool = InstancePool(self.context, specs, launch, pipeline_depth(config))
        await self._pool.start()

    async def unload(self) -> None:
        if self._pool is not None:
            await self._pool.stop()

    @property
    def capacity(self) -> int:
        return self._pool.size * self._pool.depth if self._pool is not None else 1

    @property
    def healthy(self) -> bool:
        return self._pool is not None and self._pool.healthy

    @property
    def failure(self) -> str | None:
        return self._pool.failure if self._pool is not None else None

    async def execute(self, jobs: list[Job]) -> None:
        """Run the batch on a free instance; returns when the model's execute returned.

        A decoupled model may keep answering its jobs after that, from its own threads.
        """
        pool = self._pool
        instance = await pool.acquire()
        try:
            await instance.execute(jobs)
        finally:
            pool.release(instance)

    def try_execute(self, jobs: list[Job], on_done: Callable[[BaseException | None], None]) -> bool:
        """The batch goes to an idle instance now, if there is one (``Backend.try_execute``)."""
        pool = self._pool
        instance = pool.try_acquire() if pool is not None else None
        if instance is None:
            return False

        def ended() -> None:
            pool.release(instance)
            on_done(None)

        try:
            instance.send_batch(jobs, ended)
        except BaseException:
            pool.release(instance)
            raise
        return True

    def stats(self) -> dict[str, Any]:
        processes = self._pool.processes if self._pool is not None else []
        return {"instances": len(processes),
                "pids": [process.pid for process in processes if process.alive]}


def model_filename(config: model_config_pb2.ModelConfig) -> str:
    return config.default_model_filename or "model.py"


def latest_version_dir(model_dir: Path) -> Path:
    """The highest numeric version folder (auto-complete runs before versions are chosen)."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return model_dir / str(max(versions, default=1))


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no error output"


def model_python(config: model_config_pb2.ModelConfig, model_dir: Path,
                 probe_timeout: float = environment.PROBE_TIMEOUT_S) -> tuple[Path, dict[str, str]]:
    """The Python that runs the model's processes, and their environment variables.

    A relative EXECUTION_ENV_PATH is relative to the model's folder; its probe process
    has ``probe_timeout`` seconds.
    """
    parameter = config.parameters.get(environment.PARAMETER)
    if parameter is None or not parameter.string_value:
        return Path(sys.executable), dict(os.environ)
    env_path = parameter.string_value
    if not Path(env_path).expanduser().is_absolute():
        env_path = str(model_dir / Path(env_path).expanduser())
    try:
        python = environment.prepare_python(env_path, probe_timeout)
    except InferError as error:  # errors reach clients: the model's folder by its variable, not its path
        message = error.message
        for folder in {str(model_dir.resolve()), str(model_dir)}:
            message = message.replace(folder, "$$TRITON_MODEL_DIRECTORY")
        raise InferError(error.code, message) from None
    return python, environment.foreign_env(os.environ)


def instance_specs(context: ModelContext, python: Path, env: dict[str, str]) -> list[InstanceSpec]:
    """One spec per instance, named ``<group>_<n>`` like Triton's; GPU groups count per GPU."""
    groups = list(context.config.instance_group) or [model_config_pb2.ModelInstanceGroup()]
    specs = []
    for index, group in enumerate(groups):
        group_name = group.name or (context.name if len(groups) == 1 else f"{context.name}_{index}")
        count = group.count or 1
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU:
            devices = list(group.gpus) or [0]
            kind = "GPU" if cuda_device_count(python, env) > 0 else "CPU"
            if kind == "CPU":
                context.logger.warning(
                    "model '%s': instance group '%s' is KIND_GPU but no CUDA GPU is usable "
                    "(torch missing or no device); running it on the CPU", context.name, group_name)
        else:
            devices = [0]
            kind = "MODEL" if group.kind == model_config_pb2.ModelInstanceGroup.KIND_MODEL else "CPU"
        placements = [device_id for device_id in devices for _ in range(count)]
        specs.extend(InstanceSpec(f"{group_name}_{n}", kind, device_id)
                     for n, device_id in enumerate(placements))
    return specs


def cuda_device_count(python: Path, env: dict[str, str]) -> int:
    """CUDA devices the model's Python can use; no NVIDIA driver means none, without importing torch."""
    if not Path("/proc/driver/nvidia").exists():
        return 0
    try:
        result = subprocess.run(
            [str(python), "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("probing CUDA devices with %s took over %g s; assuming none", python,
                       PROBE_TIMEOUT_S)
        return 0
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else 0


