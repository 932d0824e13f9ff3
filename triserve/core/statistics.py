"""Per-model-version counters, reported in Triton's ``ModelStatistics`` shape.

One set of counters feeds both the statistics extension (``/v2/models/stats``,
gRPC ``ModelStatistics``) and the Prometheus ``nv_*`` metrics, so the two can
never disagree. Updates are plain attribute arithmetic on the event loop: the
hot path pays no locks and no allocations beyond the batch-size bucket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# Triton 2.51's ``reason`` label values of nv_inference_request_failure.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass(slots=True)
class Duration:
    """A count and the nanoseconds they took together (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchDurations:
    """Compute times of the executions that had one particular batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStatistics:
    name: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    pending: int = 0  # requests queued, not yet executing

    def record_execution(self, batch_size: int, queue_ns: list[int], compute_ns: int) -> None:
        """One ``Backend.execute`` call over requests that waited ``queue_ns`` each.

        The core sees only the whole ``execute`` call, so all of it counts as
        compute_infer; compute_input and compute_output are counted with 0 ns.
        """
        self.execution_count += 1
        self.inference_count += batch_size
        for waited in queue_ns:
            self.queue.add(waited)
            self.compute_input.add(0)
            self.compute_infer.add(compute_ns)
            self.compute_output.add(0)
        bucket = self.batches.get(batch_size)
        if bucket is None:
            bucket = self.batches[batch_size] = BatchDurations()
        bucket.compute_input.add(0)
        bucket.compute_infer.add(compute_ns)
        bucket.compute_output.add(0)

    def record_success(self, duration_ns: int) -> None:
        self.success.add(duration_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, reason: str, duration_ns: int) -> None:
        self.fail.add(duration_ns)
        self.failures[reason] += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def to_json(self) -> dict[str, Any]:
        """One entry of Triton's ``model_stats`` list."""
        return {
            "name": self.name,
            "version": str(self.version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": Duration().to_json(),
                "cache_miss": Duration().to_json(),
            },
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": bucket.compute_input.to_json(),
                    "compute_infer": bucket.compute_infer.to_json(),
                    "compute_output": bucket.compute_output.to_json(),
                }
                for size, bucket in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


def merge_statistics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``model_stats`` entries of several instances of the same models (replicas of a cluster
    deployment) summed into one entry per model version: counts and durations added, batch
    sizes matched, ``last_inference`` the latest."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["name"], row["version"])
        total = merged.get(key)
        if total is None:
            merged[key] = _copy(row)
            continue
        total["last_inference"] = max(total["last_inference"], row["last_inference"])
        total["inference_count"] += row["inference_count"]
        total["execution_count"] += row["execution_count"]
        _add_durations(total["inference_stats"], row["inference_stats"])
        for reason, durations in row.get("response_stats", {}).items():
            _add_durations(total["response_stats"].setdefault(reason, {}), durations)
        batches = {batch["batch_size"]: batch for batch in total["batch_stats"]}
        for batch in row["batch_stats"]:
            if batch["batch_size"] in batches:
                _add_durations(batches[batch["batch_size"]], batch)
            else:
                batches[batch["batch_size"]] = _copy(batch)
        total["batch_stats"] = [batches[size] for size in sorted(batches)]
        total["memory_usage"] = total["memory_usage"] + list(row["memory_usage"])
    return [merged[key] for key in sorted(merged, key=lambda k: (k[0], int(k[1])))]


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    return {key: _copy(value) if isinstance(value, dict)
            else [_copy(item) if isinstance(item, dict) else item for item in value]
            if isinstance(value, list) else value
            for key, value in row.items()}


def _add_durations(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Add ``{"count", "ns"}`` durations by name (other keys, such as batch_size, are kept)."""
    for name, duration in more.items():
        if isinstance(duration, dict):
            into = total.setdefault(name, {"count": 0, "ns": 0})
            into["count"] += duration["count"]
            into["ns"] += duration["ns"]
