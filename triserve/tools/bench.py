"""``triserve bench``: the seed's client grown up.

Sends requests to any KServe v2 endpoint (HTTP or gRPC, through tritonclient) or
OpenAI endpoint (``/v1/chat/completions``) at each concurrency of a range: N workers,
each sending its next request as soon as its last one is answered, until the level's
request count is reached. Streams (gRPC ModelStreamInfer, HTTP through Triton's generate
extension ``/generate_stream``, OpenAI SSE) also give the
time to first token and the inter-token latency. For each level it prints the seed's
``cnt=%d max=%dms min=%dms avg=%dms`` line, then a table; ``--report`` writes the
figures as JSON and ``--plots`` draws them (PNG, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import triserve
from triserve.tools import bench_inputs
from triserve.tools.bench_inputs import InputError

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001", "openai": "http://127.0.0.1:8000"}
PERCENTILES = (50, 90, 99)


class BenchError(RuntimeError):
    """The endpoint or the model cannot be benchmarked as asked; the message says why."""


@dataclass
class Sample:
    """One request: when it ended, how long it took, and what it produced."""

    latency_s: float
    error: str | None = None
    tokens: int | None = None
    ttft_s: float | None = None
    chunks: int = 0

    @property
    def itl_s(self) -> float | None:
        """Mean time between tokens after the first (as genai-perf computes it)."""
        if self.ttft_s is None or not self.tokens or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)


# --- targets: one per protocol -------------------------------------------------------------

class Target(ABC):
    """An endpoint and model to send requests to."""

    protocol = ""
    model: str | None = None
    stream = False

    @abstractmethod
    async def open(self) -> None:
        """Connect, check the model, learn what it needs; :class:`BenchError` if it cannot be used."""

    @abstractmethod
    async def close(self) -> None: ...

    def worker(self) -> "Worker":
        return Worker(self)

    @abstractmethod
    async def send(self, entry: dict[str, Any], worker: "Worker") -> Sample:
        """One request; errors are returned in the sample, never raised."""


class Worker:
    """One concurrent sender; a gRPC stream keeps its own stream open across requests."""

    def __init__(self, target: Target):
        self.target = target
        self.state: Any = None

    async def send(self, entry: dict[str, Any]) -> Sample:
        return await self.target.send(entry, self)

    async def close(self) -> None:
        pass


class KServeTarget(Target):
    def __init__(self, protocol: str, url: str, model: str, api_key: str | None, stream: bool | None,
                 extra: dict[str, list[str]], timeout_s: float):
        self.protocol = protocol
        self.url = url.removeprefix("http://")
        self.model = model
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self.requested_stream = stream
        self.extra = extra
        self.timeout_s = timeout_s
        self.client: Any = None
        self.metadata: dict[str, Any] = {}
        self.batched = False
        self.decoupled = False
        self.sse: Any = None

    async def open(self) -> None:
        from tritonclient.utils import InferenceServerException

        if self.protocol == "grpc":
            import tritonclient.grpc.aio as client_module
        else:
            import tritonclient.http.aio as client_module
        self.client = client_module.InferenceServerClient(self.url)
        try:
            if self.protocol == "grpc":
                metadata = await self.client.get_model_metadata(self.model, headers=self.headers, as_json=True)
                config = (await self.client.get_model_config(self.model, headers=self.headers,
                                                             as_json=True))["config"]
                metadata["inputs"] = [{**t, "shape": [int(d) for d in t["shape"]]} for t in metadata["inputs"]]
            else:
                metadata = await self.client.get_model_metadata(self.model, headers=self.headers)
                config = await self.client.get_model_config(self.model, headers=self.headers)
        except InferenceServerException as exc:
            raise BenchError(f"model '{self.model}' at {self.url}: {exc.message()}") from None
        except OSError as exc:
            raise BenchError(f"cannot reach {self.url}: {exc}") from None
        self.metadata = metadata
        self.batched = int(config.get("max_batch_size", 0) or 0) > 0
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self.stream = self.decoupled if self.requested_stream is None else self.requested_stream
        if self.stream:
            self.extra = {**self.extra, "stream": ["true"]}
        if self.stream and self.protocol == "http":
            import httpx

            # HTTP streams go through Triton's generate extension (/generate_stream, SSE)
            self.sse = httpx.AsyncClient(base_url=f"http://{self.url}", headers=self.headers,
                                         timeout=httpx.Timeout(self.timeout_s),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.sse is not None:
            await self.sse.aclose()

    def tensors(self, entry: dict[str, Any]) -> list[Any]:
        if self.protocol == "grpc":
            from tritonclient.grpc import InferInput
        else:
            from tritonclient.http import InferInput
        inputs = []
        for tensor in bench_inputs.kserve_tensors(entry, self.metadata, self.batched, self.extra):
            infer_input = InferInput(tensor.name, list(tensor.array.shape), tensor.datatype)
            infer_input.set_data_from_numpy(tensor.array)
            inputs.append(infer_input)
        return inputs

    def worker(self) -> Worker:
        return StreamWorker(self) if self.stream and self.protocol == "grpc" else Worker(self)

    def has_piece(self, response: Any) -> bool:
        """Whether a streamed response carries output: a non-empty value of the model's first
        output (``response`` for a chat model), not just the final flag or a closing history."""
        name = self.metadata["outputs"][0]["name"]
        for index, output in enumerate(response.outputs):
            if output.name == name and index < len(response.raw_output_contents):
                raw = response.raw_output_contents[index]
                return len(raw) > (4 if output.datatype == "BYTES" else 0)
        return False

    async def send(self, entry: dict[str, Any], worker: Worker) -> Sample:
        from tritonclient.utils import InferenceServerException

        if self.sse is not None:
            return await self.generate_stream(entry)
        inputs = self.tensors(entry)
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                self.client.infer(self.model, inputs, headers=self.headers), self.timeout_s)
        except InferenceServerException as exc:
            return Sample(time.perf_counter() - started, error=exc.message())
        except (asyncio.TimeoutError, OSError) as exc:
            return Sample(time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}")
        return Sample(time.perf_counter() - started, tokens=_completion_tokens(result, self.protocol))


    async def generate_stream(self, entry: dict[str, Any]) -> Sample:
        """One request on ``/v2/models/{m}/generate_stream``: the inputs as a flat JSON object,
        each SSE event one response, the stream's end the final one."""
        import httpx

        from triserve.tools import openai_http

        body = {tensor.name: tensor.array.reshape(-1).tolist() if tensor.array.size != 1
                else tensor.array.reshape(-1)[0]
                for tensor in bench_inputs.kserve_tensors(entry, self.metadata, self.batched, self.extra)}
        body = {name: _jsonable(value) for name, value in body.items()}
        piece_output = self.metadata["outputs"][0]["name"]
        started = time.perf_counter()
        sample = Sample(0.0)
        try:
            async with self.sse.stream("POST", f"/v2/models/{self.model}/generate_stream", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    sample.error = openai_http.error_text(response)
                else:
                    async for event in openai_http.sse_chunks_async(response.aiter_lines()):
                        if "error" in event:
                            sample.error = str(event["error"])
                            break
                        if event.get(piece_output) not in (None, "", []):
                            sample.chunks += 1
                            if sample.ttft_s is None:
                                sample.ttft_s = time.perf_counter() - started
                        tokens = (event.get("parameters") or {}).get("completion_tokens")
                        if tokens is not None:
                            sample.tokens = int(tokens)
        except httpx.HTTPError as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        sample.latency_s = time.perf_counter() - started
        if sample.tokens is None and sample.chunks:
            sample.tokens = sample.chunks
        return sample


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if hasattr(value, "item") else value


class StreamWorker(Worker):
    """Requests on one ModelStreamInfer stream, one at a time, each until its final response."""

    def __init__(self, target: KServeTarget):
        super().__init__(target)
        self.requests: asyncio.Queue = asyncio.Queue()
        self.responses: Any = None

    async def _requests(self):
        while (request := await self.requests.get()) is not None:
            yield request

    async def send(self, entry: dict[str, Any]) -> Sample:
        target: KServeTarget = self.target  # type: ignore[assignment]
        if self.responses is None:
            self.responses = target.client.stream_infer(self._requests(), headers=target.headers)
        request_id = f"bench-{id(self)}-{time.perf_counter_ns()}"
        await self.requests.put({"model_name": target.model, "inputs": target.tensors(entry),
                                 "request_id": request_id,
                                 "parameters": {"triton_enable_empty_final_response": True}})
        started = time.perf_counter()
        sample = Sample(0.0)

        async def until_final() -> None:
            async for result, error in self.responses:
                if error is not None:
                    sample.error = str(error.message() if hasattr(error, "message") else error)
                    return
                response = result.get_response()
                if response.id != request_id:
                    continue
                if target.has_piece(response):
                    sample.chunks += 1
                    if sample.ttft_s is None:
                        sample.ttft_s = time.perf_counter() - started
                final = response.parameters.get("triton_final_response")
                if (final is not None and final.bool_param) or not target.decoupled:
                    sample.tokens = _completion_tokens(result, "grpc")
                    return
            sample.error = "the stream ended before the final response"

        try:
            await asyncio.wait_for(until_final(), target.timeout_s)
        except asyncio.TimeoutError:
            sample.error = f"no final response within {target.timeout_s} s"
        sample.latency_s = time.perf_counter() - started
        if sample.tokens is None and target.decoupled and sample.chunks:
            sample.tokens = sample.chunks  # a model that reports no token counts: one piece each
        if sample.error:
            await self.close()  # the stream may be unusable; the next request opens a new one
        return sample

    async def close(self) -> None:
        if self.responses is not None:
            await self.requests.put(None)
            self.responses.cancel()
            self.responses = None
            self.requests = asyncio.Queue()


def _completion_tokens(result: Any, protocol: str) -> int | None:
    """triserve's LLM models report ``completion_tokens`` as a response parameter."""
    response = result.get_response()
    if protocol == "grpc":
        parameter = response.parameters.get("completion_tokens")
        return int(parameter.int64_param) if parameter is not None else None
    value = (response.get("parameters") or {}).get("completion_tokens")
    return int(value) if value is not None else None


class OpenAITarget(Target):
    protocol = "openai"

    def __init__(self, url: str, model: str | None, api_key: str | None, stream: bool | None,
                 sampling: dict[str, Any], timeout_s: float):
        from triserve.tools import openai_http

        self.url = openai_http.root_url(url)
        self.model = model
        self.api_key = api_key
        self.stream = True if stream is None else stream
        self.sampling = sampling
        self.timeout_s = timeout_s
        self.client: Any = None

    async def open(self) -> None:
        import httpx

        from triserve.tools import openai_http

        self.client = httpx.AsyncClient(base_url=self.url, headers=openai_http.headers(self.api_key),
                                        timeout=httpx.Timeout(self.timeout_s),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        try:
            response = await self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise BenchError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code != 200:
            raise BenchError(f"{self.url}/v1/models: {openai_http.error_text(response)}")
        models = [model["id"] for model in response.json()["data"]]
        if self.model is None:
            if not models:
                raise BenchError(f"{self.url} serves no model")
            self.model = models[0]
        elif self.model not in models:
            raise BenchError(f"{self.url} serves no model '{self.model}' (it serves: {', '.join(models)})")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def send(self, entry: dict[str, Any], worker: Worker) -> Sample:
        import httpx

        from triserve.tools import openai_http

        body = bench_inputs.openai_body(entry, self.model, self.sampling)
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        started = time.perf_counter()
        sample = Sample(0.0)
        try:
            if not self.stream:
                response = await self.client.post("/v1/chat/completions", json=body)
                if response.status_code != 200:
                    sample.error = openai_http.error_text(response)
                else:
                    usage = response.json().get("usage") or {}
                    sample.tokens = usage.get("completion_tokens")
            else:
                async with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        sample.error = openai_http.error_text(response)
                    else:
                        async for chunk in openai_http.sse_chunks_async(response.aiter_lines()):
                            if "error" in chunk:
                                sample.error = str(chunk["error"].get("message", chunk["error"]))
                                break
                            if chunk.get("usage"):
                                sample.tokens = chunk["usage"].get("completion_tokens")
                            if any((choice.get("delta") or {}).get("content")
                                   for choice in chunk.get("choices", [])):
                                sample.chunks += 1
                                if sample.ttft_s is None:
                                    sample.ttft_s = time.perf_counter() - started
        except httpx.HTTPError as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        sample.latency_s = time.perf_counter() - started
        if self.stream and sample.tokens is None and sample.chunks:
            sample.tokens = sample.chunks
        return sample


# --- running a level and summarising it ---------------------------------------------------

@dataclass
class Level:
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    duration_s: float = 0.0


async def run_level(target: Target, entries: list[dict[str, Any]], concurrency: int, count: int,
                    on_done: Any) -> Level:
    level = Level(concurrency)
    numbers = itertools.count()
    workers = [target.worker() for _ in range(concurrency)]

    async def work(worker: Worker) -> None:
        while (number := next(numbers)) < count:
            sample = await worker.send(entries[number % len(entries)])
            level.samples.append(sample)
            on_done()
        await worker.close()

    started = time.perf_counter()
    await asyncio.gather(*(work(worker) for worker in workers))
    level.duration_s = time.perf_counter() - started
    return level


def _distribution(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values) * 1000
    summary = {"min": float(array.min()), "max": float(array.max()), "avg": float(array.mean())}
    summary.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    return {key: round(value, 3) for key, value in summary.items()}


def summarise(level: Level) -> dict[str, Any]:
    ok = [sample for sample in level.samples if sample.error is None]
    errors = [sample.error for sample in level.samples if sample.error is not None]
    tokens = [sample.tokens for sample in ok if sample.tokens is not None]
    total_tokens = sum(tokens) if tokens and len(tokens) == len(ok) else None
    duration = max(level.duration_s, 1e-9)
    return {
        "concurrency": level.concurrency,
        "count": len(ok),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:5],
        "duration_s": round(level.duration_s, 4),
        "requests_per_s": round(len(ok) / duration, 3),
        "latency_ms": _distribution([sample.latency_s for sample in ok]),
        "tokens": total_tokens,
        "tokens_per_s": round(total_tokens / duration, 3) if total_tokens is not None else None,
        "ttft_ms": _distribution([s.ttft_s for s in ok if s.ttft_s is not None]),
        "itl_ms": _distribution([s.itl_s for s in ok if s.itl_s is not None]),
        "latencies_ms": [round(sample.latency_s * 1000, 3) for sample in ok],
    }


def seed_line(summary: dict[str, Any]) -> str:
    """The seed client's own line (its figures truncated to whole ms by %d, as there)."""
    latency = summary["latency_ms"] or {"max": 0, "min": 0, "avg": 0}
    return "cnt=%d max=%dms min=%dms avg=%dms" % (summary["count"], latency["max"], latency["min"],
                                                  latency["avg"])


def table(summaries: list[dict[str, Any]]) -> Table:
    table = Table(title="triserve bench", show_lines=False)
    for column in ("conc", "ok", "err", "req/s", "tok/s", "p50 ms", "p90 ms", "p99 ms", "TTFT p50",
                   "ITL p50"):
        table.add_column(column, justify="right")

    def number(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for s in summaries:
        latency, ttft, itl = s["latency_ms"] or {}, s["ttft_ms"] or {}, s["itl_ms"] or {}
        table.add_row(str(s["concurrency"]), str(s["count"]), str(s["errors"]),
                      number(s["requests_per_s"]), number(s["tokens_per_s"]),
                      number(latency.get("p50")), number(latency.get("p90")), number(latency.get("p99")),
                      number(ttft.get("p50")), number(itl.get("p50")))
    return table


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """latency_distribution.png and concurrency.png in ``folder``."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plots needs matplotlib: pip install 'triserve[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    levels = [level for level in report["levels"] if level["count"]]
    title = f"{report['model']} over {report['protocol']}{' (streamed)' if report['stream'] else ''}"

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for level in levels:
        axes.hist(level["latencies_ms"], bins=30, histtype="step", linewidth=1.5,
                  label=f"concurrency {level['concurrency']}")
    axes.set(xlabel="latency (ms)", ylabel="requests", title=f"Latency distribution: {title}")
    axes.legend()
    figure.tight_layout()
    distribution = folder / "latency_distribution.png"
    figure.savefig(distribution, dpi=110)
    plt.close(figure)

    concurrency = [level["concurrency"] for level in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(concurrency, [level["requests_per_s"] for level in levels], "o-", label="requests/s")
    left.set(xlabel="concurrency", ylabel="requests/s", title="Throughput")
    if all(level["tokens_per_s"] is not None for level in levels):
        tokens = left.twinx()
        tokens.plot(concurrency, [level["tokens_per_s"] for level in levels], "s--", color="tab:orange",
                    label="tokens/s")
        tokens.set_ylabel("tokens/s")
        tokens.set_ylim(bottom=0)
        tokens.legend(loc="lower right")
    left.set_ylim(bottom=0)
    left.legend(loc="upper left")
    for p in PERCENTILES:
        right.plot(concurrency, [level["latency_ms"][f"p{p}"] for level in levels], "o-", label=f"p{p}")
    if all(level["ttft_ms"] for level in levels):
        right.plot(concurrency, [level["ttft_ms"]["p50"] for level in levels], "x:", label="TTFT p50")
    right.set(xlabel="concurrency", ylabel="latency (ms)", title="Latency")
    right.set_ylim(bottom=0)
    right.legend()
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(concurrency, [str(c) for c in concurrency])
    figure.suptitle(title)
    figure.tight_layout()
    against = folder / "concurrency.png"
    figure.savefig(against, dpi=110)
    plt.close(figure)
    return [distribution, against]


# --- the command ---------------------------------------------------------------------------

async def bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    if args.input_data:
        entries = bench_inputs.load_file(args.input_data)
    else:
        entries = [bench_inputs.seed_entry(args.prompt, args.temperature, args.max_token, args.history_len)]
    url = args.url or DEFAULT_URLS[args.protocol]
    if args.ignore_eos and not args.max_tokens:
        raise BenchError("--ignore-eos needs --max-tokens: without it every reply runs to the context's end")
    if args.protocol == "openai":
        sampling = {"max_tokens": args.max_tokens} if args.max_tokens else {}
        if args.ignore_eos:
            sampling["ignore_eos"] = True
        target: Target = OpenAITarget(url, args.model, args.api_key, args.stream, sampling, args.timeout)
    else:
        if not args.model:
            raise BenchError(f"--protocol {args.protocol} needs --model")
        extra = {"max_new_tokens": [str(args.max_tokens)]} if args.max_tokens else {}
        if args.ignore_eos:
            extra["ignore_eos"] = ["true"]
        target = KServeTarget(args.protocol, url, args.model, args.api_key, args.stream, extra, args.timeout)
    await target.open()
    report: dict[str, Any] = {
        "tool": f"triserve bench {triserve.__version__}",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "url": url, "protocol": args.protocol, "model": target.model, "stream": target.stream,
        "inputs": str(args.input_data) if args.input_data else "the seed's chat request",
        "requests_per_level": args.requests, "warmup_requests": args.warmup, "levels": [],
    }
    try:
        if args.warmup:
            await run_level(target, entries, 1, args.warmup, lambda: None)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)
        with progress:
            for concurrency in args.concurrency:
                task = progress.add_task(f"concurrency {concurrency}", total=args.requests)
                level = await run_level(target, entries, concurrency, args.requests,
                                        lambda: progress.advance(task))
                summary = summarise(level)
                report["levels"].append(summary)
                progress.console.print(f"concurrency {concurrency}: {seed_line(summary)}", highlight=False)
                for message in summary["error_messages"]:
                    progress.console.print(f"  [red]error[/red] ({summary['errors']} in all): {escape(message)}")
    finally:
        await target.close()
    return report


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False)
    try:
        report = asyncio.run(bench(args, console))
    except (BenchError, InputError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    for summary in report["levels"]:
        print(seed_line(summary))
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(table(report["levels"]))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        console.print(f"report: {args.report}")
    if args.plots:
        try:
            for path in write_plots(report, args.plots):
                console.print(f"plot: {path}")
        except BenchError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            return 1
    return 0 if all(level["errors"] == 0 for level in report["levels"]) else 2
