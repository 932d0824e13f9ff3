"""The ``/metrics`` app served on ``--metrics-port`` (Prometheus text format 0.0.4).

Triton's counters are named without prometheus_client's ``_total`` suffix
(``nv_inference_request_success``), and dashboards built for Triton query those
names. ``prometheus_client`` always writes a counter's HELP/TYPE lines with
``_total``, so counters whose samples carry the bare family name are written
here; every other family (the LLM engine's, for example) goes through
``prometheus_client`` unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from triserve.core.metrics import metrics_registry


class _OneFamily:
    """A collector of one already-collected family, to reuse ``generate_latest`` per family."""

    def __init__(self, metric: Metric):
        self._metric = metric

    def collect(self) -> list[Metric]:
        return [self._metric]


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _bare_counter(metric: Metric) -> str:
    documentation = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    lines = [f"# HELP {metric.name} {documentation}", f"# TYPE {metric.name} counter"]
    for sample in metric.samples:
        labels = ",".join(f'{key}="{_escape_label(value)}"' for key, value in sample.labels.items())
        lines.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}" if labels
                     else f"{sample.name} {floatToGoString(sample.value)}")
    return "\n".join(lines) + "\n"


def exposition(registry: CollectorRegistry | Any) -> bytes:
    """The registry in Prometheus text format, Triton's counter names kept as they are."""
    parts = []
    for metric in registry.collect():
        if metric.type == "counter" and all(s.name == metric.name for s in metric.samples):
            parts.append(_bare_counter(metric).encode("utf-8"))
        else:
            parts.append(generate_latest(_OneFamily(metric)))
    return b"".join(parts)


def create_metrics_app(registry: Callable[[], Any] = metrics_registry) -> Starlette:
    """``GET /metrics``: ``registry()`` (anything with ``collect()``; by default this
    process's registry) in Prometheus text format."""

    async def metrics(request: Request) -> Response:
        return Response(exposition(registry()), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
