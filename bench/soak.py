"""Soak: mixed load for minutes, with an instance process killed every minute.

    python -m bench.soak                      # 10 minutes
    python -m bench.soak --duration 180       # 3 minutes
    python -m bench.soak --no-llm             # Python models only (no SmolLM2 chat)

One triserve process serves ``bench/soak_models`` (``work``: a 2-instance identity
behind a bounded queue; ``words``: a decoupled stream) and the packaged SmolLM2 chat
model. Client threads, each in a loop:

- KServe infer over HTTP and over gRPC (``work``),
- streams: gRPC ModelStreamInfer and HTTP SSE ``generate_stream`` (``words``),
- OpenAI chat completions with ``max_tokens`` 8 (the chat model),
- clients that disconnect: an SSE stream dropped after its first event, and an
  infer whose connection is closed before the answer.

Every ``--kill-every`` seconds one live instance process of a Python model gets
SIGKILL. Each request ends as **served**, **refused** (503 / UNAVAILABLE / 429:
queue full, model restarting), **lost** (in flight on a killed process: its error
names the dead instance), **dropped** (the client's own disconnect) or **failed**
(anything else: the figure that must stay 0). The server's RSS (and its model
processes', summed) is sampled every 2 s.

Results in ``bench/results/soak-<stamp>/``: ``summary.json``, ``summary.md``,
``rss.csv``, ``rss.png`` (when matplotlib is installed) and the server log.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from bench.procs import REPO_ROOT, rss_split_kb, triserve_server

SOAK_MODELS = Path(__file__).resolve().parent / "soak_models"
CHAT_MODEL = REPO_ROOT / "triserve" / "model_repository" / "smollm2"
REFUSALS = ("Exceeds maximum queue size", "is not ready", "Request timeout expired")


class Tally:
    """Outcomes per client kind, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: collections.Counter = collections.Counter()

    def add(self, kind: str, outcome: str, detail: str = "") -> None:
        with self._lock:
            self.counts[kind][outcome] += 1
            if outcome == "failed":
                self.failures[f"{kind}: {detail[:160]}"] += 1

    def totals(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for counter in self.counts.values():
            total.update(counter)
        return total


def classify(status: str, message: str) -> str:
    if "process exited" in message or "did not return within" in message:
        return "lost"
    if status in ("503", "429", "StatusCode.UNAVAILABLE") and any(r in message for r in REFUSALS):
        return "refused"
    return "failed"


def http_json(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def infer_body(size: int = 16) -> dict:
    return {"inputs": [{"name": "INPUT0", "shape": [1, size], "datatype": "FP32",
                        "data": [1.0] * size}]}


def client_http_infer(server, tally: Tally, stop: threading.Event) -> None:
    url = f"http://{server.http_url}/v2/models/work/infer"
    while not stop.is_set():
        status, document = http_json(url, infer_body())
        if status == 200 and document["outputs"][0]["data"] == [1.0] * 16:
            tally.add("kserve_http", "served")
        else:
            outcome = classify(str(status), document.get("error", ""))
            tally.add("kserve_http", outcome, f"{status} {document}")


def client_grpc_infer(server, tally: Tally, stop: threading.Event) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones([1, 16], dtype=np.float32))
        while not stop.is_set():
            try:
                result = client.infer("work", [tensor], client_timeout=60)
            except InferenceServerException as error:
                tally.add("kserve_grpc", classify(str(error.status()), error.message() or ""),
                          f"{error.status()} {error.message()}")
            else:
                ok = result.as_numpy("OUTPUT0").tolist() == [[1.0] * 16]
                tally.add("kserve_grpc", "served" if ok else "failed", "wrong output")


def client_grpc_stream(server, tally: Tally, stop: threading.Event) -> None:
    import queue

    import tritonclient.grpc as grpcclient

    words = "a b c d e f g h i j"
    while not stop.is_set():
        received: queue.Queue = queue.Queue()
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            client.start_stream(callback=lambda result, error: received.put((result, error)))
            prompt = grpcclient.InferInput("prompt", [1], "BYTES")
            prompt.set_data_from_numpy(np.array([words.encode()], dtype=np.object_))
            client.async_stream_infer("words", [prompt])
            client.stop_stream()
        replies = list(received.queue)
        errors = [error for _, error in replies if error is not None]
        if errors:
            message = str(errors[0])
            tally.add("grpc_stream", classify("StatusCode.UNAVAILABLE" if "UNAVAILABLE" in message
                                              or "Exceeds" in message or "not ready" in message
                                              else "", message), message)
        elif [r.as_numpy("word")[0].decode() for r, _ in replies] == words.split():
            tally.add("grpc_stream", "served")
        else:
            tally.add("grpc_stream", "failed", f"{len(replies)} words")


def sse(server, body: dict, first_only: bool = False) -> tuple[int, list[dict]]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/words/generate_stream",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    events = []
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
                    if first_only:
                        break
            return response.status, events
    except urllib.error.HTTPError as error:
        return error.code, [json.loads(error.read() or b"{}")]


def client_sse(server, tally: Tally, stop: threading.Event) -> None:
    words = "a b c d e f g h i j"
    while not stop.is_set():
        status, events = sse(server, {"prompt": words})
        errors = [event["error"] for event in events if "error" in event]
        if status == 200 and not errors and [e["word"] for e in events] == words.split():
            tally.add("sse_stream", "served")
        else:
            message = errors[0] if errors else str(events)
            tally.add("sse_stream", classify(str(status) if status != 200 else "503", message), message)


def client_disconnects(server, tally: Tally, stop: threading.Event) -> None:
    """An SSE stream dropped after its first event, then an infer closed before its answer."""
    host, port = server.http_url.split(":")
    while not stop.is_set():
        status, events = sse(server, {"prompt": "x " * 200, "delay": 0.01}, first_only=True)
        tally.add("disconnect", "dropped" if status == 200 else classify(str(status), str(events)),
                  str(events))
        body = json.dumps(infer_body()).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/work/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
        tally.add("disconnect", "dropped")
        time.sleep(0.05)


def client_openai(server, tally: Tally, stop: threading.Event) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://{server.http_url}/v1", api_key="none", timeout=120, max_retries=0)
    while not stop.is_set():
        try:
            completion = client.chat.completions.create(
                model="smollm2", max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "Say hello."}])
        except openai.APIStatusError as error:
            tally.add("openai_chat", classify(str(error.status_code), str(error)), str(error))
        except openai.APIError as error:
            tally.add("openai_chat", "failed", str(error))
        else:
            ok = completion.choices[0].message.content is not None
            tally.add("openai_chat", "served" if ok else "failed", "no content")


