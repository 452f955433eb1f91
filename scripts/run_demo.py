"""The main job: build the embedded demo cohort, then run every bundle that exists on it.

Run through ``bash scripts/demo.sh`` (which sets up ``.venv`` first) or directly::

    .venv/bin/python scripts/run_demo.py [--out outputs/demo] [--subjects 64] [--seed 0]

It writes ``<out>/cohort/`` (the cohort, cached: a second run reuses it) and ``<out>/report.md``
with an overview figure ``<out>/cohort_overview.png``. A bundle takes part once it ships a
``configs/demo.json`` describing its demo workflow (``{"steps": [[config files..., "--key", "value"...], ...]}``:
config files, then optional command-line overrides); each
step runs ``python -m monai.bundle run --config_file [...]`` with ``dataset_dir`` pointing at the
cohort.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo runs on servers without a display
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.demo import DemoConfig, build_demo_cohort  # noqa: E402


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


def run_bundles(cohort: Path, out: Path, only: list[str] | None = None) -> list[tuple[str, str, float]]:
    """Run the demo workflow of every bundle that has a ``configs/demo.json``.

    Args:
        cohort: the demo cohort folder.
        out: the demo's output folder.
        only: names of the bundles to run (default: all).

    Returns:
        (bundle, status, seconds) per bundle.
    """
    results = []
    for demo in sorted((ROOT / "bundles").glob("*/configs/demo.json")):
        bundle = demo.parents[1]
        if only and bundle.name not in only:
            continue
        steps = json.loads(demo.read_text())["steps"]
        t0 = time.time()
        status = "ok"
        for step in steps:
            # a step lists config files, optionally followed by command-line overrides ("--scheme", "mae")
            cut = next((i for i, f in enumerate(step) if f.startswith("--")), len(step))
            files, extra = step[:cut], step[cut:]
            cfgs = [str(bundle / "configs" / f) for f in files]
            cmd = [
                sys.executable, "-m", "monai.bundle", "run",
                "--config_file", json.dumps(cfgs),
                "--bundle_root", str(bundle),
                "--dataset_dir", str(cohort),
                "--output_dir", str(out / bundle.name),
                *extra,
            ]  # fmt: skip
            print(f"[{bundle.name}] {' '.join(step)}", flush=True)
            if subprocess.run(cmd, cwd=out, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode != 0:
                status = f"failed at {files}"
                break
        results.append((bundle.name, status, time.time() - t0))
    return results


def main(argv: list[str] | None = None) -> int:
    """Build the cohort, run the bundles, write the report.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 when everything ran, 1 when a bundle failed.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder")
    ap.add_argument("--subjects", type=int, default=DemoConfig.subjects)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundles", nargs="+", default=None, help="run only these bundles (default: all)")
    a = ap.parse_args(argv)
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cohort = build_demo_cohort(out / "cohort", DemoConfig(subjects=a.subjects, seed=a.seed))
    rows = json.loads((cohort / "manifest.json").read_text())["subjects"]
    table = collections.Counter((r["kind"], r["split"]) for r in rows)
    png = cohort_overview(cohort, out / "cohort_overview.png")
    results = run_bundles(cohort, out, a.bundles)

    lines = [
        "# meddiff-bundles demo",
        "",
        f"Cohort: `{cohort}` ({len(rows)} synthetic subjects from the MNI152 2009a template, seed {a.seed}).",
        "",
        "| kind | training | validation | test |",
        "|---|---|---|---|",
    ]
    for kind in ("healthy", "glioma", "meningioma", "pituitary"):
        lines.append(
            f"| {kind} | "
            + " | ".join(str(table[(kind, s)]) for s in ("training", "validation", "test"))
            + " |"
        )
    lines += ["", f"![cohort]({png.name})", "", "## Bundles", ""]
    if results:
        lines += ["| bundle | status | time (s) |", "|---|---|---|"]
        lines += [f"| {b} | {s} | {t:.0f} |" for b, s, t in results]
    else:
        lines.append("No bundle ships a `configs/demo.json` yet: only the cohort was built.")
    lines += ["", f"Total time: {time.time() - t0:.0f} s."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {report}")
    return 0 if all(s == "ok" for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
