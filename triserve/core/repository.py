"""The model repository: which models and versions exist on disk, and which are loaded.

Layout, as in Triton::

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<version>/...      (numeric folders: 1/, 2/, ...)

``version_policy`` picks the versions to load: ``latest { num_versions: N }``
(default: the latest one), ``all``, or ``specific { versions: [...] }``.

A model that fails to load (bad config, unsupported backend, a backend error)
is UNAVAILABLE with the reason, in the index and in the log; the other models
are not affected. In ``explicit`` model control mode models are loaded and
unloaded at runtime through :meth:`ModelRepository.load` / :meth:`unload`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from triserve.core.backend import CoreClient, Lifecycle
from triserve.core import config as model_config
from triserve.core.overrides import check_override
from triserve.core.errors import ErrorCode, InferError
from triserve.core.model import ModelVersion, backend_class_for

logger = logging.getLogger("triserve")


class ModelState(str, enum.Enum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


class ModelControlMode(str, enum.Enum):
    NONE = "none"  # load every model at start; the set is fixed
    EXPLICIT = "explicit"  # load what --load-model names; load/unload through the API


def model_folders(root: Path) -> list[str]:
    """Names of the model folders in a repository (hidden folders skipped)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def version_folders(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def select_versions(config: model_config_pb2.ModelConfig, available: list[int]) -> list[int]:
    """The versions ``version_policy`` asks for among ``available``; ``ConfigError`` if none."""
    if not available:
        raise model_config.ConfigError(
            "no version folders: put the model files in a numeric subfolder such as 1/"
        )
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return available
    if kind == "specific":
        missing = [v for v in policy.specific.versions if v not in available]
        if missing:
            raise model_config.ConfigError(
                f"version_policy specific asks for version(s) {missing}, but the model folder "
                f"has only {available}"
            )
        return sorted(set(policy.specific.versions))
    count = policy.latest.num_versions if kind == "latest" else 1
    if count < 1:
        raise model_config.ConfigError("version_policy latest needs num_versions >= 1")
    return available[-count:]


@dataclass
class _ModelRecord:
    """What the repository knows about one model folder."""

    state: ModelState | None = None  # None: never loaded
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)  # ready versions
    failed: dict[int, str] = field(default_factory=dict)  # version -> why it did not load
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    unloaded: bool = False  # explicitly unloaded: exempt from strict readiness, as in Triton


