"""triserve on Ray Serve vs ``triserve serve`` alone: requests/s and p50/p99, same run.

    PYTHONPATH=. python bench/ray_serve.py                       # ~3 minutes
    PYTHONPATH=. python bench/ray_serve.py --concurrency 1 8 --seconds 5 --rounds 2

Targets, all serving ``chat_echo`` (tests/model_repository, a Python-backend chat model):

- ``serve``: ``python -m triserve serve`` (one process; its model process), the baseline;
- ``ray-1`` / ``ray-2``: ``TritonModel.deploy(instances=1)``, then scaled to 2, on a local
  single-node Ray cluster bound to 127.0.0.1 (this process is its driver; every Ray process
  is stopped at the end by ``ray.shutdown``, which ends what it started).

The client is the same for all: ``C`` threads, each a tritonclient HTTP client sending
chat_echo's five BYTES inputs back to back (closed loop) for ``--seconds``. The targets take
turns within each round, so drift on the machine falls on all of them. The extra latency of
``ray-1`` over ``serve`` at concurrency 1 is the cost of the front door -> replica hop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import free_port, triserve_server  # noqa: E402
from bench.report import markdown_table, percentile, ratio, results_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "chat_echo"


def echo_inputs(httpclient) -> list:
    inputs = []
    for name, values in (("prompt", ["How fast is the hop?"]), ("history", ["q", "a"]),
                         ("temperature", ["0.01"]), ("max_token", ["64"]), ("history_len", ["1"])):
        tensor = httpclient.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
        inputs.append(tensor)
    return inputs


def closed_loop(url: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients back to back for ``seconds``; rps, p50, p99 (ms), errors."""
    import tritonclient.http as httpclient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def client() -> None:
        with httpclient.InferenceServerClient(url, network_timeout=60) as triton:
            inputs = echo_inputs(httpclient)
            triton.infer(MODEL, inputs)  # warm the connection
            start.wait()
            mine = []
            while time.perf_counter() < deadline[0]:
                t0 = time.perf_counter()
                try:
                    triton.infer(MODEL, inputs)
                    mine.append(time.perf_counter() - t0)
                except Exception as exc:  # counted and reported
                    with lock:
                        errors.append(str(exc)[:200])
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start.wait()
    for thread in threads:
        thread.join()
    return {"requests": len(latencies), "rps": len(latencies) / seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    out_dir = results_dir("ray_serve")
    repository = out_dir / "repo"
    repository.mkdir()
    (repository / MODEL).symlink_to(REPO_ROOT / "tests" / "model_repository" / MODEL)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1
    import ray

    from triserve.deploy import TritonModel

    raw: list[dict] = []
    with triserve_server(repository, out_dir) as alone:
        print(f"[bench] uptime: {os.getloadavg()}", flush=True)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            model = TritonModel("bench")
            predictor = model.deploy(repository, cpu=1, instances=1, http_port=free_port(),
                                     grpc_port=free_port(), metrics_port=free_port())
            ray_url = f"127.0.0.1:{predictor.http_port}"
            for replicas in (1, 2):
                if replicas == 2:
                    model.scale(instances=2)
                    while model.status()["models"][MODEL]["replicas"].get("RUNNING") != 2:
                        time.sleep(0.5)
                for rnd in range(args.rounds):
                    for concurrency in args.concurrency:
                        targets = [("serve", alone.http_url), (f"ray-{replicas}", ray_url)]
                        if rnd % 2:
                            targets.reverse()
                        for name, url in targets:
                            if name == "serve" and replicas == 2 and rnd >= 1:
                                continue  # the baseline was measured beside ray-1 already; once more is enough
                            result = closed_loop(url, concurrency, args.seconds)
                            result.update(target=name, concurrency=concurrency, round=rnd)
                            raw.append(result)
                            print(f"[bench] {name} c={concurrency} round {rnd}: {result['rps']:.0f} req/s, "
                                  f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                                  f"errors {result['errors']}", flush=True)
            model.undeploy()
        finally:
            ray.shutdown()
    print(f"[bench] uptime: {os.getloadavg()}", flush=True)

    rows = []
    for concurrency in args.concurrency:
        base = [r for r in raw if r["target"] == "serve" and r["concurrency"] == concurrency]
        base_rps = float(np.median([r["rps"] for r in base]))
        base_p50 = float(np.median([r["p50_ms"] for r in base]))
        for target in ("serve", "ray-1", "ray-2"):
            mine = [r for r in raw if r["target"] == target and r["concurrency"] == concurrency]
            rps = float(np.median([r["rps"] for r in mine]))
            p50 = float(np.median([r["p50_ms"] for r in mine]))
            p99 = float(np.median([r["p99_ms"] for r in mine]))
            rows.append([target, concurrency, rps, p50, p99, ratio(rps, base_rps), p50 - base_p50,
                         sum(r["errors"] for r in mine)])
    table = markdown_table(["target", "concurrency", "req/s", "p50 ms", "p99 ms", "req/s vs serve",
                            "p50 - serve (ms)", "errors"], rows, [0, 0, 0, 1, 1, 2, 1, 0])
    summary = (f"# triserve on Ray Serve vs triserve serve ({MODEL}, HTTP, closed loop, "
               f"{args.seconds:.0f} s x {args.rounds} rounds; medians)\n\n{table}\n")
    (out_dir / "summary.md").write_text(summary)
    (out_dir / "raw.json").write_text(json.dumps(raw, indent=2))
    print("\n" + summary)


if __name__ == "__main__":
    main()
