"""CPU time of triserve's own part of a gRPC KServe infer, in-process.

Calls the gRPC servicer's ``ModelInfer`` (and ``ModelStreamInfer``, one message per request
on one stream) directly with the ``ModelInferRequest`` tritonclient.grpc builds from the
anchors' bench_data, in front of either the real core and its Python-backend model
processes (``--core real``, the anchors' repository) or a core that answers at once with the
request's inputs as outputs (``--core echo``: the decode and encode alone). grpc.aio itself
(its poller thread, HTTP/2, protobuf parsing of the wire bytes) is not in the figure: what is
measured is the servicer's decode -> core -> encode, with ``time.process_time`` of this
process on uvloop (the model processes' CPU is theirs, not counted).

    python -m bench.grpc_front_cpu                           # echo core, unary and stream
    python -m bench.grpc_front_cpu --core real --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any, AsyncIterator

import uvloop
from tritonclient.grpc import InferInput, service_pb2

from bench import http_front_cpu
from bench.core_vs_triton import ANCHORS
from bench.request_cpu import bench_inputs
from triserve.core.types import InferRequest, InferResponse
from triserve.frontends.grpc.service import InferenceServicer


class EchoCore(http_front_cpu.EchoCore):
    """The HTTP bench's echo core, with what the streaming RPC also uses."""

    class _Model:
        decoupled = False

    def get_model(self, name: str, version: str = "") -> Any:
        return self._Model()

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        yield await self.infer(request)


class Context:
    """What the servicer uses of ``grpc.aio.ServicerContext``: ``write`` (streams) and ``abort``."""

    def __init__(self) -> None:
        self.written = 0
        self.wrote = asyncio.Event()

    async def write(self, message: Any) -> None:
        message.SerializeToString()  # grpc.aio serializes every reply: part of the cost
        self.written += 1
        self.wrote.set()

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"the benchmark's request failed: {code} {details}")

    def add_done_callback(self, callback: Any) -> None:
        pass


def infer_request(model: str) -> service_pb2.ModelInferRequest:
    """The ``ModelInferRequest`` tritonclient.grpc sends for the anchors' bench_data (raw contents)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in bench_inputs(model).items():
        tensor = InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        request.inputs.extend([tensor._get_tensor()])
        request.raw_input_contents.extend([tensor._get_content()])
    # Parsed from the wire, as grpc.aio hands it over (not the builder's objects).
    return service_pb2.ModelInferRequest.FromString(request.SerializeToString())


async def unary(servicer: InferenceServicer, request: Any, count: int) -> None:
    context = Context()
    for _ in range(count):
        (await servicer.ModelInfer(request, context)).SerializeToString()


async def stream(servicer: InferenceServicer, request: Any, count: int) -> None:
    """One stream, one request in flight at a time (each waits for its reply), like a chat client."""
    context = Context()

    async def requests() -> AsyncIterator[Any]:
        for _ in range(count):
            yield request
            await context.wrote.wait()
            context.wrote.clear()

    await servicer.ModelStreamInfer(requests(), context)
    if context.written != count:
        raise RuntimeError(f"{context.written} replies for {count} requests")


async def measure(core: Any, model: str, mode: str, requests: int) -> float:
    servicer = InferenceServicer(core)
    request = infer_request(model)
    run = unary if mode == "unary" else stream
    await run(servicer, request, 300)  # warm-up
    started = time.process_time()
    await run(servicer, request, requests)
    return (time.process_time() - started) / requests * 1e6


async def main_async(args: argparse.Namespace) -> None:
    if args.core == "real":
        from triserve.core.server import InferenceServer
        core: Any = InferenceServer(ANCHORS / "model_repository")
        await core.start()
    else:
        core = EchoCore()
    try:
        for model in args.models:
            for mode in args.modes:
                runs = [await measure(core, model, mode, args.requests) for _ in range(args.runs)]
                print(f"{args.core} {model} {mode}: {statistics.median(runs):.1f} µs CPU / request "
                      f"(runs: {', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    finally:
        if args.core == "real":
            core.begin_shutdown()
            await core.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", choices=["echo", "real"], default="echo")
    parser.add_argument("--models", nargs="+", default=["chat_echo", "identity_bytes"])
    parser.add_argument("--modes", nargs="+", choices=["unary", "stream"], default=["unary", "stream"])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5, help="the median of this many runs is reported")
    uvloop.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
