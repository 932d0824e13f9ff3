"""triserve against the real Triton 2.51, same repository, same perf_analyzer, one run.

Both servers serve /work/shared/anchors/triton/model_repository (the same
model.py files). Time to ready and idle RSS are taken with only one server
running; the load phase keeps both up but loads one at a time (the other
idles), alternating which goes first per cell so drift on a shared machine
hits both sides alike. Every figure is reported as triserve/Triton.

Run through bench/core_vs_triton.sh, which makes perf_analyzer runnable first.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Protocol

from bench.procs import LoopbackAddresses, PeakRss, free_port, rss_split_kb, triserve_server
from bench.report import markdown_table, ratio, results_dir

ANCHORS = Path(os.environ.get("TRITON_ANCHORS", "/work/shared/anchors/triton"))
TRITON_ROOT = Path(os.environ.get("TRITON_ROOT",
                                  Path(os.environ.get("ANCHORS", Path.home() / ".cache/anchors"))
                                  / "triton"))
PERF_ANALYZER = TRITON_ROOT / "bin" / "perf_analyzer"
PA_TIMEOUT_S = 300


class Server(Protocol):
    name: str
    ready_s: float

    @property
    def pid(self) -> int: ...
    @property
    def http_url(self) -> str: ...
    @property
    def grpc_url(self) -> str: ...
    def start(self) -> "Server": ...
    def stop(self) -> None: ...


@dataclass
class TritonServer(LoopbackAddresses):
    """The real tritonserver, started and stopped by the anchors' start.sh / stop.sh.

    ``ready_s`` is start.sh's own "READY in" figure: spawn to the first 200 from
    /v2/health/ready, polled every 0.1 s, as ServerProcess measures triserve.
    """

    repository: Path
    out_dir: Path
    name: str = "triton"
    ready_s: float = math.nan
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    _pid: int | None = None

    @property
    def pid(self) -> int:
        assert self._pid is not None, "triton is not running"
        return self._pid

    def _env(self) -> dict[str, str]:
        return {**os.environ, "TRITON_ROOT": str(TRITON_ROOT), "MODEL_REPO": str(self.repository),
                "HTTP_PORT": str(self.http_port), "GRPC_PORT": str(self.grpc_port),
                "METRICS_PORT": str(self.metrics_port),
                "TRITON_PIDFILE": str(self.out_dir / "tritonserver.pid"),
                "TRITON_LOG": str(self.out_dir / "tritonserver.log")}

    def start(self) -> "TritonServer":
        if not (TRITON_ROOT / "venv" / "bin" / "python").exists():
            print("[triton] first run: start.sh installs nvidia-pytriton into its venv (minutes)",
                  flush=True)
        log = self.out_dir / "start.sh.log"
        with open(log, "w") as stderr:
            done = subprocess.run(["bash", str(ANCHORS / "start.sh")], env=self._env(), text=True,
                                  stdout=subprocess.PIPE, stderr=stderr, timeout=1800)
        text = log.read_text(errors="replace")
        pid = re.search(r"^PID=(\d+)$", done.stdout, re.M)
        ready = re.search(r"READY in ([\d.]+) s", text)
        if done.returncode or not pid or not ready:
            raise RuntimeError(f"start.sh failed (rc {done.returncode}):\n{text[-3000:]}")
        self._pid, self.ready_s = int(pid.group(1)), float(ready.group(1))
        print(f"[triton] ready in {self.ready_s:.2f} s (pid {self._pid})", flush=True)
        return self

    def stop(self) -> None:
        if self._pid is None:
            return
        subprocess.run(["bash", str(ANCHORS / "stop.sh"), str(self._pid)], env=self._env(),
                       check=False, timeout=120)
        self._pid = None


@dataclass
class Startup:
    server: str
    ready_s: float
    server_rss_kb: int
    models_rss_kb: int


@dataclass
class Cell:
    server: str
    model: str
    protocol: str
    concurrency: int
    infer_per_s: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    peak_rss_kb: int = 0


def measure_startup(server: Server, settle_s: float = 1.0) -> Startup:
    """Start one server alone, note time to ready and idle RSS (server, model processes), stop it."""
    server.start()
    try:
        time.sleep(settle_s)
        server_kb, models_kb = rss_split_kb(server.pid)
        return Startup(server.name, server.ready_s, server_kb, models_kb)
    finally:
        server.stop()


def run_perf_analyzer(server: Server, cell: Cell, interval_ms: int, out_dir: Path) -> Cell:
    """One perf_analyzer measurement, flags as the anchors' bench.sh uses them.

    --stability-percentage 500: the host is shared and noisy; three windows are
    accepted and averaged, with one retry at more trials if a stall still
    fails the check.
    """
    url = server.grpc_url if cell.protocol == "grpc" else server.http_url
    stem = out_dir / f"pa_{cell.server}_{cell.model}_{cell.protocol}_c{cell.concurrency}"
    print(f"[pa] {cell.server} {cell.model} {cell.protocol} c={cell.concurrency}", flush=True)
    with PeakRss(server.pid) as rss:
        for trials in (3, 10):
            with open(f"{stem}.log", "w") as log:
                done = subprocess.run(
                    [str(PERF_ANALYZER), "-m", cell.model, "-u", url, "-i", cell.protocol,
                     "--input-data", str(ANCHORS / "bench_data" / f"{cell.model}.json"),
                     "--concurrency-range", str(cell.concurrency),
                     "--measurement-interval", str(interval_ms),
                     "--stability-percentage", "500", "--max-trials", str(trials),
                     "-f", f"{stem}.csv"],
                    stdout=log, stderr=subprocess.STDOUT, timeout=PA_TIMEOUT_S, check=False)
            if done.returncode == 0:
                break
            print(f"[pa] failed/unstable with --max-trials {trials}, see {stem}.log", flush=True)
    cell.peak_rss_kb = rss.peak_kb
    if done.returncode == 0:
        with open(f"{stem}.csv") as f:
            row = next(csv.DictReader(f))
        cell.infer_per_s = float(row["Inferences/Second"])
        cell.p50_ms = int(row["p50 latency"]) / 1000
        cell.p99_ms = int(row["p99 latency"]) / 1000
        print(f"[pa]   {cell.infer_per_s:.0f} infer/s, p50 {cell.p50_ms:.2f} ms, "
              f"p99 {cell.p99_ms:.2f} ms", flush=True)
    return cell


def measure_load(servers: list[Server], models: list[str], protocols: list[str],
                 concurrencies: list[int], interval_ms: int, out_dir: Path) -> list[Cell]:
    cells: list[Cell] = []
    try:
        for server in servers:
            server.start()
        for index, (model, protocol, concurrency) in enumerate(product(models, protocols, concurrencies)):
            for server in servers if index % 2 == 0 else servers[::-1]:
                cells.append(run_perf_analyzer(server, Cell(server.name, model, protocol, concurrency),
                                               interval_ms, out_dir))
    finally:
        for server in servers:
            server.stop()
    return cells


def summary(startups: list[Startup], cells: list[Cell]) -> str:
    by_key = {(c.server, c.model, c.protocol, c.concurrency): c for c in cells}
    load_rows = []
    for model, protocol, concurrency in sorted({(c.model, c.protocol, c.concurrency) for c in cells}):
        triton = by_key.get(("triton", model, protocol, concurrency), Cell("triton", model, protocol, 0))
        ours = by_key.get(("triserve", model, protocol, concurrency), Cell("triserve", model, protocol, 0))
        load_rows.append([model, protocol, concurrency,
                          triton.infer_per_s, ours.infer_per_s, ratio(ours.infer_per_s, triton.infer_per_s),
                          triton.p50_ms, ours.p50_ms, ratio(ours.p50_ms, triton.p50_ms),
                          triton.p99_ms, ours.p99_ms, ratio(ours.p99_ms, triton.p99_ms)])
    load = markdown_table(
        ["model", "proto", "conc", "Triton infer/s", "triserve infer/s", "ratio",
         "Triton p50 ms", "triserve p50 ms", "ratio", "Triton p99 ms", "triserve p99 ms", "ratio"],
        load_rows, digits=[0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2])

    def figures(name: str) -> list[float]:
        """Median ready s, its min and max, idle RSS server / model processes MB, peak tree RSS MB."""
        runs = [s for s in startups if s.server == name]
        peak = max((c.peak_rss_kb for c in cells if c.server == name), default=0)
        if not runs:
            return [math.nan] * 6
        ready = [s.ready_s for s in runs]
        return [statistics.median(ready), min(ready), max(ready),
                statistics.median(s.server_rss_kb for s in runs) / 1024,
                statistics.median(s.models_rss_kb for s in runs) / 1024,
                peak / 1024 if peak else math.nan]

    triton, ours = figures("triton"), figures("triserve")
    start = markdown_table(
        ["server", "ready s (median)", "min", "max", "idle RSS server MB",
         "idle RSS model procs MB", "peak RSS under load MB (tree)"],
        [["triton", *triton], ["triserve", *ours],
         ["triserve/Triton", *(ratio(a, b) for a, b in zip(ours, triton))]],
        digits=[0, 2, 2, 2, 1, 1, 1])
    return (f"## Throughput and latency (perf_analyzer, triserve/Triton ratios)\n\n{load}\n\n"
            f"## Time to ready (three Python models) and memory\n\n{start}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", nargs="+", choices=["triton", "triserve"], default=["triton", "triserve"])
    ap.add_argument("--models", nargs="+", default=["identity_bytes", "chat_echo"])
    ap.add_argument("--triserve-args", default="", metavar="'ARGS'",
                    help="more arguments for triserve serve, e.g. '--busy-poll-us 0'")
    ap.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer measurement window")
    ap.add_argument("--starts", type=int, default=3, help="cold starts per server for time to ready")
    ap.add_argument("--repository", type=Path, default=ANCHORS / "model_repository")
    args = ap.parse_args()

    out_dir = results_dir("core_vs_triton")
    print(f"results: {out_dir}", flush=True)

    def make(name: str) -> Server:
        if name == "triton":
            return TritonServer(args.repository, out_dir)
        return triserve_server(args.repository, out_dir, extra_args=tuple(args.triserve_args.split()))

    startups = [measure_startup(make(name)) for _ in range(args.starts) for name in args.servers]
    cells = measure_load([make(name) for name in args.servers], args.models, args.protocols,
                         args.concurrency, args.interval_ms, out_dir)
    (out_dir / "raw.json").write_text(json.dumps(
        {"startups": [asdict(s) for s in startups], "cells": [asdict(c) for c in cells],
         "load_average": os.getloadavg()}, indent=1))
    text = summary(startups, cells)
    (out_dir / "summary.md").write_text(text)
    print("\n" + text + f"\nresults in {out_dir}", flush=True)


if __name__ == "__main__":
    main()
