"""``triserve bench`` run as a user runs it, against live servers: its report must agree with
the server's own counters (``/v2/models/{m}/stats``, ``nv_inference_request_success``,
``triserve_llm_generation_tokens``), with itself (the seed's line, percentiles in order), and
with the real Triton Inference Server (the anchor in shared/anchors/triton, when installed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEFAULT_CHAT_MODEL
from serverproc import free_port

SEED_LINE = re.compile(r"^cnt=(\d+) max=(\d+)ms min=(\d+)ms avg=(\d+)ms$", re.M)
PNG = b"\x89PNG\r\n\x1a\n"


def bench(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "triserve", "bench", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def model_successes(http_url: str, model: str) -> int:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
        [stats] = json.load(response)["model_stats"]
    return int(stats["inference_stats"]["success"]["count"])


def metrics(server, model: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("model") == model}


def check_report(report: dict, stdout: str, concurrency: list[int], count: int) -> None:
    """Every field present, and the figures consistent with each other and the seed's line."""
    assert [level["concurrency"] for level in report["levels"]] == concurrency
    seed_lines = SEED_LINE.findall(stdout)
    assert len(seed_lines) == len(concurrency)
    for level, line in zip(report["levels"], seed_lines):
        assert level["count"] == count and level["errors"] == 0
        latency = level["latency_ms"]
        assert latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert latency["min"] <= latency["avg"] <= latency["max"]
        assert len(level["latencies_ms"]) == count
        assert max(level["latencies_ms"]) == latency["max"]
        # the seed's %d truncates the milliseconds
        assert tuple(map(int, line)) == (count, int(latency["max"]), int(latency["min"]), int(latency["avg"]))
        assert level["requests_per_s"] == pytest.approx(count / level["duration_s"], rel=0.01)
        # a level cannot finish faster than its slowest request, nor than its requests in sequence / n
        assert level["duration_s"] * 1000 >= latency["max"]
        assert level["duration_s"] * 1000 * level["concurrency"] >= sum(level["latencies_ms"]) * 0.99


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bench_kserve_counts_agree_with_the_servers_statistics(core_server, tmp_path, protocol):
    url = core_server.http_url if protocol == "http" else core_server.grpc_url
    before = model_successes(core_server.http_url, "chat_echo")
    report_path = tmp_path / "report.json"
    result = bench("-i", protocol, "-u", url, "-m", "chat_echo", "--concurrency", "1,3", "-c", "15",
                   "--warmup", "2", "--report", str(report_path), "--plots", str(tmp_path / "plots"))
    report = json.loads(report_path.read_text())
    check_report(report, result.stdout, [1, 3], 15)
    assert report["model"] == "chat_echo" and report["protocol"] == protocol and report["stream"] is False
    assert report["inputs"] == "the seed's chat request"
    assert report["levels"][0]["tokens"] is None  # a Python model reports no token counts
    # the server saw exactly the requests the report counts, and the warm-up
    assert model_successes(core_server.http_url, "chat_echo") - before == 2 * 15 + 2
    for name in ("latency_distribution.png", "concurrency.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG)
    assert "concurrency 3" in result.stderr  # the progress bar's line for the level


def test_bench_sends_a_perf_analyzer_input_file(core_server, tmp_path):
    data = tmp_path / "identity.json"
    data.write_text(json.dumps({"data": [{"INPUT0": {"content": ["hello triton"], "shape": [1]}},
                                         {"INPUT0": ["你好"]}]}, ensure_ascii=False))
    before = model_successes(core_server.http_url, "identity_bytes")
    report_path = tmp_path / "report.json"
    result = bench("-i", "grpc", "-u", core_server.grpc_url, "-m", "identity_bytes", "--input-data", str(data),
                   "--concurrency", "2", "-c", "10", "--warmup", "0", "--report", str(report_path))
    check_report(json.loads(report_path.read_text()), result.stdout, [2], 10)
    assert model_successes(core_server.http_url, "identity_bytes") - before == 10


@pytest.mark.slow
def test_bench_streams_and_its_token_counts_match_the_engines(chat_server, tmp_path):
    runs = (("openai", chat_server.base_url, [1, 2], 3, 1), ("grpc", chat_server.grpc_url, [2], 2, 0),
            ("http", chat_server.http_url, [2], 2, 0))
    for protocol, url, concurrency, count, warmup in runs:
        before = metrics(chat_server, DEFAULT_CHAT_MODEL)
        report_path = tmp_path / f"{protocol}.json"
        result = bench("-i", protocol, "-u", url, "-m", DEFAULT_CHAT_MODEL, "--max-tokens", "6", "--ignore-eos",
                       "--concurrency", ",".join(map(str, concurrency)), "-c", str(count),
                       "--warmup", str(warmup), "--report", str(report_path))
        report = json.loads(report_path.read_text())
        check_report(report, result.stdout, concurrency, count)
        after = metrics(chat_server, DEFAULT_CHAT_MODEL)
        assert report["stream"] is True  # OpenAI streams by default; the LLM model is decoupled
        sent = len(concurrency) * count
        assert (after["nv_inference_request_success_total"]
                - before["nv_inference_request_success_total"]) == sent + warmup
        reported = sum(level["tokens"] for level in report["levels"])
        generated = (after["triserve_llm_generation_tokens_total"]
                     - before["triserve_llm_generation_tokens_total"])
        assert reported == 6 * sent  # --ignore-eos: every reply runs to --max-tokens
        if warmup:
            assert generated - reported == 6  # the warm-up request's tokens
        else:
            assert generated == reported
        for level in report["levels"]:
            assert level["tokens_per_s"] == pytest.approx(level["tokens"] / level["duration_s"], rel=0.01)
            ttft, latency, itl = level["ttft_ms"], level["latency_ms"], level["itl_ms"]
            assert 0 < ttft["min"] <= ttft["max"] <= latency["max"]
            assert ttft["p50"] <= latency["p50"]
            assert 0 < itl["p50"] < latency["max"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bench_streams_a_decoupled_python_model(core_server, tmp_path, protocol):
    # stream_words sends one response per word: HTTP through /generate_stream, gRPC ModelStreamInfer
    data = tmp_path / "words.json"
    data.write_text(json.dumps({"data": [{"prompt": ["one two three four"]}, {"prompt": ["五 六"]}]},
                               ensure_ascii=False))
    url = core_server.http_url if protocol == "http" else core_server.grpc_url
    before = model_successes(core_server.http_url, "stream_words")
    report_path = tmp_path / "report.json"
    result = bench("-i", protocol, "-u", url, "-m", "stream_words", "--input-data", str(data),
                   "--concurrency", "2", "-c", "10", "--warmup", "0", "--report", str(report_path))
    report = json.loads(report_path.read_text())
    check_report(report, result.stdout, [2], 10)
    [level] = report["levels"]
    assert report["stream"] is True and level["tokens"] == 5 * 4 + 5 * 2  # one piece per word
    assert level["ttft_ms"]["max"] <= level["latency_ms"]["max"] and level["itl_ms"] is not None
    assert model_successes(core_server.http_url, "stream_words") - before == 10


def test_bench_says_what_is_wrong(core_server, tmp_path):
    result = bench("-i", "http", "-u", core_server.http_url, "-m", "no_such_model", "-c", "1", expect=1)
    assert "no_such_model" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"NOT_AN_INPUT": ["x"]}]}')
    result = bench("-i", "grpc", "-u", core_server.grpc_url, "-m", "identity_bytes", "--input-data", str(bad),
                   "-c", "1", expect=1)
    assert "NOT_AN_INPUT" in result.stderr and "INPUT0" in result.stderr
    # a model that fails requests: counted as errors, named, and the exit status says so
    result = bench("-i", "grpc", "-u", core_server.grpc_url, "-m", "raises", "-c", "3", "--warmup", "0",
                   "--concurrency", "1", "--input-data", str(_raises_input(core_server, tmp_path)), expect=2)
    assert "error" in result.stderr
    assert SEED_LINE.search(result.stdout).group(1) == "0"


