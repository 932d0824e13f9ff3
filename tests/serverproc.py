"""Start and stop a real triserve server process for end-to-end tests.

Every test that talks to the server goes through here: a ``python -m triserve
serve`` process on 127.0.0.1 with free ports, stopped by its PID.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


# Ports for servers come from below Linux's ephemeral range (32768-60999, where every outgoing
# connection takes its local port, so a port free a moment ago can be taken by a client by the
# time the server binds it) and above Ray's worker ports (10002-19999).
_PORTS = range(20000, 32768)


def free_port() -> int:
    """A port nothing listens on, outside the ranges the kernel and Ray hand out by themselves."""
    while True:
        port = random.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class ServerProcess:
    repository: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 180.0
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    # for servers started with --api-key (and no --open-health): sent with the readiness probe
    headers: dict[str, str] = field(default_factory=dict)
    # for servers started with --tls-cert: the CA that signed it (and a client cert for mutual TLS)
    tls_ca: Path | None = None
    tls_client: tuple[Path, Path] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.http_port}"

    def _probe_context(self) -> ssl.SSLContext | None:
        if self.tls_ca is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca))
        if self.tls_client is not None:
            context.load_cert_chain(*map(str, self.tls_client))
        return context

    def start(self, until: str = "ready") -> "ServerProcess":
        """Start the server and wait until ``/v2/health/<until>`` answers 200 ("ready" or "live")."""
        cmd = [
            sys.executable, "-m", "triserve", "serve",
            "--model-repository", str(self.repository),
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port),
            *self.args,
        ]
        env = {**os.environ, **self.env}
        if self.log_path is None:
            self.log_path = Path(os.environ.get("TRISERVE_TEST_LOGS", "/tmp")) / f"triserve-{self.http_port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready(until)
        return self

    def wait_ready(self, until: str = "ready") -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"triserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                probe = urllib.request.Request(f"{self.base_url}/v2/health/{until}", headers=self.headers)
                with urllib.request.urlopen(probe, timeout=1, context=self._probe_context()) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"triserve not ready after {self.ready_timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
