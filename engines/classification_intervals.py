"""Subject-level bootstrap intervals of the classification metrics, and paired differences between models.

Slices of one subject are correlated (same anatomy, same lesion), so the bootstrap draws *subjects* (clusters of
items; an item without a subject, such as a Kaggle image, is its own cluster) and recomputes each metric from the
drawn clusters' items (``engines.bootstrap``). Every model is scored on the same draws, so differences are paired.

Metrics, with the definitions of :func:`engines.classification_eval.classification_metrics`:

- ``accuracy`` (pooled correct / items), ``macro_f1`` (mean per-class F1 over the classes that occur in the drawn
  labels or predictions), ``auroc`` (binary: class-1 AUROC; K > 2: mean one-vs-rest AUROC over the classes
  present in the drawn labels);
- ``conformal/<score>/alpha<a>/coverage`` for the given prediction sets. The conformal threshold is held at its
  calibrated value: the interval is over test subjects given the calibration split, not over calibration
  splits (whose variability the conformal guarantee itself accounts for, in expectation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engines.bootstrap import (
    DEFAULT_N_BOOT,
    Interval,
    RankingHistograms,
    Statistic,
    bootstrap_interval,
    paired_difference,
    subject_resamples,
    weighted_ratio,
)

__all__ = [
    "ClassificationStatistics",
    "MultilabelStatistics",
    "classification_intervals",
    "cluster_index",
    "item_clusters",
]


def cluster_index(keys: Sequence[Any]) -> np.ndarray:
    """Cluster indices of per-item keys (subjects), numbered in order of first appearance; a ``None`` or empty
    key makes the item its own cluster.

    Args:
        keys: one key per item.

    Returns:
        ``(n,)`` int64 indices.
    """
    index: dict[str, int] = {}
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        name = f"item:{i}" if key in (None, "") else f"key:{key}"
        out[i] = index.setdefault(name, len(index))
    return out


def item_clusters(
    items: Sequence[Mapping[str, Any]], fallback_ids: Sequence[str] | None = None
) -> np.ndarray:
    """The cluster index of every datalist item: its ``subject`` when it has one, else the item itself.

    Args:
        items: datalist entries.
        fallback_ids: per-item ids for items without ``subject`` (default: their position).

    Returns:
        ``(n,)`` int64 cluster indices, numbered in order of first appearance.
    """
    index: dict[str, int] = {}
    out = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        subject = item.get("subject")
        key = (
            f"subject:{subject}"
            if subject not in (None, "")
            else f"item:{fallback_ids[i] if fallback_ids is not None else i}"
        )
        out[i] = index.setdefault(key, len(index))
    return out


class ClassificationStatistics:
    """One model's classification metrics as functions of cluster multiplicities (``engines.bootstrap``).

    Args:
        probs: class probabilities ``(n, K)``.
        labels: true class indices ``(n,)``.
        clusters: cluster index of every item (:func:`item_clusters`), ``0..C-1``.
        sets: ``{metric name: bool prediction sets (n, K)}`` for coverage metrics (e.g.
            ``"conformal/lac/alpha0.1/coverage"``).
        max_bins: AUROC bins (see :class:`engines.bootstrap.RankingHistograms`; exact below this many distinct
            probabilities).

    Raises:
        ValueError: shapes that do not match.
    """

    def __init__(
        self,
        probs: Any,
        labels: Any,
        clusters: Any,
        sets: Mapping[str, Any] | None = None,
        max_bins: int | None = 2048,
    ) -> None:
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64).ravel()
        c = np.asarray(clusters).astype(np.int64).ravel()
        if p.ndim != 2 or p.shape[0] != y.size or c.size != y.size:
            raise ValueError(f"probs {p.shape}, labels ({y.size},) and clusters ({c.size},) do not match")
        self.n_clusters = int(c.max()) + 1 if c.size else 0
        self.k = p.shape[1]
        pred = p.argmax(axis=1)
        n_c = self.n_clusters

        def per_cluster(values: np.ndarray) -> np.ndarray:
            return np.bincount(c, weights=values.astype(np.float64), minlength=n_c)

        self.items = per_cluster(np.ones(y.size))
        self.correct = per_cluster(pred == y)
        self.tp = np.stack([per_cluster((pred == k) & (y == k)) for k in range(self.k)], axis=1)
        self.fp = np.stack([per_cluster((pred == k) & (y != k)) for k in range(self.k)], axis=1)
        self.fn = np.stack([per_cluster((pred != k) & (y == k)) for k in range(self.k)], axis=1)
        self.present = np.stack([per_cluster(y == k) for k in range(self.k)], axis=1) > 0  # (C, K)
        members = [np.flatnonzero(c == j) for j in range(n_c)]
        classes = [1] if self.k == 2 else list(range(self.k))
        self.auroc_hist = {
            k: RankingHistograms([p[m, k] for m in members], [y[m] == k for m in members], max_bins=max_bins)
            for k in classes
        }
        self.coverage = {
            name: per_cluster(np.asarray(s, dtype=bool)[np.arange(y.size), y])
            for name, s in (sets or {}).items()
        }

    def _macro_f1(self, m: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(m, dtype=np.float64))
        tp, fp, fn = w @ self.tp, w @ self.fp, w @ self.fn
        den = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), np.nan)
            out = np.nanmean(np.where(den > 0, f1, np.nan), axis=1)
        return out[0] if np.ndim(m) == 1 else out

    def _auroc(self, m: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(m, dtype=np.float64))
        if self.k == 2:
            out = self.auroc_hist[1].auroc(w)
        else:
            present = (w @ self.present.astype(np.float64)) > 0  # (B, K): class drawn at least once
            per_class = np.stack([self.auroc_hist[k].auroc(w) for k in range(self.k)], axis=1)
            enough = present.sum(axis=1) >= 2
            with np.errstate(invalid="ignore"):
                mean = np.nanmean(np.where(present, per_class, np.nan), axis=1)
            out = np.where(enough, mean, np.nan)
        return out[0] if np.ndim(m) == 1 else out

    def statistics(self) -> dict[str, Statistic]:
        """``{metric: statistic}`` for ``accuracy``, ``macro_f1``, ``auroc`` and every coverage in ``sets``."""
        out: dict[str, Statistic] = {
            "accuracy": weighted_ratio(self.correct, self.items),
            "macro_f1": self._macro_f1,
            "auroc": self._auroc,
        }
        for name, covered in self.coverage.items():
            out[name] = weighted_ratio(covered, self.items)
        return out


class MultilabelStatistics:
    """Multi-label metrics of one model as functions of cluster multiplicities: ``mean_auroc``, ``mean_auprc`` and
    ``auroc/<finding>``, with the definitions of :func:`engines.probe.multilabel_metrics` (masked ``-1`` entries
    left out, the means over the findings defined in the drawn studies).

    Args:
        probs: probabilities ``(n, L)``.
        labels: findings ``(n, L)`` in ``{1, 0, -1}``.
        clusters: cluster index per study (``0..C-1``).
        findings: the ``L`` names.
        max_bins: see :class:`engines.bootstrap.RankingHistograms`.

    Raises:
        ValueError: shapes that do not match.
    """

    def __init__(
        self, probs: Any, labels: Any, clusters: Any, findings: Sequence[str], max_bins: int | None = 2048
    ) -> None:
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        c = np.asarray(clusters).astype(np.int64).ravel()
        if p.ndim != 2 or p.shape != y.shape or c.size != p.shape[0] or len(findings) != p.shape[1]:
            raise ValueError(
                f"probs {p.shape}, labels {y.shape}, clusters ({c.size},) and {len(findings)} findings do not match"
            )
        self.n_clusters = int(c.max()) + 1 if c.size else 0
        self.findings = list(findings)
        members = [np.flatnonzero(c == j) for j in range(self.n_clusters)]
        self.hist = []
        for f in range(p.shape[1]):
            kept = [m[y[m, f] != -1] for m in members]
            self.hist.append(
                RankingHistograms([p[k, f] for k in kept], [y[k, f] == 1 for k in kept], max_bins=max_bins)
            )

    def _per_finding(self, m: np.ndarray, what: str) -> np.ndarray:
        w = np.atleast_2d(np.asarray(m, dtype=np.float64))
        # AUPRC needs negatives too (multilabel_metrics: NaN without both classes); the AUROC is NaN then anyway
        au = np.stack([h.auroc(w) for h in self.hist], axis=1)
        if what == "auroc":
            return au
        ap = np.stack([h.average_precision(w) for h in self.hist], axis=1)
        return np.where(np.isfinite(au), ap, np.nan)

    def _mean(self, what: str) -> Statistic:
        def stat(m: np.ndarray) -> np.ndarray:
            v = self._per_finding(m, what)
            defined = np.isfinite(v)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(
                    defined.any(axis=1), np.where(defined, v, 0).sum(axis=1) / defined.sum(axis=1), np.nan
                )
            return out[0] if np.ndim(m) == 1 else out

        return stat

    def _finding(self, f: int) -> Statistic:
        def stat(m: np.ndarray) -> np.ndarray:
            return self.hist[f].auroc(m)

        return stat

    def statistics(self) -> dict[str, Statistic]:
        """``{metric: statistic}`` for ``mean_auroc``, ``mean_auprc`` and ``auroc/<finding>``."""
        out: dict[str, Statistic] = {"mean_auroc": self._mean("auroc"), "mean_auprc": self._mean("auprc")}
        for f, name in enumerate(self.findings):
            out[f"auroc/{name}"] = self._finding(f)
        return out


def classification_intervals(
    models: Mapping[str, ClassificationStatistics | MultilabelStatistics],
    strata: Sequence[Any] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> tuple[dict[str, dict[str, Interval]], dict[str, dict[str, Interval]]]:
    """Intervals of every model's metrics and paired differences of every pair, on one draw of clusters.

    Args:
        models: ``{model: statistics}`` over the same items and clusters.
        strata: one label per cluster (drawn within), e.g. the cluster's largest class index; ``None``: none.
        n_boot: replicates.
        level: coverage.
        seed: seed of the draws.
        pairs: the ``(a, b)`` differences to report; default every pair in order.

    Returns:
        ``({model: {metric: Interval}}, {"<a>-<b>": {metric: Interval of a - b}})``.

    Raises:
        ValueError: no model, or models over different numbers of clusters.
    """
    if not models:
        raise ValueError("no model to bootstrap")
    sizes = {s.n_clusters for s in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"models were scored on different cluster sets: {sorted(sizes)}")
    draws = subject_resamples(sizes.pop(), n_boot, strata, seed)
    stats = {name: s.statistics() for name, s in models.items()}
    intervals = {
        name: {metric: bootstrap_interval(fn, draws, level) for metric, fn in st.items()}
        for name, st in stats.items()
    }
    names = list(models)
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    unknown = sorted({x for pair in pairs for x in pair} - set(names))
    if unknown:
        raise ValueError(f"pairs name models that were not given: {unknown}")
    differences = {
        f"{a}-{b}": {
            metric: paired_difference(stats[a][metric], stats[b][metric], draws, level)
            for metric in stats[a]
            if metric in stats[b]
        }
        for a, b in pairs
    }
    return intervals, differences