class ModelRepository:
    def __init__(self, root: Path, core: CoreClient, drain_timeout: float = 10.0,
                 lifecycle: Lifecycle = Lifecycle(), allowed_roots: tuple[Path, ...] = ()):
        self.root = root
        self._core = core
        self._drain_timeout = drain_timeout
        self._lifecycle = lifecycle
        self._allowed_roots = allowed_roots
        self._models: dict[str, _ModelRecord] = {}

    def all_ready(self) -> bool:
        """Triton's strict readiness: every model that was asked to load (and not unloaded since)
        serves; a model explicitly unloaded does not count."""
        for record in self._models.values():
            if record.state is None or record.unloaded:
                continue
            if record.failed or not record.versions:
                if record.state is not ModelState.LOADING:
                    return False
                continue
            if not all(model.ready for model in record.versions.values()):
                return False
        return True

    def loaded_models(self) -> list[ModelVersion]:
        """Every loaded version, ready or not (its instances restarting)."""
        return [model for record in self._models.values() for model in record.versions.values()]

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The ready model version a request names ("" = latest); NOT_FOUND / UNAVAILABLE otherwise."""
        record = self._models.get(name)
        if record is None or record.state is None:
            raise InferError.not_found(f"Request for unknown model: '{name}' is not found")
        if not record.versions:
            reason = f": {record.reason}" if record.reason else ""
            raise InferError.unavailable(
                f"Request for unknown model: '{name}' has no available versions{reason}"
            )
        if not version:
            return record.versions[max(record.versions)]
        try:
            model = record.versions.get(int(version))
        except ValueError:
            raise InferError.invalid(
                f"model version '{version}' of model '{name}' is not a number"
            ) from None
        if model is None:
            raise InferError.not_found(
                f"Request for unknown model: '{name}' version {version} is not found"
            )
        return model

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one row per version (or per model, if none is known)."""
        names = sorted(set(model_folders(self.root)) | set(self._models))
        rows = []
        for name in names:
            record = self._models.get(name, _ModelRecord())
            # a READY version's reason is why the last reload failed, if it did; a loaded
            # version that cannot serve now (instance restarting, crashed too often) says why
            versions = {v: ("READY", record.reason) if model.ready
                        else ("UNAVAILABLE", model.not_ready_reason())
                        for v, model in record.versions.items()}
            versions.update({v: ("UNAVAILABLE", why) for v, why in record.failed.items()})
            if versions:
                rows.extend({"name": name, "version": str(v), "state": state, "reason": why}
                            for v, (state, why) in sorted(versions.items()))
            else:
                state = record.state.value if record.state else ""
                rows.append({"name": name, "version": "", "state": state, "reason": record.reason})
        return [row for row in rows if row["state"] == "READY"] if ready_only else rows

    async def load(self, name: str, config_json: str | None = None) -> None:
        """Load (or reload) a model; raise ``InferError`` with the reason if no version loads.

        On reload the new versions are loaded first and the old ones unloaded
        after, so a failed reload leaves the model serving as before.
        """
        if name not in model_folders(self.root):  # also refuses "../x", "/tmp/x", "a/b"
            message = f"failed to load '{name}': no model folder '{name}' in the model repository"
            logger.error("%s", message)
            raise InferError.not_found(message)
        model_dir = self.root / name
        record = self._models.setdefault(name, _ModelRecord())
        async with record.lock:
            previous = dict(record.versions)
            if not previous:
                record.state = ModelState.LOADING
            try:
                # off the event loop: auto-complete may read model files or run a process
                config, backend_class = await asyncio.to_thread(self._read_config, model_dir, config_json)
                wanted = select_versions(config, version_folders(model_dir))
            except Exception as exc:  # any config or auto-complete failure is this model's reason
                reason = str(exc) or repr(exc)
                if previous:
                    record.reason = f"reload failed: {reason}"
                else:
                    record.state, record.reason, record.failed = ModelState.UNAVAILABLE, reason, {}
                logger.error("failed to load model '%s': %s", name, reason)
                bad_config = isinstance(exc, model_config.ConfigError)
                code = ErrorCode.INVALID_ARGUMENT if bad_config else ErrorCode.UNAVAILABLE
                raise InferError(code, f"failed to load '{name}': {reason}") from None

            loaded: dict[int, ModelVersion] = {}
            failed: dict[int, str] = {}

            def ready_versions() -> list[int]:
                return sorted(record.versions)

            async def load_version(version: int) -> None:
                model = None
                try:
                    model = ModelVersion(version, config, backend_class, model_dir, self.root,
                                         self._core, ready_versions, self._lifecycle)
                    await model.load()
                except BaseException as exc:
                    if model is not None:
                        await _unload_quietly(model)
                    if not isinstance(exc, Exception):
                        raise  # cancelled: the server is stopping while this model loads
                    failed[version] = str(exc) or repr(exc)
                    logger.error("failed to load model '%s' version %d: %s", name, version,
                                 failed[version])
                else:
                    loaded[version] = model

            await asyncio.gather(*(load_version(v) for v in wanted))
            if not loaded:
                reason = "; ".join(f"version {v}: {why}" for v, why in sorted(failed.items()))
                if previous:
                    record.reason = f"reload failed: {reason}"
                else:
                    record.state, record.reason, record.failed = ModelState.UNAVAILABLE, reason, failed
                raise InferError.unavailable(f"failed to load '{name}': {reason}")
            record.versions, record.failed = loaded, failed
            record.state, record.reason, record.unloaded = ModelState.READY, "", False
            for model in previous.values():
                await model.unload(self._drain_timeout)

    async def unload(self, name: str) -> None:
        """Unload every version of a model; in-flight requests may finish first."""
        record = self._models.get(name)
        if record is None or record.state is None:
            raise InferError.not_found(f"failed to unload '{name}': no model '{name}' is loaded")
        async with record.lock:
            versions, record.versions, record.failed = record.versions, {}, {}
            record.state = ModelState.UNLOADING
            await asyncio.gather(*(model.unload(self._drain_timeout) for model in versions.values()))
            record.state, record.reason, record.unloaded = ModelState.UNAVAILABLE, "unloaded", True

    async def unload_all(self) -> None:
        loaded = [name for name, record in self._models.items() if record.versions]
        await asyncio.gather(*(self.unload(name) for name in loaded), return_exceptions=True)

    def _read_config(self, model_dir: Path, config_json: str | None
                     ) -> tuple[model_config_pb2.ModelConfig, type]:
        """The config to load with (the override if given), auto-completed by its backend."""
        if config_json is None:
            config = model_config.read_config(model_dir)
        else:
            source = f"config override for '{model_dir.name}'"
            config = model_config.parse_config_json(config_json, source)
            config = model_config.finish_config(config, model_dir, source)
            check_override(config, model_dir, self._allowed_roots, source)
        backend_class = backend_class_for(config)
        config = backend_class.auto_complete_config(config, model_dir)
        model_config.validate_config(config, f"{model_dir.name}/{model_config.CONFIG_FILENAME}")
        return config, backend_class


async def _unload_quietly(model: ModelVersion) -> None:
    """Release what a failed load may have started (processes), keeping the load error the one reported."""
    try:
        await model.backend.unload()
    except Exception:  # the load error is what the user needs; this one is secondary
        logger.debug("cleanup after failed load of model '%s' raised", model.name, exc_info=True)


