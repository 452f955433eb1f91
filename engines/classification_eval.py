"""Evaluation of slice classifiers (binary or multi-class) on clean and corrupted MRI.

Used by the robust brain-tumour classification bundle. Two layers:

- :func:`classification_metrics`: accuracy, macro F1, AUROC, expected calibration error (ECE) and
  per-class recall/AUROC of one set of class probabilities;
- :class:`RobustnessEvaluation`: every model on the clean test slices and on every fixed-severity
  corruption of :mod:`transforms.corruptions`, with the identical corrupted images for every model,
  the metrics above and (given clean calibration probabilities) split-conformal coverage and set size
  under each corruption (:func:`engines.conformal.conformal_report`). The result is a long table
  (one row per model, corruption and level) that :func:`write_robustness_table`,
  :func:`plot_robustness` and :func:`robustness_mlflow_metrics` turn into CSV/Markdown, figures and
  MLflow metrics.

Conventions:

- probabilities are ``(n, K)`` arrays, ``K >= 2``, rows summing to 1 (softmax outputs, also for
  binary classifiers: pass ``[1 - p, p]``); labels are integer class indices ``0..K-1``;
- metrics that are undefined for the data at hand are ``NaN``, never an exception: the recall and
  AUROC of a class absent from the labels (and the AUROC of every class when only one class is
  present); macro averages leave those classes out (see :func:`classification_metrics`);
- the clean images are level ``0`` and reported once per model as corruption ``"clean"``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils.type_conversion import convert_to_tensor

from data_prep.atomic import atomic_path, atomic_write_text
from engines.conformal import _check_labels, _check_probs, conformal_report
from transforms.corruptions import SEVERITIES, corrupt, corruption_grid, corruption_seed

__all__ = [
    "CLEAN",
    "DEFAULT_CONFORMAL_METRICS",
    "DEFAULT_KINDS",
    "DEFAULT_PLOT_METRICS",
    "RobustnessEvaluation",
    "classification_metrics",
    "expected_calibration_error",
    "plot_robustness",
    "robustness_mlflow_metrics",
    "write_robustness_table",
]

CLEAN = "clean"

# Five kinds that cover the three families of MR artefacts: noise (gaussian, rician), intensity
# inhomogeneity (bias_field) and k-space/acquisition artefacts (gibbs, motion). Spikes and ghosting
# are in transforms.corruptions too; pass kinds=None to RobustnessEvaluation for all seven.
DEFAULT_KINDS: tuple[str, ...] = ("gaussian", "rician", "bias_field", "gibbs", "motion")

DEFAULT_PLOT_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "auroc", "ece")

# The conformal columns kept per corruption by default: the threshold is fixed on clean calibration
# data (it does not change with the corruption), and the per-class / per-size columns would multiply
# the table's width by K; pass conformal_metrics=None to keep everything conformal_report returns.
DEFAULT_CONFORMAL_METRICS: tuple[str, ...] = (
    "coverage",
    "mean_set_size",
    "empty_set_rate",
    "singleton_rate",
    "min_class_coverage",
)

# the identifying (non-metric) columns of a robustness row, in CSV order
_ID_COLUMNS: tuple[str, ...] = ("model", "corruption", "level", "severity", "n", "input_hash")


# ----------------------------------------------------------------------------------------------
# metrics of one set of probabilities
# ----------------------------------------------------------------------------------------------


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, with ``n_bins`` equal-width bins.

    ``ECE = sum_b (n_b / n) |acc_b - conf_b|``, where bin ``b`` holds the items whose top-1 probability
    (the confidence) falls into it, ``conf_b`` is their mean confidence and ``acc_b`` the fraction of
    them predicted correctly (Guo et al., ICML 2017). Ties in the top-1 probability go to the lowest
    class index (``argmax``), as for the accuracy.

    Computed with MONAI's :class:`~monai.metrics.CalibrationErrorMetric` (``"expected"`` reduction) on a
    single channel holding the top-1 confidence, with the correctness indicator as ground truth: that
    metric is *class-wise* when given the ``(n, K)`` probabilities and one-hot labels (one ECE per class
    channel, then averaged), which is not the standard top-1 ECE, so the top-1 reduction is done here
    and only the binning and weighting are MONAI's. MONAI bins in float32 over ``[0, 1 + eps]``; a
    confidence on a bin edge goes to the lower bin.

    Args:
        probs: class probabilities ``(n, K)``.
        labels: true labels ``(n,)``.
        n_bins: number of equal-width confidence bins in ``[0, 1]``, ``>= 1``.

    Returns:
        The ECE, in ``[0, 1]``.

    Raises:
        ValueError: for invalid probabilities or labels (see :func:`classification_metrics`) or
            ``n_bins < 1``.
    """
    from monai.metrics import CalibrationErrorMetric  # MONAI metrics import more than this module needs

    p = _check_probs(probs, "probs")
    y = _check_labels(labels, p.shape[0], p.shape[1], "labels")
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float32)
    metric = CalibrationErrorMetric(num_bins=int(n_bins), calibration_reduction="expected")
    ece = metric(
        y_pred=torch.as_tensor(confidence, dtype=torch.float32).reshape(1, 1, -1),
        y=torch.as_tensor(correct).reshape(1, 1, -1),
    )
    return float(ece.reshape(-1)[0])


