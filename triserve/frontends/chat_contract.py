"""The chat contract (docs/ARCHITECTURE.md), as the chat dialects recognise a chat model.

OpenAI's and ChatGLM's routes both serve any model that keeps this contract; it
lives here, beside them, so that neither dialect depends on the other.
"""

from __future__ import annotations

from typing import Any


def is_chat_model(metadata: dict[str, Any]) -> bool:
    """Whether KServe model metadata describes a chat model: input ``prompt``, output ``response``."""
    inputs = {tensor["name"] for tensor in metadata.get("inputs", [])}
    outputs = {tensor["name"] for tensor in metadata.get("outputs", [])}
    return "prompt" in inputs and "response" in outputs
