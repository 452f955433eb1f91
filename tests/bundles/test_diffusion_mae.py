"""diffusion_mae end to end, tiny, from its real JSON configs through ``python -m monai.bundle run``.

A module-scoped fixture pretrains both schemes (``smoke.json``: 16 studies per split, 32-pixel views, a
2-block encoder, 2 epochs), fine-tunes both and evaluates them; the checks read those outputs. The
MIMIC-CXR-JPG test writes a few synthetic JPEG studies with the dataset's CSVs, runs the adapter and feeds
its datalist to ``pretrain.json`` unchanged.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.data import subset_by_kind
from tests._catalogue import bad_views, check_failure_report, find_identifiers, planted_dicom
from tests.bundles._helpers import ROOT, SHARED_SCHEMA, common_args, mlflow_runs, run_bundle, verify_metadata

CFG = ROOT / "bundles" / "diffusion_mae" / "configs"
EXPERIMENT = "representation-learning"
SCHEMES = ("mae", "diffusion")


def _args(demo: Path, work: Path, *more: str) -> list[str]:
    return [*common_args(demo, work), *more]


@pytest.fixture(scope="module")
def trained(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dmae")
    for scheme in SCHEMES:
        run_bundle(CFG, ["pretrain.json", "smoke.json"], work, *_args(demo_cohort, work, "--scheme", scheme))
    for scheme in SCHEMES:
        run_bundle(
            CFG,
            ["pretrain.json", "finetune.json", "smoke.json"],
            work,
            *_args(demo_cohort, work, "--scheme", scheme),
        )
    run_bundle(CFG, ["pretrain.json", "evaluate.json", "smoke.json"], work, *_args(demo_cohort, work))
    return work


def _metric_steps(work: Path, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(work: Path, run_id: str, path: str | None = None) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    return sorted(Path(a.path).name for a in client.list_artifacts(run_id, path))


def test_both_schemes_pretrain_with_a_probe_curve_in_mlflow(trained: Path) -> None:
    for scheme in SCHEMES:
        assert (trained / "models" / f"pretrain_{scheme}.pt").is_file()
        (run,) = mlflow_runs(trained, f"diffusion_mae-pretrain_{scheme}", EXPERIMENT)
        assert run.data.params["scheme"] == scheme and run.data.tags["stage"] == "pretrain"
        # the untrained encoder (epoch 0) and every epoch (probe_interval 1 in smoke.json)
        assert _metric_steps(trained, run.info.run_id, "probe_mean_auroc") == [0, 1, 2]
        assert _metric_steps(trained, run.info.run_id, "probe_auroc/glioma") == [0, 1, 2]
        assert _metric_steps(trained, run.info.run_id, "val_loss") == [1, 2]
        rows = list(csv.DictReader(open(trained / "eval" / f"pretrain_{scheme}" / "probe_curve.csv")))
        assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2]
        assert all(0.0 <= float(r["probe_mean_auroc"]) <= 1.0 for r in rows)
        figures = _artifacts(trained, run.info.run_id, "figures")
        assert f"reconstruction_{scheme}_0.png" in figures
        assert ("backward_diffusion_0.gif" in figures) == (scheme == "diffusion")


def test_backward_diffusion_gif_has_one_frame_per_step(trained: Path) -> None:
    gif = Image.open(trained / "eval" / "pretrain_diffusion" / "backward_diffusion_0.gif")
    assert gif.n_frames == 4 + 1  # reconstruction_steps 4 in smoke.json, plus the starting noise


def test_evaluate_reports_per_finding_and_mean_auroc_on_the_test_split(
    trained: Path, demo_cohort: Path
) -> None:
    out = trained / "eval" / "evaluate"
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    findings = json.loads((demo_cohort / "datalists" / "studies.json").read_text())["findings"]
    pairs = {(r["scheme"], r["protocol"]) for r in rows}
    assert pairs == {("mae", "probe"), ("mae", "finetune"), ("diffusion", "probe"), ("diffusion", "finetune"),
                     ("random_init", "probe")}  # fmt: skip
    for scheme, protocol in pairs:
        mine = {r["finding"]: r for r in rows if (r["scheme"], r["protocol"]) == (scheme, protocol)}
        assert set(mine) == {*findings, "mean"}
        aurocs = [float(mine[f]["auroc"]) for f in findings if mine[f]["auroc"] not in ("", "nan")]
        assert float(mine["mean"]["auroc"]) == pytest.approx(float(np.mean(aurocs)))
    # positives are counted on the test studies (smoke.json: the first 16, round-robin over label patterns)
    test = json.loads((demo_cohort / "datalists" / "studies.json").read_text())["test"]
    expected = np.array([it["labels"] for it in subset_by_kind(test, 16, kind_key="labels")]).sum(0)
    got = [float(next(r for r in rows if r["scheme"] == "mae" and r["protocol"] == "probe" and r["finding"] == f)["positives"]) for f in findings]  # fmt: skip
    assert got == expected.tolist()
    assert (out / "figures" / "reconstruction_0.png").is_file() and (
        out / "figures" / "backward_diffusion_0.gif"
    ).is_file()
    (parent,) = mlflow_runs(trained, "diffusion_mae-evaluate", EXPERIMENT)
    assert parent.data.tags["role"] == "comparison"
    assert {"metrics.csv", "summary.md", "summary.json"} <= set(_artifacts(trained, parent.info.run_id))
    for scheme in SCHEMES:
        (child,) = mlflow_runs(trained, f"diffusion_mae-evaluate-{scheme}", EXPERIMENT)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        summary = json.loads((out / "summary.json").read_text())[scheme]
        for protocol in ("probe", "finetune"):
            assert child.data.metrics[f"{protocol}_mean_auroc"] == pytest.approx(
                summary[protocol]["mean_auroc"]
            )


def test_finetune_writes_a_classifier_and_logs_validation_auroc(trained: Path) -> None:
    for scheme in SCHEMES:
        ckpt = torch.load(trained / "models" / f"finetune_{scheme}.pt", weights_only=True)
        state = ckpt.get("model", ckpt)  # Ignite saves a one-object checkpoint as the bare state dict
        assert state["head.weight"].shape == (8, 32)  # 8 demo findings, smoke encoder width 32
        (run,) = mlflow_runs(trained, f"diffusion_mae-finetune_{scheme}", EXPERIMENT)
        assert _metric_steps(trained, run.info.run_id, "val_mean_auroc") == [1, 2]


def test_linear_probe_json(trained: Path, demo_cohort: Path) -> None:
    run_bundle(
        CFG, ["pretrain.json", "linear_probe.json", "smoke.json"], trained,
        *_args(demo_cohort, trained, "--scheme", "diffusion"),
    )  # fmt: skip
    metrics = json.loads((trained / "eval" / "linear_probe_diffusion" / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_auroc"] <= 1.0
    probe = torch.load(trained / "models" / "probe_diffusion.pt", weights_only=True)
    assert probe["model"]["linear.weight"].shape == (8, 32) and probe["in_features"] == 32
    (run,) = mlflow_runs(trained, "diffusion_mae-linear_probe_diffusion", EXPERIMENT)
    assert run.data.tags["role"] == "probe" and run.data.tags["section"] == "validation"
    assert run.data.metrics["probe_mean_auroc"] == pytest.approx(metrics["mean_auroc"])


def test_inference_on_one_study_and_on_a_datalist(trained: Path, demo_cohort: Path, tmp_path: Path) -> None:
    views = sorted(str(p) for p in (demo_cohort / "views").glob("sub-002_study1_*.nii.gz"))[:2]
    run_bundle(
        CFG, ["pretrain.json", "inference.json", "smoke.json"], trained,
        *_args(demo_cohort, trained, "--scheme", "mae", "--input_views", json.dumps(views)),
    )  # fmt: skip
    out = trained / "eval" / "inference" / "mae"
    assert json.loads((out / "failures.json").read_text())["n_failed"] == 0
    (rec_file,) = [p for p in out.glob("*.json") if p.name != "failures.json"]
    rec = json.loads(rec_file.read_text())
    assert rec["n_views"] == 2 and rec["embedding_dim"] == 32
    assert set(rec["findings"]) == set(
        json.loads((demo_cohort / "datalists" / "studies.json").read_text())["findings"]
    )
    assert np.load(out / rec["embedding_file"]).shape == (32,)
    # the whole test section of a datalist; no subject name reaches the outputs. Issue 8: one study per bad
    # view of the catalogue is reported and skipped, and a study whose view is a DICOM slice with planted
    # patient identifiers is predicted without any trace of them in the outputs or the log
    studies_file = demo_cohort / "datalists" / "studies.json"
    studies = json.loads(studies_file.read_text())
    test = [
        {**st, "views": [str((studies_file.parent / v).resolve()) for v in st["views"]]}
        for st in studies["test"]
    ]
    cases = bad_views(Path(test[0]["views"][0]), tmp_path / "bad")
    dicom = json.loads((demo_cohort / "datalists" / "dicom.json").read_text())["test"][0]
    series = planted_dicom((demo_cohort / "datalists" / dicom["image"]).resolve(), tmp_path / "series_a")
    planted_view = sorted(series.glob("*.dcm"))[40]
    extra = [{"views": [test[0]["views"][0], str(p)], "labels": test[0]["labels"]} for p, _ in cases.values()]
    extra.append({"views": [str(planted_view)], "labels": test[0]["labels"]})
    datalist = tmp_path / "studies_with_bad_views.json"
    datalist.write_text(json.dumps({"findings": studies["findings"], "test": test + extra}))
    proc = run_bundle(
        CFG, ["pretrain.json", "inference.json", "smoke.json"], trained,
        *_args(demo_cohort, trained, "--scheme", "diffusion", "--input_datalist", str(datalist)),
        check=False,
    )  # fmt: skip
    out = trained / "eval" / "inference" / "diffusion"
    n_in = len(test) + len(extra)
    assert proc.returncode != 0 and f"{len(cases)} of {n_in} study(s) failed" in proc.stderr
    check_failure_report(out / "failures.json", cases, n_in)
    assert len(list(out.glob("*_embedding.npy"))) == len(test) + 1
    # failures.json names the failed studies' files (the user's own paths); the predictions carry no name
    preds = [p for p in out.glob("*.json") if p.name != "failures.json"]
    text = "".join(p.read_text() for p in preds) + (out / "predictions.csv").read_text()
    assert "sub-" not in text
    assert find_identifiers([out, *trained.glob("mlruns*")], [proc.stdout, proc.stderr]) == []


def test_finetune_without_pretraining_names_the_missing_file(demo_cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(
        AssertionError, match=r"pretrain_mae\.pt: checkpoint file does not exist; pretrain it with"
    ):
        run_bundle(
            CFG, ["pretrain.json", "finetune.json", "smoke.json"], tmp_path,
            *_args(demo_cohort, tmp_path, "--scheme", "mae"),
        )  # fmt: skip


def _mimic_cxr_jpg(root: Path, n_subjects: int = 12) -> None:
    """A few synthetic studies laid out as MIMIC-CXR-JPG 2.0.0 (files/pXX/pSUBJECT/sSTUDY/DICOMID.jpg + CSVs)."""
    from data_prep.adapters.chexpert import FINDINGS

    rng = np.random.default_rng(0)
    lab_rows, meta_rows = [], []
    for k in range(n_subjects):
        sid = str(10000032 + k)
        stid = str(50000000 + k)
        positive = k % 2 == 1
        for j, vp in enumerate(["PA", "LATERAL", "AP"][: 1 + k % 3]):
            img = rng.normal(100, 20, (48, 40)).clip(0, 255)
            img[10:30, 8:30] += 80 if positive else 0
            mode = "RGB" if j == 2 else "L"  # some JPEGs are stored in colour
            pil = Image.fromarray(img.astype(np.uint8)).convert(mode)
            path = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{stid}" / f"d{k}_{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pil.save(path)
            meta_rows.append([f"d{k}_{j}", sid, stid, vp])
        labels = {f: "" for f in FINDINGS}
        labels["Cardiomegaly"] = "1.0" if positive else "0.0"
        labels["Edema"] = "-1.0" if k % 4 == 0 else ""
        labels["No Finding"] = "" if positive else "1.0"
        lab_rows.append([sid, stid, *[labels[f] for f in FINDINGS]])
    for name, header, rows in (
        ("mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *FINDINGS], lab_rows),
        (
            "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "ViewPosition"],
            meta_rows,
        ),
    ):
        lines = [",".join(header), *(",".join(map(str, r)) for r in rows)]
        (root / name).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def test_mimic_cxr_adapter_datalist_feeds_pretrain_unchanged(tmp_path: Path) -> None:
    from data_prep.adapters.chexpert import FINDINGS, chexpert

    _mimic_cxr_jpg(tmp_path / "mimic")
    (datalist,) = chexpert(
        tmp_path / "mimic", tmp_path / "lists", val_frac=0.25, test_frac=0.25, uncertain="ignore"
    )
    work = tmp_path / "work"
    work.mkdir()
    run_bundle(
        CFG, ["pretrain.json", "smoke.json"], work,
        "--datalist", str(datalist), "--dataset_name", "mimic-cxr-jpg-synthetic",
        "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"), "--scheme", "diffusion",
    )  # fmt: skip
    assert (work / "models" / "pretrain_diffusion.pt").is_file()
    header = next(csv.reader(open(work / "eval" / "pretrain_diffusion" / "probe_curve.csv")))
    assert [h[len("probe_auroc/") :] for h in header if h.startswith("probe_auroc/")] == list(FINDINGS)
    (run,) = mlflow_runs(work, "diffusion_mae-pretrain_diffusion", EXPERIMENT)
    assert run.data.tags["dataset"] == "mimic-cxr-jpg-synthetic"


def test_torchrun_two_processes(demo_cohort: Path, tmp_path: Path) -> None:
    for configs in (["pretrain.json"], ["pretrain.json", "finetune.json"]):
        run_bundle(
            CFG, [*configs, "smoke.json", "multi_gpu_train.json"], tmp_path,
            *_args(demo_cohort, tmp_path, "--scheme", "diffusion"), torchrun=2, port=29561,
        )  # fmt: skip
    for name in ("pretrain_diffusion.pt", "finetune_diffusion.pt"):
        assert (tmp_path / "models" / name).is_file(), name
    # rank 0 alone logs and probes: one run per stage, one probe point per epoch
    (run,) = mlflow_runs(tmp_path, "diffusion_mae-pretrain_diffusion", EXPERIMENT)
    assert _metric_steps(tmp_path, run.info.run_id, "probe_mean_auroc") == [0, 1, 2]
    assert len(mlflow_runs(tmp_path, "diffusion_mae-finetune_diffusion", EXPERIMENT)) == 1


def test_verify_metadata(tmp_path: Path) -> None:
    if not SHARED_SCHEMA.is_file():
        pytest.skip("../shared/monai schema not present (a user's clone)")
    proc = verify_metadata(CFG / "metadata.json", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stage_configs_are_overrides_of_pretrain_json() -> None:
    pretrain = json.loads((CFG / "pretrain.json").read_text())
    for name in (
        "finetune",
        "linear_probe",
        "evaluate",
        "inference",
        "smoke",
        "demo_budget",
        "size_s",
        "size_b",
    ):
        cfg = json.loads((CFG / f"{name}.json").read_text())
        assert len(json.dumps(cfg)) < len(json.dumps(pretrain)) / 2, (
            f"{name}.json looks like a copy of pretrain.json"
        )
