"""A triserve server that a tool starts for itself: ``python -m triserve serve`` on free
127.0.0.1 ports, waited for until ready, and stopped (by its PID) when the tool is done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape

#: Seconds to wait for the models to load (the first start converts the default model's GGUF).
READY_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# the ports are chosen free, then bound by the server seconds later: on a busy machine another
# process may take one meanwhile, and the server is started again on others
PORT_ATTEMPTS = 3


class _PortTaken(RuntimeError):
    pass


class EmbeddedServer:
    def __init__(self, repository: Path, console: Console):
        self.repository = repository
        self.console = console
        self.http_port = _free_port()
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "EmbeddedServer":
        for _ in range(PORT_ATTEMPTS - 1):
            try:
                return self._start_once()
            except _PortTaken:
                self.console.print("[dim]a port was taken by another process meanwhile; starting again on "
                                   "other ports[/dim]")
                self.http_port = _free_port()
        return self._start_once()  # a port taken again is the RuntimeError it is

    def _start_once(self) -> "EmbeddedServer":
        self._log = tempfile.NamedTemporaryFile(prefix="triserve-chat-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "triserve", "serve", "--model-repository", str(self.repository),
                   "--host", "127.0.0.1", "--http-port", str(self.http_port),
                   "--grpc-port", str(_free_port()), "--metrics-port", str(_free_port()),
                   # ready once every model was tried: a model that fails is reported, not waited for
                   "--strict-readiness", "false"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.console.print(f"[dim]started triserve (pid {self.process.pid}) on {self.url} for "
                           f"{self.repository}; its log: {self._log.name}[/dim]")
        with self.console.status("loading the models…"):
            self._wait_ready()
        self._report_failed_models()
        return self

    def _report_failed_models(self) -> None:
        with httpx.Client(timeout=10) as client:
            rows = client.post(f"{self.url}/v2/repository/index", json={}).json()
        for row in rows:
            if row.get("state") == "UNAVAILABLE":
                self.console.print(f"[yellow]model {escape(row['name'])} did not load:[/yellow] "
                                   f"{escape(row.get('reason', ''))}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    status, tail = self.process.returncode, self.log_tail()
                    self.stop()
                    error = _PortTaken if "Address already in use" in tail else RuntimeError
                    raise error(f"triserve exited with status {status}:\n{tail}")
                try:
                    if client.get(f"{self.url}/v2/health/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"triserve was not ready after {READY_TIMEOUT_S} s:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
