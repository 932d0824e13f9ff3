"""Joining a Ray cluster, or starting a local one that listens on loopback only.

Ray rewrites 127.0.0.1 to the host's address (so other machines can join) unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; that variable must be set before ``ray`` is
imported, for the head's ``ray start`` and for every driver that talks to it. With it,
every Ray process of a local cluster listens on 127.0.0.1 only. A second local node
cannot be added with ``ray start --address`` then (the CLI refuses multi-node with it
set, and without it rewrites the address); the tests add one with Ray's own
``ray.cluster_utils.Cluster``.

A cluster triserve starts uses Ray's token authentication; token mode is turned on for
joining that cluster only (see :func:`connect`).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from triserve.deploy.spec import DeployError

logger = logging.getLogger("triserve")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_ENV = "RAY_AUTH_MODE"
NAMESPACE = "triserve"


def _is_loopback(endpoint: str | None) -> bool:
    if endpoint is None or endpoint == "auto":
        return True
    host = endpoint.removeprefix("ray://").rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.path.exists(candidate) else (shutil.which("ray") or "ray")


def start_local_head(num_cpus: int | None = None) -> str:
    """``ray start --head`` on 127.0.0.1 (its processes outlive this one); its address."""
    port = _free_port()
    cmd = [_ray_cli(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--include-dashboard", "false", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    logger.info("starting a local Ray cluster on 127.0.0.1:%d", port)
    result = subprocess.run(cmd, env={**os.environ, LOOPBACK_ENV: "0", AUTH_ENV: "token"},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise DeployError(f"could not start a local Ray cluster: {result.stderr.strip()[-2000:]}")
    address = f"127.0.0.1:{port}"
    _OWN_CLUSTER_RECORD.write_text(address)
    return address


# The address of the local cluster triserve started (with token authentication), beside the
# record of the current cluster ``ray start`` keeps.
_OWN_CLUSTER_RECORD = Path(tempfile.gettempdir()) / "ray" / "triserve_cluster"


def _started_by_triserve(address: str) -> bool:
    try:
        return _OWN_CLUSTER_RECORD.read_text().strip() == address.removeprefix("ray://")
    except OSError:
        return False


def _running_local_cluster() -> str | None:
    """The address of the local cluster ``ray start`` recorded, if it answers."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip()
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return None
    return address


def connect(endpoint: str | None = None, start: bool = True) -> None:
    """Connect this process to the cluster at ``endpoint`` (None: the local one, started if
    ``start`` and there is none) and make sure Serve runs, its own proxies disabled.

    Token authentication is turned on (``RAY_AUTH_MODE=token``) only for the cluster triserve
    started itself; any other cluster is joined with the caller's own Ray settings. A driver in
    token mode refuses the calls of a cluster's workers that send no token (Serve's handles then
    never hear back from a replica), and the mode is inherited by every child process."""
    ray_module = sys.modules.get("ray")
    if ray_module is None or not ray_module.is_initialized():
        if _is_loopback(endpoint):
            os.environ.setdefault(LOOPBACK_ENV, "0")
        address = endpoint
        if address is None:
            # one ray.init only: a failed first attempt would leave this process unable to
            # join the cluster started next (Ray reads its auth token on the first attempt)
            address = _running_local_cluster()
            if address is None:
                # a record of triserve's own cluster outlives it (a reboot, `ray stop`): no
                # cluster answers, so it names none, and must not mark one started later at its port
                _OWN_CLUSTER_RECORD.unlink(missing_ok=True)
                if not start:
                    raise DeployError("no local Ray cluster is running (nothing is deployed)")
                address = start_local_head()
        if _started_by_triserve(address):
            # its token is in ~/.ray/auth_token (made by its `ray start`); set before ray is imported
            os.environ.setdefault(AUTH_ENV, "token")
        import ray

        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
                     log_to_driver=False)
        except ConnectionError as exc:
            raise DeployError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    from ray import serve

    # the front door serves HTTP and gRPC itself: Serve's proxies would only listen unused
    serve.start(proxy_location="Disabled")