def instance_pids(server_pid: int) -> list[int]:
    """The Python-backend instance processes (``stub/runner.py``) of the server."""
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            if any(part.endswith("runner.py") for part in child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between instance kills")
    parser.add_argument("--threads", type=int, default=2, help="threads per client kind (default 2)")
    parser.add_argument("--no-llm", action="store_true", help="leave out the chat model")
    args = parser.parse_args(argv)

    out = REPO_ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    repository = out / "repository"
    for model in ("work", "words"):
        shutil.copytree(SOAK_MODELS / model, repository / model)
    if not args.no_llm:
        shutil.copytree(CHAT_MODEL, repository / "smollm2")
    server = triserve_server(repository, out, extra_args=("--execute-timeout", "30"))
    tally = Tally()
    stop = threading.Event()
    samples: list[tuple[float, int, int, int]] = []  # t, server kB, models kB, instance kills
    kills: list[tuple[float, int]] = []
    clients = [client_http_infer, client_grpc_infer, client_grpc_stream, client_sse, client_disconnects]
    if not args.no_llm:
        clients.append(client_openai)
    server.start()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(server, tally, stop), daemon=True,
                                name=f"{client.__name__}-{n}")
               for client in clients for n in range(args.threads)]
    try:
        for thread in threads:
            thread.start()
        next_kill = started + args.kill_every
        next_report = started + 30
        while (now := time.monotonic()) - started < args.duration:
            server_kb, models_kb = rss_split_kb(server.pid)
            samples.append((now - started, server_kb, models_kb, len(kills)))
            if now >= next_kill:
                pids = instance_pids(server.pid)
                if pids:
                    victim = random.choice(pids)
                    try:
                        psutil.Process(victim).send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        pass
                    kills.append((now - started, victim))
                    print(f"[soak] {now - started:6.0f} s: killed instance process {victim}", flush=True)
                next_kill += args.kill_every
            if now >= next_report:
                totals = tally.totals()
                print(f"[soak] {now - started:6.0f} s: {dict(totals)}; server RSS "
                      f"{server_kb / 1024:.0f} MB, models {models_kb / 1024:.0f} MB", flush=True)
                next_report += 30
            time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=130)
        server.stop()

    write_results(out, args, tally, samples, kills)
    return 0


def write_results(out: Path, args, tally: Tally, samples, kills) -> None:
    totals = tally.totals()
    server_mb = [s[1] / 1024 for s in samples]
    tenth = max(1, len(samples) // 10)
    summary = {
        "duration_s": args.duration,
        "kills": len(kills),
        "totals": dict(totals),
        "per_client": {kind: dict(counter) for kind, counter in sorted(tally.counts.items())},
        "failures": dict(tally.failures.most_common(20)),
        "server_rss_mb": {
            "first_10pct_mean": round(sum(server_mb[:tenth]) / tenth, 1),
            "last_10pct_mean": round(sum(server_mb[-tenth:]) / tenth, 1),
            "max": round(max(server_mb), 1),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "rss.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["t_s", "server_rss_kb", "model_processes_rss_kb", "kills_so_far"])
        writer.writerows(samples)
    lines = [f"# Soak: {args.duration:.0f} s, {len(kills)} instance kills", "",
             "| client | served | refused | lost | dropped | failed |", "|---|---|---|---|---|---|"]
    for kind, counter in sorted(tally.counts.items()):
        lines.append(f"| {kind} | " + " | ".join(str(counter.get(k, 0)) for k in
                                                 ("served", "refused", "lost", "dropped", "failed")) + " |")
    lines.append("| **all** | " + " | ".join(str(totals.get(k, 0)) for k in
                                             ("served", "refused", "lost", "dropped", "failed")) + " |")
    rss = summary["server_rss_mb"]
    lines += ["", f"Server RSS: {rss['first_10pct_mean']} MB (first tenth) -> {rss['last_10pct_mean']} MB "
              f"(last tenth), max {rss['max']} MB"]
    if tally.failures:
        lines += ["", "Failures:", *(f"- {n} x {what}" for what, n in tally.failures.most_common(10))]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines += ["", "(matplotlib not installed: no rss.png)"]
    else:
        figure, axis = plt.subplots(figsize=(8, 4))
        axis.plot([s[0] for s in samples], server_mb, label="server")
        axis.plot([s[0] for s in samples], [s[2] / 1024 for s in samples], label="model processes")
        for t, _ in kills:
            axis.axvline(t, color="grey", linestyle=":", linewidth=0.8)
        axis.set_xlabel("seconds (dotted: instance killed)")
        axis.set_ylabel("RSS, MB")
        axis.set_title("triserve soak: RSS under mixed load")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "rss.png", dpi=100)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nresults in {out}")


if __name__ == "__main__":
    raise SystemExit(main())
