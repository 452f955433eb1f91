"""Evaluation of anomaly maps for unsupervised anomaly detection on brain MRI (DESIGN §4).

Both anomaly-detection bundles (and the intensity baseline) are scored by this module, so their
numbers are comparable. The protocol is documented in ``docs/evaluation.md``; in short, inside the
(eroded) brain mask:

- pixel AUPRC (headline), pooled over the test set and per volume; pixel AUROC (reported, but it
  saturates for very different methods);
- Dice at the best threshold chosen on the test set itself (the literature's optimistic oracle);
- Dice at thresholds fixed on *healthy validation* data only (1 %, 5 %, 10 % false-positive rate),
  the honest operating points, with the false-alarm rate on lesion-free slices;
- slice-level AUROC and AP; everything also per lesion kind (healthy subjects are negatives for
  every kind); a per-subject CSV.

Conventions used everywhere here:

- a pixel is *detected* at threshold ``t`` when its (post-processed) score is **strictly greater**
  than ``t``;
- volumes are ``(X, Y, Z)`` or channel-first ``(1, X, Y, Z)``, numpy or torch; non-bool masks are
  binarised with ``> 0.5``;
- metrics that are undefined for the data at hand are ``NaN``, never an exception (see
  :func:`ranking_metrics` and :class:`AnomalyEvaluator` for the rules).
"""

from __future__ import annotations

import csv
import io
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy import ndimage

from engines.bootstrap import RankingHistograms, Statistic, weighted_ratio
from engines.checkpoint import atomic_torch_save

__all__ = [
    "DEFAULT_FPRS",
    "AnomalyEvaluator",
    "PostProcess",
    "RankingMetrics",
    "curve_points",
    "dice_at_best_threshold",
    "fpr_tag",
    "healthy_reference_intensity",
    "healthy_thresholds",
    "intensity_baseline_map",
    "ranking_metrics",
    "thresholds_from_scores",
]

DEFAULT_FPRS: tuple[float, ...] = (0.01, 0.05, 0.10)


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):  # MetaTensor included
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_volume(x: Any, name: str) -> np.ndarray:
    """``(X, Y, Z)`` view of a ``(X, Y, Z)`` or ``(1, X, Y, Z)`` array/tensor."""
    a = _to_numpy(x)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"{name}: expected a single channel (1, X, Y, Z), got shape {a.shape}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a volume (X, Y, Z) or (1, X, Y, Z), got shape {a.shape}")
    return a


def _as_map(x: Any, name: str = "anomaly_map") -> np.ndarray:
    return np.asarray(_as_volume(x, name), dtype=np.float32)


def _as_mask(x: Any, name: str) -> np.ndarray:
    a = _as_volume(x, name)
    # float masks may come from interpolation, label maps from segmentations (BraTS 1/2/4): > 0.5
    # gives the union of the labels and the nearest binary mask
    return a if a.dtype == np.bool_ else a > 0.5


def _check_axis(axis: int) -> int:
    if not -3 <= axis <= 2:
        raise ValueError(f"axis must be in [-3, 2] for (X, Y, Z) volumes, got {axis}")
    return axis % 3


def _slices(vol: np.ndarray, axis: int) -> np.ndarray:
    """``(S, pixels)`` view with one row per slice along ``axis``."""
    v = np.moveaxis(vol, axis, 0)
    return v.reshape(v.shape[0], -1)


def fpr_tag(fpr: float) -> str:
    """Stable metric-name tag of a false-positive rate: 0.01 -> ``"fpr1"``, 0.1 -> ``"fpr10"``.

    Args:
        fpr: the false-positive rate, in (0, 1).

    Returns:
        ``"fpr"`` followed by the rate in percent (``%g``, so 0.005 -> ``"fpr0.5"``).
    """
    return f"fpr{round(fpr * 100, 6):g}"


def _nanmean(values: Sequence[float]) -> float:
    # np.nanmean warns on all-NaN input; an empty/all-NaN group is a documented NaN, not a warning
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


