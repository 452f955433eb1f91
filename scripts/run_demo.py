"""The main job: build the embedded demo cohort, train and evaluate every bundle on it within a time
budget, and write a comparison report from the MLflow store.

Run through ``bash scripts/demo.sh`` (which sets up ``.venv`` first) or directly::

    .venv/bin/python scripts/run_demo.py [--out outputs/demo] [--budget MINUTES] [--bundles NAME ...]
                                         [--register] [--report-only]

It writes ``<out>/cohort/`` (the cohort, cached: a second run reuses it), ``<out>/mlruns.db`` (the
MLflow store of every run, unless ``MLFLOW_TRACKING_URI`` points elsewhere), ``<out>/steps.json`` and
the report ``<out>/report.md`` / ``report.html`` with its figures in ``<out>/report/``. A bundle takes
part once it ships a ``configs/demo.json``: ``{"steps": [{"configs": [...], "args": [...],
"budget_share": w}, ...]}``; each step runs ``python -m monai.bundle run`` with the configs merged in
order, the args, ``dataset_dir`` pointing at the cohort and, for a training step, ``time_budget_minutes``
= its share of ``--budget``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo runs on servers without a display
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.demo import DemoConfig, build_demo_cohort  # noqa: E402
from scripts.report import Report, build_report  # noqa: E402


def cohort_overview(cohort: Path, out_png: Path) -> Path:
    """A figure with one subject per kind: T1w and FLAIR through the lesion, with its outline.

    Args:
        cohort: the demo cohort folder.
        out_png: the PNG to write.

    Returns:
        The PNG path.
    """
    rows = json.loads((cohort / "manifest.json").read_text())["subjects"]
    picks: dict[str, dict] = {}
    for r in rows:
        key = r["kind"] if r["kind"] != "glioma" else f"glioma ({r['appearance']})"
        picks.setdefault(key, r)
    fig, axes = plt.subplots(2, len(picks), figsize=(2.4 * len(picks), 5.2))
    for j, (title, r) in enumerate(sorted(picks.items())):
        sid = r["subject"]
        sdir = cohort / "subjects" / sid
        lesion = np.asanyarray(nib.load(sdir / f"{sid}_lesion.nii.gz").dataobj)
        z = r["lesion_centre_vox"][2] if r["lesion_centre_vox"] else lesion.shape[2] // 2
        for i, c in enumerate(("T1w", "FLAIR")):
            img = np.asanyarray(nib.load(sdir / f"{sid}_{c}.nii.gz").dataobj)[:, :, z]
            ax = axes[i, j]
            ax.imshow(img.T, origin="lower", cmap="gray")
            if lesion[:, :, z].any():
                ax.contour(lesion[:, :, z].T, [0.5], colors="red", linewidths=0.7)
            ax.set_axis_off()
            ax.set_title(f"{title}\n{c}" if i == 0 else c, fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


@dataclass
class Step:
    """One step of a bundle's demo workflow (an entry of its ``configs/demo.json``).

    Attributes:
        bundle: the bundle folder.
        configs: config file names, merged in order.
        args: extra command-line overrides (``["--scheme", "mae"]``).
        share: the step's share of the demo's training budget (0: not a training step).
    """

    bundle: Path
    configs: list[str]
    args: list[str] = field(default_factory=list)
    share: float = 0.0

    @property
    def label(self) -> str:
        return " ".join([*self.configs, *self.args])


def read_steps(demo_json: Path) -> list[Step]:
    """The steps of one bundle's ``configs/demo.json``.

    Args:
        demo_json: the file; ``{"steps": [{"configs": [...], "args": [...], "budget_share": w}, ...]}``.

    Returns:
        The steps in order.

    Raises:
        ValueError: a step without configs, a config file that does not exist, or a negative share;
            the message names the file.
    """
    bundle = demo_json.parents[1]
    steps = []
    for i, raw in enumerate(json.loads(demo_json.read_text())["steps"]):
        if not isinstance(raw, dict) or not raw.get("configs"):
            raise ValueError(f"{demo_json}: step {i} needs a non-empty 'configs' list")
        missing = [c for c in raw["configs"] if not (bundle / "configs" / c).is_file()]
        if missing:
            raise ValueError(f"{demo_json}: step {i} names missing config files {missing}")
        share = float(raw.get("budget_share", 0.0))
        if share < 0:
            raise ValueError(f"{demo_json}: step {i} has a negative budget_share {share}")
        steps.append(Step(bundle, list(raw["configs"]), [str(a) for a in raw.get("args", [])], share))
    return steps


def plan(budget_minutes: float, only: list[str] | None = None) -> list[tuple[Step, float | None]]:
    """Every demo step with its training time budget in minutes.

    The budget is split over the steps of *all* bundles by their ``budget_share``, so a bundle gets
    the same minutes whether it runs alone (``--bundles``) or with the others.

    Args:
        budget_minutes: training minutes over all bundles.
        only: names of the bundles to run (default: all).

    Returns:
        ``(step, minutes)`` pairs in run order; ``minutes`` is ``None`` for steps that do not train.

    Raises:
        ValueError: an unknown bundle name in ``only``, or no bundle ships a ``configs/demo.json``.
    """
    demos = sorted((ROOT / "bundles").glob("*/configs/demo.json"))
    names = [d.parents[1].name for d in demos]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown bundles {unknown}; bundles with a demo: {names}")
    steps = [s for d in demos for s in read_steps(d)]
    total = sum(s.share for s in steps)
    out = []
    for s in steps:
        if only and s.bundle.name not in only:
            continue
        minutes = round(budget_minutes * s.share / total, 3) if s.share > 0 and total > 0 else None
        out.append((s, minutes))
    return out


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m:d}:{s:02d}"


def run_steps(
    steps: list[tuple[Step, float | None]], cohort: Path, out: Path, env: dict[str, str]
) -> list[dict]:
    """Run the demo steps, each as ``python -m monai.bundle run``, with progress on the console.

    A failed step stops the rest of its bundle (later steps need its outputs); other bundles go on.

    Args:
        steps: from :func:`plan`.
        cohort: the demo cohort folder.
        out: the demo's output folder (the working folder of every step).
        env: the environment of the steps (``MLFLOW_TRACKING_URI`` set).

    Returns:
        One record per step: bundle, step, budget minutes, status, seconds.
    """
    records: list[dict] = []
    failed: set[str] = set()
    t0 = time.time()
    for i, (step, minutes) in enumerate(steps, 1):
        name = step.bundle.name
        rec = {
            "bundle": name,
            "step": step.label,
            "budget_minutes": minutes,
            "status": "skipped",
            "seconds": 0.0,
        }
        records.append(rec)
        if name in failed:
            continue
        cmd = [
            sys.executable, "-m", "monai.bundle", "run",
            "--config_file", json.dumps([str(step.bundle / "configs" / c) for c in step.configs]),
            "--bundle_root", str(step.bundle),
            "--dataset_dir", str(cohort),
            "--output_dir", str(out / name),
            *step.args,
        ]  # fmt: skip
        if minutes is not None:
            cmd += ["--time_budget_minutes", str(minutes)]
        budget = f", training budget {minutes:g} min" if minutes is not None else ""
        print(
            f"\n=== [{i}/{len(steps)}] {name}: {step.label}{budget} (elapsed {_clock(time.time() - t0)})",
            flush=True,
        )
        ts = time.time()
        ok = subprocess.run(cmd, cwd=out, env=env).returncode == 0
        rec["seconds"] = round(time.time() - ts, 1)
        rec["status"] = "ok" if ok else "failed"
        if not ok:
            failed.add(name)
            print(
                f"=== {name}: step failed after {rec['seconds']:.0f} s; skipping its later steps", flush=True
            )
    return records


#: default training minutes over all bundles: fits the whole main job in 30 minutes on a 2-core CPU
#: (measured: docs/benchmarks.md, "main job"); with a GPU the same wall time trains for much longer
DEFAULT_BUDGET_CPU = 10.0
DEFAULT_BUDGET_GPU = 60.0


def default_budget() -> float:
    """The default ``--budget``: :data:`DEFAULT_BUDGET_GPU` with a CUDA device, else :data:`DEFAULT_BUDGET_CPU`."""
    import torch

    return DEFAULT_BUDGET_GPU if torch.cuda.is_available() else DEFAULT_BUDGET_CPU


def cohort_preamble(cohort: Path, png: Path, seed: int, budget: float) -> Report:
    """The report's opening: the cohort (subjects per kind and split, overview figure) and the budget.

    Args:
        cohort: the demo cohort folder.
        png: its overview figure.
        seed: the cohort's seed.
        budget: the training minutes over all bundles.

    Returns:
        The blocks.
    """
    rows = json.loads((cohort / "manifest.json").read_text())["subjects"]
    table = collections.Counter((r["kind"], r["split"]) for r in rows)
    rep = Report()
    rep.heading("Demo cohort")
    rep.text(
        f"`{cohort}`: {len(rows)} synthetic subjects from the MNI152 2009a template (seed {seed}); "
        f"training budget {budget:g} minutes over all bundles."
    )
    splits = ("training", "validation", "test")
    rep.table(
        ["kind", *splits],
        [[k, *(table[(k, s)] for s in splits)] for k in ("healthy", "glioma", "meningioma", "pituitary")],
    )
    rep.image(png, "cohort overview")
    return rep


def main(argv: list[str] | None = None) -> int:
    """Build the cohort, run the bundles within the budget, write the report from MLflow.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 when every step ran and the report was written, 1 otherwise.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder")
    ap.add_argument("--subjects", type=int, default=DemoConfig.subjects)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundles", nargs="+", default=None, help="run only these bundles (default: all)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"training minutes over all bundles, split by each step's budget_share "
        f"(default {DEFAULT_BUDGET_CPU:g} on a CPU, {DEFAULT_BUDGET_GPU:g} with a GPU)",
    )
    ap.add_argument("--register", action="store_true", help="register the best model of each task in MLflow")
    ap.add_argument(
        "--report-only", action="store_true", help="skip training: write the report from the store"
    )
    a = ap.parse_args(argv)
    budget = default_budget() if a.budget is None else a.budget
    if budget <= 0:
        ap.error("--budget must be positive")
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    # every bundle logs into one store: a team server when MLFLOW_TRACKING_URI is set, else a SQLite
    # file of this demo (the bundles' own default would be one store per bundle folder)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlruns.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_uri}
    t0 = time.time()
    steps = plan(budget, a.bundles)
    print(f"demo: {len(steps)} steps, {budget:g} training minutes, tracking at {tracking_uri}", flush=True)
    cohort = build_demo_cohort(out / "cohort", DemoConfig(subjects=a.subjects, seed=a.seed))
    png = cohort_overview(cohort, out / "cohort_overview.png")
    records = [] if a.report_only else run_steps(steps, cohort, out, env)
    (out / "steps.json").write_text(json.dumps(records, indent=1) + "\n")

    report = build_report(
        tracking_uri,
        out,
        preamble=cohort_preamble(cohort, png, a.seed, budget),
        steps=records,
        total_seconds=time.time() - t0,
        register=a.register,
    )
    print(f"\nreport: {report} (and {report.with_suffix('.html').name})")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
