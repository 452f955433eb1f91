"""The comparison report of the bundles' runs, read from an MLflow tracking store.

    .venv/bin/python scripts/report.py --tracking-uri sqlite:///outputs/demo/mlruns.db --out outputs/demo

Everything comes from the store through ``MlflowClient`` (``search_runs``, metric histories and
artifacts), never from the bundles' local output folders, so the same report works on any store the
runs went to: the demo's SQLite file, or a team's tracking server. Per task it writes a table of the
methods' metrics and the plots:

* anomaly detection (experiment ``anomaly-detection``): every setting of every anomaly bundle's latest
  evaluation and its intensity baseline (pixel AUPRC, AUROC, Dice, slice-level scores, false alarms),
  pooled pixel ROC and PR curves from the evaluations' ``curves.json`` artifacts;
* tumour classification (``tumour-classification``): each model of the latest comparison run, clean and
  under corruption, conformal coverage and set size; accuracy against corruption severity;
* representation learning (``representation-learning``): linear probe and fine-tuning per pretraining
  scheme; probe mean AUROC against the pretraining epoch (the pretraining runs' metric history).

Where an evaluation logged subject-level bootstrap bounds (``<metric>_ci_low``/``_ci_high``) a cell shows
``point [low, high]``, and its paired differences (``diff/<a>-<b>/<metric>``) follow the table as sentences
saying which the test set resolves (``scripts/report_intervals.py``).

The report is ``<out>/report.md`` and ``<out>/report.html`` (same content) with PNGs in ``<out>/report/``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers without a display
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep.atomic import atomic_path, atomic_write_text  # noqa: E402
from engines.tracking import EXPERIMENTS  # noqa: E402
from scripts.report_intervals import difference_sentence, differences, interval_cell  # noqa: E402

__all__ = ["Report", "build_report", "latest_runs", "main"]

#: the anomaly metrics shown per setting, in order, with their column titles
ANOMALY_COLUMNS: dict[str, str] = {
    "pixel_auprc": "pixel AUPRC",
    "pixel_auroc": "pixel AUROC",
    "dice_best": "Dice (oracle)",
    "dice_fpr5": "Dice (healthy 5 % FPR)",
    "slice_auroc": "slice AUROC",
    "slice_ap": "slice AP",
    "false_alarm_rate_fpr5": "false alarms (5 % FPR)",
    "n_subjects": "test volumes",
}
#: the classification metrics shown per model (children of the comparison run)
CLASSIFICATION_COLUMNS: dict[str, str] = {
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "auroc": "AUROC",
    "ece": "ECE",
    "corrupted/accuracy": "accuracy, corrupted (mean)",
    "corrupted_worst/accuracy": "accuracy, corrupted (worst)",
}
BASELINE = "intensity_baseline"
#: columns shown as "point [low, high]" where the evaluation logged bootstrap bounds
INTERVAL_COLUMNS = {"pixel_auprc", "pixel_auroc", "dice_fpr5", "slice_auroc", "accuracy", "macro_f1", "auroc"}


# ----------------------------------------------------------------------------------------------
# a report as blocks, rendered to Markdown and HTML
# ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    """An ordered list of blocks (headings, paragraphs, tables, images) rendered to Markdown and HTML."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    @staticmethod
    def _cell(v: Any) -> str:
        if isinstance(v, float):
            # three decimals, but three significant digits for small values (AUPRC of rare lesions)
            return "—" if not math.isfinite(v) else f"{v:.3f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
        return str(v)

    def markdown(self, base: Path) -> str:
        """The report as Markdown; image paths relative to ``base``."""
        out: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                out += ["#" * val[0] + " " + val[1], ""]
            elif kind == "p":
                out += [val, ""]
            elif kind == "table":
                header, rows = val
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(self._cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{val[1]}]({val[0].relative_to(base).as_posix()})", ""]
        return "\n".join(out)

    def html(self, base: Path, title: str) -> str:
        """The report as a self-contained HTML page (images linked relative to ``base``)."""
        e = html.escape
        out = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px}"
            "td{text-align:right}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}</style>",
            "</head><body>",
        ]
        for kind, val in self.blocks:
            if kind == "h":
                out.append(f"<h{val[0]}>{e(val[1])}</h{val[0]}>")
            elif kind == "p":
                out.append(f"<p>{e(val).replace(chr(10), '<br>')}</p>")
            elif kind == "table":
                header, rows = val
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(self._cell(c))}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "img":
                out.append(f'<p><img src="{e(val[0].relative_to(base).as_posix())}" alt="{e(val[1])}"></p>')
        out.append("</body></html>")
        return "\n".join(out) + "\n"


