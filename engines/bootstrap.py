"""Subject-level bootstrap: confidence intervals of headline metrics and paired differences between methods.

The test set of a medical-imaging study is a sample of *subjects*; pixels and slices of one subject are not
independent, so a bootstrap over pixels or slices gives intervals that are far too narrow. Here every replicate
draws subjects with replacement (within strata, so the numbers of healthy and lesion subjects of each kind stay
as in the test set) and recomputes the metric from the drawn subjects' contributions, each counted as many times
as it was drawn. One draw matrix ``M`` (replicates x subjects, the multiplicities) is shared by every method of a
task, so the *difference* of two methods is bootstrapped paired: both are scored on the same resampled subjects in
every replicate, which removes the between-subject variance they share (Efron & Tibshirani, *An Introduction to
the Bootstrap*, 1993, ch. 13 (percentile interval); the paired design is the usual one for comparing two
classifiers on one test set).

Statistics are written as functions of a multiplicity vector or matrix, so one code path computes the point
estimate (multiplicity 1 for everyone) and every replicate:

- :func:`weighted_mean` for per-subject means (and for ratios of per-subject sums, :func:`weighted_ratio`: pooled
  Dice = 2 sum TP / sum (detected + positives));
- :class:`RankingHistograms` for pooled AUROC and average precision over pixels, slices or images: per subject,
  counts of positives and negatives per score bin; a replicate's pooled counts are ``M @ H`` (one matrix product
  for all replicates instead of one sort per replicate). With the subjects' distinct scores as bins the result is
  exactly :func:`engines.anomaly_eval.ranking_metrics`; for millions of pixels the bins are quantiles of the
  positives' and negatives' scores (the binned point estimate is reported next to the exact one).

Intervals are percentile intervals. Written with numpy only (no torch): scikit-learn and scipy have no
subject-clustered, paired bootstrap of pooled ranking metrics, and ``scipy.stats.bootstrap`` resamples
observations, not clusters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_N_BOOT",
    "Interval",
    "RankingHistograms",
    "Statistic",
    "bootstrap_interval",
    "paired_difference",
    "percentile_interval",
    "subject_resamples",
    "weighted_mean",
    "weighted_ratio",
]

DEFAULT_N_BOOT = 1000

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval.

    Attributes:
        point: the statistic on the test set as it is (every subject once).
        low, high: the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the replicates.
        level: the nominal coverage (0.95).
        n_boot: replicates with a defined (finite) value; replicates where the statistic is undefined
            (for example no positive pixel drawn) are left out and counted in ``n_undefined``.
        n_undefined: replicates left out.
        p_le_zero: share of the replicates at or below zero (for a difference: how often the first method
            did not beat the second); NaN for a plain interval.
    """

    point: float
    low: float
    high: float
    level: float
    n_boot: int
    n_undefined: int = 0
    p_le_zero: float = math.nan

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero (a difference whose sign the test set settles)."""
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float]:
        """The fields as floats (for JSON and MLflow)."""
        return {k: float(v) for k, v in asdict(self).items()}

    def describe(self, digits: int = 3) -> str:
        """``point [low, high]`` with ``digits`` decimals."""
        return f"{self.point:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def subject_resamples(
    n_subjects: int, n_boot: int = DEFAULT_N_BOOT, strata: Sequence[Any] | None = None, seed: int = 0
) -> np.ndarray:
    """Multiplicities of a stratified subject bootstrap.

    Args:
        n_subjects: subjects in the test set.
        n_boot: replicates.
        strata: one label per subject (for example its lesion kind); subjects are drawn with replacement
            within each stratum, as many as the stratum has. ``None``: one stratum.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(n_boot, n_subjects)`` int32 multiplicities; every row sums to ``n_subjects`` and, within each stratum,
        to the stratum's size.

    Raises:
        ValueError: no subject, ``n_boot < 1`` or one stratum label per subject missing.
    """
    if n_subjects < 1:
        raise ValueError("the bootstrap needs at least one subject")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    labels = np.zeros(n_subjects, dtype=np.int64) if strata is None else np.asarray([str(s) for s in strata])
    if labels.shape != (n_subjects,):
        raise ValueError(f"strata has {labels.size} labels for {n_subjects} subjects")
    rng = np.random.default_rng(seed)
    out = np.zeros((n_boot, n_subjects), dtype=np.int32)
    rows = np.arange(n_boot)[:, None]
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        draws = members[rng.integers(0, members.size, size=(n_boot, members.size))]
        np.add.at(out, (np.broadcast_to(rows, draws.shape), draws), 1)
    return out


def _as_matrix(m: np.ndarray) -> tuple[np.ndarray, bool]:
    m = np.asarray(m, dtype=np.float64)
    return (m[None], True) if m.ndim == 1 else (m, False)


def weighted_mean(values: Sequence[float] | np.ndarray) -> Statistic:
    """The mean of per-subject values under multiplicities (subjects whose value is NaN are left out).

    Args:
        values: one value per subject.

    Returns:
        A statistic: multiplicities ``(n,)`` or ``(B, n)`` -> mean(s); NaN where no defined value was drawn.
    """
    v = np.asarray(values, dtype=np.float64)
    defined = np.isfinite(v)
    v0 = np.where(defined, v, 0.0)

    def stat(m: np.ndarray) -> np.ndarray:
        w, single = _as_matrix(m)
        den = w @ defined.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, (w @ v0) / np.where(den > 0, den, 1.0), np.nan)
        return out[0] if single else out

    return stat


def weighted_ratio(
    numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray
) -> Statistic:
    """``sum m_i a_i / sum m_i b_i``: a pooled rate from per-subject sums (pooled Dice, accuracy, coverage).

    Args:
        numerator: per-subject sums ``a_i`` (for pooled Dice ``2 TP_i``; for accuracy the correct items).
        denominator: per-subject sums ``b_i`` (``detected_i + positives_i``; the items).

    Returns:
        A statistic over multiplicities; NaN where the pooled denominator is 0.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"numerator {a.shape} and denominator {b.shape} differ in shape")

    def stat(m: np.ndarray) -> np.ndarray:
        w, single = _as_matrix(m)
        den = w @ b
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, (w @ a) / np.where(den > 0, den, 1.0), np.nan)
        return out[0] if single else out

    return stat


