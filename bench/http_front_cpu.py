"""CPU time of the HTTP front alone per KServe infer request, in-process.

Feeds raw HTTP requests (the anchors' bench_data as tritonclient sends them: binary
tensors) to triserve's HTTP protocol over an in-memory transport, in front of the
real app (auth, body limits, KServe decode and encode) and a core that answers with the
request's inputs as outputs from the next loop iteration (as the real core's answer comes
from a later read). No sockets, no model process: what is measured is the protocol (its
plain path, or httptools and uvicorn's cycle), the app and the codec, with
``time.process_time`` on uvloop, so the figure moves far less with the machine's load than
a whole server's.

    python -m bench.http_front_cpu                      # chat_echo and identity_bytes
    python -m bench.http_front_cpu --requests 50000 --pipelined 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Callable

import uvicorn
import uvloop
from uvicorn.server import ServerState

from bench.core_vs_triton import ANCHORS
from triserve.core.types import InferRequest, InferResponse
from triserve.frontends.http.app import create_app
from triserve.frontends.http.protocol import bounded_protocol
from triserve.options import Access, Limits


class EchoCore:
    """The part of the core the infer route uses: answers each request with its inputs."""

    async def infer(self, request: InferRequest) -> InferResponse:
        return self._answer(request)

    def start_infer(self, request: InferRequest, on_answer: Callable[[InferResponse], None]) -> Callable[[], None]:
        # answered from the next loop iteration, as the real core's answer comes from a later read
        handle = asyncio.get_running_loop().call_soon(on_answer, self._answer(request))
        return handle.cancel

    @staticmethod
    def _answer(request: InferRequest) -> InferResponse:
        return InferResponse(request.model_name, request.model_version or "1", request.id, list(request.inputs))


class Options:
    chatglm_model = None
    limits = Limits()
    access = Access()


class MemoryTransport(asyncio.Transport):
    """Counts the answers written (by their status lines); the connection never closes."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.answers += bytes(data[:9]) == b"HTTP/1.1 "

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise RuntimeError("the benchmark's connection closed: an answer asked for it")


def http_request(model: str) -> bytes:
    """``POST /v2/models/{model}/infer`` as tritonclient.http sends it (binary BYTES inputs)."""
    data = json.loads((ANCHORS / "bench_data" / f"{model}.json").read_text())["data"][0]
    inputs, raw = [], []
    for name, spec in data.items():
        chunk = b"".join(len(value.encode()).to_bytes(4, "little") + value.encode() for value in spec["content"])
        inputs.append({"name": name, "shape": spec["shape"], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(chunk)}})
        raw.append(chunk)
    document = json.dumps({"inputs": inputs, "outputs": []}).encode()
    body = document + b"".join(raw)
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: gzip, deflate\r\n"
            f"Inference-Header-Content-Length: {len(document)}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def measure(model: str, requests: int, pipelined: int) -> float:
    """µs of CPU per request, ``pipelined`` requests per read."""
    config = uvicorn.Config(create_app(EchoCore(), Options()), log_config=None, access_log=False,
                            lifespan="off", proxy_headers=False, server_header=False, date_header=False,
                            http=bounded_protocol(Limits()))
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = MemoryTransport()
    protocol.connection_made(transport)
    data = http_request(model) * pipelined

    async def send(count: int) -> None:
        for _ in range(count):
            expected = transport.answers + pipelined
            protocol.data_received(data)
            while transport.answers < expected:
                await asyncio.sleep(0)

    await send(max(1, 500 // pipelined))  # warm-up
    started = time.process_time()
    await send(requests // pipelined)
    elapsed = time.process_time() - started
    if protocol.timeout_keep_alive_task is not None:
        protocol.timeout_keep_alive_task.cancel()
    return elapsed / (requests // pipelined * pipelined) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["chat_echo", "identity_bytes"])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--pipelined", type=int, default=1, help="requests per read (HTTP pipelining)")
    parser.add_argument("--runs", type=int, default=5, help="the median of this many runs is reported")
    args = parser.parse_args()
    for model in args.models:
        runs = [uvloop.run(measure(model, args.requests, args.pipelined)) for _ in range(args.runs)]
        print(f"{model}: {statistics.median(runs):.1f} µs CPU / request "
              f"(runs: {', '.join(f'{r:.1f}' for r in runs)})", flush=True)


if __name__ == "__main__":
    main()
