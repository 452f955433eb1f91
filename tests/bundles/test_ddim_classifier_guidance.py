"""ddim_classifier_guidance end to end, tiny, from its real JSON configs through ``python -m monai.bundle run``.

One module-scoped smoke training of both networks (``smoke.json``: 3 volumes of mixed kinds, 32² slices) is
shared by the mechanism, evaluation and inference tests. Outputs go to ``tmp_path``; MLflow to an SQLite store
there.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests._catalogue import bad_volumes, check_failure_report, find_identifiers, planted_dicom
from tests.bundles._helpers import ROOT, SHARED_SCHEMA, common_args, mlflow_runs, run_bundle, verify_metadata

CFG = ROOT / "bundles" / "ddim_classifier_guidance" / "configs"
DIFFUSION = ["train_diffusion.json", "smoke.json"]
CLASSIFIER = ["train_diffusion.json", "train_classifier.json", "smoke.json"]
# the smoke classifier sees 6 volumes (two of each lesion kind are not guaranteed, but every kind is) for a
# few more epochs than the UNet: the guidance test needs a classifier that has learnt something
CLASSIFIER_ARGS = ["--max_volumes", "6", "--epochs", "6"]


@pytest.fixture(scope="module")
def trained(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ddim_cg")
    run_bundle(CFG, DIFFUSION, work, *common_args(demo_cohort, work))
    run_bundle(CFG, CLASSIFIER, work, *common_args(demo_cohort, work), *CLASSIFIER_ARGS)
    return work


def _parser(demo: Path, work: Path, configs: list[str]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CFG / c) for c in configs])
    parser["bundle_root"] = str(CFG.parent)
    parser["dataset_dir"] = str(demo)
    parser["ckpt_dir"] = str(work / "models")
    parser["device"] = torch.device("cpu")
    return parser


def test_trainings_write_models_labels_and_mlflow_runs(trained: Path) -> None:
    from engines import load_checkpoint

    models = trained / "models"
    for stem in ("diffusion", "classifier"):
        sd = load_checkpoint(models / f"{stem}_model.pt" if stem == "diffusion" else models / "classifier.pt")
        assert any(k.endswith("weight") for k in sd)
        full = sorted(models.glob(f"{stem}_checkpoint_epoch=*.pt"))
        assert full, f"no full-state {stem} checkpoint"
        assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(load_checkpoint(full[-1]))
    assert json.loads((models / "classifier_labels.json").read_text()) == {
        "labels": ["healthy", "diseased"],
        "healthy_index": 0,
    }
    (diff_run,) = mlflow_runs(trained, "ddim_classifier_guidance-train_diffusion")
    assert diff_run.data.params["method"] == "ddim_classifier_guidance"
    assert diff_run.data.params["stage"] == "diffusion"
    assert np.isfinite(diff_run.data.metrics["val_mse"])
    (clf_run,) = mlflow_runs(trained, "ddim_classifier_guidance-train_classifier")
    assert clf_run.data.params["stage"] == "classifier"
    assert np.isfinite(clf_run.data.metrics["Loss"]) and 0.0 <= clf_run.data.metrics["train_accuracy"] <= 1.0
    # accuracy as a function of t, on every t of the validation grid
    grid = json.loads((CFG / "train_classifier.json").read_text())["val_timesteps"]
    for t in grid:
        assert 0.0 <= clf_run.data.metrics[f"val_acc_t{t}"] <= 1.0
    assert 0.0 <= clf_run.data.metrics["val_auroc"] <= 1.0


def test_evaluate_logs_the_shared_metrics_and_the_sweep(trained: Path, demo_cohort: Path) -> None:
    proc = run_bundle(
        CFG,
        ["train_diffusion.json", "evaluate.json", "smoke.json"],
        trained,
        *common_args(demo_cohort, trained),
        "--noise_levels", "[50, 100]",
        "--guidance_scales", "[0, 5]",
        "--headline", "L100_s5",
        "--ddim_steps", "2",
        "--max_test_volumes", "4",
    )  # fmt: skip
    res = json.loads((trained / "eval" / "metrics.json").read_text())
    assert set(res) == {"L50_s0", "L50_s5", "L100_s0", "L100_s5", "intensity_baseline"}
    shared = ("pixel_auprc", "pixel_auroc", "dice_best", "dice_fpr5", "slice_auroc")
    for name, r in res.items():
        for k in shared:
            assert 0.0 <= r[k] <= 1.0, (name, k, r[k])
        assert r["n_pixels"] == res["intensity_baseline"]["n_pixels"]
    assert "| intensity_baseline |" in proc.stdout and "| L100_s5 |" in proc.stdout
    (run,) = mlflow_runs(trained, "ddim_classifier_guidance-evaluate")
    metrics = run.data.metrics
    # the same unprefixed names as anoddpm_simplex's evaluation (one MLflow table holds both methods)
    for k in shared:
        assert metrics[k] == pytest.approx(res["L100_s5"][k])
        assert metrics[f"intensity_baseline/{k}"] == pytest.approx(res["intensity_baseline"][k])
    assert metrics["L50_s0/pixel_auprc"] == pytest.approx(res["L50_s0"]["pixel_auprc"])
    assert run.data.params["headline"] == "L100_s5" and run.data.params["dataset"] == "demo-t1w"
    figures = trained / "eval" / "figures"
    chains = sorted(p.name for p in figures.glob("chain_*"))
    assert len(chains) == 4 and {Path(c).suffix for c in chains} == {".png", ".gif"}
    # the figures reach MLflow as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained / 'mlruns.db'}")
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(chains) | {"metrics.json", "per_subject_L100_s5.csv"} <= listed, listed


def test_evaluate_refuses_a_healthy_index_that_disagrees_with_the_classifier(
    trained: Path, demo_cohort: Path
) -> None:
    with pytest.raises(
        AssertionError, match=r"healthy_index 1 does not point at 'healthy'.*set healthy_index to 0"
    ):
        run_bundle(
            CFG,
            ["train_diffusion.json", "evaluate.json", "smoke.json"],
            trained,
            *common_args(demo_cohort, trained),
            "--healthy_index", "1",
        )  # fmt: skip


def test_inference_maps_keep_the_input_grid_and_bad_inputs_are_reported(
    trained: Path, demo_cohort: Path, tmp_path: Path
) -> None:
    """Maps on the input grid (NIfTI and DICOM); issue 8: the 14 kinds of bad volume in the same batch are
    reported and skipped, and the DICOM series' planted patient identifiers reach no output or log."""
    src = demo_cohort / "subjects" / "sub-002" / "sub-002_T1w.nii.gz"
    img = nib.load(src)
    dicom = json.loads((demo_cohort / "datalists" / "dicom.json").read_text())["test"][0]
    dicom_dir = planted_dicom((demo_cohort / "datalists" / dicom["image"]).resolve(), tmp_path / "series_a")
    cases = bad_volumes(src, dicom_dir, tmp_path / "bad")
    inputs = [str(src), *(str(p) for p, _ in cases.values()), str(dicom_dir)]
    out = trained / "inference"
    proc = run_bundle(
        CFG,
        ["train_diffusion.json", "inference.json", "smoke.json"],
        trained,
        *common_args(demo_cohort, trained),
        "--input", json.dumps(inputs),
        "--output_dir", str(out),
        "--setting", "L100_s5",
        "--ddim_steps", "2",
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0, "failed inputs make the run fail, after the good ones are written"
    assert f"{len(cases)} of {len(inputs)} input(s) failed" in proc.stderr
    check_failure_report(out / "failures.json", cases, len(inputs))
    a = nib.load(out / "sub-002_T1w_anomaly_map.nii.gz")
    assert a.shape == img.shape and np.allclose(a.affine, img.affine)
    dsub = dicom["subject"]
    ref = nib.load(demo_cohort / "subjects" / dsub / f"{dsub}_T1w.nii.gz")
    c = nib.load(out / "series_0001_anomaly_map.nii.gz")
    assert c.shape == ref.shape and np.allclose(c.affine, ref.affine, atol=1e-3)
    assert a.get_fdata().max() > 0 and a.get_fdata().min() >= 0
    assert find_identifiers([out, *trained.glob("mlruns*")], [proc.stdout, proc.stderr]) == []


@pytest.mark.parametrize("stage", ["diffusion", "classifier"])
def test_multi_gpu_train_on_cpu_gloo(stage: str, demo_cohort: Path, tmp_path: Path) -> None:
    configs = DIFFUSION if stage == "diffusion" else CLASSIFIER
    configs = [*configs[:-1], "multi_gpu_train.json", configs[-1]]
    run_bundle(
        CFG, configs, tmp_path, *common_args(demo_cohort, tmp_path), "--epochs", "1", torchrun=2, port=29534
    )
    final = "diffusion_model.pt" if stage == "diffusion" else "classifier.pt"
    assert sorted(p.name for p in (tmp_path / "models").glob("*.pt")) == sorted(
        [f"{stage}_checkpoint_epoch=1.pt", final]
    )
    assert len(mlflow_runs(tmp_path, f"ddim_classifier_guidance-train_{stage}")) == 1, "only rank 0 logs"
    if stage == "classifier":
        assert (tmp_path / "models" / "classifier_labels.json").is_file()


def test_class_conditional_option_trains_and_guides(demo_cohort: Path, tmp_path: Path) -> None:
    """class_conditional: the UNet gets a class embedding, trains on labelled slices, and decodes as healthy."""
    from engines import GuidedDDIMInferer, load_checkpoint

    run_bundle(
        CFG,
        DIFFUSION,
        tmp_path,
        *common_args(demo_cohort, tmp_path),
        "--epochs",
        "1",
        "--class_conditional",
        "true",
    )
    sd = load_checkpoint(tmp_path / "models" / "diffusion_model.pt")
    assert sd["class_embedding.weight"].shape[0] == 2, "one embedding per class of the datalist"
    parser = _parser(demo_cohort, tmp_path, DIFFUSION)
    parser["class_conditional"] = True
    unet = parser.get_parsed_content("unet_def")
    unet.load_state_dict(sd)
    unet.eval()
    clf = parser.get_parsed_content("classifier_def").eval()
    sched = parser.get_parsed_content("noise_scheduler")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    cond = GuidedDDIMInferer(sched, clf, 100, 5.0, ddim_steps=2, class_conditional=True)
    recon = cond.reconstruct(x, unet)["recon"]
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    with pytest.raises(ValueError, match="class_labels"):
        GuidedDDIMInferer(sched, clf, 100, 5.0, ddim_steps=2).reconstruct(x, unet)


@pytest.mark.skipif(not SHARED_SCHEMA.is_file(), reason="../shared (the offline metadata schema) is absent")
def test_metadata_verifies_offline(tmp_path: Path) -> None:
    proc = verify_metadata(CFG / "metadata.json", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr
