"""anoddpm_simplex end to end, tiny, from its real JSON configs through ``python -m monai.bundle run``.

One module-scoped smoke training (``smoke.json``: 2 volumes, 32² slices, 2 epochs) is shared by
the evaluation, inference and export tests. Outputs go to ``tmp_path``; MLflow to an SQLite store
there.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests._catalogue import bad_volumes, check_failure_report, find_identifiers, planted_dicom
from tests.bundles._helpers import ROOT, SHARED_SCHEMA, common_args, mlflow_runs, run_bundle, verify_metadata

BUNDLE = ROOT / "bundles" / "anoddpm_simplex"
CFG = BUNDLE / "configs"


def _run(
    configs: list[str], work: Path, *args: str, torchrun: int = 0, check: bool = True
) -> subprocess.CompletedProcess:
    return run_bundle(CFG, configs, work, *args, torchrun=torchrun, check=check)


_common = common_args
_runs = mlflow_runs


@pytest.fixture(scope="module")
def trained(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("anoddpm")
    _run(["train.json", "smoke.json"], work, *_common(demo_cohort, work))
    return work


def test_train_writes_model_and_checkpoints(trained: Path) -> None:
    from engines import load_checkpoint

    sd = load_checkpoint(trained / "models" / "model.pt")
    assert any(k.endswith("weight") for k in sd), "model.pt holds the network's state dict"
    ckpts = sorted(p.name for p in (trained / "models").glob("checkpoint_epoch=*.pt"))
    assert ckpts == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    full = load_checkpoint(trained / "models" / "checkpoint_epoch=2.pt")
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(full)
    assert (
        full["trainer"]["iteration"] == 2 * full["trainer"]["epoch_length"]
    )  # ignite keeps iterations, not epochs
    assert not list((trained / "models").glob(".*tmp*")), "no temporary files left"
    (run,) = _runs(trained, "anoddpm_simplex-train")
    assert run.data.params["method"] == "anoddpm_simplex"
    assert run.data.params["noise_type"] == "simplex"
    assert len(run.data.params["datalist_hash"]) == 12
    assert "val_mse" in run.data.metrics and np.isfinite(run.data.metrics["val_mse"])


def test_evaluate_scores_maps_and_baseline(trained: Path, demo_cohort: Path) -> None:
    proc = _run(
        ["train.json", "evaluate.json", "smoke.json"],
        trained,
        *_common(demo_cohort, trained),
        "--t_values", "[60, 200]",
        "--headline_t", "200",
    )  # fmt: skip
    res = json.loads((trained / "eval" / "metrics.json").read_text())
    assert set(res) == {"t60", "t200", "intensity_baseline"}
    for name, r in res.items():
        for k in ("pixel_auprc", "pixel_auroc", "dice_best", "dice_fpr5", "slice_auroc"):
            assert 0.0 <= r[k] <= 1.0, (name, k, r[k])
        # the prevalence bounds a random map's AUPRC from below; all maps here are scored on the same pixels
        assert r["n_pixels"] == res["intensity_baseline"]["n_pixels"]
    test = json.loads((demo_cohort / "datalists" / "anomaly_t1w.json").read_text())["test"]
    rows = (trained / "eval" / "per_subject_t200.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(test)
    assert "| intensity_baseline |" in proc.stdout and "pixel_auprc" in proc.stdout
    assert len(list((trained / "eval" / "figures").glob("*.png"))) >= 2
    (run,) = _runs(trained, "anoddpm_simplex-evaluate")
    assert run.data.metrics["t200/pixel_auprc"] == pytest.approx(res["t200"]["pixel_auprc"])
    assert run.data.metrics["intensity_baseline/pixel_auprc"] == pytest.approx(
        res["intensity_baseline"]["pixel_auprc"]
    )
    # subject-level bootstrap: every method's interval brackets its point (the binned pixel AP within 0.01), and
    # the paired differences against the baseline and between the two t reach metrics.json's neighbour and MLflow
    for name, r in res.items():
        for k in ("pixel_auprc", "slice_auroc", "dice_fpr5"):
            assert r[f"{k}_ci_low"] - 0.01 <= r[k] <= r[f"{k}_ci_high"] + 0.01, (name, k)
        assert run.data.metrics[f"{name}/pixel_auprc_ci_high"] == pytest.approx(r["pixel_auprc_ci_high"])
    diff = json.loads((trained / "eval" / "differences.json").read_text())
    assert set(diff) == {"t60-intensity_baseline", "t200-intensity_baseline", "t60-t200"}
    d = diff["t200-intensity_baseline"]["pixel_auprc"]
    assert d["low"] <= d["high"] and d["n_boot"] + d["n_undefined"] == 1000
    assert run.data.metrics["diff/t200-intensity_baseline/pixel_auprc_ci_low"] == pytest.approx(d["low"])


def test_inference_nifti_non_ras_and_dicom_keep_the_input_grid(trained: Path, demo_cohort: Path) -> None:
    src = demo_cohort / "subjects" / "sub-002" / "sub-002_T1w.nii.gz"
    img = nib.load(src)
    # the same volume stored LPS (first two axes flipped): the map must come back on that grid
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(img.shape[:2]) - 1
    lps = trained / "lps_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1, ::-1], img.affine @ flip), lps)
    dicom = json.loads((demo_cohort / "datalists" / "dicom.json").read_text())["test"][0]
    dicom_dir = (demo_cohort / "datalists" / dicom["image"]).resolve()
    out = trained / "inference"
    _run(
        ["train.json", "inference.json", "smoke.json"],
        trained,
        *_common(demo_cohort, trained),
        "--input", json.dumps([str(src), str(lps), str(dicom_dir)]),
        "--output_dir", str(out),
        "--t", "200",
    )  # fmt: skip
    a = nib.load(out / "sub-002_T1w_anomaly_map.nii.gz")
    b = nib.load(out / "lps_T1w_anomaly_map.nii.gz")
    c = nib.load(out / "series_0002_anomaly_map.nii.gz")
    assert a.shape == img.shape and np.allclose(a.affine, img.affine)
    assert b.shape == img.shape and np.allclose(b.affine, img.affine @ flip)
    # the LPS copy is the same anatomy: its map is the RAS map flipped back
    np.testing.assert_allclose(b.get_fdata()[::-1, ::-1], a.get_fdata(), atol=1e-5)
    dsub = dicom["subject"]
    ref = nib.load(demo_cohort / "subjects" / dsub / f"{dsub}_T1w.nii.gz")
    assert c.shape == ref.shape and np.allclose(c.affine, ref.affine, atol=1e-3)
    assert a.get_fdata().max() > 0
    assert len(list((out / "figures").glob("*.png"))) == 3


def test_inference_batch_reports_bad_inputs_and_leaks_no_identifiers(
    trained: Path, demo_cohort: Path, tmp_path: Path
) -> None:
    """Issue 8: the 14 kinds of bad volume go through inference.json beside two good inputs, one of them a
    DICOM series carrying planted patient identifiers."""
    good = demo_cohort / "subjects" / "sub-003" / "sub-003_T1w.nii.gz"
    dicom = json.loads((demo_cohort / "datalists" / "dicom.json").read_text())["test"][0]
    series = (demo_cohort / "datalists" / dicom["image"]).resolve()
    cases = bad_volumes(good, series, tmp_path / "bad")
    planted = planted_dicom(series, tmp_path / "series_a")
    inputs = [str(good), *(str(p) for p, _ in cases.values()), str(planted)]
    out = tmp_path / "maps"
    proc = _run(
        ["train.json", "inference.json", "smoke.json"],
        trained,
        *_common(demo_cohort, trained),
        "--input", json.dumps(inputs),
        "--output_dir", str(out),
        "--t", "200",
        check=False,
    )  # fmt: skip
    # the run fails (a scheduler must notice) only after every good input was written
    assert proc.returncode != 0
    assert f"{len(cases)} of {len(inputs)} input(s) failed" in proc.stderr
    assert len(cases) >= 14
    check_failure_report(out / "failures.json", cases, len(inputs))
    good_map = nib.load(out / "sub-003_T1w_anomaly_map.nii.gz")
    assert good_map.shape == nib.load(good).shape and good_map.get_fdata().max() > 0
    assert (out / "series_0001_anomaly_map.nii.gz").is_file()  # the DICOM series, named by position
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "volume0001.png",
        f"volume{len(inputs):04d}.png",
    ]
    assert find_identifiers([out, *trained.glob("mlruns*")], [proc.stdout, proc.stderr]) == []


class _Payload:
    """Pickled by reference to ``os.makedirs``: loading the checkpoint unsafely would create the folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