@dataclass
class Candidate:
    """A model the report may register: the run its metric is logged in, and where its files are named.

    Attributes:
        task: a key of :data:`EXPERIMENTS`.
        run: the run holding ``metric`` (an evaluation, or a comparison's child).
        metric: the metric the task's best model is chosen by (higher is better).
        value: its value.
        parent: the comparison run (its ``ckpt_dir`` param), for children.
        model: the model, scheme or bundle name shown and tagged.
    """

    task: str
    run: Any
    metric: str
    value: float
    parent: Any = None
    model: str = ""


# ----------------------------------------------------------------------------------------------
# reading the store
# ----------------------------------------------------------------------------------------------


def latest_runs(client: Any, experiment: str, name_suffix: str = "", parent_only: bool = True) -> list[Any]:
    """The newest finished run of each run name in an experiment.

    Args:
        client: an ``MlflowClient``.
        experiment: the experiment name.
        name_suffix: keep only run names ending with this.
        parent_only: skip child runs (those with ``mlflow.parentRunId``).

    Returns:
        The runs, ordered by name; empty when the experiment does not exist.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    newest: dict[str, Any] = {}
    for r in runs:
        name = r.info.run_name or ""
        if not name.endswith(name_suffix) or (parent_only and "mlflow.parentRunId" in r.data.tags):
            continue
        newest.setdefault(name, r)
    return [newest[k] for k in sorted(newest)]


def child_runs(client: Any, parent: Any) -> list[Any]:
    """The finished child runs of a comparison run, ordered by name."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    return sorted(runs, key=lambda r: r.info.run_name or "")


def find_artifact(client: Any, run_id: str, name: str, path: str | None = None) -> str | None:
    """The artifact path of the first file called ``name`` in a run's artifact tree (breadth first)."""
    queue = [path]
    while queue:
        for f in client.list_artifacts(run_id, queue.pop(0)):
            if f.is_dir:
                queue.append(f.path)
            elif Path(f.path).name == name:
                return f.path
    return None


def read_json_artifact(client: Any, run_id: str, name: str) -> Any | None:
    """A JSON artifact of a run, by file name; ``None`` if the run has none."""
    path = find_artifact(client, run_id, name)
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def _setting_title(setting: str, headline: bool) -> str:
    return f"{setting} (headline)" if headline else setting


def _count(v: float) -> int | float:
    """A count logged as a float metric, shown as an integer."""
    return int(v) if math.isfinite(v) else v


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# the three tasks
# ----------------------------------------------------------------------------------------------