def _raises_input(core_server, tmp_path: Path) -> Path:
    with urllib.request.urlopen(f"{core_server.base_url}/v2/models/raises", timeout=10) as response:
        metadata = json.load(response)
    entry = {}
    for tensor in metadata["inputs"]:
        entry[tensor["name"]] = {"content": ["1"] if tensor["datatype"] == "BYTES" else [1],
                                 "shape": [1 if d == -1 else d for d in tensor["shape"]]}
    path = tmp_path / "raises.json"
    path.write_text(json.dumps({"data": [entry]}))
    return path


# --- the real Triton ------------------------------------------------------------------------

def _triton_anchor() -> Path | None:
    candidates = [os.environ.get("TRITON_ANCHORS", ""), Path(__file__).parents[2] / "shared/anchors/triton",
                  "/work/shared/anchors/triton"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "start.sh").exists():
            return Path(candidate)
    return None


TRITON_ROOT = Path(os.environ.get("TRITON_ROOT", Path.home() / ".cache/anchors/triton"))


@pytest.mark.slow
@pytest.mark.skipif(_triton_anchor() is None or not (TRITON_ROOT / "venv/bin/python").exists(),
                    reason="the real Triton (shared/anchors/triton, nvidia-pytriton in ~/.cache/anchors/triton/venv) "
                           "is not installed: its start.sh downloads ~45 s of wheels, past this suite's budget; "
                           "run that start.sh once to enable this test")