def test_inference_refuses_a_checkpoint_carrying_pickled_code(demo_cohort: Path, tmp_path: Path) -> None:

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, ckpt)
    proc = _run(
        ["train.json", "inference.json", "smoke.json"],
        tmp_path,
        *_common(demo_cohort, tmp_path),
        "--checkpoint", str(ckpt),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"{ckpt}: checkpoint carries pickled code" in proc.stderr
    assert not marker.exists(), "the pickled code must not have run"
    assert not (tmp_path / "eval").exists() and not (tmp_path / "inference").exists()


def test_multi_gpu_train_on_cpu_gloo(demo_cohort: Path, tmp_path: Path) -> None:
    _run(
        ["train.json", "multi_gpu_train.json", "smoke.json"],
        tmp_path,
        *_common(demo_cohort, tmp_path),
        "--epochs", "1",
        torchrun=2,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "models").glob("*.pt")) == ["checkpoint_epoch=1.pt", "model.pt"]
    assert len(_runs(tmp_path, "anoddpm_simplex-train")) == 1, "only rank 0 logs to MLflow"


def test_torchscript_export_matches_checkpoint(trained: Path) -> None:
    from engines.export import export_torchscript

    out = export_torchscript(
        [str(CFG / "train.json"), str(CFG / "smoke.json")],
        trained / "models" / "model.pt",
        trained / "model.ts",
    )
    ts = torch.jit.load(str(out))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CFG / "train.json"), str(CFG / "smoke.json")])
    net = parser.get_parsed_content("network_def")
    from engines import load_checkpoint

    net.load_state_dict(load_checkpoint(trained / "models" / "model.pt"))
    net.eval()
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([5, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(ts(x, t), net(x, t), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not SHARED_SCHEMA.is_file(), reason="../shared (the offline metadata schema) is absent")
def test_metadata_verifies_offline(tmp_path: Path) -> None:
    proc = verify_metadata(CFG / "metadata.json", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr
