"""HTTP plumbing shared by the LangChain classes: clients, retries and server errors.

Retries go through httpx's transport ``retries``, which repeats only failed
connection attempts (``ConnectError``/``ConnectTimeout``): a request the server
has received is never sent twice, so a generation is never run twice.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from pydantic import SecretStr


class TriserveError(RuntimeError):
    """The server answered with an error; the message is the server's own."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"triserve returned HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


def error_message(body: bytes) -> str:
    """The message of an error body in OpenAI's (``{"error": {"message": ...}}``) or
    Triton's (``{"error": "..."}``) shape; any other body is returned as text."""
    text = body.decode("utf-8", errors="replace")
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)


def raise_for_error(response: httpx.Response) -> None:
    """Raise :class:`TriserveError` for a 4xx/5xx answer (its body must have been read)."""
    if response.status_code >= 400:
        raise TriserveError(response.status_code, error_message(response.content))


def bearer_headers(api_key: SecretStr | None) -> dict[str, str]:
    """The ``Authorization`` header for a server started with ``--api-key`` (none without a key)."""
    if api_key is None:
        return {}
    return {"Authorization": f"Bearer {api_key.get_secret_value()}"}


def sync_client(timeout: float | None, max_retries: int) -> httpx.Client:
    return httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(retries=max_retries))


def async_client(timeout: float | None, max_retries: int) -> httpx.AsyncClient:
    """An async client; it belongs to the event loop it first runs on, so keep one per loop."""
    return httpx.AsyncClient(timeout=timeout, transport=httpx.AsyncHTTPTransport(retries=max_retries))


SSE_DONE = object()


def sse_event(line: str) -> dict[str, Any] | object | None:
    """One line of an OpenAI SSE stream: its JSON event, :data:`SSE_DONE`, or ``None``
    for blank lines and comments."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return SSE_DONE
    return json.loads(data)