class RankingHistograms:
    """Per-subject positive/negative counts per score bin, for pooled AUROC and average precision under resampling.

    Args:
        scores: one array of scores per subject (pixels, slices or images; higher = more positive).
        labels: one bool array per subject, of the same sizes.
        weights: optional per-item weights (the evaluator's subsampling weights), one array per subject.
        max_bins: ``None`` for exact results (the bins are the distinct scores of all subjects, so the metrics
            equal :func:`engines.anomaly_eval.ranking_metrics` on the pooled items); otherwise, when there are
            more distinct scores than this, bin edges at ``max_bins // 2`` quantiles of the positives' scores and
            as many of the negatives' (resolution where either class has its mass; a tie within a bin counts as
            one threshold).

    Raises:
        ValueError: no subject, or scores and labels of a subject differ in size, or a score is NaN.
    """

    def __init__(
        self,
        scores: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        weights: Sequence[np.ndarray | None] | None = None,
        max_bins: int | None = 4096,
    ) -> None:
        if len(scores) == 0 or len(scores) != len(labels):
            raise ValueError(
                f"need one score and one label array per subject, got {len(scores)} and {len(labels)}"
            )
        s_list = [np.asarray(s, dtype=np.float64).ravel() for s in scores]
        y_list = [np.asarray(y).ravel().astype(bool) for y in labels]
        w_list = (
            [None] * len(s_list)
            if weights is None
            else [None if w is None else np.asarray(w, dtype=np.float64).ravel() for w in weights]
        )
        for i, (s, y, w) in enumerate(zip(s_list, y_list, w_list, strict=True)):
            if s.shape != y.shape or (w is not None and w.shape != s.shape):
                raise ValueError(f"subject {i}: scores, labels and weights differ in size")
            if np.isnan(s).any():
                raise ValueError(f"subject {i}: scores contain NaN")
        pooled = np.concatenate(s_list)
        pooled_y = np.concatenate(y_list)
        distinct = np.unique(pooled)
        if max_bins is None or distinct.size <= max_bins:
            edges = distinct  # bin j holds exactly the score edges[j]
            self.exact = True
        else:
            q = np.linspace(0.0, 1.0, max(max_bins // 2, 2))
            parts = [np.quantile(pooled[c], q) for c in (pooled_y, ~pooled_y) if c.any()]
            edges = np.unique(np.concatenate(parts))
            self.exact = False
        self.edges = edges
        n_bins = edges.size
        self.pos = np.zeros((len(s_list), n_bins), dtype=np.float64)
        self.neg = np.zeros((len(s_list), n_bins), dtype=np.float64)
        for i, (s, y, w) in enumerate(zip(s_list, y_list, w_list, strict=True)):
            # bin of a score: the last edge <= it (exact mode: its own value)
            b = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
            ww = np.ones_like(s) if w is None else w
            self.pos[i] = np.bincount(b[y], weights=ww[y], minlength=n_bins)
            self.neg[i] = np.bincount(b[~y], weights=ww[~y], minlength=n_bins)

    @property
    def n_subjects(self) -> int:
        """Subjects (rows of the histograms)."""
        return self.pos.shape[0]

    def _curves(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, _ = _as_matrix(m)
        if w.shape[1] != self.n_subjects:
            raise ValueError(f"multiplicities for {w.shape[1]} subjects, histograms of {self.n_subjects}")
        # descending score: detecting every bin >= j
        tps = np.cumsum((w @ self.pos)[:, ::-1], axis=1)
        fps = np.cumsum((w @ self.neg)[:, ::-1], axis=1)
        return tps, fps

    def auroc(self, m: np.ndarray) -> np.ndarray:
        """Pooled AUROC (trapezoids, ties count half) under multiplicities ``(n,)`` or ``(B, n)``; NaN without both
        classes."""
        tps, fps = self._curves(m)
        p, n = tps[:, -1], fps[:, -1]
        dfp = np.diff(fps, axis=1, prepend=0.0)
        tp_prev = np.concatenate([np.zeros((tps.shape[0], 1)), tps[:, :-1]], axis=1)
        area = np.sum(dfp * (tps + tp_prev), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where((p > 0) & (n > 0), area / (2.0 * p * n), np.nan)
        return out[0] if np.ndim(m) == 1 else out

    def average_precision(self, m: np.ndarray) -> np.ndarray:
        """Pooled average precision ``sum (R_k - R_{k-1}) P_k`` under multiplicities; NaN without positives."""
        tps, fps = self._curves(m)
        p = tps[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tps / np.where(p > 0, p, 1.0)[:, None]
            precision = tps / np.maximum(tps + fps, np.finfo(np.float64).tiny)
            ap = np.sum(np.diff(recall, axis=1, prepend=0.0) * precision, axis=1)
        out = np.where(p > 0, ap, np.nan)
        return out[0] if np.ndim(m) == 1 else out


def percentile_interval(
    point: float, replicates: np.ndarray, level: float = 0.95, difference: bool = False
) -> Interval:
    """The percentile interval of bootstrap replicates (undefined replicates left out).

    Args:
        point: the statistic on the test set.
        replicates: one value per replicate (NaN where undefined).
        level: nominal coverage in (0, 1).
        difference: also report the share of replicates at or below zero.

    Returns:
        The :class:`Interval` (NaN bounds when no replicate is defined).

    Raises:
        ValueError: ``level`` outside (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    r = np.asarray(replicates, dtype=np.float64).ravel()
    ok = r[np.isfinite(r)]
    if ok.size == 0:
        low = high = p_le = math.nan
    else:
        low, high = (float(x) for x in np.quantile(ok, [(1 - level) / 2, (1 + level) / 2]))
        p_le = float(np.mean(ok <= 0)) if difference else math.nan
    return Interval(float(point), low, high, float(level), int(ok.size), int(r.size - ok.size), p_le)


def bootstrap_interval(statistic: Statistic, resamples: np.ndarray, level: float = 0.95) -> Interval:
    """Point estimate (every subject once) and percentile interval of ``statistic`` over ``resamples``.

    Args:
        statistic: multiplicities ``(n,)`` or ``(B, n)`` -> value(s).
        resamples: ``(B, n)`` multiplicities from :func:`subject_resamples`.
        level: nominal coverage.

    Returns:
        The :class:`Interval`.
    """
    ones = np.ones(resamples.shape[1])
    return percentile_interval(float(statistic(ones)), statistic(resamples), level)


def paired_difference(a: Statistic, b: Statistic, resamples: np.ndarray, level: float = 0.95) -> Interval:
    """Paired bootstrap of ``a - b``: both statistics on the same resampled subjects in every replicate.

    Args:
        a, b: statistics over the same subjects in the same order.
        resamples: ``(B, n)`` multiplicities.
        level: nominal coverage.

    Returns:
        The :class:`Interval` of the difference, with ``p_le_zero``.
    """
    ones = np.ones(resamples.shape[1])
    point = float(a(ones)) - float(b(ones))
    return percentile_interval(point, a(resamples) - b(resamples), level, difference=True)
