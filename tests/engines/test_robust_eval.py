"""The classification evaluation workflow (engines.robust_eval) on constructed slices and toy models whose
answers are known: an oracle that reads the class off the image, and a constant model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from engines.robust_eval import (
    ClassifierEvaluation,
    build_models,
    check_trained_classes,
    conformal_set,
    load_conformal,
    load_slices,
    predict_probabilities,
    save_conformal,
    slice_ids,
)
from transforms import PercentileScaleIntensity, slice_loading_transforms
from transforms.errors import InputDataError

CLASSES = ["healthy", "tumour"]


class Oracle(nn.Module):
    """Class 1 when the centre of the (normalised) slice is bright: the constructed lesion."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # something for Grad-CAM to hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x) * 0 + x  # the features are the image itself, but the graph passes through conv
        # centre minus tissue: 0 for healthy slices, about 0.75 when the bright square sets the intensity scale
        c = f[:, :, 12:20, 12:20].mean((1, 2, 3)) - f[:, :, 24:, 24:].mean((1, 2, 3))
        return torch.stack([-20 * (c - 0.35), 20 * (c - 0.35)], 1)


class Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2) + 0 * x.mean((1, 2, 3))[:, None]


def _slices(folder: Path, n: int, start: int = 0) -> list[dict]:
    """``n`` 32x32 raw slices, alternating classes: 1 has a bright 8x8 centre square."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    items = []
    for i in range(start, start + n):
        img = 100 + 5 * rng.standard_normal((32, 32))
        label = i % 2
        if label:
            img[12:20, 12:20] += 300
        img[:8, :8] = 0  # background corner
        path = folder / f"patient-name-{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), path)
        items.append({"image": str(path), "label": label})
    return items


@pytest.fixture
def evaluation(tmp_path: Path) -> ClassifierEvaluation:
    test = _slices(tmp_path / "test", 24, 0)
    cal = _slices(tmp_path / "cal", 30, 100)
    return ClassifierEvaluation(
        {"oracle": Oracle(), "constant": Constant()},
        test, cal,
        load_transform=slice_loading_transforms(image_size=32, normalise=False),
        normalise=PercentileScaleIntensity(0.5, 99.5, 0.0, 1.0),
        class_names=CLASSES,
        output_dir=tmp_path / "eval",
        conformal_dir=tmp_path / "models",
        kinds=("gaussian", "bias_field"),
        alphas=(0.1, 0.2),
        scores=("lac", "aps"),
        gradcam_layers={"oracle": "conv"},
        explain_per_class=1,
        shap_background=4,
        shap_nsamples=4,
        tracking={"run_name": "toy-evaluate", "method": "toy", "workdir": str(tmp_path), "task_label": "binary",
                  "dataset_name": "constructed"},
    )  # fmt: skip


def test_clean_metrics_tables_conformal_and_figures(evaluation: ClassifierEvaluation, tmp_path: Path) -> None:
    res = evaluation.run()
    oracle, const = res["oracle"]["metrics"], res["constant"]["metrics"]
    assert oracle["accuracy"] == 1.0 and oracle["auroc"] == 1.0 and oracle["macro_f1"] == 1.0
    assert const["accuracy"] == 0.5, "always 'healthy' on a balanced test split"
    assert const["recall/class_0"] == 1.0 and const["recall/class_1"] == 0.0
    # conformal sets (exact known answers are in test_conformal.py): LAC sets of the sure, right oracle hold at
    # most its one class; the constant model needs both classes in every APS set to cover the tumour slices
    for alpha in (0.1, 0.2):
        for score in ("lac", "aps"):
            assert oracle[f"conformal/{score}/alpha{alpha}/coverage"] >= 1 - alpha - 0.1
        assert oracle[f"conformal/lac/alpha{alpha}/mean_set_size"] <= 1.0
    assert const["conformal/aps/alpha0.1/mean_set_size"] == 2.0
    assert const["conformal/aps/alpha0.1/coverage/class_1"] == 1.0
    # robustness keys for every (kind, level), and the corrupted summary
    for kind in ("gaussian", "bias_field"):
        for level in (1, 2, 3):
            assert f"{kind}/level{level}/accuracy" in oracle
            assert f"{kind}/level{level}/conformal/lac/alpha0.1/coverage" in oracle
    assert oracle["corrupted_worst/accuracy"] <= oracle["corrupted/accuracy"] <= 1.0
    ev = tmp_path / "eval"
    lines = (ev / "robustness.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * (1 + 2 * 3)
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["oracle"]["accuracy"] == 1.0 and "| oracle |" in (ev / "summary.md").read_text()
    # thresholds for inference, equal to the report's
    rec = load_conformal(tmp_path / "models" / "conformal_oracle.json", CLASSES)
    report = json.loads((ev / "oracle" / "conformal_clean.json").read_text())
    assert rec["thresholds"]["lac"]["alpha0.1"] == pytest.approx(report["lac/alpha0.1/threshold"])
    assert rec["n_calibration"] == 30
    # explanation figures: one healthy and one tumour slice per model; no identifiers in any file name
    figs = sorted(p.name for p in (ev / "explanations").glob("*.png"))
    assert figs == sorted(
        f"{m}_test{i:03d}_{c}.png" for m in ("oracle", "constant") for i, c in ((0, "healthy"), (1, "tumour"))
    )
    assert not any("patient" in p.name for p in ev.rglob("*"))
    assert (ev / "oracle" / "oracle_test001_tumour.png").is_file()


def test_mlflow_parent_and_child_runs(evaluation: ClassifierEvaluation, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    res = evaluation.run()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tumour-classification")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("role") == "comparison"]
    assert len(parent) == 1 and parent[0].data.params["models"] == "oracle,constant"
    children = {r.data.tags["model"]: r for r in runs if r.data.tags.get("role") == "model"}
    assert set(children) == {"oracle", "constant"}
    for name, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.tags["classification_task"] == "binary" and run.info.status == "FINISHED"
        for k, v in res[name]["metrics"].items():
            assert run.data.metrics[k] == pytest.approx(v), k


def test_probabilities_and_slice_loading(tmp_path: Path) -> None:
    items = _slices(tmp_path, 4)
    x, y = load_slices(items, slice_loading_transforms(image_size=16, normalise=False))
    assert x.shape == (4, 1, 16, 16) and y.tolist() == [0, 1, 0, 1] and float(x.max()) > 300
    p = predict_probabilities(Constant(), x, batch_size=3)
    assert p.shape == (4, 2) and np.allclose(p.sum(1), 1) and np.allclose(p[:, 0], 1 / (1 + math.exp(-2)))
    with pytest.raises(ValueError, match="no datalist items"):
        load_slices([], lambda d: d)


def test_slice_ids_are_stable_and_anonymous() -> None:
    items = [
        {"image": "/data/John_Doe/scan.nii.gz"},
        {"image": "/other/place/scan2.nii.gz", "slice_index": 3},
    ]
    ids = slice_ids(items)
    assert ids == slice_ids([{"image": "/moved/John_Doe/scan.nii.gz"}, items[1]]), (
        "the folder does not matter"
    )
    assert all(len(i) == 16 and "John" not in i for i in ids)
    with pytest.raises(ValueError, match="same image"):
        slice_ids([items[0], items[0]])


def test_build_models_and_class_checks(tmp_path: Path) -> None:
    built = build_models({"a": Constant, "b": Oracle}, ["b"])
    assert list(built) == ["b"] and not built["b"].training
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['c'\]; known: \['a', 'b'\]"):
        build_models({"a": Constant, "b": Oracle}, ["c"])
    with pytest.raises(ValueError, match="twice"):
        build_models({"a": Constant}, ["a", "a"])
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"labels": CLASSES}))
    assert check_trained_classes(path, CLASSES) == CLASSES
    with pytest.raises(InputDataError, match="trained with classes"):
        check_trained_classes(path, ["healthy", "glioma", "meningioma", "pituitary"])
    with pytest.raises(InputDataError, match="no model was trained"):
        check_trained_classes(tmp_path / "none.json", CLASSES)


def test_conformal_thresholds_round_trip_and_sets(tmp_path: Path) -> None:
    # calibration: 9 items, true-class probabilities 0.9, 0.8, ..., 0.1 -> LAC scores 0.1 ... 0.9
    p_true = np.linspace(0.9, 0.1, 9)
    cal = np.stack([p_true, 1 - p_true], 1)
    labels = np.zeros(9, dtype=int)
    rec = save_conformal(tmp_path / "c.json", cal, labels, [0.1, 0.2], ["lac", "aps"], CLASSES)
    # alpha 0.2: ceil(10 * 0.8) = 8th smallest score of 0.1..0.9 = 0.8
    assert rec["thresholds"]["lac"]["alpha0.2"] == pytest.approx(0.8)
    assert load_conformal(tmp_path / "c.json", CLASSES) == json.loads((tmp_path / "c.json").read_text())
    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9]])
    # LAC keeps y with 1 - p_y <= 0.8, i.e. p_y >= 0.2
    assert conformal_set(probs, rec, "lac", 0.2) == [["healthy"], ["healthy", "tumour"], ["tumour"]]
    with pytest.raises(ValueError, match="no threshold for score 'raps'"):
        conformal_set(probs, rec, "raps", 0.2)
    with pytest.raises(InputDataError, match="calibrated for classes"):
        load_conformal(tmp_path / "c.json", ["a", "b"])
    with pytest.raises(InputDataError, match=r"run configs/evaluate\.json first"):
        load_conformal(tmp_path / "missing.json")