def _binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``scores`` for the ``positive`` items; NaN unless both groups are present."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, scores))


def classification_metrics(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, macro F1, AUROC, ECE and per-class recall/AUROC of class probabilities.

    The predicted class is the ``argmax`` of a row (the lowest index on ties).

    - ``accuracy``: fraction of correct predictions.
    - ``macro_f1``: unweighted mean of the per-class F1 over the classes that occur in ``labels`` *or*
      in the predictions (scikit-learn's default label set): a class never seen and never predicted
      has an undefined F1 (0/0) and is left out rather than counted as 0; a class predicted but absent
      from the labels counts with F1 = 0 (all its predictions are false positives).
    - ``auroc``: for ``K == 2`` the AUROC of the class-1 probability (the usual binary AUROC); for
      ``K > 2`` the one-vs-rest macro AUROC, the unweighted mean of ``auroc/class_<k>`` over the classes
      present in ``labels`` (equal to scikit-learn's ``roc_auc_score(..., multi_class="ovr")`` when all
      are present, which refuses the case where one is not). NaN when fewer than two classes occur.
    - ``auroc/class_<k>``: AUROC of ``probs[:, k]`` for class ``k`` against the rest; NaN when class
      ``k`` is absent from ``labels`` (or is the only class).
    - ``recall/class_<k>``: fraction of the class-``k`` items predicted as ``k``; NaN when class ``k`` is
      absent from ``labels``.
    - ``ece``: :func:`expected_calibration_error` of the top-1 confidence.
    - ``n``: number of items.

    AUROC and F1 use scikit-learn (imported on first use) rather than MONAI's ``compute_roc_auc``:
    MONAI's macro average is a plain mean, so one absent class turns the whole AUROC into NaN (with a
    warning per call), and its AUROC is a Python loop over the items.

    Args:
        probs: class probabilities ``(n, K)``, ``n >= 1``, ``K >= 2``, finite, ``>= 0``, rows summing to
            1 within ``1e-3``.
        labels: true labels ``(n,)``, integers in ``[0, K - 1]`` (integer-valued floats accepted).
        n_bins: confidence bins of the ECE.

    Returns:
        Flat dict of floats, keys as above.

    Raises:
        ValueError: probabilities of the wrong shape, not finite, negative or rows not summing to 1
            (logits?); labels of the wrong length, not integers or out of range; ``n_bins < 1``.
    """
    from sklearn.metrics import f1_score

    p = _check_probs(probs, "probs")
    n, k = p.shape
    y = _check_labels(labels, n, k, "labels")
    pred = p.argmax(axis=1)
    out: dict[str, float] = {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
    }
    per_class_auroc = [_binary_auroc(p[:, c], y == c) for c in range(k)]
    present = [c for c in range(k) if (y == c).any()]
    if len(present) < 2:
        out["auroc"] = math.nan
    elif k == 2:
        out["auroc"] = per_class_auroc[1]
    else:
        out["auroc"] = float(np.mean([per_class_auroc[c] for c in present]))
    out["ece"] = expected_calibration_error(p, y, n_bins)
    for c in range(k):
        members = y == c
        out[f"recall/class_{c}"] = float(np.mean(pred[members] == c)) if members.any() else math.nan
    for c in range(k):
        out[f"auroc/class_{c}"] = per_class_auroc[c]
    out["n"] = float(n)
    return out


# ----------------------------------------------------------------------------------------------
# robustness study
# ----------------------------------------------------------------------------------------------

PredictProba = Callable[[torch.Tensor], Any]


def _as_image_stack(images: Any) -> torch.Tensor:
    """``(N, C, H, W)`` float CPU tensor of a list of ``(C, H, W)`` slices or an ``(N, C, H, W)`` stack."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = convert_to_tensor(images, track_meta=False)
    else:
        items = [convert_to_tensor(im, track_meta=False) for im in images]
        if not items:
            raise ValueError("images: no test slices")
        shapes = {tuple(im.shape) for im in items}
        if len(shapes) != 1:
            raise ValueError(f"images: all slices must have the same shape, got {sorted(shapes)}")
        x = torch.stack(items)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images: expected (N, C, H, W) slices with N >= 1, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"images: expected real intensities, got dtype {x.dtype}")
    return x.detach().cpu()