def anomaly_section(client: Any, rep: Report, fig_dir: Path) -> list[Candidate]:
    """Anomaly detection: a row per (bundle, setting), ROC and PR curves.

    Returns:
        One candidate per evaluation run for the registry: run, headline metric value.
    """
    rep.heading("Anomaly detection (brain MRI, test split)")
    runs = latest_runs(client, EXPERIMENTS["anomaly"], "-evaluate")
    if not runs:
        rep.text("No finished anomaly evaluation in the store.")
        return []
    rows, curves, candidates, sentences = [], {}, [], []
    for run in runs:
        method = run.data.tags.get("method", run.info.run_name)
        m = run.data.metrics
        headline = run.data.params.get("headline") or run.data.params.get("headline_t")
        # settings are the prefixes of "<setting>/<kind>/pixel_auprc"; "<kind>/pixel_auprc" (the headline's
        # per-kind copies) has one slash like "<setting>/pixel_auprc" and must not become a row
        # ("diff/<a>-<b>/pixel_auprc" is a paired difference, not a setting)
        settings = sorted(
            {
                k.split("/")[0]
                for k in m
                if k.count("/") == 2 and k.endswith("/pixel_auprc") and not k.startswith("diff/")
            }
        )
        settings = [s for s in settings if s != BASELINE] + ([BASELINE] if BASELINE in settings else [])
        for s in settings:
            is_head = headline is not None and s in (headline, f"t{headline}")
            rows.append(
                [
                    method,
                    _setting_title(s, is_head),
                    *(
                        _count(m.get(f"{s}/{c}", math.nan))
                        if c.startswith("n_")
                        else interval_cell(m, f"{s}/{c}")
                        if c in INTERVAL_COLUMNS
                        else m.get(f"{s}/{c}", math.nan)
                        for c in ANOMALY_COLUMNS
                    ),
                ]
            )
        for metric in ("pixel_auprc", "dice_fpr5"):
            sentences += [
                f"{method}: " + difference_sentence(d, ANOMALY_COLUMNS[metric])
                for d in differences(m, metric)
            ]
        if "pixel_auprc" in m:
            candidates.append(Candidate("anomaly", run, "pixel_auprc", m["pixel_auprc"], model=method))
        for s, c in (read_json_artifact(client, run.info.run_id, "curves.json") or {}).items():
            if c.get("fpr"):
                label = f"{method}: {s}" if s != BASELINE else f"{BASELINE} ({method} run)"
                curves[label] = c
    rep.text(
        "Maps scored inside the eroded brain mask by the shared protocol (docs/evaluation.md); pixel AUPRC "
        "is the headline. Dice at the healthy 5 % FPR threshold uses a threshold fixed on healthy "
        "validation volumes only; the oracle Dice picks its threshold on the test set itself."
    )
    rep.table(["bundle", "setting", *ANOMALY_COLUMNS.values()], rows)
    _differences_text(rep, sentences)
    if curves:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        for label, c in curves.items():
            style = ":" if label.startswith(BASELINE) else "-"
            a1.plot(c["fpr"], c["tpr"], style, label=label, lw=1.2)
            a2.plot(c["recall"], c["precision"], style, label=label, lw=1.2)
        a1.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        a1.set(xlabel="false-positive rate", ylabel="true-positive rate", title="pixel ROC (pooled)")
        a2.set(xlabel="recall", ylabel="precision", title="pixel precision-recall (pooled)", yscale="log")
        a2.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        rep.image(_save(fig, fig_dir / "anomaly_roc_pr.png"), "anomaly ROC and PR curves")
    return candidates


