"""Server CPU time per request: what the request path costs, whatever the machine's load.

infer/s on a shared machine moves with everyone else's work; the CPU seconds a
server process spends per request much less. This starts the server (triserve,
or with ``--triton`` the real Triton 2.51 through the anchors' start.sh) on the
anchors' repository, then for each model, protocol and concurrency sends a fixed
number of requests with the official tritonclient (one client per worker thread,
synchronous calls, the anchors' bench_data inputs, binary tensors over HTTP as
perf_analyzer sends them) and reports, from /proc via psutil:

- server µs/req: utime + stime of the server process over the load / requests
- model µs/req: the same summed over its descendants (the model processes)

A warm-up of ``--warmup`` requests precedes each measured load. The client runs
in this process, so its CPU is not counted on either side.

    python -m bench.request_cpu                      # triserve, every cell
    python -m bench.request_cpu --triton             # the real Triton, for reference
    python -m bench.request_cpu --models chat_echo --protocols grpc --concurrency 16 --requests 2000
    python -m bench.request_cpu --protocols grpc --server-args '--grpc-server grpcio' --label grpcio
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
import psutil

from bench.core_vs_triton import ANCHORS, TritonServer
from bench.procs import triserve_server
from bench.report import markdown_table, results_dir


@dataclass
class CpuCell:
    server: str
    model: str
    protocol: str
    concurrency: int
    requests: int
    wall_s: float
    server_us: float
    model_us: float

    @property
    def total_us(self) -> float:
        return self.server_us + self.model_us


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime+stime of a process, and summed over its live descendants."""
    root = psutil.Process(pid)
    times = root.cpu_times()
    server = times.user + times.system
    models = 0.0
    for child in root.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        models += child_times.user + child_times.system
    return server, models


def bench_inputs(model: str) -> dict[str, np.ndarray]:
    """The anchors' bench_data for ``model`` as numpy BYTES arrays."""
    data = json.loads((ANCHORS / "bench_data" / f"{model}.json").read_text())["data"][0]
    return {name: np.array([v.encode() for v in spec["content"]], dtype=np.object_).reshape(spec["shape"])
            for name, spec in data.items()}


def make_caller(protocol: str, url: str, model: str, arrays: dict[str, np.ndarray]):
    """A function sending one request over a client of its own (clients are not shared by threads)."""
    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(url)
    inputs = []
    for name, array in arrays.items():
        tensor = client_module.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)

    def call() -> None:
        client.infer(model, inputs)

    return call, client


def run_load(protocol: str, url: str, model: str, concurrency: int, requests: int) -> float:
    """Send ``requests`` requests from ``concurrency`` threads; the wall time."""
    arrays = bench_inputs(model)
    callers = [make_caller(protocol, url, model, arrays) for _ in range(concurrency)]
    counter = iter(range(requests))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(call) -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                call()
            except BaseException as exc:  # reported after the load: one failure fails the cell
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(call,)) for call, _ in callers]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    for _, client in callers:
        client.close()
    if errors:
        raise RuntimeError(f"{model} over {protocol}: {errors[0]!r}")
    return wall


def measure(server, name: str, models: list[str], protocols: list[str], concurrencies: list[int],
            requests: int, warmup: int) -> list[CpuCell]:
    cells = []
    for model, protocol, concurrency in product(models, protocols, concurrencies):
        url = server.grpc_url if protocol == "grpc" else server.http_url
        run_load(protocol, url, model, concurrency, warmup)
        before = cpu_seconds(server.pid)
        wall = run_load(protocol, url, model, concurrency, requests)
        after = cpu_seconds(server.pid)
        cell = CpuCell(name, model, protocol, concurrency, requests, wall,
                       (after[0] - before[0]) / requests * 1e6, (after[1] - before[1]) / requests * 1e6)
        print(f"[cpu] {name} {model} {protocol} c={concurrency}: server {cell.server_us:.0f} µs/req, "
              f"model {cell.model_us:.0f} µs/req ({requests / wall:.0f} req/s on this machine)",
              flush=True)
        cells.append(cell)
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton", action="store_true", help="measure the real Triton 2.51 instead")
    ap.add_argument("--models", nargs="+", default=["chat_echo", "identity_bytes"])
    ap.add_argument("--protocols", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per cell")
    ap.add_argument("--warmup", type=int, default=200, help="requests before each measured load")
    ap.add_argument("--repository", type=Path, default=ANCHORS / "model_repository")
    ap.add_argument("--label", default="", help="name of this run in the table (default: the server)")
    ap.add_argument("--server-args", default="", metavar="'ARGS'",
                    help="more arguments for triserve serve, e.g. '--grpc-server grpcio'")
    args = ap.parse_args()

    out_dir = results_dir("request_cpu")
    name = args.label or ("triton" if args.triton else "triserve")
    server = (TritonServer(args.repository, out_dir) if args.triton
              else triserve_server(args.repository, out_dir, name=name, extra_args=tuple(args.server_args.split())))
    server.start()
    try:
        load_avg = psutil.getloadavg()
        cells = measure(server, name, args.models, args.protocols, args.concurrency,
                        args.requests, args.warmup)
    finally:
        server.stop()
    rows = [[c.model, c.protocol, c.concurrency, f"{c.server_us:.0f}", f"{c.model_us:.0f}",
             f"{c.total_us:.0f}"] for c in cells]
    table = markdown_table(["model", "protocol", "conc.", "server µs/req", "model µs/req", "total µs/req"],
                           rows)
    summary = (f"## CPU per request: {name}\n\nload average at start: "
               f"{load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f}; {args.requests} requests "
               f"per cell after {args.warmup} of warm-up\n\n{table}\n")
    (out_dir / "summary.md").write_text(summary)
    (out_dir / "raw.json").write_text(json.dumps([asdict(c) for c in cells], indent=2))
    print(summary)
    print(f"results: {out_dir}")


if __name__ == "__main__":
    main()
