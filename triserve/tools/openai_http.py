"""What the tools share to talk to OpenAI-compatible routes: headers, error text, SSE parsing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx


def headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def root_url(url: str) -> str:
    """The server's root from what a user types: ``host:port``, ``http://host:port[/v1]``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url[: -len("/v1")] if url.endswith("/v1") else url


def error_text(response: httpx.Response) -> str:
    """The server's own words for a failed request (OpenAI's or triserve's error shape)."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return f"HTTP {response.status_code}: {error or body}"


def _event_data(lines: list[str]) -> str | None:
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


def sse_chunks(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON chunks of an SSE stream, until ``[DONE]``."""
    event: list[str] = []
    for line in lines:
        if line:
            event.append(line)
            continue
        data, event = _event_data(event), []
        if data == "[DONE]":
            return
        if data is not None:
            yield json.loads(data)


async def sse_chunks_async(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """:func:`sse_chunks` for an async line stream."""
    event: list[str] = []
    async for line in lines:
        if line:
            event.append(line)
            continue
        data, event = _event_data(event), []
        if data == "[DONE]":
            return
        if data is not None:
            yield json.loads(data)


def chat_models(client: httpx.Client) -> list[str]:
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise RuntimeError(f"cannot list the server's models: {error_text(response)}")
    return [model["id"] for model in response.json()["data"]]
