"""What ``diffusion_mae``'s Ignite engines need: prepare-batch and losses for studies, study embeddings,
the linear probe run during pretraining, reconstruction figures and the backward-diffusion GIF.

The probe is seed 003's main measurement: the AUROC of a linear probe on frozen study embeddings
against pretraining epochs, for the MAE and the diffusion-MAE scheme. :class:`LinearProbeHandler` runs
it every ``interval`` epochs (and on the untrained encoder, epoch 0) and logs it into the training run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines.utils import PrepareBatch
from torch import nn

from data_prep.atomic import atomic_path
from engines.checkpoint import load_checkpoint
from engines.probe import fit_linear_probe, multilabel_metrics, probe_probabilities
from transforms.errors import InputDataError

__all__ = [
    "LinearProbeHandler",
    "MaskedPatchLoss",
    "ReconstructionFigureHandler",
    "StudyPrepareBatch",
    "findings_of",
    "load_encoder_weights",
    "masked_patch_mse",
    "mean_auroc",
    "probe_evaluation",
    "save_backward_gif",
    "save_reconstruction_figure",
    "study_embeddings",
    "write_rows",
]

logger = logging.getLogger(__name__)


class StudyPrepareBatch(PrepareBatch):
    """Batch of studies → ``(views, labels or None, (), {"view_mask": mask})`` for MONAI's engines.

    Args:
        with_labels: return the findings as targets (fine-tuning); False for pretraining.
        views_key: collated views ``(B, V, C, H, W)``.
        mask_key: view mask ``(B, V)``.
        label_key: findings ``(B, L)``.
    """

    def __init__(
        self,
        with_labels: bool = False,
        views_key: str = "views",
        mask_key: str = "view_mask",
        label_key: str = "labels",
    ) -> None:
        self.with_labels = with_labels
        self.views_key, self.mask_key, self.label_key = views_key, mask_key, label_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        """See the class docstring."""
        views = torch.as_tensor(batchdata[self.views_key]).to(device, non_blocking=non_blocking)
        mask = torch.as_tensor(batchdata[self.mask_key]).to(device, non_blocking=non_blocking)
        labels = None
        if self.with_labels:
            labels = torch.as_tensor(batchdata[self.label_key]).float().to(device, non_blocking=non_blocking)
        return views, labels, (), {"view_mask": mask}


def findings_of(datalist: str | os.PathLike | Mapping[str, Any]) -> list[str]:
    """The finding names (label vector order) of a studies datalist: its top-level ``findings``.

    Args:
        datalist: a ``studies.json`` path or its content.

    Returns:
        The names.

    Raises:
        InputDataError: naming the file: no ``findings`` list of distinct strings.
    """
    content = datalist if isinstance(datalist, Mapping) else json.loads(Path(datalist).read_text())
    names = content.get("findings")
    path = None if isinstance(datalist, Mapping) else datalist
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise InputDataError("a studies datalist needs a top-level 'findings' list of label names", path)
    if len(set(names)) != len(names):
        raise InputDataError(f"'findings' has duplicate names: {names}", path)
    return list(names)


def masked_patch_mse(output: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the masked patches of a :class:`networks.study_vit.StudyMAE` output.

    Args:
        output: ``{"pred", "target"}`` ``(N, L, P)`` and ``"mask"`` ``(N, L)`` (True = masked).

    Returns:
        A scalar: per-patch MSE averaged over masked patches (MAE's loss).
    """
    per_patch = ((output["pred"] - output["target"]) ** 2).mean(dim=-1)
    mask = output["mask"].to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MaskedPatchLoss(nn.Module):
    """``loss_function`` of the pretraining ``SupervisedTrainer``: :func:`masked_patch_mse` of the
    network's output (the trainer's target is None: the images are their own targets)."""

    def forward(self, output: Mapping[str, torch.Tensor], target: Any = None) -> torch.Tensor:
        """See the class docstring."""
        return masked_patch_mse(output)


