"""latent_robust_classifier end to end, tiny, from its real JSON configs through ``python -m monai.bundle run``.

A module-scoped fixture trains every model of one task (``smoke.json``: 24 slices per split, 32² slices, one
epoch) in dependency order: autoencoder, latent DDPM, then the classifiers (and one head with diffusion
augmentation) for the binary task; evaluation, inference and the checks read those outputs. The 4-class
task has its own module (test_latent_robust_classifier_multiclass.py), so that the two trainings can run on
different test workers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests._catalogue import bad_volumes, check_failure_report, find_identifiers, planted_dicom
from tests.bundles._helpers import ROOT, SHARED_SCHEMA, common_args, mlflow_runs, run_bundle, verify_metadata

CFG = ROOT / "bundles" / "latent_robust_classifier" / "configs"
CLASSIFIERS = ("cnn", "attention_cnn", "resnet50", "latent_mlp", "latent_resnet", "noise_aware", "hybrid")
ALL_MODELS = ("autoencoder", "latent_ddpm", *CLASSIFIERS)
EVALUATED = [*CLASSIFIERS, "latent_resnet_aug"]
EXPERIMENT = "tumour-classification"


def _args(demo: Path, work: Path, task: str) -> list[str]:
    return [*common_args(demo, work), "--task", task]


def _train_all(demo: Path, work: Path, task: str) -> None:
    for model in ALL_MODELS:
        run_bundle(CFG, ["train.json", f"train_{model}.json", "smoke.json"], work, *_args(demo, work, task))
    run_bundle(
        CFG,
        ["train.json", "train_latent_resnet.json", "smoke.json"],
        work,
        *_args(demo, work, task),
        "--diffusion_augmentation",
        "true",
    )


@pytest.fixture(scope="module")
def binary(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("lrc_binary")
    _train_all(demo_cohort, work, "binary")
    run_bundle(
        CFG,
        ["train.json", "evaluate.json", "smoke.json"],
        work,
        *_args(demo_cohort, work, "binary"),
        "--models",
        json.dumps(EVALUATED),
    )
    return work


def _parser(demo: Path, work: Path, configs: list[str], task: str = "binary"):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CFG / c) for c in configs])
    parser["bundle_root"] = str(CFG.parent)
    parser["dataset_dir"] = str(demo)
    parser["ckpt_dir"] = str(work / "models")
    parser["task"] = task
    parser["device"] = torch.device("cpu")
    return parser


def check_every_model_trained(work: Path, task: str, classes: int, demo_cohort: Path) -> None:
    """Every model's weights and full checkpoints, the classes and latent scale files, logits per class from
    evaluate.json's factories and one MLflow run per training (shared with the multiclass module)."""
    from engines import load_checkpoint

    models = work / "models"
    for name in (*ALL_MODELS, "latent_resnet_aug"):
        sd = load_checkpoint(models / f"{name}.pt")
        assert any(k.endswith("weight") for k in sd), name
        full = sorted(models.glob(f"{name}_checkpoint_epoch=*.pt"))
        assert full and {"model", "optimizer", "lr_scheduler", "trainer"} <= set(load_checkpoint(full[-1]))
    names = json.loads((models / "classes.json").read_text())["labels"]
    assert len(names) == classes and names[0] == "healthy"
    scale = json.loads((models / "latent_scale.json").read_text())
    assert scale["scale"] > 0 and math.isclose(scale["scale"] * scale["latent_std"], 1.0)
    # every trained classifier, rebuilt from its checkpoint by evaluate.json, gives one logit per class
    factories = _parser(
        demo_cohort, work, ["train.json", "evaluate.json", "smoke.json"], task
    ).get_parsed_content("eval_factories")
    x = torch.rand(2, 1, 32, 32)
    for name in (*CLASSIFIERS, "latent_resnet_aug"):
        with torch.no_grad():
            assert factories[name]()(x).shape == (2, classes), name
    # one MLflow run per training, tagged with model and task, with validation metrics
    for name in ("cnn", "hybrid", "latent_ddpm"):
        runs = mlflow_runs(work, f"latent_robust_classifier-{task}-train_{name}", EXPERIMENT)
        assert len(runs) == 1
        run = runs[0]
        assert run.data.tags["model"] == name and run.data.tags["classification_task"] == task
        key = "val_mse" if name == "latent_ddpm" else "val_accuracy"
        assert key in run.data.metrics


def test_every_model_trains_binary(binary: Path, demo_cohort: Path) -> None:
    check_every_model_trained(binary, "binary", 2, demo_cohort)