# ----------------------------------------------------------------------------------------------
# post-processing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostProcess:
    """Post-processing of anomaly maps, part of the protocol and reported with every result.

    Applied in this order:

    1. ``median``: median filter of size ``k`` on the map. Values outside the (un-eroded) brain are
       first replaced by the median score inside the brain, so neither background errors nor an
       arbitrary fill value (0 is not "normal" for every score) leak into the brain edge.
    2. ``erode``: the brain mask is eroded by a Euclidean ball of radius ``r`` voxels (a voxel is
       kept when every voxel within distance ``r`` is brain; outside the volume counts as
       non-brain). Only voxels of the eroded mask (the *region*) are evaluated: reconstruction
       methods light up the brain boundary, which says nothing about lesions.
    3. ``min_component`` (binary maps only, i.e. after thresholding): connected components with
       fewer than ``n`` voxels are removed (face connectivity). Used for the fixed-threshold Dice and
       the false alarms; not for the threshold-free curves and not for ``dice_best`` (see
       :class:`AnomalyEvaluator`).

    ``dims=2`` applies the filter, the erosion and the components in-plane, slice by slice along
    ``axis``; ``dims=3`` in 3D. ``0`` (or 1 for the median) switches a step off.

    MONAI's ``RemoveSmallObjects`` would fit step 3 but needs scikit-image, which is not a
    dependency; ``scipy.ndimage.label`` + ``bincount`` does the same, vectorised.

    Args:
        erode: erosion radius in voxels (>= 0).
        median: median-filter size (0/1 = off, otherwise odd >= 3, so the window is centred).
        min_component: minimum component size in voxels kept after thresholding (0/1 = off).
        dims: 2 (in-plane) or 3.
        axis: the slice axis for ``dims=2``.
    """

    erode: int = 0
    median: int = 0
    min_component: int = 0
    dims: int = 2
    axis: int = 2

    def __post_init__(self) -> None:
        for name in ("erode", "median", "min_component"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"PostProcess.{name} must be an integer >= 0, got {v!r}")
        if self.median > 1 and self.median % 2 == 0:
            raise ValueError(f"PostProcess.median must be odd (centred window), got {self.median}")
        if self.dims not in (2, 3):
            raise ValueError(f"PostProcess.dims must be 2 or 3, got {self.dims!r}")
        object.__setattr__(self, "axis", _check_axis(self.axis))

    def _window(self, k: int) -> tuple[int, int, int]:
        shape = [k, k, k]
        if self.dims == 2:
            shape[self.axis] = 1
        return (shape[0], shape[1], shape[2])

    def region(self, brain: Any) -> np.ndarray:
        """The evaluated region: the brain mask eroded by ``erode`` voxels.

        Args:
            brain: brain mask, ``(X, Y, Z)`` or ``(1, X, Y, Z)``.

        Returns:
            Bool array ``(X, Y, Z)``.
        """
        b = _as_mask(brain, "brain_mask")
        r = self.erode
        if r == 0 or not b.any():
            return b.copy()
        # erosion by a ball of radius r == "distance to the nearest non-brain voxel > r"; the
        # distance transform is exact and O(n), where binary_erosion with a (2r+1)^3 ball is not
        pad = [(1, 1)] * 3
        sampling = [1.0, 1.0, 1.0]
        if self.dims == 2:
            # other slices are put further away than r, so they never decide: in-plane erosion
            pad[self.axis] = (0, 0)
            sampling[self.axis] = float(r + 1)
        dist = ndimage.distance_transform_edt(np.pad(b, pad), sampling=sampling)
        inner = tuple(slice(p0, dist.shape[i] - p1) for i, (p0, p1) in enumerate(pad))
        return dist[inner] > r

    def apply_map(self, anomaly_map: Any, brain: Any) -> tuple[np.ndarray, np.ndarray]:
        """Median-filter the map and restrict it to the eroded brain.

        Args:
            anomaly_map: float map, ``(X, Y, Z)`` or ``(1, X, Y, Z)``.
            brain: brain mask of the same shape.

        Returns:
            ``(map, region)``: the filtered float32 map (0 outside the region, where it is never
            read) and the bool region (:meth:`region`).

        Raises:
            ValueError: shapes differ, or the map is not finite inside the brain.
        """
        m = _as_map(anomaly_map)
        b = _as_mask(brain, "brain_mask")
        if m.shape != b.shape:
            raise ValueError(f"anomaly map {m.shape} and brain mask {b.shape} differ in shape")
        if not np.isfinite(m[b]).all():
            raise ValueError("anomaly map has NaN/inf values inside the brain")
        if self.median > 1 and b.any():
            m = np.where(b, m, np.median(m[b])).astype(np.float32, copy=False)
            m = ndimage.median_filter(m, size=self._window(self.median), mode="nearest")
        region = self.region(b)
        return np.where(region, m, np.float32(0)).astype(np.float32, copy=False), region

    def apply_binary(self, binary: Any) -> np.ndarray:
        """Remove connected components smaller than ``min_component`` voxels from a binary map.

        Args:
            binary: bool (or 0/1) volume ``(X, Y, Z)`` or ``(1, X, Y, Z)``.

        Returns:
            Bool array ``(X, Y, Z)``.
        """
        b = _as_mask(binary, "binary")
        if self.min_component <= 1 or not b.any():
            return b
        structure = ndimage.generate_binary_structure(3, 1)  # face connectivity
        if self.dims == 2:
            idx = [1, 1, 1]
            for off in (0, 2):  # no neighbours across slices
                idx[self.axis] = off
                structure[tuple(idx)] = False
        labels, _ = ndimage.label(b, structure=structure)
        keep = np.bincount(labels.ravel()) >= self.min_component
        keep[0] = False
        return keep[labels]

    def as_dict(self) -> dict[str, int]:
        """The parameters, for logging."""
        return {
            "erode": int(self.erode),
            "median": int(self.median),
            "min_component": int(self.min_component),
            "dims": int(self.dims),
            "axis": int(self.axis),
        }

    def describe(self) -> str:
        """One line saying what is applied (goes into every result dict).

        Returns:
            The description.
        """
        where = f"2D in-plane (slice axis {self.axis})" if self.dims == 2 else "3D"
        parts = [
            f"median filter {self.median}" if self.median > 1 else "no median filter",
            f"brain mask eroded by {self.erode} voxels" if self.erode else "brain mask not eroded",
            (
                f"components < {self.min_component} voxels removed after thresholding "
                "(fixed-threshold Dice and false alarms only)"
                if self.min_component > 1
                else "no component removal"
            ),
        ]
        return f"{where}: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# threshold-free metrics
# ----------------------------------------------------------------------------------------------


class RankingMetrics(NamedTuple):
    """Threshold-free metrics of one score/label set (see :func:`ranking_metrics`)."""

    auroc: float
    auprc: float
    dice_best: float
    threshold_best: float
    n_pos: float
    n_neg: float


def _operating_points(
    scores: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP/FP at every distinct score, in decreasing order (one sort, like sklearn).

    Returns ``(tps, fps, values)``: detecting every sample with score >= ``values[i]`` gives
    ``tps[i]`` true and ``fps[i]`` false positives.
    """
    # the order within ties is irrelevant (only counts at the end of each tie group are read), so
    # the fast unstable sort is fine
    order = np.argsort(scores)[::-1]
    s = scores[order]
    y = labels[order]
    last = np.flatnonzero(s[1:] != s[:-1])  # last index of each group of tied scores
    last = np.append(last, s.size - 1)
    if sample_weight is None:
        tps = np.cumsum(y, dtype=np.int64)[last]
        fps = (last + 1) - tps
    else:
        w = np.asarray(sample_weight, dtype=np.float64)[order]
        tps = np.cumsum(w * y)[last]
        fps = np.cumsum(w * ~y)[last]
    return tps, fps, s[last]


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat float scores and bool labels of one size (float inputs keep their precision)."""
    s = np.asarray(scores).ravel()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    y = np.asarray(labels).ravel().astype(bool, copy=False)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    return s, y


def ranking_metrics(scores: Any, labels: Any, sample_weight: Any | None = None) -> RankingMetrics:
    """AUROC, average precision and the best Dice over all thresholds, exactly, from one sort.

    Same definitions as ``sklearn.metrics.roc_auc_score`` (trapezoids over the distinct scores,
    so ties count half) and ``average_precision_score`` (``sum_n (R_n - R_{n-1}) P_n``, no
    interpolation); implemented here so that the pooled curves over 10^7 pixels need a single
    float32 argsort instead of several float64 copies. The tests check equality with sklearn.

    Dice at threshold ``t`` is ``2 TP / (2 TP + FP + FN) = 2 TP / (detected + positives)``; the best
    over every distinct threshold is exact. ``threshold_best`` is returned in the module's
    convention (detected = score **>** threshold): the next lower distinct score (or the float just
    below the minimum when detecting everything is best). Ties in Dice go to the higher threshold.

    Degenerate cases (never an exception):

    - no samples: everything NaN;
    - no positives: AUROC, AUPRC, Dice and threshold NaN (nothing to find);
    - no negatives: AUROC NaN (needs both classes); AUPRC is then 1 and Dice defined.

    Args:
        scores: anomaly scores (any shape; flattened), higher = more anomalous.
        labels: bool/0-1 labels of the same size (1 = lesion).
        sample_weight: optional non-negative weights (used for the subsampled pooled curves).

    Returns:
        :class:`RankingMetrics` (counts are weighted when weights are given).
    """
    s, y = _scores_labels(scores, labels)
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64).ravel()
        if sample_weight.shape != s.shape:
            raise ValueError("sample_weight must have one weight per score")
    nan = math.nan
    if s.size == 0:
        return RankingMetrics(nan, nan, nan, nan, 0.0, 0.0)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    tps, fps, values = _operating_points(s, y, sample_weight)
    n_pos, n_neg = float(tps[-1]), float(fps[-1])
    if n_pos <= 0:
        return RankingMetrics(nan, nan, nan, nan, n_pos, n_neg)
    tps_f = tps.astype(np.float64)
    fps_f = fps.astype(np.float64)
    recall = tps_f / n_pos
    precision = tps_f / np.maximum(tps_f + fps_f, np.finfo(np.float64).tiny)
    auprc = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    # trapezoids over the distinct scores, summed exactly in integers when unweighted (a perfect
    # ranking gives exactly 1.0): area = sum(dFP * (TP_prev + TP)) / (2 P N)
    if n_neg > 0:
        dfp = np.diff(fps, prepend=fps.dtype.type(0))
        area = np.sum(dfp * (tps + np.concatenate(([tps.dtype.type(0)], tps[:-1]))))
        auroc = float(area) / (2.0 * n_pos * n_neg)
    else:
        auroc = nan
    dice = 2.0 * tps_f / (tps_f + fps_f + n_pos)
    best = int(np.argmax(dice))  # first maximum: the highest threshold, the smallest detection
    if best + 1 < values.size:
        threshold = float(values[best + 1])
    else:
        threshold = float(np.nextafter(values[-1], -np.inf))
    return RankingMetrics(auroc, auprc, float(dice[best]), threshold, n_pos, n_neg)