def load_encoder_weights(
    encoder: nn.Module,
    path: str | os.PathLike,
    prefix: str = "encoder.",
    hint: str = "",
    map_location: Any = "cpu",
) -> nn.Module:
    """Fill an encoder from a pretraining checkpoint (the ``encoder.*`` part of the saved ``StudyMAE``) or
    from a fine-tuning one (``StudyClassifier``, same prefix).

    Args:
        encoder: the :class:`networks.study_vit.StudyViTEncoder` to fill (strictly).
        path: the checkpoint (``{"model": state_dict}`` or a bare state dict).
        prefix: the encoder's prefix in the saved state dict.
        hint: appended to the missing-file message (which config writes the file).
        map_location: where tensors load.

    Returns:
        ``encoder`` in eval mode.

    Raises:
        InputDataError: naming the file: missing, no ``encoder.*`` weights, or weights of another size.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError("checkpoint file does not exist" + (f"; {hint}" if hint else ""), path)
    ckpt = load_checkpoint(path, map_location)
    state = ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise InputDataError(f"no '{prefix}*' weights in this checkpoint (not a diffusion_mae model?)", path)
    try:
        encoder.load_state_dict(sub)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise InputDataError(
            f"encoder weights do not fit the configured encoder (size preset?): {first}", path
        ) from e
    return encoder.eval()


@torch.no_grad()
def study_embeddings(
    encoder: nn.Module,
    loader: Any,
    device: str | torch.device = "cpu",
    classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """Study embeddings (and optionally a classifier's probabilities) of every study of a loader.

    The encoder (and classifier) are put in eval mode for the pass and back to their mode afterwards, so
    a probe during training does not leave dropout off.

    Args:
        encoder: views, view_mask → ``(B, D)``.
        loader: yields collated studies (:func:`transforms.study.collate_studies`).
        device: where to compute.
        classifier: views, view_mask → logits; its sigmoid goes to ``"probs"``.

    Returns:
        ``{"features": (n, D) float32 CPU tensor, "labels": (n, L) or None, "studies": [ids],
        "subjects": [the batches' ``subject`` or None], "probs": (n, L) or absent}``.
    """
    modes = [(m, m.training) for m in (encoder, classifier) if m is not None]
    for m, _ in modes:
        m.eval()
    feats, labels, probs, studies, subjects = [], [], [], [], []
    try:
        for batch in loader:
            views = batch["views"].to(device)
            mask = batch["view_mask"].to(device)
            feats.append(encoder(views, mask).float().cpu())
            if classifier is not None:
                probs.append(torch.sigmoid(classifier(views, mask).float()).cpu())
            if "labels" in batch:
                labels.append(torch.as_tensor(batch["labels"]).float().cpu())
            studies.extend(batch.get("study", [None] * views.shape[0]))
            # kept in memory only, to group a subject's studies in the bootstrap; never written
            subjects.extend(batch.get("subject", [None] * views.shape[0]))
    finally:
        for m, mode in modes:
            m.train(mode)
    out: dict[str, Any] = {
        "features": torch.cat(feats),
        "labels": torch.cat(labels) if labels else None,
        "studies": studies,
        "subjects": subjects,
    }
    if classifier is not None:
        out["probs"] = torch.cat(probs)
    return out


def mean_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over findings of the AUROC (masked entries left out; NaN if no finding is defined): the
    ``compute_fn`` of the fine-tuning's ``ignite.metrics.EpochMetric``."""
    return float(multilabel_metrics(probs.detach().cpu(), labels.detach().cpu())["mean_auroc"])


def probe_evaluation(
    train: Mapping[str, Any],
    evaluate: Mapping[str, Any],
    findings: Sequence[str],
    probe_epochs: int = 300,
    probe_lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[dict[str, float], torch.Tensor, nn.Module]:
    """Fit the linear probe on one split's embeddings and score another's.

    Args:
        train: :func:`study_embeddings` of the probe's training split.
        evaluate: :func:`study_embeddings` of the scored split.
        findings: label names.
        probe_epochs: full-batch optimisation steps.
        probe_lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: probe initialisation.

    Returns:
        ``(metrics, probabilities, probe)``: :func:`engines.probe.multilabel_metrics`, the ``(n, L)``
        probabilities and the fitted :class:`engines.probe.LinearProbe`.
    """
    probe = fit_linear_probe(
        train["features"],
        train["labels"],
        epochs=probe_epochs,
        lr=probe_lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    probs = probe_probabilities(probe, evaluate["features"])
    return multilabel_metrics(probs, evaluate["labels"], list(findings)), probs, probe


def _open_run(mlflow_handler: Any, engine: Any) -> None:
    """Open the MLflow handler's run now (its own ``STARTED`` hook may not have fired yet); the handler's
    ``start`` resumes the run of the same name, so its later call is harmless."""
    if mlflow_handler is not None and getattr(mlflow_handler, "cur_run", None) is None:
        mlflow_handler.start(engine)


class LinearProbeHandler:
    """The linear probe on frozen study embeddings during pretraining (seed 003's probe-vs-epoch curve).

    At the start (epoch 0, the untrained encoder; not when resuming), every ``interval`` epochs and at the
    end of training, the encoder embeds the probe's training and validation studies, a linear probe
    (:func:`engines.probe.fit_linear_probe`) is fitted on the training ones and scored on the validation
    ones. The results go to the log, to ``<output_dir>/probe_curve.csv`` (one row per probe, appended and
    rewritten atomically) and, when ``mlflow_handler`` is given, into its run as ``probe_mean_auroc``,
    ``probe_mean_auprc`` and ``probe_auroc/<finding>`` with the pretraining epoch as the step, so MLflow
    plots the curves of the two schemes against epochs. List it *before* the MLflow handler, whose
    ``COMPLETED`` hook closes the run; the probe opens the run itself for its epoch-0 point.

    Args:
        encoder: the encoder being pretrained (the module, not a copy).
        train_loader: probe training studies (labelled, not shuffled, no augmentation).
        val_loader: probe validation studies.
        findings: label names.
        interval: epochs between probes.
        device: where embeddings are computed.
        output_dir: folder of ``probe_curve.csv``; None: no file.
        mlflow_handler: the trainer's ``MLFlowHandler`` (``client`` and ``cur_run`` are used).
        at_start: probe the untrained encoder when training starts from epoch 0.
        probe_epochs, probe_lr, seed: :func:`probe_evaluation` arguments.
    """

    def __init__(
        self,
        encoder: nn.Module,
        train_loader: Any,
        val_loader: Any,
        findings: Sequence[str],
        interval: int = 10,
        device: str | torch.device = "cpu",
        output_dir: str | os.PathLike | None = None,
        mlflow_handler: Any = None,
        at_start: bool = True,
        probe_epochs: int = 300,
        probe_lr: float = 0.05,
        seed: int = 0,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.encoder, self.train_loader, self.val_loader = encoder, train_loader, val_loader
        self.findings = list(findings)
        self.interval, self.device, self.at_start = int(interval), device, at_start
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.mlflow_handler = mlflow_handler
        self.probe_kwargs = {"probe_epochs": probe_epochs, "probe_lr": probe_lr, "seed": seed}
        self.history: list[dict[str, float]] = []
        self._last_epoch = -1

    def attach(self, engine: Any) -> None:
        """Register on ``STARTED``, every ``interval`` ``EPOCH_COMPLETED`` and ``COMPLETED``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Any) -> None:
        if self.at_start and engine.state.epoch == 0:
            _open_run(self.mlflow_handler, engine)
            self.probe(0)

    def __call__(self, engine: Any) -> None:
        """Probe at the engine's current epoch (once per epoch)."""
        self.probe(int(engine.state.epoch))

    def probe(self, epoch: int) -> dict[str, float]:
        """Run the probe now and record it as ``epoch``.

        Args:
            epoch: the pretraining epoch (the MLflow step).

        Returns:
            The metrics (``probe_``-prefixed), or ``{}`` if this epoch was probed already.
        """
        if epoch == self._last_epoch:
            return {}
        self._last_epoch = epoch
        train = study_embeddings(self.encoder, self.train_loader, self.device)
        val = study_embeddings(self.encoder, self.val_loader, self.device)
        metrics, _, _ = probe_evaluation(train, val, self.findings, **self.probe_kwargs)
        row = {"epoch": float(epoch), **{f"probe_{k}": float(v) for k, v in metrics.items()}}
        self.history.append(row)
        logger.info(
            "linear probe at epoch %d: validation mean AUROC %.4f, mean AUPRC %.4f",
            epoch,
            metrics["mean_auroc"],
            metrics["mean_auprc"],
        )
        self._write_csv()
        self._log_mlflow(row, epoch)
        return {k: v for k, v in row.items() if k != "epoch"}

    def _write_csv(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "probe_curve.csv"
        keys = list(self.history[0])
        with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)

    def _log_mlflow(self, row: Mapping[str, float], epoch: int) -> None:
        h = self.mlflow_handler
        run = getattr(h, "cur_run", None)
        if h is None or run is None:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        names = ("probe_mean_auroc", "probe_mean_auprc", *(f"probe_auroc/{f}" for f in self.findings))
        ms = [Metric(k, row[k], ts, epoch) for k in names if k in row and np.isfinite(row[k])]
        if callable(getattr(h, "log_metrics", None)):
            # engines.TaggedMLFlowHandler: a tracking outage falls back to its local store, never
            # stopping the pretraining
            h.log_metrics({m.key: m.value for m in ms}, step=epoch)
        else:
            h.client.log_batch(run.info.run_id, metrics=ms)


def _to_rgb_grid(rows: Sequence[Sequence[np.ndarray]], lo: float, hi: float, pad: int = 2) -> np.ndarray:
    """Images ``(H, W)`` laid out in a grid (uint8, one shared intensity window)."""
    h, w = rows[0][0].shape
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, a in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return out


def save_reconstruction_figure(
    path: str | os.PathLike,
    original: torch.Tensor,
    columns: Mapping[str, torch.Tensor],
    view_names: Sequence[str] | None = None,
    title: str = "",
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """One row per view: the original and each named column (masked input, reconstructions...).

    Args:
        path: output PNG.
        original: ``(V, 1, H, W)`` the views of one study.
        columns: column title → ``(V, 1, H, W)``.
        view_names: row labels.
        title: figure title.
        value_range: the shared display window (the training intensity range).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["original", *columns]
    images = [original, *columns.values()]
    v = original.shape[0]
    fig, axes = plt.subplots(v, len(names), figsize=(2.0 * len(names), 2.0 * v + 0.4), squeeze=False)
    for i in range(v):
        for j, (name, im) in enumerate(zip(names, images, strict=True)):
            ax = axes[i, j]
            ax.imshow(
                im[i, 0].detach().cpu().float().numpy().T[::-1],
                cmap="gray",
                vmin=value_range[0],
                vmax=value_range[1],
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and view_names is not None:
                ax.set_ylabel(view_names[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def save_backward_gif(
    path: str | os.PathLike,
    chain: Sequence[torch.Tensor],
    original: torch.Tensor | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    scale: int = 2,
    duration_ms: int = 200,
) -> Path:
    """Animated GIF of a study's backward diffusion: every frame shows all its views side by side.

    Args:
        path: output GIF.
        chain: frames, each ``(V, 1, H, W)`` (pure noise in the masked patches first, the x0 estimate last).
        original: ``(V, 1, H, W)`` shown as a fixed top row for reference.
        value_range: the shared intensity window.
        scale: nearest-neighbour magnification.
        duration_ms: per frame (the last frame is held 5x longer).

    Returns:
        ``path``.
    """
    from PIL import Image

    lo, hi = value_range
    frames = []
    for k, x in enumerate(chain):
        rows = [[v[0].detach().cpu().float().numpy().T[::-1] for v in x]]
        if original is not None:
            rows.insert(0, [v[0].detach().cpu().float().numpy().T[::-1] for v in original])
        grid = _to_rgb_grid(rows, lo, hi)
        # a progress strip: where in the chain this frame is (also keeps GIF writers from merging frames)
        strip = np.full((6, grid.shape[1]), 255, np.uint8)
        strip[1:5, : round(grid.shape[1] * (k + 1) / len(chain))] = 90
        img = Image.fromarray(np.vstack([grid, strip]))
        frames.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [duration_ms * 5]
    with atomic_path(path, ".gif") as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


class ReconstructionFigureHandler:
    """Reconstruction figures of the first ``max_studies`` studies of a loader at the end of pretraining.

    Writes ``<output_dir>/reconstruction_<scheme>_<k>.png`` (per view: original, masked input, the
    first-step estimate for ``diffusion``, the reconstruction) and, for ``diffusion``,
    ``backward_diffusion_<k>.gif``; with ``mlflow_handler`` they become artifacts of the training run.
    Masks and starting noise come from a generator seeded with ``seed``, so two runs (and two schemes)
    draw the same masks for the same study.

    Args:
        model: the :class:`networks.study_vit.StudyMAE` being trained.
        loader: yields collated studies (batch size 1 keeps one study per figure).
        output_dir: figure folder.
        max_studies: studies drawn.
        steps: diffusion reconstruction steps.
        seed: masks and noise.
        device: where to compute.
        mlflow_handler: the trainer's ``MLFlowHandler``.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Any,
        output_dir: str | os.PathLike,
        max_studies: int = 2,
        steps: int = 20,
        seed: int = 0,
        device: str | torch.device = "cpu",
        mlflow_handler: Any = None,
    ) -> None:
        self.model, self.loader, self.output_dir = model, loader, Path(output_dir)
        self.max_studies, self.steps, self.seed, self.device = int(max_studies), int(steps), int(seed), device
        self.mlflow_handler = mlflow_handler
        self.written: list[Path] = []

    def attach(self, engine: Any) -> None:
        """Register on ``COMPLETED``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any = None) -> list[Path]:
        """Draw the figures (see the class docstring)."""
        model = getattr(self.model, "module", self.model)  # DistributedDataParallel → the model
        mode = model.training
        model.eval()
        self.written = []
        try:
            for k, batch in enumerate(self.loader):
                if k >= self.max_studies:
                    break
                self.written += draw_study(
                    model, batch, self.output_dir, k, self.steps, self.seed, self.device
                )
        finally:
            model.train(mode)
        h = self.mlflow_handler
        if h is not None and getattr(h, "cur_run", None) is not None:
            for p in self.written:
                if callable(getattr(h, "log_artifact", None)):  # guarded against tracking outages
                    h.log_artifact(p, "figures")
                else:
                    h.client.log_artifact(h.cur_run.info.run_id, str(p), "figures")
        return self.written


def draw_study(
    model: nn.Module,
    batch: Mapping[str, Any],
    output_dir: str | os.PathLike,
    k: int,
    steps: int = 20,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Figures of the first study of a batch for one model (see :class:`ReconstructionFigureHandler`)."""
    views = batch["views"][:1].to(device)
    mask = batch["view_mask"][:1].to(device)
    gen = torch.Generator(device=device).manual_seed(seed + k)
    out = model.reconstruct(views, mask, steps=steps, generator=gen, return_chain=model.scheme == "diffusion")
    names = batch.get("view_names", [None])[0]
    original = views[0][mask[0]]
    cols = {"masked input": out["masked"]}
    if model.scheme == "diffusion":
        cols["first step"] = out["first"]
    cols[f"{model.scheme} reconstruction"] = out["recon"]
    out_dir = Path(output_dir)
    paths = [
        save_reconstruction_figure(
            out_dir / f"reconstruction_{model.scheme}_{k}.png",
            original,
            cols,
            names,
            title=f"{model.scheme}, study {k}",
        )
    ]
    if model.scheme == "diffusion":
        paths.append(save_backward_gif(out_dir / f"backward_diffusion_{k}.gif", out["chain"], original))
    return paths


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write dict rows as CSV atomically (columns: the union of keys in first-seen order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def finite_or_none(x: float) -> float | None:
    """JSON-safe float: NaN/inf → None."""
    return float(x) if np.isfinite(x) else None
