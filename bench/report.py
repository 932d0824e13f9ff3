"""Turning measurements into the markdown tables both benchmarks print and save."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(benchmark: str) -> Path:
    """A fresh ``bench/results/<benchmark>-<stamp>/`` for one run's raw files and summary."""
    path = RESULTS / f"{benchmark}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs and not math.isnan(theirs) else math.nan


def fmt(value: float | int | str, digits: int = 2) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[float | int | str]],
                   digits: Sequence[int] | None = None) -> str:
    """A markdown table; ``digits`` gives the decimals of each column's floats (default 2)."""
    digits = digits or [2] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell, d) for cell, d in zip(row, digits)) + " |" for row in rows]
    return "\n".join(lines)
