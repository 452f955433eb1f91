"""``diffusion_mae`` evaluation (linear probe and fine-tuning of each pretraining scheme on the test split)
and inference (study → embedding and finding probabilities)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_prep.atomic import atomic_path, atomic_write_text
from engines.bootstrap import DEFAULT_N_BOOT
from engines.classification_intervals import MultilabelStatistics, classification_intervals, cluster_index
from engines.probe import multilabel_metrics
from engines.study import (
    probe_evaluation,
    save_backward_gif,
    save_reconstruction_figure,
    study_embeddings,
    write_rows,
)
from engines.tracking import log_comparison_runs
from transforms.errors import InputDataError

__all__ = ["StudyEvaluation", "StudyInference", "linear_probe_run", "study_id"]

logger = logging.getLogger(__name__)


def study_id(views: Sequence[str | os.PathLike]) -> str:
    """A stable, anonymous id of a study: a hash of its views' file names (which may carry identifiers)."""
    names = "|".join(os.path.basename(os.fspath(v)) for v in views)
    return hashlib.blake2b(names.encode(), digest_size=8).hexdigest()


class StudyEvaluation:
    """Per-label and mean AUROC / AUPRC of every pretraining scheme on the *test* split, by linear probing
    and by fine-tuning, plus the reconstruction comparison figures.

    - ``probe``: the pretrained encoder (frozen) embeds the training and test studies; a linear probe
      (non-affine BatchNorm + linear, :func:`engines.study.probe_evaluation`) is fitted on the training
      studies and scored on the test studies. The validation split is not used (nothing is selected).
    - ``finetune``: the fine-tuned :class:`networks.study_vit.StudyClassifier` scores the test studies.
    - ``random_init``: (``random_baseline``) the probe on an untrained encoder of the same size, the
      reference a pretraining scheme has to beat.

    Writes ``metrics.csv`` (scheme, protocol, finding, AUROC, AUPRC, positives), ``summary.json``,
    ``summary.md``, ``figures/reconstruction_<k>.png`` (per view: original, masked input, each scheme's
    reconstruction, with the same masks) and ``figures/backward_diffusion_<k>.gif``; logs a parent MLflow
    run (experiment ``representation-learning``) with the tables and figures and one child run per scheme
    with the metrics ``probe_mean_auroc``, ``probe_auroc/<finding>``, ``finetune_mean_auroc``...

    Args:
        schemes: pretraining schemes to evaluate (``mae``, ``diffusion``).
        load_pretrained: scheme → trained :class:`~networks.study_vit.StudyMAE` (raises naming the file).
        load_classifier: scheme → fine-tuned classifier, or None to skip fine-tuning results.
        make_encoder: → an untrained encoder (the random baseline), or None.
        train_loader: the probe's training studies.
        test_loader: the scored studies.
        figure_loader: studies for the figures (batch size 1), or None.
        findings: label names.
        output_dir: output folder.
        device: where to compute.
        protocols: subset of ``("probe", "finetune")``.
        probe_epochs, probe_lr, seed: the probe's fit.
        figure_studies: studies drawn.
        steps: diffusion reconstruction steps of the figures.
        tracking: ``make_mlflow_handler``-like keys (``run_name``, ``method``, ``datalist``, ``dataset_name``,
            ``workdir``, ``hparams``), or None for no MLflow.
        n_boot: replicates of the subject-level bootstrap (studies grouped by their ``subject``; 0: none). Every
            metric gets ``<metric>_ci_low`` / ``_ci_high``; ``intervals.json`` and the parent run's
            ``diff/<scheme>/<protocol>-<scheme>/<protocol>/<metric>`` hold the paired differences.
        ci_level: their coverage.

    Raises:
        ValueError: unknown protocol or scheme.
    """

    def __init__(
        self,
        schemes: Sequence[str],
        load_pretrained: Callable[[str], nn.Module],
        load_classifier: Callable[[str], nn.Module] | None,
        make_encoder: Callable[[], nn.Module] | None,
        train_loader: Any,
        test_loader: Any,
        findings: Sequence[str],
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        figure_loader: Any = None,
        protocols: Sequence[str] = ("probe", "finetune"),
        probe_epochs: int = 300,
        probe_lr: float = 0.05,
        seed: int = 0,
        figure_studies: int = 2,
        steps: int = 20,
        tracking: Mapping[str, Any] | None = None,
        n_boot: int = DEFAULT_N_BOOT,
        ci_level: float = 0.95,
    ) -> None:
        bad = set(protocols) - {"probe", "finetune"}
        if bad:
            raise ValueError(f"unknown protocols {sorted(bad)}; expected probe and/or finetune.")
        bad = set(schemes) - {"mae", "diffusion"}
        if bad or not schemes:
            raise ValueError(
                f"schemes must be a non-empty subset of ['mae', 'diffusion'], got {list(schemes)}."
            )
        if "finetune" in protocols and load_classifier is None:
            raise ValueError("protocol 'finetune' needs load_classifier.")
        self.schemes, self.protocols = list(schemes), list(protocols)
        self.load_pretrained, self.load_classifier, self.make_encoder = (
            load_pretrained,
            load_classifier,
            make_encoder,
        )
        self.train_loader, self.test_loader, self.figure_loader = train_loader, test_loader, figure_loader
        self.findings = list(findings)
        self.output_dir = Path(output_dir)
        self.device = device
        self.probe_kwargs = {"probe_epochs": probe_epochs, "probe_lr": probe_lr, "seed": seed}
        self.figure_studies, self.steps, self.seed = int(figure_studies), int(steps), int(seed)
        self.tracking = tracking
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        self.n_boot, self.ci_level = int(n_boot), float(ci_level)
        self._scored: dict[str, tuple[np.ndarray, np.ndarray, list[Any], list[Any]]] = {}
        self.differences: dict[str, dict[str, dict[str, float]]] = {}

    def _probe(self, encoder: nn.Module, key: str) -> dict[str, float]:
        train = study_embeddings(encoder, self.train_loader, self.device)
        test = study_embeddings(encoder, self.test_loader, self.device)
        metrics, probs, _ = probe_evaluation(train, test, self.findings, **self.probe_kwargs)
        self._scored[key] = (np.asarray(probs), np.asarray(test["labels"]), test["subjects"], test["studies"])
        return metrics

    def _finetune(self, classifier: nn.Module, key: str) -> dict[str, float]:
        out = study_embeddings(classifier.encoder, self.test_loader, self.device, classifier=classifier)
        self._scored[key] = (
            np.asarray(out["probs"]),
            np.asarray(out["labels"]),
            out["subjects"],
            out["studies"],
        )
        return multilabel_metrics(out["probs"], out["labels"], self.findings)

    def _intervals(self) -> None:
        """Subject-level bootstrap intervals of every (scheme, protocol)'s metrics, and the paired differences
        that answer the study's questions: each scheme's probe against the untrained encoder's, fine-tuning
        against the probe of the same scheme, and the two schemes against each other."""
        if self.n_boot <= 0 or not self._scored:
            return
        first = next(iter(self._scored.values()))
        if any(v[3] != first[3] for v in self._scored.values()):
            raise RuntimeError("the test loader gave the studies in a different order for different models")
        clusters = cluster_index(first[2])
        models = {
            key: MultilabelStatistics(probs, labels, clusters, self.findings)
            for key, (probs, labels, _, _) in self._scored.items()
        }
        keys = list(models)
        pairs = [(k, "random_init/probe") for k in keys if k.endswith("/probe") and k != "random_init/probe"]
        pairs += [(f"{s}/finetune", f"{s}/probe") for s in self.schemes if f"{s}/finetune" in models]
        if len(self.schemes) == 2:
            a, b = self.schemes
            pairs += [
                (f"{a}/{p}", f"{b}/{p}")
                for p in self.protocols
                if f"{a}/{p}" in models and f"{b}/{p}" in models
            ]
        pairs = [(a, b) for a, b in pairs if a in models and b in models]
        intervals, differences = classification_intervals(
            models, None, self.n_boot, self.ci_level, self.seed, pairs
        )
        for key, metrics in intervals.items():
            scheme, protocol = key.split("/")
            for metric, iv in metrics.items():
                self.results[scheme][protocol][f"{metric}_ci_low"] = iv.low
                self.results[scheme][protocol][f"{metric}_ci_high"] = iv.high
        self.differences = {
            pair: {metric: iv.as_dict() for metric, iv in metrics.items()}
            for pair, metrics in differences.items()
        }
        payload = {
            "n_clusters": int(clusters.max()) + 1,
            "n_boot": self.n_boot,
            "level": self.ci_level,
            "differences": self.differences,
        }
        atomic_write_text(self.output_dir / "intervals.json", json.dumps(payload, indent=2) + "\n")

    def run(self) -> dict[str, dict[str, dict[str, float]]]:
        """Evaluate, write the tables and figures, log to MLflow.

        Returns:
            ``{scheme: {protocol: metrics}}`` (``random_init`` → ``{"probe": ...}`` with the baseline).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        models: dict[str, nn.Module] = {}
        for scheme in self.schemes:
            model = self.load_pretrained(scheme).to(self.device).eval()
            models[scheme] = model
            res: dict[str, dict[str, float]] = {}
            if "probe" in self.protocols:
                res["probe"] = self._probe(model.encoder, f"{scheme}/probe")
            if "finetune" in self.protocols:
                assert self.load_classifier is not None
                res["finetune"] = self._finetune(
                    self.load_classifier(scheme).to(self.device).eval(), f"{scheme}/finetune"
                )
            self.results[scheme] = res
            logger.info(
                "%s: %s",
                scheme,
                ", ".join(f"{p} mean AUROC {m['mean_auroc']:.4f}" for p, m in res.items()),
            )
        if self.make_encoder is not None and "probe" in self.protocols:
            self.results["random_init"] = {
                "probe": self._probe(self.make_encoder().to(self.device).eval(), "random_init/probe")
            }
        self._intervals()
        figures = self._figures(models)
        self._write_tables()
        if self.tracking is not None:
            self._log_mlflow(figures)
        return self.results

    def _figures(self, models: Mapping[str, nn.Module]) -> list[Path]:
        if self.figure_loader is None or self.figure_studies < 1:
            return []
        fig_dir = self.output_dir / "figures"
        written: list[Path] = []
        for k, batch in enumerate(self.figure_loader):
            if k >= self.figure_studies:
                break
            views = batch["views"][:1].to(self.device)
            mask = batch["view_mask"][:1].to(self.device)
            original = views[0][mask[0]]
            cols: dict[str, torch.Tensor] = {}
            chain = None
            for scheme, model in models.items():
                # the same generator seed → the same masks (drawn first) for every scheme
                gen = torch.Generator(device=self.device).manual_seed(self.seed + k)
                out = model.reconstruct(
                    views, mask, steps=self.steps, generator=gen, return_chain=model.scheme == "diffusion"
                )
                cols.setdefault("masked input", out["masked"])
                cols[f"{scheme} reconstruction"] = out["recon"]
                if model.scheme == "diffusion":
                    chain = out["chain"]
            names = batch.get("view_names", [None])[0]
            written.append(
                save_reconstruction_figure(
                    fig_dir / f"reconstruction_{k}.png", original, cols, names, title=f"test study {k}"
                )
            )
            if chain is not None:
                written.append(save_backward_gif(fig_dir / f"backward_diffusion_{k}.gif", chain, original))
        return written

    def _rows(self) -> list[dict[str, Any]]:
        rows = []
        for scheme, res in self.results.items():
            for protocol, m in res.items():
                for f in [*self.findings, None]:
                    auroc, auprc = ("mean_auroc", "mean_auprc") if f is None else (f"auroc/{f}", f"auprc/{f}")
                    rows.append(
                        {
                            "scheme": scheme,
                            "protocol": protocol,
                            "finding": f if f is not None else "mean",
                            "auroc": m.get(auroc, math.nan),
                            "auprc": m.get(auprc, math.nan),
                            "positives": m.get(f"n_pos/{f}", math.nan) if f is not None else math.nan,
                        }
                    )
        return rows

    def _write_tables(self) -> None:
        write_rows(self.output_dir / "metrics.csv", self._rows())
        summary = {
            s: {p: {k: (float(v) if np.isfinite(v) else None) for k, v in m.items()} for p, m in res.items()}
            for s, res in self.results.items()
        }
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        cols = ["mean AUROC", "mean AUPRC", *self.findings]
        lines = [
            "Test split; per-finding columns are AUROC (— = the finding has no positive or no negative test study);"
            " [low, high]: subject-level bootstrap 95 % interval.",
            "",
            "| scheme | protocol | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 2) + "|",
        ]

        def fmt(v: float) -> str:
            return f"{v:.3f}" if np.isfinite(v) else "—"

        for s, res in self.results.items():
            for p, m in res.items():
                cells = [
                    fmt(m[k])
                    + (f" [{fmt(m[k + '_ci_low'])}, {fmt(m[k + '_ci_high'])}]" if k + "_ci_low" in m else "")
                    for k in ("mean_auroc", "mean_auprc")
                ]
                cells += [fmt(m[f"auroc/{f}"]) for f in self.findings]
                lines.append(f"| {s} | {p} | " + " | ".join(cells) + " |")
        atomic_write_text(self.output_dir / "summary.md", "\n".join(lines) + "\n")

    def _log_mlflow(self, figures: Sequence[Path]) -> None:
        t = dict(self.tracking or {})
        children = {}
        for scheme, res in self.results.items():
            metrics = {f"{p}_{k}": v for p, m in res.items() for k, v in m.items() if np.isfinite(v)}
            children[scheme] = {"metrics": metrics, "params": {"scheme": scheme}, "tags": {"scheme": scheme}}
        log_comparison_runs(
            task="representation",
            run_name=t.get("run_name", "diffusion_mae-evaluate"),
            method=t.get("method", "diffusion_mae"),
            datalist=t.get("datalist"),
            dataset_name=t.get("dataset_name"),
            workdir=t.get("workdir", "."),
            hparams=t.get("hparams", {}),
            parent_params={"schemes": ",".join(self.schemes), "protocols": ",".join(self.protocols)},
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
                    for f in ("metrics.csv", "summary.json", "summary.md", "intervals.json")
                    if (self.output_dir / f).is_file()
                ],
                *[(p, "figures") for p in figures],
            ],
            children=children,
            child_role="scheme",
        )


class StudyInference:
    """Study → study embedding and finding probabilities of the fine-tuned classifier.

    For every input study writes ``<output_dir>/<id>.json`` (``findings``: name → probability, ``n_views``,
    ``embedding_file``) and ``<id>_embedding.npy``, where ``<id>`` is :func:`study_id` (a hash: file names
    can carry patient identifiers), and ``predictions.csv`` with one row per study.

    Studies are given either as ``data`` + ``transform`` (the bundle's way: each study is loaded on its own,
    so a study with a bad view is reported in ``failures.json`` and skipped while the others are predicted)
    or as a ready ``loader`` of collated batches (no per-study error handling).

    Args:
        classifier: a fine-tuned :class:`networks.study_vit.StudyClassifier` (its encoder gives the
            embedding).
        loader: collated studies (:func:`transforms.study.collate_studies`) with the ``views`` paths kept
            under ``view_paths``; ``None`` when ``data`` is given.
        findings: label names.
        output_dir: output folder.
        device: where to compute.
        data: study dicts (``views``: list of paths) to load one by one with ``transform``.
        transform: loads one study dict (keeping the paths under ``view_paths``).
        batch_size: studies per forward pass with ``data``.
        allow_failures: with ``data``, end normally when some studies failed instead of raising after the
            others were written.

    Raises:
        ValueError: neither or both of ``loader`` and ``data``, or ``data`` without ``transform``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        loader: Any,
        findings: Sequence[str],
        output_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        data: Sequence[Mapping[str, Any]] | None = None,
        transform: Any = None,
        batch_size: int = 8,
        allow_failures: bool = False,
    ) -> None:
        if (loader is None) == (data is None):
            raise ValueError("StudyInference needs exactly one of loader and data.")
        if data is not None and transform is None:
            raise ValueError("StudyInference: data needs a transform to load each study.")
        self.classifier, self.loader, self.findings = classifier, loader, list(findings)
        self.output_dir, self.device = Path(output_dir), device
        self.data = None if data is None else list(data)
        self.transform, self.batch_size, self.allow_failures = (
            transform,
            int(batch_size),
            bool(allow_failures),
        )
        self.failures: Any = None

    def _batches(self) -> Any:
        """Collated batches of the studies that loaded; failed studies are recorded and skipped."""
        from engines.batch import FailureLog
        from transforms.study import collate_studies

        if self.data is None:
            yield from self.loader
            return
        self.failures = FailureLog(self.output_dir, what="study")
        pending: list[Any] = []
        for item in self.data:
            views = item.get("views") if isinstance(item, Mapping) else None
            where = ", ".join(os.fspath(v) for v in views) if isinstance(views, (list, tuple)) else str(views)
            try:
                loaded = self.transform(dict(item))
                # only what prediction needs: datalist items may carry different extra keys, which
                # MONAI's collation cannot batch together
                pending.append({"views": loaded["views"], "view_paths": loaded["view_paths"]})
            except Exception as e:  # one bad study must not stop the others
                self.failures.record(f"study [{where}]", e)
                continue
            if len(pending) == self.batch_size:
                yield collate_studies(pending)
                pending = []
        if pending:
            yield collate_studies(pending)

    @torch.no_grad()
    def run(self) -> list[dict[str, Any]]:
        """Predict every study.

        Returns:
            The written records.

        Raises:
            BatchInputError: with ``data``, after every other study was written, when some failed and
                ``allow_failures`` is False (``failures.json`` lists them).
            InputDataError: ``data`` is empty.
        """
        if self.data is not None and not self.data:
            raise InputDataError("no studies to predict (empty input list)")
        self.classifier.eval()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for batch in self._batches():
            views, mask = batch["views"].to(self.device), batch["view_mask"].to(self.device)
            emb = self.classifier.encoder(views, mask)
            probs = torch.sigmoid(self.classifier.head(emb)).cpu().numpy()
            emb = emb.float().cpu().numpy()
            for i, paths in enumerate(batch["view_paths"]):
                sid = study_id(paths)
                with atomic_path(self.output_dir / f"{sid}_embedding.npy", ".npy") as tmp:
                    np.save(tmp, emb[i])
                rec = {
                    "study_id": sid,
                    "n_views": int(mask[i].sum()),
                    "findings": {f: float(p) for f, p in zip(self.findings, probs[i], strict=True)},
                    "embedding_file": f"{sid}_embedding.npy",
                    "embedding_dim": int(emb.shape[1]),
                }
                atomic_write_text(self.output_dir / f"{sid}.json", json.dumps(rec, indent=2) + "\n")
                records.append(rec)
        write_rows(
            self.output_dir / "predictions.csv",
            [{"study_id": r["study_id"], "n_views": r["n_views"], **r["findings"]} for r in records],
        )
        logger.info("wrote predictions of %d studies to %s", len(records), self.output_dir)
        if self.failures is not None:
            self.failures.finish(len(self.data or []), self.allow_failures)
        return records


