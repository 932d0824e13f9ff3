"""Server processes under measurement: start, time to ready, memory, stop by PID.

Every benchmark compares servers that run as separate process trees (a server
plus its model processes), so memory is always the RSS of the whole tree and a
process is only ever stopped through the PID this module started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_split_kb(pid: int) -> tuple[int, int]:
    """RSS of a server process and, summed, of all its descendants (model processes), in kB.

    Both are 0 once the process is gone.
    """
    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
        server = root.memory_info().rss
    except psutil.NoSuchProcess:
        return 0, 0
    models = 0
    for child in children:
        try:
            models += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return server // 1024, models // 1024


def tree_rss_kb(pid: int) -> int:
    """RSS of a process and all its descendants, in kB."""
    return sum(rss_split_kb(pid))


class PeakRss:
    """Samples a process tree's RSS on a thread while a load runs; ``peak_kb`` is the maximum.

    Use as a context manager around the load, so sampling never outlives it.
    """

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kb = tree_rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))


class LoopbackAddresses:
    """``host:port`` of a benchmarked server's endpoints on 127.0.0.1, as tritonclient takes them."""

    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@dataclass
class ServerProcess(LoopbackAddresses):
    """A server started from ``command``, ready once ``ready_url`` answers 200.

    ``ready_s`` is measured from spawn to the first 200, polled every 0.1 s (the
    same poll start.sh uses for Triton, so both times to ready compare).
    """

    name: str
    command: list[str]
    ready_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 600.0
    http_port: int = 0
    grpc_port: int = 0  # 0: the server has no gRPC endpoint
    proc: subprocess.Popen | None = None
    ready_s: float = float("nan")
    cwd: Path = REPO_ROOT  # where ``python -m triserve`` finds its code: another checkout serves its own

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, cwd=self.cwd)
        log.close()
        deadline = t0 + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"{self.name} exited before ready; log {self.log_path}:\n"
                                   + self.log_tail())
            if _answers_200(self.ready_url):
                self.ready_s = time.perf_counter() - t0
                print(f"[{self.name}] ready in {self.ready_s:.2f} s (pid {self.proc.pid}, "
                      f"RSS {tree_rss_kb(self.proc.pid) / 1024:.0f} MB)", flush=True)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout_s:.0f} s; "
                           f"log {self.log_path}:\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server (it stops its own model processes), SIGKILL what is left."""
        if self.proc is None:
            return
        children = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                print(f"[{self.name}] still running after {timeout_s:.0f} s, SIGKILL", flush=True)
                self.proc.kill()
                self.proc.wait()
        for child in children:
            if child.is_running():
                print(f"[{self.name}] model process {child.pid} left over, SIGKILL", flush=True)
                child.kill()
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def triserve_server(repository: Path, log_dir: Path, name: str = "triserve",
                    extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                    checkout: Path = REPO_ROOT) -> ServerProcess:
    """``python -m triserve serve`` on 127.0.0.1 with free ports (HTTP, gRPC, metrics), running the
    code of ``checkout`` (this one by default)."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    return ServerProcess(
        name=name,
        command=[sys.executable, "-m", "triserve", "serve", "--model-repository", str(repository),
                 "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                 "--metrics-port", str(metrics), *extra_args],
        ready_url=f"http://127.0.0.1:{http}/v2/health/ready",
        log_path=log_dir / f"{name}.log",
        env=env or {},
        http_port=http,
        grpc_port=grpc,
        cwd=checkout,
    )
