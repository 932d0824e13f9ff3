"""The LLM figures in the core's Prometheus registry (``triserve_llm_*``).

Latencies are observed by the backend as tokens reach the client. Everything
the engine already counts (sequences, tokens, caches) is read from
``LLMEngine.stats()`` at scrape time instead of being mirrored on every step,
so the gauges are exact whenever ``/metrics`` is read and serving pays nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triserve.core.metrics import metrics_registry

_LABELS = ("model", "version")

# (metric name, engine stats key, help)
_GAUGES = (
    ("triserve_llm_running_sequences", "running", "Sequences being decoded"),
    ("triserve_llm_waiting_sequences", "waiting", "Requests waiting for a free sequence slot"),
    ("triserve_llm_kv_cache_bytes_in_use", "kv_cache_bytes_in_use", "KV cache bytes held by running sequences"),
    ("triserve_llm_prefix_cache_bytes", "prefix_cache_bytes", "KV bytes kept in the prefix cache for reuse"),
    ("triserve_llm_kv_cache_bytes_reserved", "kv_cache_bytes_reserved",
     "KV cache bytes reserved at load (kv_cache_mb); on the CPU only written pages take memory"),
    ("triserve_llm_weight_bytes", "weight_bytes", "Bytes of the weights the engine holds, as stored (quantized or not)"),
)
_COUNTERS = (
    ("triserve_llm_prompt_tokens", "prompt_tokens_total", "Prompt tokens prefilled"),
    ("triserve_llm_generation_tokens", "generated_tokens_total", "Tokens generated"),
    ("triserve_llm_prefix_cache_queries", "prefix_cache_queries", "Prompts looked up in the prefix cache"),
    ("triserve_llm_prefix_cache_hits", "prefix_cache_hits", "Prompts that reused a cached prefix"),
    ("triserve_llm_engine_restarts", "engine_restarts_total",
     "Restarts of the engine thread after a fault escaped its step loop"),
    ("triserve_llm_decode_graph_steps", "decode_graph_steps_total",
     "Decode steps replayed as CUDA graphs (on a GPU with cuda_graphs)"),
)

_TIME_TO_FIRST_TOKEN = Histogram(
    "triserve_llm_time_to_first_token_seconds",
    "Time from the request's arrival to its first generated token",
    _LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=metrics_registry(),
)
_TIME_PER_OUTPUT_TOKEN = Histogram(
    "triserve_llm_time_per_output_token_seconds",
    "Time between generated tokens of one request, after the first",
    _LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5),
    registry=metrics_registry(),
)


class _EngineStatsCollector(Collector):
    """Reads every loaded LLM model's engine stats when ``/metrics`` is scraped."""

    def __init__(self) -> None:
        self._sources: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {}

    def track(self, labels: tuple[str, str], stats: Callable[[], dict[str, Any]]) -> None:
        self._sources[labels] = stats

    def untrack(self, labels: tuple[str, str], stats: Callable[[], dict[str, Any]]) -> bool:
        """Forget ``labels`` if ``stats`` is still their source (on a reload of the same version
        the new model tracks them before the old one is unloaded); True if forgotten."""
        if self._sources.get(labels) is not stats:
            return False
        del self._sources[labels]
        return True

    def collect(self) -> Iterator[Metric]:
        snapshots = [(labels, stats()) for labels, stats in list(self._sources.items())]
        for family, specs in ((GaugeMetricFamily, _GAUGES), (CounterMetricFamily, _COUNTERS)):
            for name, key, documentation in specs:
                metric = family(name, documentation, labels=_LABELS)
                for labels, snapshot in snapshots:
                    metric.add_metric(labels, snapshot[key])
                yield metric


_ENGINE_STATS = _EngineStatsCollector()
metrics_registry().register(_ENGINE_STATS)


class LLMMetrics:
    """One model version's LLM metrics."""

    def __init__(self, model: str, version: int, engine_stats: Callable[[], dict[str, Any]]):
        self._labels = (model, str(version))
        self._time_to_first_token = _TIME_TO_FIRST_TOKEN.labels(*self._labels)
        self._time_per_output_token = _TIME_PER_OUTPUT_TOKEN.labels(*self._labels)
        self._engine_stats = engine_stats
        _ENGINE_STATS.track(self._labels, engine_stats)

    def first_token(self, seconds: float) -> None:
        self._time_to_first_token.observe(seconds)

    def output_tokens(self, seconds: float, count: int) -> None:
        """``count`` tokens arrived ``seconds`` after the previous ones."""
        for _ in range(count):
            self._time_per_output_token.observe(seconds / count)

    def close(self) -> None:
        """The model is unloaded: its series disappear from ``/metrics``, unless a reload of
        the same version now owns them."""
        if _ENGINE_STATS.untrack(self._labels, self._engine_stats):
            _TIME_TO_FIRST_TOKEN.remove(*self._labels)
            _TIME_PER_OUTPUT_TOKEN.remove(*self._labels)
