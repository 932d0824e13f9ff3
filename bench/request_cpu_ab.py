"""Server CPU per request of two triserve checkouts, served side by side, loads alternated.

The machine's load moves a whole server's CPU per request by ±10-15 % from one minute to the
next; two versions measured one after the other differ by as much. Here both servers run at
once (each idle while the other is loaded), and each cell alternates blocks of ``--block``
requests between them, ``--rounds`` times, reversing the order every round: slow drift hits
both alike. Reported per cell: the median server µs of CPU per request over the blocks (min-max),
and the client's median rate.

    git worktree add /tmp/base <commit>      # the version to compare against
    python -m bench.request_cpu_ab /tmp/base .
    python -m bench.request_cpu_ab /tmp/base . --protocol grpc --concurrency 16 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.core_vs_triton import ANCHORS
from bench.procs import triserve_server
from bench.report import results_dir
from bench.request_cpu import cpu_seconds, run_load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs=2, type=Path, help="two triserve checkouts (the first is the baseline)")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--models", nargs="+", default=["identity_bytes", "chat_echo"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--rounds", type=int, default=6, help="blocks per server and cell")
    ap.add_argument("--block", type=int, default=1000, help="requests per block")
    args = ap.parse_args()

    out_dir = results_dir("request_cpu_ab")
    servers = [triserve_server(ANCHORS / "model_repository", out_dir, name=f"{index}-{checkout.resolve().name}",
                               checkout=checkout.resolve())
               for index, checkout in enumerate(args.checkouts)]
    for server in servers:
        server.start()
    try:
        for model in args.models:
            for concurrency in args.concurrency:
                cpu: list[list[float]] = [[], []]
                rate: list[list[float]] = [[], []]
                for server in servers:
                    run_load(args.protocol, _url(server, args.protocol), model, concurrency, 300)  # warm-up
                for round_ in range(args.rounds):
                    order = [0, 1] if round_ % 2 == 0 else [1, 0]
                    for index in order:
                        server = servers[index]
                        before = cpu_seconds(server.pid)[0]
                        wall = run_load(args.protocol, _url(server, args.protocol), model, concurrency, args.block)
                        cpu[index].append((cpu_seconds(server.pid)[0] - before) / args.block * 1e6)
                        rate[index].append(args.block / wall)
                cells = [f"{checkout}: server {statistics.median(cpu[i]):.0f} µs ({min(cpu[i]):.0f}-{max(cpu[i]):.0f}), "
                         f"{statistics.median(rate[i]):.0f} req/s" for i, checkout in enumerate(args.checkouts)]
                print(f"{model} {args.protocol} c={concurrency}: " + " | ".join(cells), flush=True)
    finally:
        for server in servers:
            server.stop()


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


if __name__ == "__main__":
    main()
