"""The evaluation workflow of the ``latent_robust_classifier`` bundle: every trained classifier on one test split.

:class:`ClassifierEvaluation` runs, for all models on the same slices:

1. clean metrics (:func:`~engines.classification_eval.classification_metrics`);
2. robustness: :class:`~engines.classification_eval.RobustnessEvaluation` over a grid of fixed-severity MRI
   corruptions applied to the raw slice before normalisation (identical corrupted inputs for every model, proved
   by the ``input_hash`` column);
3. split-conformal sets (LAC, APS, RAPS at each alpha) calibrated on the clean calibration split, evaluated on
   the clean test split (full report, per-class coverage) and under every corruption; the thresholds are saved
   beside the weights (``conformal_<model>.json``) for ``inference.json``;
4. SHAP / occlusion / Grad-CAM figures for a fixed set of test slices (the first ``explain_per_class`` of each
   class, in datalist order);
5. MLflow: a parent run holding the combined table and plots, and one child run per model whose metrics have
   the same names in every child (``accuracy``, ``macro_f1``, ``auroc``, ``ece``, ``corrupted/<metric>``,
   ``<corruption>/level<k>/<metric>``, ``conformal/<score>/alpha<a>/<metric>``), so MLflow's run table compares
   the models column by column.

Not an Ignite engine: the unit of work is a (corruption, level) test set shared by all models, not a stream of
batches through one network; Ignite's evaluator would have to be rebuilt per model and per corruption to see
the same tensors, and the robustness study guarantees that sharing itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_prep.atomic import atomic_write_text
from engines.bootstrap import DEFAULT_N_BOOT
from engines.classification_eval import (
    CLEAN,
    DEFAULT_KINDS,
    RobustnessEvaluation,
    plot_robustness,
    write_robustness_table,
)
from engines.classification_intervals import ClassificationStatistics, classification_intervals, item_clusters
from engines.conformal import SCORES, _threshold_and_sets, alpha_tag, conformal_report, prediction_sets
from engines.explain import explain_fixed_slices, save_explanation_figure
from engines.tracking import log_comparison_runs
from transforms.errors import InputDataError

__all__ = [
    "ClassifierEvaluation",
    "build_models",
    "check_trained_classes",
    "conformal_set",
    "load_conformal",
    "load_slices",
    "predict_probabilities",
    "save_conformal",
    "slice_ids",
]

logger = logging.getLogger(__name__)


def slice_ids(items: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[str]:
    """Stable, anonymous ids of datalist items: a hash of the image's file name (and slice index).

    The corruption seeds derive from these ids, so the same slice gets the same noise on any machine and in
    any order; file names can carry patient identifiers, so only a hash leaves this function.

    Args:
        items: datalist entries.
        image_key: key of the image path.

    Returns:
        16-hex-digit ids, one per item.

    Raises:
        ValueError: two items with the same id (the same file listed twice).
    """
    out = []
    for it in items:
        name = os.path.basename(os.fspath(it[image_key]))
        out.append(hashlib.blake2b(f"{name}|{it.get('slice_index', '')}".encode(), digest_size=8).hexdigest())
    if len(set(out)) != len(out):
        raise ValueError("two datalist items have the same image file (and slice index)")
    return out


def load_slices(
    items: Sequence[Mapping[str, Any]],
    transform: Callable[[dict], dict],
    image_key: str = "image",
    label_key: str = "label",
) -> tuple[torch.Tensor, np.ndarray]:
    """Load every item's slice (through ``transform``) into one stack.

    Args:
        items: datalist entries with ``image_key`` and ``label_key``.
        transform: dict transform returning ``(1, H, W)`` images (raw intensities for a robustness study).
        image_key: image key.
        label_key: class-index key.

    Returns:
        ``(images (N, 1, H, W) float32, labels (N,) int64)``.

    Raises:
        ValueError: no items.
        InputDataError: from ``transform``, naming the file.
    """
    if not items:
        raise ValueError("no datalist items to load")
    images, labels = [], []
    for it in items:
        d = transform(dict(it))
        images.append(torch.as_tensor(d[image_key]).float())
        labels.append(int(it[label_key]))
    return torch.stack(images), np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """Softmax probabilities of a classifier over a stack of (normalised) images.

    Args:
        model: images → logits.
        images: ``(N, C, H, W)``.
        device: where the model runs.
        batch_size: images per call.

    Returns:
        ``(N, K)`` float64 probabilities.
    """
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size].to(device))
        out.append(torch.softmax(logits.float(), dim=1).cpu().double().numpy())
    return np.concatenate(out)


def build_models(
    factories: Mapping[str, Callable[[], nn.Module]], names: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, nn.Module]:
    """Build (load) the requested models only.

    Args:
        factories: model name → zero-argument function returning the trained network (images → logits).
        names: the models to build, in order.
        device: where they go.

    Returns:
        ``{name: network}`` in eval mode on ``device``.

    Raises:
        ValueError: an unknown or repeated name (the message lists the known ones).
        InputDataError: a missing checkpoint, naming the file (from the factory).
    """
    names = list(names)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(factories)}")
    if len(set(names)) != len(names):
        raise ValueError(f"models listed twice: {names}")
    if not names:
        raise ValueError("no models to evaluate")
    return {n: factories[n]().to(device).eval() for n in names}


def save_conformal(
    path: str | os.PathLike,
    cal_probs: np.ndarray,
    cal_labels: np.ndarray,
    alphas: Sequence[float],
    scores: Sequence[str],
    class_names: Sequence[str],
    score_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the conformal thresholds of one model (every score and alpha) for inference.

    Args:
        path: the JSON file (written atomically).
        cal_probs: calibration probabilities ``(n, K)``.
        cal_labels: calibration labels.
        alphas: miscoverage rates.
        scores: score names.
        class_names: the class order.
        score_kwargs: per-score parameters (RAPS ``k_reg``, ``lam``).

    Returns:
        The written record.
    """
    kwargs = {k: dict(v) for k, v in (score_kwargs or {}).items()}
    thresholds: dict[str, dict[str, float]] = {}
    for score in scores:
        for alpha in alphas:
            tau, _ = _threshold_and_sets(
                cal_probs, cal_labels, cal_probs[:1], alpha, score, kwargs.get(score, {})
            )
            thresholds.setdefault(score, {})[alpha_tag(alpha)] = float(tau)
    record = {
        "class_names": list(class_names),
        "n_calibration": len(cal_labels),
        "alphas": [float(a) for a in alphas],
        "score_kwargs": kwargs,
        "thresholds": thresholds,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record


def load_conformal(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Read :func:`save_conformal`'s file.

    Args:
        path: the JSON file.
        class_names: when given, must equal the file's class order.

    Returns:
        The record.

    Raises:
        InputDataError: naming the file: missing (run evaluate.json first), malformed, or another class order.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            "conformal thresholds not found: run configs/evaluate.json first (it calibrates every model on the "
            "calibration split and writes them beside the weights)",
            path,
        )
    try:
        record = json.loads(path.read_text())
        record["thresholds"], record["class_names"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputDataError(f"malformed conformal thresholds file ({type(e).__name__}: {e})", path) from e
    if class_names is not None and list(class_names) != list(record["class_names"]):
        raise InputDataError(
            f"the thresholds were calibrated for classes {record['class_names']}, not {list(class_names)}",
            path,
        )
    return record


def conformal_set(probs: np.ndarray, record: Mapping[str, Any], score: str, alpha: float) -> list[list[str]]:
    """Prediction sets (class names) of probabilities with stored thresholds.

    Args:
        probs: ``(n, K)`` probabilities.
        record: from :func:`load_conformal`.
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        alpha: one of the calibrated alphas.

    Returns:
        One list of class names per row.

    Raises:
        ValueError: a score or alpha that was not calibrated.
    """
    tag = alpha_tag(alpha)
    try:
        tau = record["thresholds"][score][tag]
    except KeyError:
        raise ValueError(
            f"no threshold for score {score!r} at {tag}; calibrated: "
            f"{ {s: sorted(v) for s, v in record['thresholds'].items()} }"
        ) from None
    sets = prediction_sets(probs, tau, score, **record.get("score_kwargs", {}).get(score, {}))
    names = record["class_names"]
    return [[names[k] for k in np.nonzero(row)[0]] for row in sets]


def check_trained_classes(path: str | os.PathLike, class_names: Sequence[str]) -> list[str]:
    """Check that the models in a checkpoint folder were trained with the datalist's class order.

    Args:
        path: ``classes.json`` written beside the weights at training (``{"labels": [...]}``).
        class_names: the class order of the datalist being evaluated.

    Returns:
        The trained class names.

    Raises:
        InputDataError: naming the file: missing (no model trained there) or another class order (the
            probabilities' columns would be read as the wrong classes).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            "no classes.json: no model was trained into this folder (see configs/train.json)", path
        )
    try:
        trained = list(json.loads(path.read_text())["labels"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputDataError(f"malformed classes file ({type(e).__name__}: {e})", path) from e
    if trained != list(class_names):
        raise InputDataError(
            f"the models were trained with classes {trained}, the datalist has {list(class_names)}: "
            "evaluate with the datalist (--task) they were trained on",
            path,
        )
    return trained


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))
    }


class ClassifierEvaluation:
    """Every model on the same clean and corrupted test slices, with conformal sets and explanations.

    Args:
        models: ``{name: network}`` (images → logits), e.g. from :func:`build_models`.
        test_items: datalist entries of the test split.
        calibration_items: datalist entries of the calibration split (clean; not used for training).
        load_transform: dict transform loading one slice with *raw* intensities ``(1, H, W)``.
        normalise: ``(1, H, W)`` raw → normalised, applied after any corruption (the models' own normalisation).
        class_names: the class order.
        output_dir: where tables, plots, figures go (``<output_dir>/<model>/`` per model).
        conformal_dir: where ``conformal_<model>.json`` thresholds are written (the checkpoint folder);
            ``None`` skips writing them.
        kinds: corruption kinds (every level of each).
        alphas: conformal miscoverage rates.
        scores: conformal scores.
        score_kwargs: per-score parameters, e.g. ``{"raps": {"k_reg": 1, "lam": 0.1}}``.
        explain_models: models that get explanation figures (``None``: all).
        shap_models: models that get SHAP (needs input gradients; ``None``: all explained models).
        gradcam_layers: model name → Grad-CAM target layer.
        explain_per_class: fixed test slices per class to explain.
        shap_background: calibration slices used as the SHAP reference distribution.
        shap_nsamples: SHAP draws per slice.
        device: where the models run.
        batch_size: slices per call.
        seed: corruption and SHAP seed (and the bootstrap's).
        tracking: MLflow settings: ``run_name``, ``method``, ``datalist``, ``dataset_name``, ``workdir``,
            ``hparams`` (dict), ``task_label`` (e.g. ``"binary"``); ``None`` skips MLflow.
        n_boot: subject-level bootstrap replicates of the clean metrics' intervals (0: none).
        ci_level: their coverage.

    Raises:
        ValueError: no models, or labels outside the class range.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        test_items: Sequence[Mapping[str, Any]],
        calibration_items: Sequence[Mapping[str, Any]],
        load_transform: Callable[[dict], dict],
        normalise: Callable[[Any], Any],
        class_names: Sequence[str],
        output_dir: str | os.PathLike,
        conformal_dir: str | os.PathLike | None = None,
        kinds: Sequence[str] = DEFAULT_KINDS,
        alphas: Sequence[float] = (0.1, 0.05),
        scores: Sequence[str] = SCORES,
        score_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        explain_models: Sequence[str] | None = None,
        shap_models: Sequence[str] | None = None,
        gradcam_layers: Mapping[str, str] | None = None,
        explain_per_class: int = 2,
        shap_background: int = 16,
        shap_nsamples: int = 50,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        seed: int = 0,
        tracking: Mapping[str, Any] | None = None,
        n_boot: int = DEFAULT_N_BOOT,
        ci_level: float = 0.95,
    ) -> None:
        if not models:
            raise ValueError("no models to evaluate")
        self.models = dict(models)
        self.test_items, self.calibration_items = list(test_items), list(calibration_items)
        self.load_transform, self.normalise = load_transform, normalise
        self.class_names = list(class_names)
        self.output_dir = Path(output_dir)
        self.conformal_dir = None if conformal_dir is None else Path(conformal_dir)
        self.kinds, self.alphas, self.scores = tuple(kinds), tuple(alphas), tuple(scores)
        self.score_kwargs = {k: dict(v) for k, v in (score_kwargs or {}).items()}
        self.explain_models = list(self.models) if explain_models is None else list(explain_models)
        self.shap_models = (
            None if shap_models is None else [m for m in shap_models if m in self.explain_models]
        )
        self.gradcam_layers = {k: v for k, v in (gradcam_layers or {}).items() if k in self.explain_models}
        self.explain_per_class, self.shap_background = int(explain_per_class), int(shap_background)
        self.shap_nsamples = int(shap_nsamples)
        self.device, self.batch_size, self.seed = torch.device(device), int(batch_size), int(seed)
        self.tracking = None if tracking is None else dict(tracking)
        self.results: dict[str, dict[str, Any]] = {}
        self.n_boot, self.ci_level = int(n_boot), float(ci_level)
        self.differences: dict[str, dict[str, dict[str, float]]] = {}

    # ------------------------------------------------------------------
    def _proba_fn(self, model: nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
        return lambda x: predict_probabilities(model, x, self.device, self.batch_size)

    def _normalised(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.normalise(img)).float() for img in raw])

    def _fixed_slices(self, labels: np.ndarray) -> list[int]:
        picked = []
        for k in range(len(self.class_names)):
            picked += [int(i) for i in np.nonzero(labels == k)[0][: self.explain_per_class]]
        return picked

    # ------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, Any]]:
        """Evaluate, write every output, log to MLflow.

        Returns:
            ``{model: {"metrics": {...}, "dir": Path}}``; the metrics are those logged to the model's MLflow run.
        """
        k = len(self.class_names)
        test_raw, test_y = load_slices(self.test_items, self.load_transform)
        cal_raw, cal_y = load_slices(self.calibration_items, self.load_transform)
        for name, y in (("test", test_y), ("calibration", cal_y)):
            if y.min() < 0 or y.max() >= k:
                raise ValueError(f"{name} labels outside 0..{k - 1} for classes {self.class_names}")
        logger.info(
            "evaluating %d model(s) on %d test slices (%d calibration) over %d corruption kinds",
            len(self.models),
            len(test_y),
            len(cal_y),
            len(self.kinds),
        )
        cal_x = self._normalised(cal_raw)
        cal_probs = {
            n: predict_probabilities(m, cal_x, self.device, self.batch_size) for n, m in self.models.items()
        }

        study = RobustnessEvaluation(
            {n: self._proba_fn(m) for n, m in self.models.items()},
            images=test_raw,
            labels=test_y,
            slice_ids=slice_ids(self.test_items),
            normalise=self.normalise,
            kinds=self.kinds,
            base_seed=self.seed,
            calibration_probs=cal_probs,
            calibration_labels=cal_y,
            alphas=self.alphas,
            scores=self.scores,
            batch_size=self.batch_size,
        )
        rows = study.run()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_robustness_table(rows, self.output_dir)
        plot_robustness(rows, self.output_dir)

        # explanations of fixed test slices
        fixed = self._fixed_slices(test_y)
        figures: list[Path] = []
        if fixed and self.explain_models:
            test_x = self._normalised(test_raw[fixed])
            bg = cal_x[: self.shap_background]
            figures = explain_fixed_slices(
                {n: self.models[n] for n in self.explain_models},
                test_x,
                test_y[fixed],
                bg,
                self.output_dir,
                ids=[f"test{i:03d}_{self.class_names[test_y[i]]}" for i in fixed],
                gradcam_layers=self.gradcam_layers,
                nsamples=self.shap_nsamples,
                seed=self.seed,
                shap_models=self.shap_models,
            )

        if fixed:
            figures += self._attention_figures(test_raw[fixed], test_y[fixed], fixed)

        for name in self.models:
            mdir = self.output_dir / name
            mdir.mkdir(parents=True, exist_ok=True)
            mrows = [r for r in rows if r["model"] == name]
            write_robustness_table(mrows, mdir)
            plot_robustness(mrows, mdir)
            clean_probs = study.probabilities[(name, CLEAN, 0)]
            report = conformal_report(
                cal_probs[name], cal_y, clean_probs, test_y, self.alphas, self.scores, self.score_kwargs
            )
            atomic_write_text(mdir / "conformal_clean.json", json.dumps(report, indent=2) + "\n")
            if self.conformal_dir is not None:
                save_conformal(
                    self.conformal_dir / f"conformal_{name}.json",
                    cal_probs[name],
                    cal_y,
                    self.alphas,
                    self.scores,
                    self.class_names,
                    self.score_kwargs,
                )
            for fig in figures:
                if fig.name.startswith(f"{name}_test"):
                    shutil.copy2(fig, mdir / fig.name)
            self.results[name] = {"metrics": self._model_metrics(name, mrows, report), "dir": mdir}
        self._intervals(study, cal_probs, cal_y, test_y)
        self._write_summary()
        if self.tracking is not None:
            self._log_mlflow()
        return self.results

    def _intervals(
        self,
        study: RobustnessEvaluation,
        cal_probs: Mapping[str, np.ndarray],
        cal_y: np.ndarray,
        test_y: np.ndarray,
    ) -> None:
        """Subject-level bootstrap intervals of the clean headline metrics and paired differences between models
        (``engines.classification_intervals``); the bounds join each model's metrics as ``<metric>_ci_low`` /
        ``_ci_high``, the differences go to ``intervals.json`` and the parent MLflow run."""
        if self.n_boot <= 0:
            return
        clusters = item_clusters(self.test_items, slice_ids(self.test_items))
        strata = np.zeros(int(clusters.max()) + 1, dtype=np.int64)
        np.maximum.at(strata, clusters, test_y)  # a subject's stratum: its most specific (largest) class
        per_model = {}
        for name in self.models:
            sets = {}
            for score in self.scores:
                for a in self.alphas:
                    _, sets[f"conformal/{score}/{alpha_tag(a)}/coverage"] = _threshold_and_sets(
                        cal_probs[name],
                        cal_y,
                        study.probabilities[(name, CLEAN, 0)],
                        a,
                        score,
                        self.score_kwargs.get(score, {}),
                    )
            per_model[name] = ClassificationStatistics(
                study.probabilities[(name, CLEAN, 0)], test_y, clusters, sets
            )
        intervals, differences = classification_intervals(
            per_model, strata.tolist(), self.n_boot, self.ci_level, self.seed
        )
        for name, metrics in intervals.items():
            for metric, iv in metrics.items():
                self.results[name]["metrics"].update(
                    _finite({f"{metric}_ci_low": iv.low, f"{metric}_ci_high": iv.high})
                )
        self.differences = {
            pair: {metric: iv.as_dict() for metric, iv in metrics.items()}
            for pair, metrics in differences.items()
        }
        payload = {
            "n_clusters": int(strata.size),
            "n_boot": self.n_boot,
            "level": self.ci_level,
            "intervals": {n: {m: iv.as_dict() for m, iv in ms.items()} for n, ms in intervals.items()},
            "differences": self.differences,
        }
        atomic_write_text(self.output_dir / "intervals.json", json.dumps(payload, indent=2) + "\n")

    def _attention_figures(self, raw: torch.Tensor, labels: np.ndarray, index: Sequence[int]) -> list[Path]:
        """The learnt attention maps of models that have one (:class:`networks.AttentionCNN`)."""
        written = []
        x = self._normalised(raw)
        for name in self.explain_models:
            model = self.models[name]
            if not hasattr(model, "attention_map"):
                continue
            with torch.no_grad():
                logits, maps = model(x.to(self.device), return_attention=True)
            pred = logits.argmax(1).cpu()
            for j, i in enumerate(index):
                sid = f"test{i:03d}_{self.class_names[labels[j]]}"
                written.append(
                    save_explanation_figure(
                        self.output_dir / "explanations" / f"{name}_{sid}_attention.png",
                        x[j, 0],
                        {"attention": maps[j, 0].cpu()},
                        title=f"{name} | {sid} | label {int(labels[j])}, pred {int(pred[j])}",
                    )
                )
        return written

    # ------------------------------------------------------------------
    def _model_metrics(
        self, name: str, rows: Sequence[Mapping[str, Any]], report: Mapping[str, float]
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        clean = next(r for r in rows if r["corruption"] == CLEAN)
        out.update(
            _finite(
                {
                    m: v
                    for m, v in clean.items()
                    if m not in ("model", "corruption", "level", "severity", "n", "input_hash")
                    and not m.startswith("conformal/")
                }
            )
        )
        out["n_test"], out["n_calibration"] = float(report["n_test"]), float(report["n_calibration"])
        for key, value in report.items():
            if key not in ("n_calibration", "n_test"):
                out[f"conformal/{key}"] = value
        corrupted = [r for r in rows if r["corruption"] != CLEAN]
        for r in corrupted:
            for m in ("accuracy", "macro_f1", "auroc", "ece"):
                out[f"{r['corruption']}/level{r['level']}/{m}"] = float(r[m])
            for s in self.scores:
                for a in self.alphas:
                    for m in ("coverage", "mean_set_size", "empty_set_rate"):
                        key = f"conformal/{s}/{alpha_tag(a)}/{m}"
                        if key in r:
                            out[f"{r['corruption']}/level{r['level']}/{key}"] = float(r[key])
        if corrupted:
            for m in ("accuracy", "macro_f1", "auroc", "ece"):
                vals = [float(r[m]) for r in corrupted if math.isfinite(float(r[m]))]
                if vals:
                    out[f"corrupted/{m}"] = float(np.mean(vals))
                    worst = min(vals) if m != "ece" else max(vals)
                    out[f"corrupted_worst/{m}"] = float(worst)
            for s in self.scores:
                for a in self.alphas:
                    key = f"conformal/{s}/{alpha_tag(a)}/coverage"
                    vals = [float(r[key]) for r in corrupted if key in r]
                    if vals:
                        out[f"corrupted/{key}"] = float(np.mean(vals))
                        out[f"corrupted_worst/{key}"] = float(min(vals))
        return _finite(out)

    def _write_summary(self) -> None:
        """``summary.md``/``summary.json``: one line per model, clean vs corrupted (the docs' comparison table)."""
        cols = [
            "accuracy",
            "accuracy_ci_low",
            "accuracy_ci_high",
            "macro_f1",
            "macro_f1_ci_low",
            "macro_f1_ci_high",
            "auroc",
            "auroc_ci_low",
            "auroc_ci_high",
            "ece",
            "corrupted/accuracy",
            "corrupted_worst/accuracy",
            "corrupted/auroc",
            "corrupted/macro_f1",
        ]
        for s in self.scores:
            for a in self.alphas:
                cols += [
                    f"conformal/{s}/{alpha_tag(a)}/coverage",
                    f"conformal/{s}/{alpha_tag(a)}/mean_set_size",
                ]
        summary = {n: {c: r["metrics"].get(c, math.nan) for c in cols} for n, r in self.results.items()}
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for n, vals in summary.items():
            lines.append(f"| {n} | " + " | ".join(f"{vals[c]:.3f}" for c in cols) + " |")
        atomic_write_text(self.output_dir / "summary.md", "\n".join(lines) + "\n")

    def _log_mlflow(self) -> None:
        t = self.tracking
        log_comparison_runs(
            task="classification",
            run_name=t["run_name"],
            method=t["method"],
            datalist=t.get("datalist"),
            dataset_name=t.get("dataset_name"),
            workdir=t.get("workdir", "."),
            hparams=t.get("hparams", {}),
            tags={"classification_task": t.get("task_label", "")},
            parent_params={"models": ",".join(self.models)},
            parent_metrics={
                f"diff/{pair}/{metric}{suffix}": iv[key]
                for pair, metrics in self.differences.items()
                for metric, iv in metrics.items()
                for suffix, key in (("", "point"), ("_ci_low", "low"), ("_ci_high", "high"))
                if math.isfinite(iv[key])
            },
            parent_artifacts=[
                *[
                    (self.output_dir / f, None)
                    for f in (
                        "robustness.csv",
                        "robustness.md",
                        "summary.md",
                        "summary.json",
                        "intervals.json",
                    )
                    if (self.output_dir / f).is_file()
                ],
                *[(png, "plots") for png in sorted(self.output_dir.glob("robustness_*.png"))],
            ],
            children={
                name: {
                    "metrics": res["metrics"],
                    "params": {"model": name},
                    "tags": {"model": name},
                    "artifact_dir": res["dir"],
                }
                for name, res in self.results.items()
            },
        )