def classification_section(client: Any, rep: Report, fig_dir: Path) -> list[Candidate]:
    """Tumour classification: a row per model of each comparison run, accuracy vs corruption severity."""
    rep.heading("Tumour classification (test split)")
    parents = [
        r
        for r in latest_runs(client, EXPERIMENTS["classification"], "-evaluate")
        if r.data.tags.get("role") == "comparison"
    ]
    if not parents:
        rep.text("No finished classification comparison in the store.")
        return []
    candidates = []
    for parent in parents:
        children = child_runs(client, parent)
        task = parent.data.tags.get("classification_task", "")
        rep.heading(f"{parent.data.tags.get('method', '')} ({task})", 3)
        # conformal sets: "coverage / mean set size" per (score, alpha), one cell each
        conformal = sorted(
            {
                k[len("conformal/") : -len("/coverage")]
                for c in children
                for k in c.data.metrics
                if k.startswith("conformal/") and k.count("/") == 3 and k.endswith("/coverage")
            }
        )
        rows = []
        for c in children:
            model = c.data.tags.get("model", c.info.run_name)
            m = c.data.metrics
            cells = [
                f"{m[f'conformal/{sa}/coverage']:.3f} / {m.get(f'conformal/{sa}/mean_set_size', math.nan):.2f}"
                if f"conformal/{sa}/coverage" in m
                else "—"
                for sa in conformal
            ]
            rows.append(
                [
                    model,
                    *(
                        interval_cell(m, k) if k in INTERVAL_COLUMNS else m.get(k, math.nan)
                        for k in CLASSIFICATION_COLUMNS
                    ),
                    *cells,
                ]
            )
            if "accuracy" in c.data.metrics:
                candidates.append(Candidate("classification", c, "accuracy", m["accuracy"], parent, model))
        rep.table(
            ["model", *CLASSIFICATION_COLUMNS.values(), *(f"{sa} coverage / set size" for sa in conformal)],
            rows,
        )
        # the best model by accuracy against every other (the parent run holds every pair's paired difference)
        best = max(
            (c for c in children if "accuracy" in c.data.metrics),
            key=lambda c: c.data.metrics["accuracy"],
            default=None,
        )
        if best is not None:
            name = best.data.tags.get("model", best.info.run_name)
            sentences = []
            for metric in ("accuracy", "macro_f1"):
                for d in differences(parent.data.metrics, metric):
                    if name in (d.a, d.b):
                        sentences.append(difference_sentence(d, CLASSIFICATION_COLUMNS[metric]))
            _differences_text(rep, sentences, f"best model by accuracy: {name}")
        png = robustness_plot(children, fig_dir / f"classification_robustness_{task or 'task'}.png")
        if png is not None:
            rep.image(png, "accuracy against corruption severity")
    return candidates


def _differences_text(rep: Report, sentences: Sequence[str], lead: str = "") -> None:
    """A paragraph of paired-difference sentences (subject-level bootstrap, 95 %), when there are any."""
    if not sentences:
        return
    intro = (
        "Paired differences (subject-level bootstrap, 95 % interval; resolved = the interval excludes 0)"
        + (f", {lead}" if lead else "")
        + ":"
    )
    rep.text("\n".join([intro, "", *(f"- {x}" for x in sentences)]))


