"""Backends run models. The core picks one by the ``backend`` field of config.pbtxt."""

from __future__ import annotations

import importlib

from triserve.backends.base import Backend, Job, ModelContext

# backend name -> "module:Class"; imported on first use so that a repository of
# Python models never pays for importing torch.
_BACKENDS = {
    "python": "triserve.backends.python.backend:PythonBackend",
    "llm": "triserve.backends.llm.backend:LLMBackend",
}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend_class(name: str) -> type[Backend]:
    """The Backend class for a config's ``backend``; ``KeyError`` if there is none."""
    module_name, class_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["Backend", "Job", "ModelContext", "backend_names", "get_backend_class"]
