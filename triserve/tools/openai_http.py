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


class _SSEReader:
    """Lines of an SSE stream in, the JSON of each complete event out (until ``[DONE]``)."""

    def __init__(self) -> None:
        self._event: list[str] = []
        self.done = False

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event this line completes (a blank line ends one), else None."""
        if line:
            self._event.append(line)
            return None
        data = [part[5:].removeprefix(" ") for part in self._event if part.startswith("data:")]
        self._event = []
        if not data:
            return None
        text = "\n".join(data)
        if text == "[DONE]":
            self.done = True
            return None
        return json.loads(text)


def sse_chunks(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON chunks of an SSE stream, until ``[DONE]``."""
    reader = _SSEReader()
    for line in lines:
        chunk = reader.feed(line)
        if reader.done:
            return
        if chunk is not None:
            yield chunk


async def sse_chunks_async(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """:func:`sse_chunks` for an async line stream."""
    reader = _SSEReader()
    async for line in lines:
        chunk = reader.feed(line)
        if reader.done:
            return
        if chunk is not None:
            yield chunk


def chat_models(client: httpx.Client) -> list[str]:
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise RuntimeError(f"cannot list the server's models: {error_text(response)}")
    return [model["id"] for model in response.json()["data"]]