def test_evaluation_tables_conformal_and_mlflow(binary: Path, demo_cohort: Path) -> None:
    ev = binary / "eval"
    rows = (ev / "robustness.csv").read_text().splitlines()
    header = rows[0].split(",")
    body = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    # 8 models x (clean + 5 corruptions x 3 levels)
    assert len(body) == len(EVALUATED) * (1 + 5 * 3)
    kinds = {r["corruption"] for r in body}
    assert kinds == {"clean", "gaussian", "rician", "bias_field", "gibbs", "motion"}
    # identical corrupted inputs for every model: one hash per (corruption, level)
    by_setting: dict[tuple[str, str], set[str]] = {}
    for r in body:
        by_setting.setdefault((r["corruption"], r["level"]), set()).add(r["input_hash"])
    assert all(len(h) == 1 for h in by_setting.values())
    for model in EVALUATED:
        assert (ev / f"robustness_{model}.png").stat().st_size > 1000
        assert (ev / model / "robustness.md").is_file()
        report = json.loads((ev / model / "conformal_clean.json").read_text())
        for score in ("lac", "aps", "raps"):
            for alpha in ("0.1", "0.05"):
                for metric in (
                    "coverage",
                    "mean_set_size",
                    "empty_set_rate",
                    "coverage/class_0",
                    "coverage/class_1",
                ):
                    assert f"{score}/alpha{alpha}/{metric}" in report
        # APS and RAPS sets are never empty (the crossing class is always included)
        assert report["aps/alpha0.1/empty_set_rate"] == 0.0
        thresholds = json.loads((binary / "models" / f"conformal_{model}.json").read_text())
        assert set(thresholds["thresholds"]) == {"lac", "aps", "raps"}
    # explanation figures for the fixed test slices, attention maps for the attention CNN
    figs = sorted(p.name for p in (ev / "explanations").glob("*.png"))
    for model in EVALUATED:
        assert any(f.startswith(f"{model}_test") and not f.endswith("_attention.png") for f in figs), model
    assert any(f.startswith("attention_cnn_") and f.endswith("_attention.png") for f in figs)

    # MLflow: a comparison run and one child per model with the same metric names
    from mlflow.tracking import MlflowClient

    parent = mlflow_runs(binary, "latent_robust_classifier-binary-evaluate", EXPERIMENT)
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{binary / 'mlruns.db'}")
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"robustness.csv", "robustness.md", "summary.md", "plots"} <= arts
    children = client.search_runs(
        [parent[0].info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'"
    )
    assert sorted(r.data.tags["model"] for r in children) == sorted(EVALUATED)
    keys = [set(r.data.metrics) for r in children]
    common = set.intersection(*keys)
    for k in ("accuracy", "macro_f1", "auroc", "ece", "corrupted/accuracy", "gaussian/level3/accuracy",
              "conformal/raps/alpha0.05/coverage", "motion/level2/conformal/aps/alpha0.1/coverage"):  # fmt: skip
        assert k in common, k
    child = next(r for r in children if r.data.tags["model"] == "cnn")
    assert any(a.path.endswith(".png") for a in client.list_artifacts(child.info.run_id))
    # subject-level bootstrap intervals of the clean metrics, and paired differences between every pair of models
    intervals = json.loads((ev / "intervals.json").read_text())
    test = json.loads((demo_cohort / "datalists" / "classification_binary.json").read_text())["test"]
    # slices are grouped by subject: fewer clusters than evaluated slices, no more than the test split's subjects
    n_test = children[0].data.metrics["n_test"]
    assert intervals["n_boot"] == 1000 and 2 <= intervals["n_clusters"] <= len({i["subject"] for i in test})
    assert intervals["n_clusters"] < n_test
    for r in children:
        m = r.data.metrics
        for k in ("accuracy", "macro_f1", "conformal/lac/alpha0.1/coverage"):
            assert m[f"{k}_ci_low"] <= m[k] + 1e-12 and m[k] <= m[f"{k}_ci_high"] + 1e-12, (
                r.data.tags["model"],
                k,
            )
    n = len(EVALUATED)
    assert len(intervals["differences"]) == n * (n - 1) // 2
    pair = next(iter(intervals["differences"]))
    assert f"diff/{pair}/accuracy_ci_low" in parent[0].data.metrics


def test_shap_maps_of_the_trained_image_models_have_the_input_shape(binary: Path, demo_cohort: Path) -> None:
    from engines import shap_maps

    parser = _parser(demo_cohort, binary, ["train.json", "evaluate.json", "smoke.json"])
    factories = parser.get_parsed_content("eval_factories")
    x = torch.rand(2, 1, 32, 32)
    background = torch.rand(4, 1, 32, 32)
    for name in ("cnn", "attention_cnn", "resnet50", "latent_resnet"):
        maps = shap_maps(factories[name](), x, background, nsamples=4)
        assert maps.shape == x.shape, name
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0, name


def test_evaluate_refuses_models_trained_with_another_class_order(binary: Path, demo_cohort: Path) -> None:
    with pytest.raises(AssertionError, match="trained with classes"):
        run_bundle(
            CFG, ["train.json", "evaluate.json", "smoke.json"], binary, *_args(demo_cohort, binary, "multiclass"),
            "--models", "['cnn']",
        )  # fmt: skip


def test_inference_on_a_slice_and_a_volume(binary: Path, demo_cohort: Path, tmp_path: Path) -> None:
    """A slice and a volume are classified; issue 8: the bad volumes of the catalogue in the same batch are
    reported and skipped (a 2D file is a valid slice input here, so that kind is not a fault), and a DICOM
    series with planted patient identifiers leaves no trace in the outputs or the log."""
    out = binary / "inference"
    slice_file = sorted((demo_cohort / "slices").glob("*.nii.gz"))[0]
    volume = demo_cohort / "subjects" / "sub-002" / "sub-002_T1w.nii.gz"
    dicom = json.loads((demo_cohort / "datalists" / "dicom.json").read_text())["test"][0]
    series = planted_dicom((demo_cohort / "datalists" / dicom["image"]).resolve(), tmp_path / "series_a")
    cases = bad_volumes(volume, series, tmp_path / "bad")
    cases.pop("2d_where_3d")
    inputs = [str(slice_file), str(volume), *(str(p) for p, _ in cases.values()), str(series)]
    proc = run_bundle(
        CFG, ["train.json", "evaluate.json", "inference.json", "smoke.json"], binary,
        *_args(demo_cohort, binary, "binary"), "--output_dir", str(out),
        "--input", json.dumps(inputs), "--model", "hybrid", check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and f"{len(cases)} of {len(inputs)} input(s) failed" in proc.stderr
    check_failure_report(out / "failures.json", cases, len(inputs))
    assert json.loads((out / "series_a_classes.json").read_text())["summary"]["n_slices"] > 0
    assert find_identifiers([out, *binary.glob("mlruns*")], [proc.stdout, proc.stderr]) == []
    one = json.loads((out / f"{slice_file.name.removesuffix('.nii.gz')}_classes.json").read_text())
    assert one["model"] == "hybrid" and one["class_names"] == ["healthy", "tumour"]
    (s,) = one["slices"]
    assert s["slice_index"] is None and s["predicted_class"] in ("healthy", "tumour")
    assert math.isclose(sum(s["probabilities"].values()), 1.0, abs_tol=1e-4)
    assert s["conformal_set"] and set(s["conformal_set"]) <= {"healthy", "tumour"}
    vol = json.loads((out / "sub-002_T1w_classes.json").read_text())
    n = vol["summary"]["n_slices"]
    assert 10 < n < 80 and len(vol["slices"]) == n  # only slices with enough brain, not all 80
    assert sum(vol["summary"]["slices_per_class"].values()) == n
    idx = [s["slice_index"] for s in vol["slices"]]
    assert idx == sorted(idx) and all(isinstance(i, int) for i in idx)


def test_latent_heads_train_without_the_latent_ddpm(binary: Path, demo_cohort: Path, tmp_path: Path) -> None:
    """Only the hybrid and augmentation need the latent DDPM: a plain latent head trains without it."""
    import shutil

    work = tmp_path
    (work / "models").mkdir()
    for name in ("autoencoder.pt", "latent_scale.json"):
        shutil.copy(binary / "models" / name, work / "models" / name)
    run_bundle(
        CFG, ["train.json", "train_latent_mlp.json", "smoke.json"], work, *_args(demo_cohort, work, "binary")
    )
    assert (work / "models" / "latent_mlp.pt").is_file() and not (work / "models" / "latent_ddpm.pt").exists()


def test_verify_metadata(tmp_path: Path) -> None:
    if not SHARED_SCHEMA.is_file():
        pytest.skip("../shared/monai schema not present (a user's clone)")
    proc = verify_metadata(CFG / "metadata.json", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_configs_share_train_json_through_overrides() -> None:
    train = json.loads((CFG / "train.json").read_text())
    for model in ALL_MODELS:
        cfg = json.loads((CFG / f"train_{model}.json").read_text())
        assert len(cfg) < len(train) / 3, f"train_{model}.json looks like a copy of train.json"
        assert cfg.get("model", "cnn") == model or model == "cnn"
