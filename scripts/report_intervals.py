"""Confidence intervals and paired differences in the comparison report (read from MLflow metrics).

The evaluations log, next to each metric ``<m>``, its subject-level bootstrap bounds ``<m>_ci_low`` /
``<m>_ci_high``, and for compared pairs the paired difference ``diff/<a>-<b>/<m>`` with its bounds
(``engines/bootstrap.py``, docs/evaluation.md). This module turns them into table cells ``point [low, high]`` and
into sentences saying which differences the test set resolves (the interval excludes 0) and which it does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Difference", "difference_sentence", "differences", "fmt", "interval_cell"]


def fmt(v: float) -> str:
    """Three decimals, three significant digits for small values (the report's number format); ``—`` for NaN."""
    if not math.isfinite(v):
        return "—"
    return f"{v:.3f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def interval_cell(metrics: Mapping[str, float], key: str) -> str | float:
    """``point [low, high]`` when ``key`` has logged bounds, else the bare value (NaN when absent).

    Args:
        metrics: a run's metrics.
        key: the metric (its bounds are ``<key>_ci_low`` / ``<key>_ci_high``).

    Returns:
        The cell.
    """
    v = metrics.get(key, math.nan)
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if lo is None or hi is None or not math.isfinite(v):
        return v
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` of one metric with its bootstrap interval."""

    a: str
    b: str
    metric: str
    point: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0


def differences(metrics: Mapping[str, float], metric: str, prefix: str = "") -> list[Difference]:
    """The paired differences of ``metric`` logged in ``metrics`` as ``diff/<a>-<b>/<metric>`` (+ bounds).

    Args:
        metrics: a run's metrics.
        metric: the metric name, e.g. ``pixel_auprc``.
        prefix: only pairs whose name starts with it.

    Returns:
        One :class:`Difference` per pair with both bounds, in name order.
    """
    out = []
    tail = f"/{metric}"
    for key in sorted(metrics):
        if not key.startswith("diff/") or not key.endswith(tail):
            continue
        pair = key[len("diff/") : -len(tail)]
        if "-" not in pair or not pair.startswith(prefix):
            continue
        lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        if lo is None or hi is None:
            continue
        a, b = pair.split("-", 1)
        out.append(Difference(a, b, metric, float(metrics[key]), float(lo), float(hi)))
    return out


def difference_sentence(d: Difference, label: str | None = None) -> str:
    """One sentence: the difference, its interval and whether the test set resolves its sign.

    Args:
        d: the difference.
        label: the metric's name in words (default ``d.metric``).

    Returns:
        E.g. ``"t250 vs intensity_baseline, pixel AUPRC: +0.012 [+0.004, +0.020], resolved: t250 is better."``
    """
    name = label or d.metric
    head = f"{d.a} vs {d.b}, {name}: {d.point:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    if d.resolved:
        better, worse = (d.a, d.b) if d.point > 0 else (d.b, d.a)
        return f"{head}, resolved: {better} is better than {worse}."
    return f"{head}, not resolved: the test set does not tell which is better."