def _tensor_digest(x: torch.Tensor, h: Any) -> None:
    """Feed the dtype, shape and bytes of ``x`` to the hash ``h``."""
    x = x.detach().cpu().contiguous()
    h.update(f"{x.dtype}:{tuple(x.shape)};".encode())
    h.update(x.numpy().tobytes())


class RobustnessEvaluation:
    """Classifiers on clean test slices and on every fixed-severity corruption of them.

    Each corrupted test set is built once: slice ``i`` is corrupted with
    ``corrupt(image_i, kind, level, seed=corruption_seed(base_seed, slice_ids[i]))`` on its
    de-normalised intensities, *then* normalised, and the very same tensor is given (as a fresh copy per
    model, so a model that modifies its input in place cannot change what the next one sees) to every
    model. What each model received is hashed (BLAKE2b over dtype, shape and bytes of its batches, in
    order) and stored in each row as ``input_hash``: equal hashes for the rows of one
    ``(corruption, level)`` prove that every model saw byte-identical inputs; the hash of the set
    itself is in :attr:`input_hashes`. The seed depends on the slice id and ``base_seed`` only, not on
    the slice's position or the model, and :func:`~transforms.corruptions.corrupt` makes the levels of
    one kind the same noise realisation at increasing strength.

    Only one corrupted set is in memory at a time; the class probabilities of every
    ``(model, corruption, level)`` are kept in :attr:`probabilities` for reuse (e.g. other conformal
    scores, reliability diagrams) without running the models again.

    Example::

        ev = RobustnessEvaluation(
            {"resnet": resnet_proba, "diffusion_clf": dc_proba},
            images=raw_slices, labels=labels, slice_ids=ids,
            normalise=PercentileScaleIntensity(b_min=-1.0, b_max=1.0),
            calibration_probs={"resnet": cal_p_resnet, "diffusion_clf": cal_p_dc},
            calibration_labels=cal_labels,
        )
        rows = ev.run()
        write_robustness_table(rows, out_dir); plot_robustness(rows, out_dir)
        mlflow.log_metrics(robustness_mlflow_metrics(rows))

    Args:
        models: ``{name: predict_proba}``; ``predict_proba(images)`` takes a normalised float batch
            ``(B, C, H, W)`` (CPU; move it to the model's device yourself) and returns class
            probabilities ``(B, K)`` (numpy or tensor). Called under ``torch.no_grad()``.
        images: the de-normalised (raw, non-negative) test slices, a list of ``(C, H, W)`` arrays or
            tensors or an ``(N, C, H, W)`` stack.
        labels: true labels ``(N,)``.
        slice_ids: a stable, unique identifier per slice (e.g. ``"subject-007/z083"``), for the seeds.
        normalise: applied to each ``(C, H, W)`` slice after the corruption, e.g.
            :class:`~transforms.intensity.PercentileScaleIntensity`; returns a tensor or array of the
            same shape.
        kinds: corruption kinds, expanded with :func:`~transforms.corruptions.corruption_grid`
            (every level of each kind); default :data:`DEFAULT_KINDS`. Ignored when ``grid`` is given.
        grid: explicit ``(kind, level)`` pairs instead of ``kinds`` (level ``>= 1``; the clean set is
            always evaluated).
        base_seed: base seed of :func:`~transforms.corruptions.corruption_seed`.
        calibration_probs: optional ``{name: (n_cal, K) probabilities}`` on *clean* calibration data;
            models listed here get conformal columns (needs ``calibration_labels``).
        calibration_labels: labels of the calibration items ``(n_cal,)``.
        alphas: miscoverage rates of the conformal sets.
        scores: conformal scores (``"lac"``, ``"aps"``, ``"raps"``).
        conformal_metrics: which metrics of :func:`~engines.conformal.set_metrics` (and
            ``"threshold"``) to keep per score and alpha; ``None`` keeps all. Columns are named
            ``conformal/<score>/alpha<a>/<metric>``.
        n_bins: confidence bins of the ECE.
        batch_size: slices per model call.
        phase_axis: phase-encode axis for ``motion`` and ``ghosting`` (see
            :func:`~transforms.corruptions.corrupt`).

    Raises:
        ValueError: no models, mismatched lengths, duplicate slice ids, labels out of range of a
            model's classes, calibration probabilities without labels or for unknown models, or an
            invalid grid.
    """

    def __init__(
        self,
        models: Mapping[str, PredictProba],
        images: Any,
        labels: Any,
        slice_ids: Sequence[Hashable],
        normalise: Callable[[Any], Any],
        kinds: Sequence[str] | None = DEFAULT_KINDS,
        grid: Iterable[tuple[str, int]] | None = None,
        base_seed: int = 0,
        calibration_probs: Mapping[str, Any] | None = None,
        calibration_labels: Any = None,
        alphas: Sequence[float] = (0.1,),
        scores: Sequence[str] = ("lac", "aps"),
        conformal_metrics: Sequence[str] | None = DEFAULT_CONFORMAL_METRICS,
        n_bins: int = 15,
        batch_size: int = 64,
        phase_axis: int = -1,
    ) -> None:
        if not models:
            raise ValueError("models: give at least one {name: predict_proba}")
        for name in models:
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"model names must be non-empty strings without '/', got {name!r}")
        self.models = dict(models)
        self.images = _as_image_stack(images)
        n = self.images.shape[0]
        y = np.asarray(labels)
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"labels: expected shape ({n},) for {n} slices, got {y.shape}")
        # range checked against each model's K once its probabilities are known
        self.labels = _check_labels(y, n, np.iinfo(np.int64).max, "labels")
        self.slice_ids = list(slice_ids)
        if len(self.slice_ids) != n:
            raise ValueError(f"slice_ids: expected {n} ids, got {len(self.slice_ids)}")
        if len(set(self.slice_ids)) != n:
            # two slices with one id would get the same noise realisation
            raise ValueError("slice_ids must be unique")
        self.normalise = normalise
        self.grid: list[tuple[str, int]] = self._make_grid(kinds, grid)
        self.base_seed = int(base_seed)
        self.seeds = [corruption_seed(self.base_seed, sid) for sid in self.slice_ids]

        cal = dict(calibration_probs or {})
        unknown = sorted(set(cal) - set(self.models))
        if unknown:
            raise ValueError(f"calibration_probs for unknown models: {unknown}")
        if cal and calibration_labels is None:
            raise ValueError("calibration_probs need calibration_labels")
        self.calibration_probs = {m: _check_probs(p, f"calibration_probs[{m!r}]") for m, p in cal.items()}
        self.calibration_labels = None if calibration_labels is None else np.asarray(calibration_labels)
        self.alphas = tuple(alphas)
        self.scores = tuple(scores)
        self.conformal_metrics = None if conformal_metrics is None else tuple(conformal_metrics)
        self.n_bins = int(n_bins)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.phase_axis = int(phase_axis)

        self.probabilities: dict[tuple[str, str, int], np.ndarray] = {}
        """Class probabilities ``(N, K)`` per ``(model, corruption, level)`` (clean: ``("m", "clean", 0)``)."""
        self.input_hashes: dict[tuple[str, int], str] = {}
        """Hash of each normalised test set per ``(corruption, level)``."""
        self.model_input_hashes: dict[tuple[str, str, int], str] = {}
        """Hash of what each model received per ``(model, corruption, level)``."""
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def _make_grid(
        kinds: Sequence[str] | None, grid: Iterable[tuple[str, int]] | None
    ) -> list[tuple[str, int]]:
        if grid is None:
            return corruption_grid(kinds)
        out = []
        for kind, level in grid:
            if kind not in SEVERITIES:
                raise ValueError(f"grid: unknown corruption {kind!r}, expected one of {sorted(SEVERITIES)}")
            if not 1 <= int(level) <= len(SEVERITIES[kind]):
                raise ValueError(
                    f"grid: level of {kind!r} must be in [1, {len(SEVERITIES[kind])}] (0 is the clean set, "
                    f"always evaluated), got {level}"
                )
            out.append((kind, int(level)))
        if len(set(out)) != len(out):
            raise ValueError("grid: duplicate (kind, level) pairs")
        return out

    def settings(self) -> list[tuple[str, int]]:
        """The evaluated ``(corruption, level)`` pairs, ``("clean", 0)`` first."""
        return [(CLEAN, 0), *self.grid]

    def severity(self, corruption: str, level: int) -> float:
        """The severity value of a setting (0 for the clean set); units in ``SEVERITIES``' comments."""
        return 0.0 if level == 0 else float(SEVERITIES[corruption][level - 1])

    def test_set(self, corruption: str, level: int) -> torch.Tensor:
        """The normalised test set of one setting, ``(N, C, H, W)`` float32 (built on every call).

        Args:
            corruption: a kind of :data:`~transforms.corruptions.CORRUPTIONS` or ``"clean"``.
            level: its level (``0`` for ``"clean"``).

        Returns:
            The corrupted (or clean) slices after ``normalise``.
        """
        out = []
        for i in range(self.images.shape[0]):
            img = self.images[i]
            if level > 0:
                img = corrupt(img, corruption, level, seed=self.seeds[i], phase_axis=self.phase_axis)
            norm = convert_to_tensor(self.normalise(img), track_meta=False)
            if tuple(norm.shape) != tuple(img.shape):
                raise ValueError(
                    f"normalise changed the shape of slice {self.slice_ids[i]!r}: "
                    f"{tuple(img.shape)} -> {tuple(norm.shape)}"
                )
            out.append(norm.detach().cpu().to(torch.float32))
        return torch.stack(out)

    def _predict(self, name: str, x: torch.Tensor) -> tuple[np.ndarray, str]:
        fn = self.models[name]
        h = hashlib.blake2b(digest_size=16)
        parts = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start : start + self.batch_size].clone()  # a copy per model: no in-place leaks
                _tensor_digest(batch, h)
                p = fn(batch)
                if isinstance(p, torch.Tensor):
                    p = p.detach().cpu().float().numpy()
                p = np.asarray(p, dtype=np.float64)
                if p.ndim != 2 or p.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"model {name!r} returned shape {p.shape} for a batch of {batch.shape[0]}; "
                        "expected (B, K) class probabilities"
                    )
                parts.append(p)
        probs = _check_probs(np.concatenate(parts), f"probabilities of model {name!r}")
        return probs, h.hexdigest()

    def _row(self, name: str, corruption: str, level: int, probs: np.ndarray) -> dict[str, Any]:
        row: dict[str, Any] = {
            "model": name,
            "corruption": corruption,
            "level": level,
            "severity": self.severity(corruption, level),
            "n": int(probs.shape[0]),
            "input_hash": self.model_input_hashes[(name, corruption, level)],
        }
        metrics = classification_metrics(probs, self.labels, self.n_bins)
        metrics.pop("n")
        row.update(metrics)
        if name in self.calibration_probs:
            report = conformal_report(
                self.calibration_probs[name],
                self.calibration_labels,
                probs,
                self.labels,
                alphas=self.alphas,
                scores=self.scores,
            )
            for key, value in report.items():
                if key in ("n_calibration", "n_test"):
                    continue
                if self.conformal_metrics is not None and key.split("/", 2)[2] not in self.conformal_metrics:
                    continue
                row[f"conformal/{key}"] = value
        return row

    def run(self) -> list[dict[str, Any]]:
        """Evaluate every model on the clean set and every corruption of the grid.

        Settings already evaluated (probabilities in :attr:`probabilities`) are not run again.

        Returns:
            The long table, one dict per ``(model, corruption, level)`` in the order clean, then the
            grid, models in the given order: ``model``, ``corruption`` (``"clean"`` for level 0),
            ``level``, ``severity`` (the corruption's parameter, 0 for clean), ``n``, ``input_hash``,
            the keys of :func:`classification_metrics` (without ``n``) and, for models with calibration
            probabilities, ``conformal/<score>/alpha<a>/<metric>``. Also stored in :attr:`rows`.

        Raises:
            ValueError: a model returning something other than ``(B, K)`` probabilities, labels out of
                range of its ``K``, or calibration probabilities with another ``K``.
        """
        rows = []
        for corruption, level in self.settings():
            todo = [m for m in self.models if (m, corruption, level) not in self.probabilities]
            if todo:
                x = self.test_set(corruption, level)
                h = hashlib.blake2b(digest_size=16)
                for start in range(0, x.shape[0], self.batch_size):  # same chunks as the models get
                    _tensor_digest(x[start : start + self.batch_size], h)
                self.input_hashes[(corruption, level)] = h.hexdigest()
                for name in todo:
                    probs, digest = self._predict(name, x)
                    self.probabilities[(name, corruption, level)] = probs
                    self.model_input_hashes[(name, corruption, level)] = digest
                del x  # one corrupted set in memory at a time
            for name in self.models:
                rows.append(self._row(name, corruption, level, self.probabilities[(name, corruption, level)]))
        self.rows = rows
        return rows


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Identifying columns first, then every other key in first-seen order."""
    seen = dict.fromkeys(c for c in _ID_COLUMNS if any(c in r for r in rows))
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [c for c in _columns(rows) if c not in _ID_COLUMNS and any(_is_number(r.get(c)) for r in rows)]


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        raise ValueError("rows: empty robustness table")
    for r in rows:
        missing = [c for c in ("model", "corruption", "level") if c not in r]
        if missing:
            raise ValueError(f"rows: every row needs model, corruption and level; missing {missing} in {r}")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if _is_number(v):
        f = float(v)
        return "nan" if math.isnan(f) else (str(int(f)) if isinstance(v, (int, np.integer)) else f"{f:.4f}")
    return str(v)


def _csv_cell(v: Any) -> str:
    """Full precision in the CSV (it is the data; the Markdown file is the summary)."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(int(v)) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else str(v)