def test_bench_against_the_real_triton(tmp_path):
    anchor = _triton_anchor()
    ports = {"HTTP_PORT": free_port(), "GRPC_PORT": free_port(), "METRICS_PORT": free_port()}
    env = {**os.environ, **{key: str(value) for key, value in ports.items()}, "TRITON_ROOT": str(TRITON_ROOT),
           "TRITON_PIDFILE": str(tmp_path / "triton.pid"), "TRITON_LOG": str(tmp_path / "triton.log")}
    subprocess.run(["bash", str(anchor / "start.sh")], env=env, check=True, capture_output=True, timeout=300)
    try:
        http_url = f"127.0.0.1:{ports['HTTP_PORT']}"
        grpc_url = f"127.0.0.1:{ports['GRPC_PORT']}"
        # the anchors' own perf_analyzer input file, over HTTP and gRPC
        for protocol, url in (("http", http_url), ("grpc", grpc_url)):
            before = model_successes(http_url, "chat_echo")
            report_path = tmp_path / f"{protocol}.json"
            result = bench("-i", protocol, "-u", url, "-m", "chat_echo", "--input-data",
                           str(anchor / "bench_data/chat_echo.json"), "--concurrency", "1,4", "-c", "20",
                           "--warmup", "1", "--report", str(report_path))
            check_report(json.loads(report_path.read_text()), result.stdout, [1, 4], 20)
            assert model_successes(http_url, "chat_echo") - before == 41
        # a decoupled model, streamed: one piece per word
        prompt = tmp_path / "prompt.json"
        prompt.write_text(json.dumps({"data": [{"prompt": {"content": ["one two three four five"], "shape": [1]}}]}))
        for protocol, url in (("grpc", grpc_url), ("http", http_url)):  # HTTP: Triton's /generate_stream
            report_path = tmp_path / f"stream-{protocol}.json"
            result = bench("-i", protocol, "-u", url, "-m", "stream_echo", "--input-data", str(prompt),
                           "--concurrency", "2", "-c", "10", "--warmup", "0", "--report", str(report_path))
            report = json.loads(report_path.read_text())
            check_report(report, result.stdout, [2], 10)
            assert report["stream"] is True and report["levels"][0]["tokens"] == 50
        assert model_successes(http_url, "stream_echo") == 20
    finally:
        subprocess.run(["bash", str(anchor / "stop.sh")], env=env, capture_output=True, timeout=120)
