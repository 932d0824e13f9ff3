"""Prometheus metrics (``--metrics-port``) and the statistics extension against a real server.

Uses the session's ``core_server`` (tests/model_repository); every check is a
difference between two readings, so other tests' traffic does not matter.
"""

from __future__ import annotations

import collections
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from tritonclient.utils import InferenceServerException

from triserve.backends.llm.metrics import LLMMetrics
from triserve.core.metrics import metrics_registry
from triserve.frontends.metrics import exposition

COUNTERS = [
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
]


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample of ``name`` whose labels include ``labels`` (exactly one must match)."""
    found = []
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1).split(",") for k, v in labels.items()):
            found.append(float(match.group(2)))
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def identity_request(client, model: str, data: np.ndarray, datatype: str = "FP32"):
    tensor = httpclient.InferInput("INPUT0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor])


def model_stats(client, model: str) -> dict:
    (stats,) = client.get_inference_statistics(model)["model_stats"]
    return stats


@pytest.fixture
def client(core_server):
    return httpclient.InferenceServerClient(core_server.http_url)


def test_metric_families_have_tritons_names_and_types(core_server):
    text = scrape(core_server)
    for name in COUNTERS:
        assert f"# TYPE {name} counter\n" in text
        assert f"{name}_total" not in text
    assert "# TYPE nv_inference_pending_request_count gauge\n" in text
    assert value(text, "nv_inference_pending_request_count", model="identity_fp32", version="1") == 0


def test_successful_requests_are_counted(core_server, client):
    labels = {"model": "identity_fp32", "version": "1"}
    before = scrape(core_server)
    for _ in range(3):
        identity_request(client, "identity_fp32", np.ones(4, np.float32))
    after = scrape(core_server)
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count"):
        assert value(after, name, **labels) - value(before, name, **labels) == 3
    for name in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert value(after, name, **labels) > value(before, name, **labels)


def test_failures_are_counted_by_reason(core_server, client):
    before = scrape(core_server)
    with pytest.raises(InferenceServerException) as error:
        identity_request(client, "identity_fp32", np.ones(2, np.int32), "INT32")
    assert ("inference input 'INPUT0' data-type is 'INT32', but model 'identity_fp32' expects 'FP32'"
            in error.value.message())
    with pytest.raises(InferenceServerException, match="this model always fails"):
        identity_request(client, "raises", np.ones(2, np.float32))
    after = scrape(core_server)

    def failures(model: str, reason: str) -> float:
        return (value(after, "nv_inference_request_failure", model=model, reason=reason)
                - value(before, "nv_inference_request_failure", model=model, reason=reason))

    assert failures("identity_fp32", "OTHER") == 1  # rejected by validation, before the model ran
    assert failures("raises", "BACKEND") == 1
    assert failures("identity_fp32", "BACKEND") == 0


def test_statistics_in_tritons_shape(client):
    before = model_stats(client, "identity_fp32_batched")
    identity_request(client, "identity_fp32_batched", np.ones((3, 2), np.float32))
    after = model_stats(client, "identity_fp32_batched")
    assert (after["name"], after["version"]) == ("identity_fp32_batched", "1")
    assert after["inference_count"] - before["inference_count"] == 3  # the batch dimension counts
    assert after["execution_count"] - before["execution_count"] == 1
    stats, previous = after["inference_stats"], before["inference_stats"]
    for kind in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert int(stats[kind]["count"]) - int(previous[kind]["count"]) == 1
    assert int(stats["success"]["ns"]) > int(previous["success"]["ns"])
    assert int(after["last_inference"]) > 0
    sizes = {entry["batch_size"]: entry for entry in after["batch_stats"]}
    assert 3 in sizes and int(sizes[3]["compute_infer"]["count"]) >= 1


def test_statistics_of_an_unknown_model(client):
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found"):
        client.get_inference_statistics("nope")


def test_exposition_keeps_bare_counter_names_and_standard_families():
    """Backends' own prometheus_client metrics are written unchanged next to Triton's."""
    registry = CollectorRegistry()
    Counter("engine_tokens", "Tokens generated", ["model"], registry=registry).labels('a"b').inc(2)

    class TritonStyle:
        def collect(self):
            metric = Metric("nv_example", "An example", "counter")
            metric.add_sample("nv_example", {"model": "m", "version": "1"}, 5)
            return [metric]

    registry.register(TritonStyle())
    text = exposition(registry).decode()
    assert "# TYPE engine_tokens_total counter\n" in text
    assert 'engine_tokens_total{model="a\\"b"} 2.0\n' in text
    assert '# TYPE nv_example counter\nnv_example{model="m",version="1"} 5.0\n' in text


def test_reloading_an_llm_version_keeps_its_series():
    """A reload of the same version tracks the new model before the old one is closed."""
    old = LLMMetrics("reloaded", 1, lambda: collections.defaultdict(int))
    new = LLMMetrics("reloaded", 1, lambda: collections.defaultdict(lambda: 7))
    old.close()
    new.first_token(0.2)
    text = generate_latest(metrics_registry()).decode()
    assert value(text, "triserve_llm_generation_tokens_total", model="reloaded") == 7
    assert value(text, "triserve_llm_time_to_first_token_seconds_count", model="reloaded") == 1
    new.close()
    assert 'model="reloaded"' not in generate_latest(metrics_registry()).decode()


def test_figures_of_several_replicas_sum_into_one_series_each():
    """What a cluster deployment's front door reports: one series per model version, the
    sum over its replicas (counters, histograms, gauges), the earliest ``_created``."""
    from prometheus_client import Histogram

    from triserve.core.metrics import merge_families
    from triserve.core.statistics import ModelStatistics, merge_statistics

    replicas = []
    for successes, latency in ((3, 0.2), (5, 2.0)):
        registry = CollectorRegistry()
        Counter("restarts", "Restarts", ["model"], registry=registry).labels("m").inc(successes)
        Histogram("ttft_seconds", "TTFT", ["model"], buckets=(1.0,), registry=registry).labels("m").observe(latency)
        stats = ModelStatistics("m", 1)
        for _ in range(successes):
            stats.record_success(1000)
        stats.record_execution(2, [10, 10], 500)
        replicas.append((list(registry.collect()), stats.to_json()))
    families = merge_families(families for families, _ in replicas)

    class Merged:
        def collect(self):
            return families

    text = exposition(Merged()).decode()
    assert value(text, "restarts_total", model="m") == 8
    assert value(text, "ttft_seconds_count", model="m") == 2
    assert value(text, "ttft_seconds_bucket", model="m", le="1.0") == 1
    assert value(text, "ttft_seconds_sum", model="m") == pytest.approx(2.2)
    created = [s.value for f in families for s in f.samples if s.name == "restarts_created"]
    assert created == [min(s.value for fs, _ in replicas for f in fs for s in f.samples
                           if s.name == "restarts_created")]

    (merged,) = merge_statistics([row for _, row in replicas])
    assert merged["inference_stats"]["success"] == {"count": 8, "ns": 8000}
    assert merged["inference_count"] == 4 and merged["execution_count"] == 2
    assert merged["batch_stats"] == [{"batch_size": 2, "compute_input": {"count": 2, "ns": 0},
                                      "compute_infer": {"count": 2, "ns": 1000},
                                      "compute_output": {"count": 2, "ns": 0}}]
    assert merged["last_inference"] == max(row["last_inference"] for _, row in replicas)