def _md_cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|")


def _grid_of(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], list[int]]:
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    kinds = list(dict.fromkeys(str(r["corruption"]) for r in rows if r["corruption"] != CLEAN))
    levels = sorted({int(r["level"]) for r in rows} | {0})
    return models, kinds, levels


def _lookup(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    return {(str(r["model"]), str(r["corruption"]), int(r["level"])): r for r in rows}


def _value(
    table: Mapping[tuple[str, str, int], Mapping[str, Any]], model: str, kind: str, level: int, metric: str
) -> Any:
    """Metric of a cell; level 0 of every kind is the model's clean row."""
    r = table.get((model, CLEAN, 0)) if level == 0 else table.get((model, kind, level))
    return None if r is None else r.get(metric)


def write_robustness_table(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, metrics: Sequence[str] | None = None
) -> dict[str, Path]:
    """Write the long table as ``robustness.csv`` and a Markdown summary ``robustness.md``, atomically.

    The CSV has one line per row and the union of the rows' keys as columns (identifying columns
    first; a key missing from a row, e.g. the conformal columns of a model without calibration data,
    is an empty cell; NaN is written ``nan``). The Markdown file has the severity values of each
    corruption and level, then one table per metric: a line per (model, corruption), a column per level
    (level 0 is the model's clean result, repeated on every corruption's line so each line reads as a
    robustness curve).

    Args:
        rows: from :meth:`RobustnessEvaluation.run`.
        out_dir: created if needed.
        metrics: the metrics tabulated in the Markdown file; default ``accuracy``, ``macro_f1``,
            ``auroc``, ``ece`` and every conformal ``coverage``/``mean_set_size``/``empty_set_rate``
            column present. The CSV always has every column.

    Returns:
        ``{"csv": path, "md": path}``.

    Raises:
        ValueError: empty rows, rows without ``model``/``corruption``/``level``, or an unknown metric.
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    columns = _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _csv_cell(r.get(c)) for c in columns})
    csv_path = atomic_write_text(out_dir / "robustness.csv", buf.getvalue())

    available = _metric_columns(rows)
    if metrics is None:
        metrics = [m for m in DEFAULT_PLOT_METRICS if m in available] + [
            c
            for c in available
            if c.startswith("conformal/")
            and c.rsplit("/", 1)[-1] in ("coverage", "mean_set_size", "empty_set_rate")
        ]
    else:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise ValueError(f"metrics not in the rows: {unknown}; available: {available}")
    models, kinds, levels = _grid_of(rows)
    table = _lookup(rows)
    lines = ["# Robustness to MRI corruptions", ""]
    lines += ["Level 0 is the clean test set; severities (units in `transforms/corruptions.py`):", ""]
    lines.append("| corruption | " + " | ".join(f"level {lv}" for lv in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    for kind in kinds:
        sev = {int(r["level"]): r.get("severity") for r in rows if r["corruption"] == kind}
        cells = ["0" if lv == 0 else _md_cell(sev.get(lv)) for lv in levels]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    row_kinds = kinds or [CLEAN]  # a clean-only table still gets one line per model
    for metric in metrics:
        lines += ["", f"## {metric}", ""]
        lines.append("| model | corruption | " + " | ".join(str(lv) for lv in levels) + " |")
        lines.append("|---|---|" + "---|" * len(levels))
        for model in models:
            for kind in row_kinds:
                cells = [_md_cell(_value(table, model, kind, lv, metric)) for lv in levels]
                lines.append(f"| {_md_cell(model)} | {kind} | " + " | ".join(cells) + " |")
    md_path = atomic_write_text(out_dir / "robustness.md", "\n".join(lines) + "\n")
    return {"csv": csv_path, "md": md_path}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


def plot_robustness(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    metrics: Sequence[str] = DEFAULT_PLOT_METRICS,
) -> list[Path]:
    """One figure per model, ``robustness_<model>.png``: a panel per metric, a line per corruption.

    Each line runs from the model's clean result at level 0 through the corruption's levels; a metric
    missing from the rows (e.g. a conformal one for a model without calibration data) is skipped.
    Written with matplotlib's Agg backend (no display needed), through a temporary file and an atomic
    rename. Characters other than letters, digits, ``_``, ``.`` and ``-`` in a model name become ``_``.

    Args:
        rows: from :meth:`RobustnessEvaluation.run`.
        out_dir: created if needed.
        metrics: the panels.

    Returns:
        The written paths, in model order.

    Raises:
        ValueError: empty rows, rows without ``model``/``corruption``/``level``, or no metric present.
    """
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: headless servers and CI have no display
    import matplotlib.pyplot as plt

    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models, kinds, levels = _grid_of(rows)
    table = _lookup(rows)
    available = set(_metric_columns(rows))
    panels = [m for m in metrics if m in available]
    if not panels:
        raise ValueError(f"none of the metrics {list(metrics)} is in the rows")
    paths = []
    for model in models:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], panels, strict=True):
            for kind in kinds or [CLEAN]:
                xs, ys = [], []
                for lv in levels:
                    v = _value(table, model, kind, lv, metric)
                    if _is_number(v) and not math.isnan(float(v)):
                        xs.append(lv)
                        ys.append(float(v))
                if xs:
                    ax.plot(xs, ys, marker="o", label=kind)
            ax.set_title(metric)
            ax.set_xlabel("severity level (0 = clean)")
            ax.set_xticks(levels)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.suptitle(model)
        fig.tight_layout()
        path = out_dir / f"robustness_{_safe_name(model)}.png"
        try:
            with atomic_path(path, ".png") as tmp:
                fig.savefig(tmp, dpi=100)
        finally:
            plt.close(fig)
        paths.append(path)
    return paths


def robustness_mlflow_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Flat MLflow metric names of the long table.

    ``<model>/<corruption>/level<k>/<metric>`` for corrupted rows and ``<model>/clean/<metric>`` for
    clean ones, for every numeric metric column (not ``level``, ``severity``, ``n``). Values may be NaN
    only where :func:`classification_metrics` documents it (a class absent from the labels: its
    ``recall/class_<k>`` and ``auroc/class_<k>``, and ``auroc`` when fewer than two classes occur) or
    where :func:`~engines.conformal.set_metrics` does (per-class conformal metrics of an absent class).

    Args:
        rows: from :meth:`RobustnessEvaluation.run`.

    Returns:
        ``{name: value}``.

    Raises:
        ValueError: empty or malformed rows, or two rows giving the same name (duplicated rows).
    """
    _check_rows(rows)
    out: dict[str, float] = {}
    for r in rows:
        model, corruption, level = str(r["model"]), str(r["corruption"]), int(r["level"])
        prefix = f"{model}/{CLEAN}" if corruption == CLEAN else f"{model}/{corruption}/level{level}"
        for key, value in r.items():
            if key in _ID_COLUMNS or not _is_number(value):
                continue
            name = f"{prefix}/{key}"
            if name in out:
                raise ValueError(
                    f"duplicate metric name {name!r}: is a (model, corruption, level) row repeated?"
                )
            out[name] = float(value)
    return out
