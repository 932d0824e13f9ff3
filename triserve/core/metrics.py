"""Triton's ``nv_inference_*`` Prometheus metrics, read from the models' statistics.

The metrics live in one dedicated :class:`CollectorRegistry` (not the process
default), which backends may add their own collectors to through
:func:`metrics_registry`. The ``nv_*`` families are produced at scrape time
from each loaded model version's :class:`ModelStatistics`, so serving a request
costs nothing extra for metrics.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from triserve.core.statistics import FAILURE_REASONS, ModelStatistics

_REGISTRY = CollectorRegistry(auto_describe=False)

# (name, help, value in the statistics); durations are reported in microseconds.
_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     lambda s: s.execution_count),
    ("nv_inference_request_duration_us",
     "Cumulative inference request duration in microseconds (includes cached requests)",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us",
     "Cumulative inference queuing duration in microseconds (includes cached requests)",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds (does not include cached requests)",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds (does not include cached requests)",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds (does not include cached requests)",
     lambda s: s.compute_output.ns // 1000),
)


class _ModelMetricsCollector(Collector):
    """Turns the tracked models' statistics into Triton's metric families."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], ModelStatistics] = {}

    def track(self, statistics: ModelStatistics) -> None:
        self._models[(statistics.name, statistics.version)] = statistics

    def untrack(self, statistics: ModelStatistics) -> None:
        if self._models.get((statistics.name, statistics.version)) is statistics:
            del self._models[(statistics.name, statistics.version)]

    def collect(self) -> Iterator[Metric]:
        models = [self._models[key] for key in sorted(self._models)]
        failure = Metric("nv_inference_request_failure",
                         "Number of failed inference requests, all batch sizes", "counter")
        for stats in models:
            for reason in FAILURE_REASONS:
                failure.add_sample(failure.name, {**_labels(stats), "reason": reason},
                                   stats.failures[reason])
        yield failure
        for name, documentation, value in _COUNTERS:
            metric = Metric(name, documentation, "counter")
            for stats in models:
                metric.add_sample(name, _labels(stats), value(stats))
            yield metric
        pending = Metric("nv_inference_pending_request_count",
                         "Instantaneous number of pending requests awaiting execution per-model.",
                         "gauge")
        for stats in models:
            pending.add_sample(pending.name, _labels(stats), stats.pending)
        yield pending


def _labels(stats: ModelStatistics) -> dict[str, str]:
    return {"model": stats.name, "version": str(stats.version)}


_MODEL_METRICS = _ModelMetricsCollector()
_REGISTRY.register(_MODEL_METRICS)


def metrics_registry() -> CollectorRegistry:
    """The registry ``/metrics`` serves; backends register their own collectors here."""
    return _REGISTRY


def track_model(statistics: ModelStatistics) -> None:
    """Report a loaded model version's statistics as ``nv_*`` metrics."""
    _MODEL_METRICS.track(statistics)


def untrack_model(statistics: ModelStatistics) -> None:
    """Stop reporting an unloaded model version."""
    _MODEL_METRICS.untrack(statistics)


_INSTANCE_RESTARTS = Counter(
    "triserve_instance_restarts", "Restarts of model instance processes that died "
    "(crash, kill, execute deadline)", ["model", "version"], registry=_REGISTRY)


def count_instance_restart(model: str, version: int) -> None:
    """One restart of a dead instance process of ``model`` ``version``."""
    _INSTANCE_RESTARTS.labels(model=model, version=str(version)).inc()


def merge_families(groups: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The metric families of several instances of the same models (replicas of a cluster
    deployment) as one set: samples with the same name and labels are added up (counters,
    histogram buckets, and the gauges here, which all count things: sequences, bytes,
    requests), except ``*_created`` timestamps, of which the earliest is kept."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, list]] = {}
    for group in groups:
        for family in group:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type,
                                               family.unit)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                entry = samples.get(key)
                if entry is None:
                    samples[key] = [sample.name, dict(sample.labels), sample.value]
                elif sample.name.endswith("_created"):
                    entry[2] = min(entry[2], sample.value)
                else:
                    entry[2] += sample.value
    for name, family in families.items():
        for sample_name, labels, value in values[name].values():
            family.add_sample(sample_name, labels, value)
    return list(families.values())
