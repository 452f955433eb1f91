"""Glue between the 2D anomaly inferers and 3D volumes in MONAI evaluators (shared by both anomaly bundles).

* :class:`VolumeAnomalyInferer` runs a 2D slice inferer (AnoDDPM's partial diffusion, guided DDIM) on a
  whole volume: it cuts the volume into slices along an axis, brings every slice to the network's
  square input size exactly as the training transforms do (resize the longest side, pad
  symmetrically), runs the slices in batches, undoes the resize, and stacks the maps back into a
  volume on the input's grid. It is the ``inferer`` of a ``SupervisedEvaluator``.
* :class:`AnomalyEvaluationHandler` scores the maps of every test volume with the shared protocol
  (:class:`engines.anomaly_eval.AnomalyEvaluator`) for every ``t`` of the sweep and for the
  intensity baseline, with thresholds fixed on healthy validation volumes by a
  :class:`HealthyThresholdHandler` run first; it puts the metrics into ``engine.state.metrics``
  (so ``MLFlowHandler`` logs them), writes the per-subject CSVs and prints the headline table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer

from data_prep.atomic import atomic_path, atomic_write_text
from engines.anomaly_eval import (
    AnomalyEvaluator,
    PostProcess,
    healthy_reference_intensity,
    healthy_thresholds,
    intensity_baseline_map,
)
from engines.bootstrap import DEFAULT_N_BOOT, bootstrap_interval, paired_difference, subject_resamples

__all__ = [
    "AnomalyEvaluationHandler",
    "HealthyThresholdHandler",
    "VolumeAnomalyInferer",
    "from_model_size",
    "setting_key",
    "setting_name",
    "to_model_size",
]

logger = logging.getLogger(__name__)

BASELINE = "intensity_baseline"


def _longest_resize(h: int, w: int, size: int) -> tuple[int, int]:
    # the same rounding as MONAI's Resize(size_mode="longest")
    scale = size / max(h, w)
    return (round(h * scale), round(w * scale))


def to_model_size(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(B, C, H, W)`` so the longest side is ``size``, then pad symmetrically to ``size²``.

    Matches ``Resized(spatial_size=size, size_mode="longest")`` + ``SpatialPadd((size, size))`` of the
    training transforms, so the network sees slices at the geometry it was trained on.

    Args:
        x: a batch of slices.
        size: the network's input size.
        mode: interpolation mode (``"nearest"`` for masks).

    Returns:
        ``(B, C, size, size)``; the padding value is the batch's minimum (the background).
    """
    h, w = x.shape[-2:]
    rh, rw = _longest_resize(h, w, size)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x, size=(rh, rw), mode=mode, **kw) if (rh, rw) != (h, w) else x
    ph, pw = size - rh, size - rw
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(y, pad, value=float(x.min())) if any(pad) else y


def from_model_size(y: torch.Tensor, shape: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Invert :func:`to_model_size`: crop the padding and resize back to ``shape`` (H, W).

    Args:
        y: ``(B, C, size, size)`` network-size slices (e.g. anomaly maps).
        shape: the original in-plane shape.
        mode: interpolation mode.

    Returns:
        ``(B, C, H, W)``.
    """
    size = y.shape[-1]
    h, w = int(shape[0]), int(shape[1])
    rh, rw = _longest_resize(h, w, size)
    top, left = (size - rh) // 2, (size - rw) // 2
    y = y[..., top : top + rh, left : left + rw]
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(y, size=(h, w), mode=mode, **kw) if (rh, rw) != (h, w) else y


def setting_key(value: Any) -> int | str:
    """Normalise a sweep setting: a noise level ``t`` stays an ``int`` (also when given as ``"250"``), a
    named setting (e.g. guided DDIM's ``"L500_s10"``) stays a string.

    Args:
        value: an int, a numeric string or a setting name.

    Returns:
        The key under which maps and reconstructions are stored.
    """
    if isinstance(value, str) and not value.strip().isdigit():
        return value.strip()
    return int(value)


def setting_name(key: int | str) -> str:
    """The metric prefix of a setting: ``t<t>`` for a noise level, the name itself otherwise.

    Args:
        key: a key from :func:`setting_key`.

    Returns:
        E.g. ``"t250"`` or ``"L500_s10"``.
    """
    key = setting_key(key)
    return f"t{key}" if isinstance(key, int) else key


class VolumeAnomalyInferer(Inferer):
    """Apply a 2D anomaly inferer to every slice of a ``(1, C, X, Y, Z)`` volume.

    Args:
        slice_inferer: a 2D inferer with ``reconstruct(images, network, t_start=setting)`` returning
            ``{"recon": ...}`` and ``anomaly_map(images, recon)`` (e.g.
            :class:`engines.diffusion.AnomalyInferer`, :class:`engines.guided.GuidedDDIMInferer`). If it also
            has ``reconstruct_settings(images, network, settings)``, that is used, so it can share work
            between settings (guided DDIM encodes each level once for all its guidance scales).
        t_values: the settings to compute maps for: noise levels ``t`` (AnoDDPM) or setting names
            such as ``"L500_s10"`` (guided DDIM); see :func:`setting_key`.
        image_size: the network's square input size.
        axis: slicing axis of the volume (spatial index 0..2; 2 = axial for RAS volumes).
        batch_size: slices per network call.
        brain_key: not used by the inferer itself; maps are masked by the evaluation (the
            un-masked map is what inference writes, so a user can apply another mask).
        min_foreground: slices whose fraction of non-background voxels is below this are skipped
            (their map is 0), which saves time on the empty slices at the ends of a volume.

    Returns (from ``__call__``):
        ``{t: (1, 1, X, Y, Z) float map}`` for every ``t``.
    """

    def __init__(
        self,
        slice_inferer: Any,
        t_values: Sequence[int],
        image_size: int = 64,
        axis: int = 2,
        batch_size: int = 64,
        min_foreground: float = 0.01,
    ) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if not t_values:
            raise ValueError("t_values must name at least one noise level")
        self.slice_inferer = slice_inferer
        self.t_values = [setting_key(t) for t in t_values]
        self.image_size = int(image_size)
        self.axis = axis
        self.batch_size = int(batch_size)
        self.min_foreground = float(min_foreground)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Compute the anomaly-map and reconstruction volumes for every ``t``.

        Args:
            inputs: ``(1, C, X, Y, Z)`` normalised volume (batch of one).
            network: the noise-prediction network.
            args: ignored (MONAI evaluators may pass extra arguments).
            kwargs: ignored.

        Returns:
            ``{"maps": {t: (1, 1, X, Y, Z)}, "recons": {t: (1, C, X, Y, Z)}}`` on the input grid.

        Raises:
            ValueError: for a batch of several volumes or a non-3D input.
        """
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(
                f"VolumeAnomalyInferer expects one volume (1, C, X, Y, Z), got {tuple(inputs.shape)}"
            )
        vol = torch.as_tensor(inputs)[0]  # (C, X, Y, Z)
        # slices become the batch: (N, C, H, W)
        slices = torch.movedim(vol, self.axis + 1, 0)
        background = slices.amin()
        fg = (slices > background + 1e-6).flatten(1).float().mean(1)
        keep = torch.nonzero(fg >= self.min_foreground).flatten()
        n, hw = slices.shape[0], slices.shape[-2:]
        maps = {t: torch.zeros((n, 1, *hw), dtype=torch.float32, device=vol.device) for t in self.t_values}
        recons = {t: slices.clone().float() for t in self.t_values}
        for start in range(0, len(keep), self.batch_size):
            idx = keep[start : start + self.batch_size]
            x = to_model_size(slices[idx], self.image_size)
            if hasattr(self.slice_inferer, "reconstruct_settings"):
                batch_recons = self.slice_inferer.reconstruct_settings(x, network, self.t_values)
            else:
                # a seeded slice inferer starts every call from the same generator state, so every t sees the
                # same noise field (common random numbers across the sweep)
                batch_recons = {
                    t: self.slice_inferer.reconstruct(x, network, t_start=t)["recon"] for t in self.t_values
                }
            for t in self.t_values:
                recon = batch_recons[t]
                maps[t][idx] = from_model_size(self.slice_inferer.anomaly_map(x, recon).float(), hw)
                recons[t][idx] = from_model_size(recon.float(), hw)
        # back to (1, C, X, Y, Z): the slice axis returns to where it came from
        return {
            "maps": {t: torch.movedim(m, 0, self.axis + 1)[None] for t, m in maps.items()},
            "recons": {t: torch.movedim(r, 0, self.axis + 1)[None] for t, r in recons.items()},
        }


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    while a.ndim > 3:
        a = a[0]
    return a


class HealthyThresholdHandler:
    """Collect the maps of HEALTHY VALIDATION volumes and fix the operating points from them.

    Attach to an evaluator whose dataset holds healthy validation volumes and whose inferer is a
    :class:`VolumeAnomalyInferer`. On completion ``thresholds`` holds ``{method: {fpr: threshold}}``
    for every ``t`` and for the intensity baseline, and ``reference`` the healthy median intensity.

    Args:
        post: the post-processing used at test time.
        fprs: false-positive rates of the operating points.
        image_key: key of the normalised image in the batch.
        brain_key: key of the brain mask in the batch.
        baseline_mode: intensity baseline map, ``"image"`` or ``"abs_dev"``.
    """

    def __init__(
        self,
        post: PostProcess | None = None,
        fprs: Sequence[float] = (0.01, 0.05, 0.10),
        image_key: str = "image",
        brain_key: str = "brain_mask",
        baseline_mode: str = "abs_dev",
    ) -> None:
        self.post = post or PostProcess()
        self.fprs = tuple(fprs)
        self.image_key, self.brain_key = image_key, brain_key
        self.baseline_mode = baseline_mode
        self._maps: dict[str, list[np.ndarray]] = {}
        self._brains: list[np.ndarray] = []
        self._images: list[np.ndarray] = []
        self.thresholds: dict[str, dict[float, float]] = {}
        self.reference: float | None = None

    def attach(self, engine: Any) -> None:
        """Register with an Ignite engine.

        Args:
            engine: the healthy-validation evaluator.
        """
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        # EPOCH_COMPLETED (an evaluator runs one epoch): before MLFlowHandler logs the epoch's metrics
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        self._brains.append(_np(_first(batch[self.brain_key])) > 0)
        self._images.append(_np(_first(batch[self.image_key])))
        for t, m in engine.state.output["pred"]["maps"].items():
            self._maps.setdefault(setting_name(t), []).append(_np(m))

    def _finish(self, engine: Any) -> None:
        if not self._brains:
            raise ValueError("HealthyThresholdHandler: the healthy validation set is empty")
        for name, maps in self._maps.items():
            self.thresholds[name] = healthy_thresholds(maps, self._brains, self.fprs, self.post)
        self.reference = healthy_reference_intensity(self._images, self._brains)
        base = [
            intensity_baseline_map(im, b, self.baseline_mode, self.reference)
            for im, b in zip(self._images, self._brains, strict=True)
        ]
        self.thresholds[BASELINE] = healthy_thresholds(base, self._brains, self.fprs, self.post)
        logger.info(
            "healthy thresholds: %s",
            json.dumps({k: {str(f): v for f, v in d.items()} for k, d in self.thresholds.items()}),
        )
        self._maps.clear()
        self._images.clear()
        self._brains.clear()


class AnomalyEvaluationHandler:
    """Score every test volume's maps with the shared protocol; publish, save and print the results.

    Args:
        output_dir: folder for ``metrics.json`` and the per-subject CSVs (one per method).
        healthy: the :class:`HealthyThresholdHandler` run before on healthy validation volumes.
        post: post-processing (must equal the healthy handler's).
        slice_axis: the slicing axis (for slice-level metrics).
        slice_score: ``"max"`` or ``"mean"``.
        image_key, label_key, brain_key: batch keys; ``subject`` and ``kind`` are read from the batch.
        headline_t: the ``t`` whose metrics are also published without prefix; default the first.
        max_pixels_for_curves: see :class:`AnomalyEvaluator`.
        n_boot: subject-level bootstrap replicates for the intervals (``engines.bootstrap``); 0 turns them off.
        ci_level: coverage of the intervals.
        bootstrap_seed: seed of the subject draws (one draw matrix for every method, so differences are paired).

    Every headline metric (pixel AUPRC and AUROC, slice AUROC, Dice at each healthy threshold) also gets
    ``<metric>_ci_low`` / ``<metric>_ci_high``; each method against the intensity baseline, and each pair of
    methods, gets the paired difference ``diff/<a>-<b>/<metric>`` with ``_ci_low`` / ``_ci_high`` (written to
    ``differences.json`` too). Subjects are drawn within their ``kind``.

    The metrics land in ``engine.state.metrics`` as ``t<t>/<metric>`` and ``intensity_baseline/<metric>``
    (plus the headline ``t`` unprefixed), so an ``MLFlowHandler`` attached after this handler logs them.
    """

    def __init__(
        self,
        output_dir: str | Path,
        healthy: HealthyThresholdHandler | None = None,
        post: PostProcess | None = None,
        slice_axis: int = 2,
        slice_score: str = "max",
        image_key: str = "image",
        label_key: str = "label",
        brain_key: str = "brain_mask",
        headline_t: int | str | None = None,
        max_pixels_for_curves: int | None = None,
        n_boot: int = DEFAULT_N_BOOT,
        ci_level: float = 0.95,
        bootstrap_seed: int = 0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.n_boot, self.ci_level, self.bootstrap_seed = int(n_boot), float(ci_level), int(bootstrap_seed)
        self.differences: dict[str, dict[str, dict[str, float]]] = {}
        self.healthy = healthy
        self.post = post or (healthy.post if healthy else PostProcess())
        self.slice_axis, self.slice_score = slice_axis, slice_score
        self.image_key, self.label_key, self.brain_key = image_key, label_key, brain_key
        self.headline_t = headline_t
        self.max_pixels = max_pixels_for_curves
        self.evaluators: dict[str, AnomalyEvaluator] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def attach(self, engine: Any) -> None:
        """Register with an Ignite engine.

        Args:
            engine: the test-set evaluator.
        """
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._add)
        # EPOCH_COMPLETED (an evaluator runs one epoch): before MLFlowHandler logs the epoch's metrics
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _evaluator(self, name: str) -> AnomalyEvaluator:
        if name not in self.evaluators:
            thr = self.healthy.thresholds.get(name) if self.healthy else None
            self.evaluators[name] = AnomalyEvaluator(
                self.post,
                thr,
                self.slice_axis,
                self.slice_score,
                self.max_pixels,  # type: ignore[arg-type]
            )
        return self.evaluators[name]

    def _add(self, engine: Any) -> None:
        batch = engine.state.batch
        subject = str(_first(batch.get("subject", f"volume{engine.state.iteration}")))
        kind = str(_first(batch.get("kind", "unknown")))
        brain = _np(_first(batch[self.brain_key])) > 0
        lesion = _np(_first(batch[self.label_key])) > 0 if self.label_key in batch else None
        image = _np(_first(batch[self.image_key]))
        for t, m in engine.state.output["pred"]["maps"].items():
            self._evaluator(setting_name(t)).add(subject, kind, _np(m), lesion, brain)
        reference = self.healthy.reference if self.healthy else None
        mode = self.healthy.baseline_mode if self.healthy else "abs_dev"
        self._evaluator(BASELINE).add(
            subject, kind, intensity_baseline_map(image, brain, mode, reference), lesion, brain
        )

    def _finish(self, engine: Any) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        methods = [k for k in self.evaluators if k != BASELINE]
        headline = (
            setting_name(self.headline_t)
            if self.headline_t is not None
            else (methods[0] if methods else None)
        )
        for name, ev in self.evaluators.items():
            self.results[name] = ev.compute()
            ev.write_csv(self.output_dir / f"per_subject_{name}.csv")
        if self.n_boot > 0 and self.evaluators:
            self._bootstrap(methods)
        for name, res in self.results.items():
            for k, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    engine.state.metrics[f"{name}/{k}"] = float(v)
                    if name == headline:
                        engine.state.metrics[k] = float(v)
        for pair, metrics in self.differences.items():
            for metric, iv in metrics.items():
                engine.state.metrics[f"diff/{pair}/{metric}"] = iv["point"]
                engine.state.metrics[f"diff/{pair}/{metric}_ci_low"] = iv["low"]
                engine.state.metrics[f"diff/{pair}/{metric}_ci_high"] = iv["high"]
        atomic_write_text(
            self.output_dir / "metrics.json", json.dumps(self.results, indent=1, default=str) + "\n"
        )
        if self.differences:
            atomic_write_text(
                self.output_dir / "differences.json", json.dumps(self.differences, indent=1) + "\n"
            )
        # pooled ROC/PR points per method: logged with the output folder, so a report can draw the
        # curves from the tracking store alone (scripts/report.py)
        curves = {name: ev.curves() for name, ev in self.evaluators.items()}
        atomic_write_text(self.output_dir / "curves.json", json.dumps(curves) + "\n")
        print(self.table())

    def _bootstrap(self, methods: list[str]) -> None:
        """Intervals of every method's headline metrics and paired differences, on one subject draw matrix."""
        evs = self.evaluators
        first = next(iter(evs.values()))
        for name, ev in evs.items():
            if ev.subjects != first.subjects:
                raise RuntimeError(f"method {name!r} was scored on other subjects than the rest")
        draws = subject_resamples(len(first.subjects), self.n_boot, first.kinds, self.bootstrap_seed)
        stats = {name: ev.bootstrap_statistics() for name, ev in evs.items()}
        for name, st in stats.items():
            for metric, fn in st.items():
                iv = bootstrap_interval(fn, draws, self.ci_level)
                self.results[name][f"{metric}_ci_low"] = iv.low
                self.results[name][f"{metric}_ci_high"] = iv.high
        pairs = [(m, BASELINE) for m in methods if BASELINE in evs]
        pairs += [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
        for a, b in pairs:
            self.differences[f"{a}-{b}"] = {
                metric: paired_difference(stats[a][metric], stats[b][metric], draws, self.ci_level).as_dict()
                for metric in stats[a]
                if metric in stats[b]
            }

    def table(self) -> str:
        """The headline metrics of every method as a Markdown table.

        Returns:
            The table (also printed at the end of the evaluation).
        """
        cols = ["pixel_auprc", "pixel_auroc", "dice_best", "dice_fpr5", "slice_auroc", "slice_ap"]
        lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, res in self.results.items():
            cells = [
                f"{res.get(c, float('nan')):.4f}" if isinstance(res.get(c), (int, float)) else "n/a"
                for c in cols
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


class AnomalyFigureHandler:
    """PNG figures of image / reconstruction / anomaly map / lesion outline for a few test subjects.

    For each of the first ``max_subjects`` subjects with a lesion (and one healthy subject), the
    slice with the largest lesion area (the middle slice for healthy) is drawn in one row:
    the normalised image, the reconstruction at ``t``, the anomaly map inside the brain, and the map
    blended over the image (``monai.visualize.blend_images``) with the lesion outline.

    Args:
        output_dir: folder for ``figures/<subject>.png``.
        t: the noise level whose reconstruction and map are drawn.
        max_subjects: number of pathological subjects drawn.
        slice_axis: the slicing axis.
        image_key, label_key, brain_key: batch keys.
        every_volume: draw every volume (inference); without a lesion the slice with the largest
            total anomaly score is drawn.
    """

    def __init__(
        self,
        output_dir: str | Path,
        t: int | str,
        max_subjects: int = 6,
        slice_axis: int = 2,
        image_key: str = "image",
        label_key: str = "label",
        brain_key: str = "brain_mask",
        every_volume: bool = False,
    ) -> None:
        self.every_volume = every_volume
        self.output_dir = Path(output_dir) / "figures"
        self.t = setting_key(t)
        self.max_subjects = int(max_subjects)
        self.axis = slice_axis
        self.image_key, self.label_key, self.brain_key = image_key, label_key, brain_key
        self._drawn = 0
        self._healthy_drawn = False
        self.written: list[Path] = []

    def attach(self, engine: Any) -> None:
        """Register with an Ignite engine.

        Args:
            engine: the test-set evaluator.
        """
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._draw)

    def _draw(self, engine: Any) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from monai.visualize import blend_images

        batch, pred = engine.state.batch, engine.state.output["pred"]
        lesion = _np(_first(batch[self.label_key])) > 0 if self.label_key in batch else None
        healthy = lesion is None or not lesion.any()
        done = (healthy and self._healthy_drawn) or (not healthy and self._drawn >= self.max_subjects)
        if done and not self.every_volume:
            return
        if self.t not in pred["maps"]:
            return
        image = _np(_first(batch[self.image_key]))
        brain = _np(_first(batch[self.brain_key])) > 0
        amap = _np(pred["maps"][self.t]) * brain
        recon = _np(pred["recons"][self.t])
        in_plane = tuple(a for a in range(3) if a != self.axis)
        if not healthy:
            k = int(np.argmax(lesion.sum(axis=in_plane)))
        elif self.every_volume:
            k = int(np.argmax(amap.sum(axis=in_plane)))
        else:
            k = image.shape[self.axis] // 2

        def cut(a: np.ndarray) -> np.ndarray:
            return np.take(a, k, axis=self.axis).T  # RAS: transpose so anterior is up with origin="lower"

        vmax = float(np.percentile(amap[brain], 99.5)) if brain.any() else 1.0
        heat = np.clip(cut(amap) / max(vmax, 1e-8), 0, 1)
        blended = blend_images(
            torch.as_tensor((cut(image) + 1) / 2)[None], torch.as_tensor(heat)[None], alpha=0.5, cmap="hot"
        )
        fig, axes = plt.subplots(1, 4, figsize=(10, 2.9))
        panels = [
            (cut(image), "image", "gray"),
            (cut(recon), f"reconstruction ({setting_name(self.t)})", "gray"),
            (cut(amap), "anomaly map", "hot"),
        ]
        for ax, (a, title, cmap) in zip(axes, panels, strict=False):
            ax.imshow(
                a,
                origin="lower",
                cmap=cmap,
                vmin=-1 if cmap == "gray" else 0,
                vmax=1 if cmap == "gray" else vmax,
            )
            ax.set_title(title, fontsize=8)
        axes[3].imshow(np.moveaxis(np.asarray(blended), 0, -1), origin="lower")
        axes[3].set_title("overlay, lesion outline", fontsize=8)
        if lesion is not None and lesion.any():
            for ax in axes:
                ax.contour(cut(lesion.astype(float)), [0.5], colors="cyan", linewidths=0.6)
        for ax in axes:
            ax.set_axis_off()
        subject = str(_first(batch.get("subject", f"volume{engine.state.iteration:04d}")))
        kind = str(_first(batch.get("kind", "")))
        fig.suptitle(f"{subject} ({kind}), slice {k}", fontsize=9)
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        out = self.output_dir / f"{subject}.png"
        with atomic_path(out, ".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)
        self.written.append(out)
        if healthy:
            self._healthy_drawn = True
        else:
            self._drawn += 1


class AnomalyMapWriter:
    """Write each volume's anomaly map as NIfTI on the input's own grid (shape and affine).

    The map is computed on the reoriented (and possibly resampled) volume; the loading transforms'
    recorded operations are inverted (as ``monai.transforms.Invertd`` does) so the written map lies
    voxel for voxel on the input file's grid, whether it came from NIfTI or a DICOM series. Files
    are written atomically (temporary file, then rename); names come from the input file name (a
    DICOM series folder gives ``series_<n>``, never tag values).

    Args:
        preprocessing: the invertible loading ``Compose`` the evaluator's dataset used.
        output_dir: output folder.
        t: the noise level whose map is written.
        image_key, brain_key: batch keys; the map is zeroed outside the brain mask.
        postfix: file-name postfix.
    """

    def __init__(
        self,
        preprocessing: Any,
        output_dir: str | Path,
        t: int | str,
        image_key: str = "image",
        brain_key: str = "brain_mask",
        postfix: str = "anomaly_map",
    ) -> None:
        self.preprocessing = preprocessing
        self.output_dir = Path(output_dir)
        self.t = setting_key(t)
        self.image_key, self.brain_key = image_key, brain_key
        self.postfix = postfix
        self.written: list[Path] = []

    def attach(self, engine: Any) -> None:
        """Register with an Ignite engine.

        Args:
            engine: the inference evaluator.
        """
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)

    def _name(self, source: str, index: int) -> str:
        p = Path(source)
        if p.is_dir():
            return f"series_{index:04d}"
        stem = p.name
        for ext in (".nii.gz", ".nii", ".dcm", ".mha", ".nrrd"):
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
                break
        return stem

    def _write(self, engine: Any) -> None:
        import nibabel as nib
        from monai.data import MetaTensor

        from transforms.errors import source_name

        batch = engine.state.batch
        image = batch[self.image_key][0]  # decollate-free: the batch holds one volume
        amap = engine.state.output["pred"]["maps"][self.t][0].float().cpu()
        if self.brain_key in batch:
            amap = amap * (torch.as_tensor(batch[self.brain_key][0]).cpu() > 0)
        m = MetaTensor(amap, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        inv = self.preprocessing.inverse({self.image_key: m})[self.image_key]
        arr = np.asarray(inv.detach().cpu().numpy(), dtype=np.float32)
        arr = arr[0] if arr.ndim == 4 else arr
        affine = np.asarray(
            inv.affine.cpu().numpy() if hasattr(inv.affine, "cpu") else inv.affine, dtype=np.float64
        )
        src = source_name(image.meta)
        out = self.output_dir / f"{self._name(src, len(self.written))}_{self.postfix}.nii.gz"
        img = nib.Nifti1Image(arr, affine)
        img.header.set_xyzt_units("mm")
        with atomic_path(out, ".nii.gz") as tmp:
            nib.save(img, tmp)
        self.written.append(out)
        logger.info("anomaly map written: %s", out)
