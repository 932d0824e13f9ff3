"""One chat turn against each server under test, timed the same way.

Every client sends a user question plus the conversation so far and returns a
:class:`Turn`: the reply text, time to first token and end-to-end latency.
Only triserve's LLM model streams, so only there is time to first token the
first streamed piece; for the two non-streaming servers it is the full latency.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import httpx
import numpy as np
import tritonclient.grpc.aio as grpcclient


@dataclass
class Turn:
    text: str
    ttft_s: float
    latency_s: float
    server_completion_tokens: int | None = None  # as the server reports it, where it does
    cached_tokens: int | None = None


class ChatClient(Protocol):
    streams: bool

    async def chat(self, prompt: str, history: list[str], new_tokens: int, max_length: int) -> Turn:
        """One turn. ``history`` is flattened ``[q1, a1, ...]``. The reply is bounded by
        ``new_tokens``, or for APIs with ChatGLM's ``max_length`` (prompt plus reply
        tokens) by ``max_length``, which the caller computes to mean the same."""
        ...

    async def close(self) -> None: ...


def _bytes_input(name: str, values: list[str]) -> grpcclient.InferInput:
    array = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


class TriserveStreamClient:
    """triserve's LLM model through the chat contract over gRPC ModelStreamInfer, ``stream`` on."""

    streams = True

    def __init__(self, url: str, model: str, timeout_s: float):
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.timeout_s = timeout_s

    async def chat(self, prompt: str, history: list[str], new_tokens: int, max_length: int) -> Turn:
        inputs = [_bytes_input("prompt", [prompt]),
                  _bytes_input("max_new_tokens", [str(new_tokens)]),
                  _bytes_input("temperature", ["0"]),
                  _bytes_input("stream", ["true"])]
        if history:
            inputs.append(_bytes_input("history", history))

        async def one_request():
            yield {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex,
                   "enable_empty_final_response": True}

        pieces: list[str] = []
        ttft = None
        started = time.perf_counter()
        async for result, error in self.client.stream_infer(one_request(), stream_timeout=self.timeout_s):
            if error is not None:
                raise RuntimeError(f"triserve stream error: {error}")
            response = result.get_response()
            output = result.as_numpy("response")
            if output is not None and output.size:
                piece = output.reshape(-1)[0].decode("utf-8")
                if piece and ttft is None:
                    ttft = time.perf_counter() - started
                pieces.append(piece)
            if response.parameters["triton_final_response"].bool_param:
                params = response.parameters
                latency = time.perf_counter() - started
                return Turn("".join(pieces), ttft if ttft is not None else latency, latency,
                            params["completion_tokens"].int64_param if "completion_tokens" in params else None,
                            params["cached_tokens"].int64_param if "cached_tokens" in params else None)
        raise RuntimeError("triserve closed the stream without a final response")

    async def close(self) -> None:
        await self.client.close()


class SeedStyleClient:
    """The seed's Python-backend model: unary gRPC infer with its five string inputs."""

    streams = False

    def __init__(self, url: str, model: str, timeout_s: float):
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.timeout_s = timeout_s

    async def chat(self, prompt: str, history: list[str], new_tokens: int, max_length: int) -> Turn:
        inputs = [_bytes_input("prompt", [prompt]), _bytes_input("history", history),
                  _bytes_input("temperature", ["0"]), _bytes_input("max_token", [str(max_length)]),
                  _bytes_input("history_len", [str(len(history) // 2)])]
        started = time.perf_counter()
        result = await self.client.infer(self.model, inputs, client_timeout=self.timeout_s)
        latency = time.perf_counter() - started
        return Turn(result.as_numpy("response").reshape(-1)[0].decode("utf-8"), latency, latency)

    async def close(self) -> None:
        await self.client.close()


class FastAPIClient:
    """The FastAPI baseline: ChatGLM api.py's JSON over HTTP."""

    streams = False

    def __init__(self, url: str, timeout_s: float):
        self.client = httpx.AsyncClient(base_url=f"http://{url}", timeout=timeout_s)

    async def chat(self, prompt: str, history: list[str], new_tokens: int, max_length: int) -> Turn:
        pairs = [history[i:i + 2] for i in range(0, len(history), 2)]
        started = time.perf_counter()
        response = await self.client.post("/", json={"prompt": prompt, "history": pairs,
                                                     "max_length": max_length, "temperature": 0})
        response.raise_for_status()
        latency = time.perf_counter() - started
        return Turn(response.json()["response"], latency, latency)

    async def close(self) -> None:
        await self.client.aclose()