def robustness_plot(children: Sequence[Any], path: Path) -> Path | None:
    """Accuracy against corruption severity, one panel per corruption, one line per model.

    Reads the children's ``<corruption>/level<k>/accuracy`` metrics (level 0 = the clean accuracy).
    """
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for c in children:
        model = c.data.tags.get("model", c.info.run_name)
        for k, v in c.data.metrics.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[1].startswith("level") and parts[2] == "accuracy":
                curves.setdefault(parts[0], {}).setdefault(
                    model, {0: c.data.metrics.get("accuracy", math.nan)}
                )[int(parts[1][5:])] = v
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.4), sharey=True, squeeze=False)
    for ax, (corr, models) in zip(axes[0], sorted(curves.items()), strict=True):
        for model, pts in sorted(models.items()):
            lv = sorted(pts)
            ax.plot(lv, [pts[x] for x in lv], marker="o", ms=3, lw=1.2, label=model)
        ax.set(
            title=corr,
            xlabel="severity level (0 = clean)",
            xticks=sorted({x for p in models.values() for x in p}),
        )
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def representation_section(client: Any, rep: Report, fig_dir: Path) -> list[Candidate]:
    """Representation learning: probe and fine-tuning per scheme; probe AUROC against pretraining epoch."""
    rep.heading("Representation learning (multi-view studies, test split)")
    exp = EXPERIMENTS["representation"]
    parents = [r for r in latest_runs(client, exp, "-evaluate") if r.data.tags.get("role") == "comparison"]
    candidates = []
    if not parents:
        rep.text("No finished representation-learning evaluation in the store.")
    for parent in parents:
        children = child_runs(client, parent)
        protocols = sorted(
            {k[: -len("_mean_auroc")] for c in children for k in c.data.metrics if k.endswith("_mean_auroc")}
        )
        rows = []
        for c in children:
            scheme = c.data.tags.get("scheme", c.info.run_name)
            for p in protocols:
                m = c.data.metrics
                if f"{p}_mean_auroc" in m:
                    rows.append(
                        [scheme, p, interval_cell(m, f"{p}_mean_auroc"), interval_cell(m, f"{p}_mean_auprc")]
                    )
            if "finetune_mean_auroc" in c.data.metrics:
                candidates.append(
                    Candidate(
                        "representation",
                        c,
                        "finetune_mean_auroc",
                        c.data.metrics["finetune_mean_auroc"],
                        parent,
                        scheme,
                    )
                )
        rep.table(["scheme", "protocol", "mean AUROC", "mean AUPRC"], rows)
        _differences_text(
            rep,
            [difference_sentence(d, "mean AUROC") for d in differences(parent.data.metrics, "mean_auroc")],
        )
    # the probe during pretraining: metric history of the pretraining runs (step = epoch)
    lines = {}
    for run in latest_runs(client, exp):
        if "probe_mean_auroc" in run.data.metrics and "pretrain" in (run.info.run_name or ""):
            hist = sorted(
                client.get_metric_history(run.info.run_id, "probe_mean_auroc"), key=lambda h: h.step
            )
            lines[run.data.params.get("scheme") or run.info.run_name] = (
                [h.step for h in hist],
                [h.value for h in hist],
            )
    if lines:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for name, (x, y) in sorted(lines.items()):
            ax.plot(x, y, marker="o", ms=3, label=name)
        ax.set(
            xlabel="pretraining epoch",
            ylabel="probe mean AUROC (validation)",
            title="linear probe during pretraining",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        rep.image(
            _save(fig, fig_dir / "representation_probe_curve.png"), "probe AUROC against pretraining epoch"
        )
    return candidates


def runs_section(client: Any, rep: Report) -> None:
    """Every latest top-level run of the three experiments: status, duration, key tags."""
    rep.heading("Runs in the store")
    rows = []
    for exp in EXPERIMENTS.values():
        for r in latest_runs(client, exp):
            dur = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else math.nan
            rows.append(
                [
                    exp,
                    r.info.run_name,
                    r.info.run_id[:8],
                    f"{dur:.0f}",
                    r.data.tags.get("git_commit", ""),
                    r.data.tags.get("datalist_hash", "")[:12],
                ]
            )
    rep.table(["experiment", "run", "id", "seconds", "git commit", "datalist hash"], rows)


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------


def build_report(
    tracking_uri: str,
    out: str | Path,
    preamble: Report | None = None,
    steps: Sequence[Mapping[str, Any]] = (),
    total_seconds: float | None = None,
    register: bool = False,
) -> Path:
    """Write ``<out>/report.md`` and ``<out>/report.html`` from the runs in a tracking store.

    Args:
        tracking_uri: the MLflow store (``sqlite:///...`` or ``http://host:port``).
        out: output folder; figures go to ``<out>/report/``.
        preamble: blocks shown after the title (the demo describes its cohort there).
        steps: the demo's step records (bundle, step, budget_minutes, status, seconds), shown as a table.
        total_seconds: the demo's wall time, shown when given.
        register: register the best model of each task in the store's model registry.

    Returns:
        The Markdown report's path.
    """
    from mlflow import MlflowClient

    out = Path(out).absolute()
    fig_dir = out / "report"
    client = MlflowClient(tracking_uri=tracking_uri)
    rep = Report()
    rep.heading("meddiff-bundles: comparison report", 1)
    rep.text(f"Written {time.strftime('%Y-%m-%d %H:%M')} from the MLflow store `{tracking_uri}`.")
    if preamble is not None:
        rep.blocks += preamble.blocks
    candidates = [
        *anomaly_section(client, rep, fig_dir),
        *classification_section(client, rep, fig_dir),
        *representation_section(client, rep, fig_dir),
    ]
    if register:
        registry_section(client, rep, candidates)
    if steps:
        rep.heading("Demo steps")
        rep.table(
            ["bundle", "step", "training budget (min)", "status", "seconds"],
            [
                [
                    s["bundle"],
                    s["step"],
                    "" if s.get("budget_minutes") is None else s["budget_minutes"],
                    s["status"],
                    f"{s['seconds']:.0f}",
                ]
                for s in steps
            ],
        )
        if total_seconds is not None:
            rep.text(f"Total wall time: {total_seconds / 60:.1f} minutes.")
    runs_section(client, rep)
    md = out / "report.md"
    atomic_write_text(md, rep.markdown(out) + "\n")
    atomic_write_text(out / "report.html", rep.html(out, "meddiff-bundles report"))
    return md


#: files beside a classifier's checkpoint that a latent pipeline needs to run (its encoder and scale)
_LATENT_PARTS = ("autoencoder.pt", "latent_scale.json")


def candidate_files(cand: Candidate) -> list[Path]:
    """The checkpoint files that reproduce a candidate model, from its runs' params.

    Anomaly evaluations name their checkpoints in params ending with ``checkpoint``; the comparison runs
    of classification and representation learning name their ``ckpt_dir`` and each child its model or
    scheme, whose files follow the bundles' naming (``<model>.pt`` with ``classes.json`` and the
    conformal thresholds; a latent head with the autoencoder and latent scale, the hybrid also with the
    latent DDPM; ``finetune_<scheme>.pt``).

    Args:
        cand: a candidate from the sections.

    Returns:
        The paths (the first is the model's own checkpoint); they may not exist on this machine.
    """
    if cand.task == "anomaly":
        params = cand.run.data.params
        return [Path(v) for k, v in sorted(params.items()) if k.endswith("checkpoint")]
    ckpt = Path(cand.parent.data.params.get("ckpt_dir", "."))
    model = cand.model
    if cand.task == "representation":
        return [ckpt / f"finetune_{model}.pt"]
    files = [ckpt / f"{model}.pt", ckpt / "classes.json", ckpt / f"conformal_{model}.json"]
    if model.startswith(("latent_", "noise_aware", "hybrid")):
        files += [ckpt / f for f in _LATENT_PARTS]
    if model.startswith("hybrid"):
        files.append(ckpt / "latent_ddpm.pt")
    return files


def registry_section(client: Any, rep: Report, candidates: Sequence[Candidate]) -> None:
    """Register the best candidate of each task as a new version of ``<experiment>-best``.

    The version's source is the chosen run's ``model/`` artifacts (the checkpoint files are logged there);
    its tags carry the metric it was chosen by and the run's provenance (``engines.registry``).
    """
    from engines.registry import register_model

    rep.heading("Model registry")
    rows = []
    for task, exp in EXPERIMENTS.items():
        mine = [c for c in candidates if c.task == task and math.isfinite(c.value)]
        if not mine:
            continue
        best = max(mine, key=lambda c: c.value)
        files = candidate_files(best)
        present = [f for f in files if f.is_file()]
        who = best.model
        if not files or not files[0].is_file():
            rows.append(
                [
                    exp,
                    who,
                    best.metric,
                    best.value,
                    f"not registered: {files[0] if files else 'no checkpoint'} is missing here",
                ]
            )
            continue
        mv = register_model(
            client,
            best.run.info.run_id,
            f"{exp}-best",
            present,
            {best.metric: best.value},
            tags={"model": who},
        )
        rows.append([exp, who, best.metric, best.value, f"{mv.name} version {mv.version}"])
    rep.table(["experiment", "model", "chosen by", "value", "registered as"], rows)


def main(argv: list[str] | None = None) -> int:
    """Command line: write the report of a tracking store."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True, help="sqlite:///path/mlruns.db or http://host:port")
    ap.add_argument("--out", required=True, help="output folder of report.md/.html and report/")
    ap.add_argument("--register", action="store_true", help="register the best model of each task")
    a = ap.parse_args(argv)
    print(build_report(a.tracking_uri, a.out, register=a.register))
    return 0


if __name__ == "__main__":
    sys.exit(main())