def curve_points(
    scores: Any, labels: Any, sample_weight: Any | None = None, max_points: int = 200
) -> dict[str, list[float]]:
    """ROC and precision-recall operating points, thinned to at most ``max_points`` each, for plots.

    The points are the exact operating points of :func:`ranking_metrics` (same sort, same tie rule);
    thinning keeps the first and the last and evenly spaced ones between (by index), so a plot drawn
    from them is the curve whose area :func:`ranking_metrics` reports, up to the thinning. They are
    what an evaluation logs to MLflow (``curves.json``) so a report can draw the curves from the
    tracking store without the maps.

    Args:
        scores: anomaly scores (flattened), higher = more anomalous.
        labels: bool/0-1 labels of the same size.
        sample_weight: optional non-negative weights.
        max_points: most points per curve (>= 2).

    Returns:
        ``{"fpr", "tpr", "recall", "precision"}`` lists (ROC starts at (0, 0), PR at recall 0 with
        the precision of the first operating point); empty lists when there are no positives or no
        samples (no curve is defined).

    Raises:
        ValueError: ``max_points < 2`` or scores and labels of different sizes.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    s, y = _scores_labels(scores, labels)
    empty: dict[str, list[float]] = {"fpr": [], "tpr": [], "recall": [], "precision": []}
    if s.size == 0:
        return empty
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    tps, fps, _ = _operating_points(s, y, w)
    n_pos, n_neg = float(tps[-1]), float(fps[-1])
    if n_pos <= 0:
        return empty
    tps_f, fps_f = tps.astype(np.float64), fps.astype(np.float64)
    idx = np.unique(np.linspace(0, tps_f.size - 1, min(max_points - 1, tps_f.size)).round().astype(int))
    tpr = tps_f[idx] / n_pos
    fpr = fps_f[idx] / n_neg if n_neg > 0 else np.zeros_like(tpr)
    precision = tps_f[idx] / np.maximum(tps_f[idx] + fps_f[idx], np.finfo(np.float64).tiny)
    return {
        "fpr": [0.0, *fpr.tolist()],
        "tpr": [0.0, *tpr.tolist()],
        "recall": [0.0, *tpr.tolist()],
        "precision": [float(precision[0]), *precision.tolist()],
    }


def dice_at_best_threshold(scores: Any, labels: Any, sample_weight: Any | None = None) -> tuple[float, float]:
    """Best Dice over all thresholds (the optimistic oracle) and its threshold, exact and vectorised.

    Args:
        scores: anomaly scores (flattened).
        labels: bool/0-1 labels of the same size.
        sample_weight: optional weights.

    Returns:
        ``(dice, threshold)`` with detection = score > threshold; ``(nan, nan)`` without positives.
    """
    r = ranking_metrics(scores, labels, sample_weight)
    return r.dice_best, r.threshold_best


# ----------------------------------------------------------------------------------------------
# healthy thresholds and the intensity baseline
# ----------------------------------------------------------------------------------------------


def thresholds_from_scores(scores: Any, fprs: Iterable[float] = DEFAULT_FPRS) -> dict[float, float]:
    """Thresholds at which at most ``fpr`` of the given (healthy) scores are detected.

    The threshold is the ``(1 - fpr)`` quantile taken as an order statistic: with ``n`` scores and
    ``k = floor(fpr * n)``, it is the ``(k + 1)``-th largest score, so at most ``k`` scores are
    strictly greater (fewer when there are ties at the threshold).

    Args:
        scores: healthy scores (flattened).
        fprs: false-positive rates in (0, 1).

    Returns:
        ``{fpr: threshold}``.

    Raises:
        ValueError: no scores, non-finite scores, or an fpr outside (0, 1).
    """
    s = np.asarray(scores).ravel()
    fprs = tuple(float(f) for f in fprs)
    if s.size == 0:
        raise ValueError("no healthy scores to set thresholds on")
    if not np.isfinite(s).all():
        raise ValueError("healthy scores contain NaN/inf")
    for f in fprs:
        if not 0.0 < f < 1.0:
            raise ValueError(f"false-positive rates must be in (0, 1), got {f}")
    n = s.size
    # 1e-9: 0.29 * 100 is 28.999999999999996 in floating point
    idx = {f: n - 1 - min(n - 1, math.floor(f * n + 1e-9)) for f in fprs}
    part = np.partition(s, sorted(set(idx.values())))
    return {f: float(part[i]) for f, i in idx.items()}


def healthy_thresholds(
    maps: Iterable[Any],
    brains: Iterable[Any],
    fprs: Iterable[float] = DEFAULT_FPRS,
    post: PostProcess | None = None,
) -> dict[float, float]:
    """Fixed operating points from HEALTHY VALIDATION volumes only (never the test set).

    Every map is post-processed exactly as at test time (median filter, eroded brain) and the
    scores of all region pixels are pooled; see :func:`thresholds_from_scores` for the quantile.
    Memory: 4 bytes per healthy brain pixel (exact quantiles need them all).

    Args:
        maps: anomaly maps of the healthy validation volumes (any iterable; consumed once).
        brains: their brain masks, in the same order.
        fprs: false-positive rates (default 1 %, 5 %, 10 %).
        post: the post-processing used at test time (default: none).

    Returns:
        ``{fpr: threshold}``; detection at test time is ``score > threshold``.

    Raises:
        ValueError: different numbers of maps and masks, or no brain pixel at all.
    """
    post = post or PostProcess()
    chunks = []
    for m, b in zip(maps, brains, strict=True):
        pm, region = post.apply_map(m, b)
        chunks.append(pm[region])
    return thresholds_from_scores(np.concatenate(chunks) if chunks else np.empty(0, np.float32), fprs)


def _channel(image: Any, channel: int) -> np.ndarray:
    a = _to_numpy(image)
    if a.ndim == 4:
        a = a[channel]
    if a.ndim != 3:
        raise ValueError(f"image: expected (X, Y, Z) or (C, X, Y, Z), got shape {a.shape}")
    return np.asarray(a, dtype=np.float32)


def healthy_reference_intensity(images: Iterable[Any], brains: Iterable[Any], channel: int = 0) -> float:
    """Median intensity of the brain pixels of healthy validation volumes (for ``abs_dev``).

    Args:
        images: normalised images (as fed to the model), ``(X, Y, Z)`` or ``(C, X, Y, Z)``.
        brains: their brain masks.
        channel: the channel used for multi-channel images.

    Returns:
        The exact median over all pooled brain pixels.
    """
    vals = []
    for image, brain in zip(images, brains, strict=True):
        img, b = _channel(image, channel), _as_mask(brain, "brain_mask")
        if img.shape != b.shape:
            raise ValueError(f"image {img.shape} and brain mask {b.shape} differ in shape")
        vals.append(img[b])
    if not vals or sum(v.size for v in vals) == 0:
        raise ValueError("no healthy brain pixels")
    return float(np.median(np.concatenate(vals)))


def intensity_baseline_map(
    image: Any,
    brain: Any,
    mode: Literal["image", "abs_dev"] = "image",
    reference: float | None = None,
    channel: int = 0,
) -> np.ndarray:
    """Anomaly map of the intensity baseline: what thresholding intensity alone achieves.

    Scored with the same evaluator (and its own healthy thresholds) next to every method.

    - ``"image"``: the normalised image itself (finds hyperintense lesions, e.g. FLAIR);
    - ``"abs_dev"``: ``|image - reference|`` with ``reference`` the healthy-validation median
      intensity (:func:`healthy_reference_intensity`); finds hypo- and hyperintense lesions. Without
      ``reference`` the volume's own brain median is used (self-referenced, no labels involved).

    Args:
        image: the normalised image, ``(X, Y, Z)`` or ``(C, X, Y, Z)``.
        brain: brain mask (values outside are set to 0; they are never evaluated).
        mode: ``"image"`` or ``"abs_dev"``.
        reference: the healthy median intensity for ``abs_dev``.
        channel: channel of a multi-channel image.

    Returns:
        Float32 map ``(X, Y, Z)``.
    """
    img = _channel(image, channel)
    b = _as_mask(brain, "brain_mask")
    if img.shape != b.shape:
        raise ValueError(f"image {img.shape} and brain mask {b.shape} differ in shape")
    if mode == "image":
        out = img
    elif mode == "abs_dev":
        if reference is None:
            reference = float(np.median(img[b])) if b.any() else 0.0
        out = np.abs(img - np.float32(reference))
    else:
        raise ValueError(f"mode must be 'image' or 'abs_dev', got {mode!r}")
    return np.where(b, out, np.float32(0)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """What is kept of one volume after :meth:`AnomalyEvaluator.add` (the map itself is not)."""

    subject: str
    kind: str
    n_region: int
    n_pos: int
    n_pos_excluded: int
    auroc: float
    auprc: float
    score_max: float
    score_mean: float
    tp: dict[float, int]
    detected: dict[float, int]
    slice_scores: np.ndarray
    slice_labels: np.ndarray
    slice_alarm: dict[float, np.ndarray]
    slice_hit: dict[float, np.ndarray]
    # pixels for the pooled curves (all of them, or a deterministic subsample)
    scores: np.ndarray
    labels: np.ndarray
    keys: np.ndarray | None = None


class AnomalyEvaluator:
    """Accumulates anomaly maps volume by volume and computes the protocol's metrics.

    Call :meth:`add` once per test volume (healthy and pathological), then :meth:`compute`,
    :meth:`per_subject_rows` / :meth:`write_csv`. Only per-volume results and the region pixels
    (float32 score + bool label, 5 bytes per pixel) are kept, never the maps: pooled curves are
    exact from one argsort, fine up to ~5e7 pixels. With ``max_pixels_for_curves`` the pooled
    curves use a deterministic, class-stratified subsample instead (see ``__init__``).

    Degenerate-case rules (NaN, never an exception):

    - per-volume AUPRC/AUROC/Dice are NaN for a volume without (evaluated) lesion pixels; the
      ``*_per_volume_mean`` metrics average over the volumes where they are defined (NaN if none);
    - pooled metrics follow :func:`ranking_metrics` (no positives -> NaN, no negatives -> AUROC NaN);
    - fixed-threshold Dice pooled over a group without lesion pixels is NaN;
    - the false-alarm rate is NaN without lesion-free slices, the slice sensitivity without lesion
      slices.

    Args:
        post: post-processing (the same as for :func:`healthy_thresholds`).
        thresholds: ``{fpr: threshold}`` from :func:`healthy_thresholds`; ``None`` skips every
            fixed-threshold metric (their keys are then absent).
        slice_axis: axis of the slices for slice-level metrics and false alarms (default 2, axial).
        slice_score: ``"max"`` or ``"mean"`` of the map over the slice's region pixels.
        max_pixels_for_curves: ``None`` for exact pooled curves; otherwise at most this many pixels
            (half per class) enter them: each pixel gets a pseudo-random key seeded by ``seed`` and
            the subject string, and the pixels with the smallest keys are kept per class (bottom-k
            sampling: uniform, deterministic, independent of the order of :meth:`add`). The curves
            are then computed with weights ``class total / class kept`` within each reported group.
        seed: seed of the subsampling keys.
        healthy_kind: the ``kind`` of healthy subjects; they are negatives for every lesion kind.
    """

    def __init__(
        self,
        post: PostProcess | None = None,
        thresholds: Mapping[float, float] | None = None,
        slice_axis: int = 2,
        slice_score: Literal["max", "mean"] = "max",
        max_pixels_for_curves: int | None = None,
        seed: int = 0,
        healthy_kind: str = "healthy",
    ) -> None:
        self.post = post or PostProcess()
        self.thresholds: dict[float, float] = (
            {} if thresholds is None else {float(k): float(v) for k, v in sorted(thresholds.items())}
        )
        for f in self.thresholds:
            if not 0.0 < f < 1.0:
                raise ValueError(f"threshold keys are false-positive rates in (0, 1), got {f}")
        tags = [fpr_tag(f) for f in self.thresholds]
        if len(set(tags)) != len(tags):
            raise ValueError(f"false-positive rates too close to name apart: {sorted(self.thresholds)}")
        self.slice_axis = _check_axis(slice_axis)
        if slice_score not in ("max", "mean"):
            raise ValueError(f"slice_score must be 'max' or 'mean', got {slice_score!r}")
        self.slice_score = slice_score
        if max_pixels_for_curves is not None and max_pixels_for_curves < 2:
            raise ValueError("max_pixels_for_curves must be >= 2 (half per class) or None")
        self.max_pixels_for_curves = max_pixels_for_curves
        self.seed = int(seed)
        self.healthy_kind = healthy_kind
        self._records: dict[str, _Record] = {}

    # -- accumulation ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every added volume."""
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        subject: str,
        kind: str,
        anomaly_map: Any,
        lesion_mask: Any | None,
        brain_mask: Any,
    ) -> dict[str, Any]:
        """Evaluate one test volume and keep what :meth:`compute` needs.

        Lesion pixels outside the eroded brain are not evaluated (counted in the CSV as
        ``lesion_voxels_excluded``). A slice is a *lesion slice* when it has evaluated lesion pixels
        and *lesion-free* when it has region pixels and no lesion pixel at all; slices whose lesion
        lies entirely outside the region are neither (excluded from slice metrics), as are slices
        without region pixels.

        Args:
            subject: pseudonymous subject id (the only identifier written anywhere); unique.
            kind: lesion kind (e.g. ``"glioma"``) or ``healthy_kind``.
            anomaly_map: float map ``(X, Y, Z)`` or ``(1, X, Y, Z)``, higher = more anomalous.
            lesion_mask: lesion mask of the same shape; ``None`` for healthy subjects.
            brain_mask: brain mask of the same shape.

        Returns:
            The subject's CSV row (see :meth:`per_subject_rows`).

        Raises:
            ValueError: duplicate subject, mismatched shapes, non-finite map inside the brain, or a
                healthy subject with lesion pixels.
        """
        subject, kind = str(subject), str(kind)
        if subject in self._records:
            raise ValueError(f"subject {subject!r} was already added")
        pm, region = self.post.apply_map(anomaly_map, brain_mask)
        if lesion_mask is None:
            lesion = np.zeros_like(region)
        else:
            lesion = _as_mask(lesion_mask, "lesion_mask")
            if lesion.shape != region.shape:
                raise ValueError(f"lesion mask {lesion.shape} and anomaly map {region.shape} differ in shape")
        if kind == self.healthy_kind and lesion.any():
            raise ValueError(f"subject {subject!r} is {kind!r} but its lesion mask is not empty")
        lesion_in = lesion & region
        scores = pm[region]
        labels = lesion_in[region]
        n_pos = int(labels.sum())
        rm = ranking_metrics(scores, labels)

        # slices: label, score and (per threshold) alarms, all vectorised over (S, pixels)
        reg_s = _slices(region, self.slice_axis)
        les_in_s = _slices(lesion_in, self.slice_axis)
        map_s = _slices(pm, self.slice_axis)
        n_reg = reg_s.sum(axis=1)
        has_lesion_in = les_in_s.any(axis=1)
        has_lesion_any = _slices(lesion, self.slice_axis).any(axis=1)
        use = (n_reg > 0) & (has_lesion_in | ~has_lesion_any)
        if self.slice_score == "max":
            s_score = np.where(reg_s, map_s, -np.inf).max(axis=1, initial=-np.inf)
        else:  # the map is 0 outside the region
            s_score = map_s.sum(axis=1, dtype=np.float64) / np.maximum(n_reg, 1)

        tp: dict[float, int] = {}
        detected: dict[float, int] = {}
        alarm: dict[float, np.ndarray] = {}
        hit: dict[float, np.ndarray] = {}
        for f, t in self.thresholds.items():
            binary = self.post.apply_binary((pm > np.float32(t)) & region)
            tp[f] = int(np.count_nonzero(binary & lesion_in))
            detected[f] = int(np.count_nonzero(binary))
            bin_s = _slices(binary, self.slice_axis)
            alarm[f] = bin_s.any(axis=1)[use]
            hit[f] = (bin_s & les_in_s).any(axis=1)[use]

        keys = None
        if self.max_pixels_for_curves is not None:
            rng = np.random.default_rng([self.seed, zlib.crc32(subject.encode("utf-8"))])
            keys = rng.integers(0, 2**32, size=scores.size, dtype=np.uint32)
        self._records[subject] = _Record(
            subject=subject,
            kind=kind,
            n_region=int(scores.size),
            n_pos=n_pos,
            n_pos_excluded=int(np.count_nonzero(lesion)) - n_pos,
            auroc=rm.auroc,
            auprc=rm.auprc,
            score_max=float(scores.max()) if scores.size else math.nan,
            score_mean=float(scores.mean(dtype=np.float64)) if scores.size else math.nan,
            tp=tp,
            detected=detected,
            slice_scores=s_score[use],
            slice_labels=has_lesion_in[use],
            slice_alarm=alarm,
            slice_hit=hit,
            scores=scores,
            labels=labels,
            keys=keys,
        )
        self._prune(final=False)
        return self._row(self._records[subject])

    def _prune(self, final: bool) -> None:
        """Bottom-k subsampling per class; lazily at 2x the budget, exactly at ``compute``."""
        if self.max_pixels_for_curves is None:
            return
        budget = self.max_pixels_for_curves // 2
        for cls in (True, False):
            recs = list(self._records.values())
            kept = sum(int(np.count_nonzero(r.labels == cls)) for r in recs)
            if kept <= (budget if final else 2 * budget):
                continue
            all_keys = np.concatenate([r.keys[r.labels == cls] for r in recs])  # type: ignore[index]
            cutoff = np.partition(all_keys, budget - 1)[budget - 1]
            for r in recs:
                assert r.keys is not None
                drop = (r.labels == cls) & (r.keys > cutoff)
                if drop.any():
                    keep = ~drop
                    r.scores, r.labels, r.keys = r.scores[keep], r.labels[keep], r.keys[keep]

    # -- results --------------------------------------------------------------------------------

    @staticmethod
    def _pooled_arrays(recs: list[_Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The group's kept pixels, labels and the weights that undo the per-class subsampling."""
        scores = np.concatenate([r.scores for r in recs])
        labels = np.concatenate([r.labels for r in recs])
        total_pos = sum(r.n_pos for r in recs)
        total_neg = sum(r.n_region - r.n_pos for r in recs)
        kept_pos = int(np.count_nonzero(labels))
        kept_neg = labels.size - kept_pos
        weights = None
        if (kept_pos, kept_neg) != (total_pos, total_neg):
            # each class is a uniform sample of the group's pixels of that class: reweight to totals
            w_pos = total_pos / kept_pos if kept_pos else 0.0
            w_neg = total_neg / kept_neg if kept_neg else 0.0
            weights = np.where(labels, w_pos, w_neg)
        return scores, labels, weights

    def _pooled(self, recs: list[_Record]) -> tuple[RankingMetrics, int]:
        scores, labels, weights = self._pooled_arrays(recs)
        return ranking_metrics(scores, labels, weights), labels.size

    def _group_metrics(self, recs: list[_Record]) -> dict[str, float]:
        out: dict[str, float] = {}
        n_pos = sum(r.n_pos for r in recs)
        n_pix = sum(r.n_region for r in recs)
        out["n_subjects"] = float(len(recs))
        out["n_subjects_with_lesion"] = float(sum(r.n_pos > 0 for r in recs))
        out["n_pixels"] = float(n_pix)
        out["n_lesion_pixels"] = float(n_pos)
        out["lesion_prevalence"] = n_pos / n_pix if n_pix else math.nan

        pooled, n_curve = self._pooled(recs)
        out["pixel_auprc"] = pooled.auprc
        out["pixel_auroc"] = pooled.auroc
        out["pixel_auprc_per_volume_mean"] = _nanmean([r.auprc for r in recs])
        out["pixel_auroc_per_volume_mean"] = _nanmean([r.auroc for r in recs])
        out["dice_best"] = pooled.dice_best
        out["threshold_best"] = pooled.threshold_best
        out["curve_pixels"] = float(n_curve)

        s_labels = np.concatenate([r.slice_labels for r in recs])
        s_scores = np.concatenate([r.slice_scores for r in recs])
        sl = ranking_metrics(s_scores, s_labels)
        out["slice_auroc"] = sl.auroc
        out["slice_ap"] = sl.auprc
        out["n_slices"] = float(s_labels.size)
        out["n_lesion_slices"] = float(np.count_nonzero(s_labels))

        n_neg = n_pix - n_pos
        for f in self.thresholds:
            tag = fpr_tag(f)
            tp = sum(r.tp[f] for r in recs)
            det = sum(r.detected[f] for r in recs)
            out[f"dice_{tag}"] = 2 * tp / (det + n_pos) if n_pos else math.nan
            out[f"dice_{tag}_per_volume_mean"] = _nanmean([self._dice(r, f) for r in recs])
            out[f"test_pixel_fpr_{tag}"] = (det - tp) / n_neg if n_neg else math.nan
            alarm = np.concatenate([r.slice_alarm[f] for r in recs])
            hit = np.concatenate([r.slice_hit[f] for r in recs])
            out[f"false_alarm_rate_{tag}"] = float(alarm[~s_labels].mean()) if (~s_labels).any() else math.nan
            out[f"slice_sensitivity_{tag}"] = float(hit[s_labels].mean()) if s_labels.any() else math.nan
        return out

    @staticmethod
    def _dice(r: _Record, f: float) -> float:
        return 2 * r.tp[f] / (r.detected[f] + r.n_pos) if r.n_pos else math.nan

    def compute(self) -> dict[str, Any]:
        """All metrics, as a flat dict with stable names.

        Over all subjects: ``pixel_auprc`` (headline, pooled), ``pixel_auroc``,
        ``pixel_auprc_per_volume_mean``, ``pixel_auroc_per_volume_mean``, ``dice_best`` and
        ``threshold_best`` (oracle threshold chosen on the test set itself; on the median-filtered,
        masked map without component removal, which would need re-labelling at every candidate
        threshold), ``slice_auroc``, ``slice_ap``; per healthy threshold (tag ``fpr1``, ``fpr5``,
        ``fpr10``, ...): ``threshold_<tag>``, ``dice_<tag>`` (pooled TP/FP/FN over the test set),
        ``dice_<tag>_per_volume_mean``, ``false_alarm_rate_<tag>`` (lesion-free slices with any
        detected pixel after post-processing), ``slice_sensitivity_<tag>`` (lesion slices with a
        detected lesion pixel), ``test_pixel_fpr_<tag>`` (realised pixel FPR on the test
        negatives); counts ``n_subjects``, ``n_subjects_with_lesion``, ``n_pixels``,
        ``n_lesion_pixels``, ``lesion_prevalence``, ``n_slices``, ``n_lesion_slices``,
        ``curve_pixels``. The same per lesion kind as ``<kind>/<name>``, computed on the subjects of
        that kind plus all healthy subjects. Also ``post_processing`` (str), ``post_processing/<param>``,
        ``slice_score`` (str), ``slice_axis``.

        Returns:
            The metrics (floats, except the two description strings).

        Raises:
            RuntimeError: nothing was added.
        """
        if not self._records:
            raise RuntimeError("AnomalyEvaluator.compute() called before any add()")
        self._prune(final=True)
        recs = list(self._records.values())
        out: dict[str, Any] = {"post_processing": self.post.describe()}
        out.update({f"post_processing/{k}": float(v) for k, v in self.post.as_dict().items()})
        out["slice_score"] = self.slice_score
        out["slice_axis"] = float(self.slice_axis)
        for f, t in self.thresholds.items():
            out[f"threshold_{fpr_tag(f)}"] = t
        out.update(self._group_metrics(recs))
        kinds = sorted({r.kind for r in recs} - {self.healthy_kind})
        for kind in kinds:
            group = [r for r in recs if r.kind in (kind, self.healthy_kind)]
            out.update({f"{kind}/{k}": v for k, v in self._group_metrics(group).items()})
        return out

    @property
    def subjects(self) -> list[str]:
        """The added subjects, in the order added."""
        return list(self._records)

    @property
    def kinds(self) -> list[str]:
        """Each added subject's kind, in the order added (the strata of :func:`engines.bootstrap.subject_resamples`)."""
        return [r.kind for r in self._records.values()]

    def bootstrap_statistics(self, max_bins: int | None = 4096) -> dict[str, Statistic]:
        """The headline metrics as functions of subject multiplicities (``engines.bootstrap``), subjects in the
        order added: ``pixel_auprc``, ``pixel_auroc`` (pooled pixels, binned at ``max_bins`` class quantiles),
        ``slice_auroc`` (exact) and ``dice_<tag>`` per healthy threshold (pooled 2 TP / (detected + lesion)).

        Multiplicity 1 for every subject gives :meth:`compute`'s values (the pixel metrics up to the binning).

        Args:
            max_bins: see :class:`engines.bootstrap.RankingHistograms`.

        Returns:
            ``{metric: statistic}``.

        Raises:
            RuntimeError: nothing was added.
        """
        if not self._records:
            raise RuntimeError("AnomalyEvaluator.bootstrap_statistics() called before any add()")
        self._prune(final=True)
        recs = list(self._records.values())
        _, labels, weights = self._pooled_arrays(recs)
        # the subsampling weights are one per class over all subjects (a uniform sample of each class)
        w_pos = float(weights[labels].max()) if weights is not None and labels.any() else 1.0
        w_neg = float(weights[~labels].max()) if weights is not None and (~labels).any() else 1.0
        pixels = RankingHistograms(
            [r.scores for r in recs],
            [r.labels for r in recs],
            [np.where(r.labels, w_pos, w_neg) for r in recs] if weights is not None else None,
            max_bins=max_bins,
        )
        slices = RankingHistograms(
            [r.slice_scores for r in recs], [r.slice_labels for r in recs], max_bins=None
        )
        out: dict[str, Statistic] = {
            "pixel_auprc": pixels.average_precision,
            "pixel_auroc": pixels.auroc,
            "slice_auroc": slices.auroc,
        }
        n_pos = np.array([r.n_pos for r in recs], dtype=np.float64)
        for f in self.thresholds:
            tp = np.array([r.tp[f] for r in recs], dtype=np.float64)
            det = np.array([r.detected[f] for r in recs], dtype=np.float64)
            out[f"dice_{fpr_tag(f)}"] = weighted_ratio(2 * tp, det + n_pos)
        return out

    def curves(self, max_points: int = 200) -> dict[str, list[float]]:
        """Pooled pixel ROC and PR points over every added volume (see :func:`curve_points`).

        The same pixels and weights as the pooled ``pixel_auroc``/``pixel_auprc`` of :meth:`compute`.

        Args:
            max_points: most points per curve.

        Returns:
            The curve points.

        Raises:
            RuntimeError: nothing was added.
        """
        if not self._records:
            raise RuntimeError("AnomalyEvaluator.curves() called before any add()")
        self._prune(final=True)
        scores, labels, weights = self._pooled_arrays(list(self._records.values()))
        return curve_points(scores, labels, weights, max_points)

    def csv_columns(self) -> list[str]:
        """The per-subject CSV columns, in order."""
        tags = [fpr_tag(f) for f in self.thresholds]
        return [
            "subject",
            "kind",
            "brain_voxels",
            "lesion_voxels",
            "lesion_voxels_excluded",
            "pixel_auprc",
            "pixel_auroc",
            *[f"dice_{t}" for t in tags],
            *[f"detected_voxels_{t}" for t in tags],
            "score_max",
            "score_mean",
        ]

    def _row(self, r: _Record) -> dict[str, Any]:
        row: dict[str, Any] = {
            "subject": r.subject,
            "kind": r.kind,
            "brain_voxels": r.n_region,
            "lesion_voxels": r.n_pos,
            "lesion_voxels_excluded": r.n_pos_excluded,
            "pixel_auprc": r.auprc,
            "pixel_auroc": r.auroc,
        }
        for f in self.thresholds:
            row[f"dice_{fpr_tag(f)}"] = self._dice(r, f)
        for f in self.thresholds:
            row[f"detected_voxels_{fpr_tag(f)}"] = r.detected[f]
        row["score_max"] = r.score_max
        row["score_mean"] = r.score_mean
        return row

    def per_subject_rows(self) -> list[dict[str, Any]]:
        """One dict per subject (in the order added) with the columns of :meth:`csv_columns`.

        ``brain_voxels`` counts the evaluated (eroded) brain, ``lesion_voxels`` the lesion voxels in
        it and ``lesion_voxels_excluded`` those outside; Dice is NaN for subjects without lesion
        voxels (their false positives are in ``detected_voxels_<tag>``).

        Returns:
            The rows.
        """
        return [self._row(r) for r in self._records.values()]

    def write_csv(self, path: str | Path) -> Path:
        """Write :meth:`per_subject_rows` as CSV, atomically (temporary file + rename).

        Only the given pseudonymous ``subject`` string identifies a row. NaN is written as ``nan``.

        Args:
            path: destination; its folder is created if missing.

        Returns:
            The destination.
        """
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.csv_columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.per_subject_rows())
        data = buf.getvalue().encode("utf-8")
        return atomic_torch_save(data, path, save_fn=lambda obj, f: f.write(obj))
