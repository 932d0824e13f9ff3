"""Checks on a config override sent with an explicit load request.

A load request (``POST /v2/repository/models/{m}/load`` with ``config``, gRPC
``RepositoryModelLoad``) comes from the network, so what it may point at is
bounded: ``default_model_filename`` and every path-like parameter
(``EXECUTION_ENV_PATH``, the LLM's ``model``, any value with a ``/``, ``~`` or a
leading ``.``) must resolve inside the model's folder, symlinks followed, or
inside a root the operator allowed (``--allowed-model-root``). A ``package:``
reference is accepted only as the model's own config.pbtxt has it,
``trust_remote_code`` cannot be switched on, and the test-only fault-injection
parameters (``fault_*``) may only keep the value config.pbtxt gives them. The errors name the parameter and
the rule, never a resolved server path, and are the same whether or not the
target exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from triserve.core.config import CONFIG_FILENAME, ConfigError, parse_config, strip_slash_comments

PATH_PARAMETERS = ("EXECUTION_ENV_PATH", "model")
PACKAGE_PREFIX = "package:"
PINNED_PREFIX = "fault_"  # test-only fault injection (docs/llm.md): never from the network
_TRUE = ("true", "1", "yes", "on")


def check_override(config: model_config_pb2.ModelConfig, model_dir: Path,
                   allowed_roots: tuple[Path, ...], source: str) -> None:
    """Raise :class:`ConfigError` if the override reaches outside what a request may name."""
    on_disk = _on_disk_parameters(model_dir)
    roots = (model_dir.resolve(), *(root.resolve() for root in allowed_roots))
    filename = config.default_model_filename
    if filename and (Path(filename).is_absolute() or len(Path(filename).parts) != 1
                     or filename in (".", "..")):
        raise ConfigError(f"{source}: default_model_filename must be a file name in the version "
                          f"folder, got {filename!r}")
    if filename and not any(_inside(model_dir / "1" / filename, root) for root in roots):
        raise ConfigError(f"{source}: default_model_filename {filename!r} resolves outside the "
                          "model's folder")
    for name, parameter in config.parameters.items():
        value = parameter.string_value
        if name == "trust_remote_code":
            if value.strip().lower() in _TRUE and on_disk.get(name, "").strip().lower() not in _TRUE:
                raise ConfigError(f"{source}: parameter 'trust_remote_code' cannot be switched on by a "
                                  "load request; set it in the model's config.pbtxt")
            continue
        if name.startswith(PINNED_PREFIX):
            if value != on_disk.get(name, ""):
                raise ConfigError(f"{source}: parameter '{name}' (fault injection, for tests) cannot be "
                                  "set by a load request; set it in the model's config.pbtxt")
            continue
        if value.startswith(PACKAGE_PREFIX):
            if on_disk.get(name) != value:
                raise ConfigError(f"{source}: parameter '{name}' may name a package only as the "
                                  f"model's {CONFIG_FILENAME} does")
            continue
        if not value or not (name in PATH_PARAMETERS or _path_like(value)):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = model_dir / path
        if not any(_inside(path, root) for root in roots):
            raise ConfigError(
                f"{source}: parameter '{name}' points outside the model's folder; a load request "
                "may name only files inside it (or under a root the server allows with "
                "--allowed-model-root)")


def _path_like(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith(("~", ".")) or value == ".."


def _inside(path: Path, root: Path) -> bool:
    """Does ``path`` (symlinks resolved, whether or not it exists) lie within ``root``?"""
    return path.resolve().is_relative_to(root)


def _on_disk_parameters(model_dir: Path) -> dict[str, str]:
    """The string parameters of the model's own config.pbtxt ({} if it has none or cannot be read)."""
    try:
        text = (model_dir / CONFIG_FILENAME).read_text(encoding="utf-8")
        config = parse_config(strip_slash_comments(text))
    except (OSError, ConfigError, UnicodeDecodeError):
        return {}
    return {name: parameter.string_value for name, parameter in config.parameters.items()}