def linear_probe_run(
    encoder: nn.Module,
    train_loader: Any,
    eval_loader: Any,
    findings: Sequence[str],
    output_dir: str | os.PathLike,
    probe_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    probe_epochs: int = 300,
    probe_lr: float = 0.05,
    seed: int = 0,
    tracking: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The linear probe of one frozen encoder, on its own (``linear_probe.json``): fitted on
    ``train_loader``'s studies, scored on ``eval_loader``'s (the validation split by default, so checkpoints
    can be compared without touching the test split).

    Writes ``<output_dir>/metrics.json`` and ``metrics.csv`` (per finding), the probe's weights to
    ``probe_path`` (a state dict of :class:`engines.probe.LinearProbe`, with the findings and the embedding
    size), and one MLflow run (``role=probe``) with ``probe_mean_auroc``, ``probe_auroc/<finding>``...

    Args:
        encoder: the frozen (pretrained) encoder.
        train_loader: the probe's training studies.
        eval_loader: the scored studies.
        findings: label names.
        output_dir: output folder.
        probe_path: where the probe is saved (None: not saved).
        device: where to compute.
        probe_epochs, probe_lr, seed: the probe's fit.
        tracking: ``run_name``, ``method``, ``datalist``, ``dataset_name``, ``workdir``, ``hparams``; None: no MLflow.

    Returns:
        The metrics of :func:`engines.probe.multilabel_metrics`.
    """
    from engines.checkpoint import atomic_torch_save

    encoder = encoder.to(device).eval()
    train = study_embeddings(encoder, train_loader, device)
    evaluate = study_embeddings(encoder, eval_loader, device)
    metrics, _, probe = probe_evaluation(
        train, evaluate, findings, probe_epochs=probe_epochs, probe_lr=probe_lr, seed=seed
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: (float(v) if np.isfinite(v) else None) for k, v in metrics.items()}
    atomic_write_text(out / "metrics.json", json.dumps(clean, indent=2) + "\n")
    rows = [
        {
            "finding": f,
            "auroc": metrics[f"auroc/{f}"],
            "auprc": metrics[f"auprc/{f}"],
            "positives": metrics[f"n_pos/{f}"],
        }
        for f in findings
    ]
    rows.append({"finding": "mean", "auroc": metrics["mean_auroc"], "auprc": metrics["mean_auprc"]})
    write_rows(out / "metrics.csv", rows)
    if probe_path is not None:
        Path(probe_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {
                "model": probe.state_dict(),
                "findings": list(findings),
                "in_features": int(train["features"].shape[1]),
            },
            probe_path,
        )
    logger.info(
        "linear probe: mean AUROC %.4f, mean AUPRC %.4f", metrics["mean_auroc"], metrics["mean_auprc"]
    )
    if tracking is not None:
        t = dict(tracking)
        log_comparison_runs(
            task="representation",
            run_name=t.get("run_name", "diffusion_mae-linear_probe"),
            method=t.get("method", "diffusion_mae"),
            children={},
            datalist=t.get("datalist"),
            dataset_name=t.get("dataset_name"),
            workdir=t.get("workdir", "."),
            hparams=t.get("hparams", {}),
            tags=t.get("tags", {}),
            parent_metrics={f"probe_{k}": v for k, v in metrics.items() if np.isfinite(v)},
            parent_artifacts=[(out / "metrics.json", None), (out / "metrics.csv", None)],
            parent_role="probe",
        )
    return metrics
