"""The comparison report is built from an MLflow store alone: constructed runs with known metrics end up,
value for value, in its tables and plots."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient

from engines.tracking import log_comparison_runs
from scripts.report import Report, build_report, latest_runs


def _run(
    client: MlflowClient, exp: str, name: str, metrics: dict, tags: dict | None = None, params=None
) -> str:
    eid = (client.get_experiment_by_name(exp) or None) and client.get_experiment_by_name(exp).experiment_id
    eid = eid or client.create_experiment(exp)
    run = client.create_run(eid, run_name=name, tags=tags or {})
    for k, v in metrics.items():
        for step, val in enumerate(v if isinstance(v, list) else [v]):
            client.log_metric(run.info.run_id, k, val, step=step)
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    # anomaly: an older evaluation (must be ignored), then the latest with a curves.json artifact
    _run(
        client,
        "anomaly-detection",
        "anoddpm_simplex-evaluate",
        {"t250/pixel_auprc": 0.5},
        {"method": "anoddpm_simplex"},
    )
    rid = _run(
        client,
        "anomaly-detection",
        "anoddpm_simplex-evaluate",
        {
            "t250/pixel_auprc": 0.0123,
            "t250/pixel_auroc": 0.812,
            "t100/pixel_auprc": 0.0456,
            "intensity_baseline/pixel_auprc": 0.0014,
            "t250/glioma/pixel_auprc": 0.9,  # per-kind metrics are not rows
            "t100/glioma/pixel_auprc": 0.8,
            "intensity_baseline/glioma/pixel_auprc": 0.7,
            "glioma/pixel_auprc": 0.9,  # the headline's per-kind copy
            "pixel_auprc": 0.0123,
            "t250/pixel_auprc_ci_low": 0.0081,  # bootstrap bounds and a paired difference (not a row)
            "t250/pixel_auprc_ci_high": 0.0177,
            "diff/t250-intensity_baseline/pixel_auprc": 0.0109,
            "diff/t250-intensity_baseline/pixel_auprc_ci_low": 0.0062,
            "diff/t250-intensity_baseline/pixel_auprc_ci_high": 0.0161,
        },
        {"method": "anoddpm_simplex"},
        {"headline_t": "250", "checkpoint": str(tmp_path / "models" / "model.pt")},
    )
    (tmp_path / "models").mkdir()
    for f in ("model.pt", "cnn.pt", "classes.json", "conformal_cnn.json"):
        (tmp_path / "models" / f).write_bytes(f.encode())
    curves = tmp_path / "eval" / "curves.json"
    curves.parent.mkdir()
    curves.write_text(
        json.dumps(
            {
                "t250": {
                    "fpr": [0, 0.5, 1],
                    "tpr": [0, 0.9, 1],
                    "recall": [0, 0.9, 1],
                    "precision": [1, 0.4, 0.2],
                },
                "intensity_baseline": {
                    "fpr": [0, 1],
                    "tpr": [0, 1],
                    "recall": [0, 1],
                    "precision": [0.2, 0.2],
                },
            }
        )
    )
    client.log_artifacts(rid, str(curves.parent))
    # classification: a comparison run with two models, clean, corrupted and conformal metrics
    log_comparison_runs(
        task="classification",
        run_name="latent_robust_classifier-multiclass-evaluate",
        method="latent_robust_classifier",
        workdir=tmp_path,
        tags={"classification_task": "multiclass"},
        hparams={"ckpt_dir": str(tmp_path / "models")},
        children={
            "cnn": {
                "metrics": {
                    "accuracy": 0.611,
                    "ece": 0.237,
                    "gaussian/level1/accuracy": 0.55,
                    "gaussian/level3/accuracy": 0.31,
                    "conformal/lac/alpha0.1/coverage": 0.9,
                    "conformal/lac/alpha0.1/mean_set_size": 2.25,
                },
                "tags": {"model": "cnn"},
            },
            "hybrid": {
                "metrics": {"accuracy": 0.503, "gaussian/level1/accuracy": 0.5},
                "tags": {"model": "hybrid"},
            },
        },
    )
    # representation: evaluation with two schemes, and pretraining runs with a probe history
    log_comparison_runs(
        task="representation",
        run_name="diffusion_mae-evaluate",
        method="diffusion_mae",
        workdir=tmp_path,
        child_role="scheme",
        hparams={"ckpt_dir": str(tmp_path / "models")},  # finetune_<scheme>.pt is not there
        children={
            "mae": {
                "metrics": {"probe_mean_auroc": 0.744, "finetune_mean_auroc": 0.788},
                "tags": {"scheme": "mae"},
            },
            "diffusion": {
                "metrics": {"probe_mean_auroc": 0.8, "finetune_mean_auroc": 0.876, "probe_mean_auprc": 0.608},
                "tags": {"scheme": "diffusion"},
            },
        },
    )
    for scheme, hist in (("mae", [0.6, 0.7, 0.65]), ("diffusion", [0.6, 0.72])):
        _run(
            client,
            "representation-learning",
            f"diffusion_mae-pretrain_{scheme}",
            {"probe_mean_auroc": hist},
            params={"scheme": scheme},
        )
    return uri


def test_report_tables_come_from_the_store(store: str, tmp_path: Path) -> None:
    pre = Report()
    pre.text("cohort paragraph")
    steps = [
        {
            "bundle": "anoddpm_simplex",
            "step": "train.json",
            "budget_minutes": 2.5,
            "status": "ok",
            "seconds": 151.0,
        }
    ]
    md_path = build_report(store, tmp_path / "out", preamble=pre, steps=steps, total_seconds=600)
    md = md_path.read_text()
    # anomaly: the latest evaluation's values, per setting, the baseline last; the headline marked
    assert "| anoddpm_simplex | t250 (headline) | 0.0123 [0.0081, 0.0177] | 0.812 |" in md, md
    assert (
        "- anoddpm_simplex: t250 vs intensity_baseline, pixel AUPRC: +0.011 [+0.006, +0.016], resolved: t250 is "
        "better than intensity_baseline."
    ) in md, md
    assert "| anoddpm_simplex | t100 | 0.0456 |" in md, md
    assert "| anoddpm_simplex | intensity_baseline | 0.0014 |" in md, md
    assert "0.500" not in md  # the older run
    assert "glioma" not in md.split("## Tumour")[0]
    assert md.split("## Tumour")[0].count("| anoddpm_simplex |") == 3
    # classification: one row per child, conformal "coverage / set size", worst/mean columns absent → —
    assert re.search(r"\| cnn \| 0\.611 \| — \| — \| 0\.237 \| — \| — \| 0\.900 / 2\.25 \|", md), md
    assert "| hybrid | 0.503 | — | — | — | — | — | — |" in md, md
    # representation: scheme x protocol rows
    assert "| diffusion | finetune | 0.876 | — |" in md, md
    assert "| diffusion | probe | 0.800 | 0.608 |" in md, md
    assert "| mae | probe | 0.744 | — |" in md, md
    # the preamble and the demo steps
    assert "cohort paragraph" in md
    assert "| anoddpm_simplex | train.json | 2.500 | ok | 151 |" in md, md
    assert "Total wall time: 10.0 minutes." in md
    # every figure exists, is referenced relatively, and the HTML shows the same numbers
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figs) == [
        "report/anomaly_roc_pr.png",
        "report/classification_robustness_multiclass.png",
        "report/representation_probe_curve.png",
    ]
    for f in figs:
        assert (md_path.parent / f).stat().st_size > 5000
    html = (md_path.parent / "report.html").read_text()
    assert "<td>0.0123 [0.0081, 0.0177]</td>" in html and "<td>0.876</td>" in html
    assert 'src="report/anomaly_roc_pr.png"' in html


def test_report_on_an_empty_store_says_so(tmp_path: Path) -> None:
    md = build_report(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "out").read_text()
    assert "No finished anomaly evaluation in the store." in md
    assert "No finished classification comparison in the store." in md
    assert "No finished representation-learning evaluation in the store." in md
    assert not (tmp_path / "out" / "report").exists()


def test_latest_runs_skips_children_and_unfinished(store: str) -> None:
    client = MlflowClient(store)
    names = [r.info.run_name for r in latest_runs(client, "tumour-classification")]
    assert names == ["latent_robust_classifier-multiclass-evaluate"]
    eid = client.get_experiment_by_name("anomaly-detection").experiment_id
    client.create_run(eid, run_name="still-running-evaluate")  # never terminated
    names = [r.info.run_name for r in latest_runs(client, "anomaly-detection", "-evaluate")]
    assert names == ["anoddpm_simplex-evaluate"]
    assert latest_runs(client, "no-such-experiment") == []
    run = latest_runs(client, "anomaly-detection")[0]
    assert math.isclose(run.data.metrics["pixel_auprc"], 0.0123)


def test_register_best_model_of_each_task(store: str, tmp_path: Path) -> None:
    md = build_report(store, tmp_path / "out", register=True).read_text()
    assert (
        "| anomaly-detection | anoddpm_simplex | pixel_auprc | 0.0123 | anomaly-detection-best version 1 |"
        in md
    ), md
    assert (
        "| tumour-classification | cnn | accuracy | 0.611 | tumour-classification-best version 1 |" in md
    ), md
    missing = tmp_path / "models" / "finetune_diffusion.pt"
    assert (
        f"| representation-learning | diffusion | finetune_mean_auroc | 0.876 | not registered: {missing} is missing here |"
        in md
    ), md
    client = MlflowClient(store)
    mv = client.get_model_version("tumour-classification-best", "1")
    assert mv.tags["accuracy"] == "0.611" and mv.tags["model"] == "cnn"
    run_files = {Path(f.path).name for f in client.list_artifacts(mv.run_id, "model")}
    assert run_files == {"cnn.pt", "classes.json", "conformal_cnn.json"}
    # a second report registers a new version, not a copy of the files
    md = build_report(store, tmp_path / "out", register=True).read_text()
    assert "anomaly-detection-best version 2" in md
