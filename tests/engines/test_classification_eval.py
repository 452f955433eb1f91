"""Tests of engines.classification_eval: classification metrics and the corruption-robustness study."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from engines.classification_eval import (
    CLEAN,
    RobustnessEvaluation,
    classification_metrics,
    expected_calibration_error,
    plot_robustness,
    robustness_mlflow_metrics,
    write_robustness_table,
)
from transforms.corruptions import SEVERITIES
from transforms.intensity import PercentileScaleIntensity

# ----------------------------------------------------------------------------------------------
# classification_metrics
# ----------------------------------------------------------------------------------------------


def _one_hot_probs(pred: np.ndarray, k: int, conf: float = 0.9) -> np.ndarray:
    """Rows giving ``conf`` to the predicted class and the rest evenly to the others."""
    p = np.full((len(pred), k), (1.0 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_accuracy_and_macro_f1_known_confusion():
    # binary confusion: TN=3, FP=1, FN=2, TP=4
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    m = classification_metrics(_one_hot_probs(pred, 2), labels)
    assert m["accuracy"] == pytest.approx(7 / 10)
    f1_0 = 2 * 3 / (2 * 3 + 1 + 2)  # 2TP / (2TP + FP + FN) with class 0 as positive
    f1_1 = 2 * 4 / (2 * 4 + 1 + 2)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    assert m["recall/class_0"] == pytest.approx(3 / 4)
    assert m["recall/class_1"] == pytest.approx(4 / 6)
    assert m["n"] == 10


def test_auroc_perfect_ranking_and_constant_scores():
    labels = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.3, 0.45, 0.5, 0.6, 0.55])  # every positive above every negative
    perfect = classification_metrics(np.stack([1 - p1, p1], 1), labels)
    assert perfect["auroc"] == pytest.approx(1.0)
    constant = classification_metrics(np.full((6, 2), 0.5), labels)
    assert constant["auroc"] == pytest.approx(0.5)
    inverted = classification_metrics(np.stack([p1, 1 - p1], 1), labels)
    assert inverted["auroc"] == pytest.approx(0.0)


def test_ece_zero_when_calibrated_and_gap_when_not():
    labels = np.zeros(10, dtype=int)
    # confidence 0.8 on class 0 for everyone, 8 of 10 correct: calibrated
    pred = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(_one_hot_probs(pred, 2, 0.8), labels) == pytest.approx(0.0, abs=1e-6)
    # confidence 0.9, 6 of 10 correct, one bin: ECE = |0.9 - 0.6|
    pred = np.array([0] * 6 + [1] * 4)
    m = classification_metrics(_one_hot_probs(pred, 2, 0.9), labels)
    assert m["ece"] == pytest.approx(0.3, abs=1e-6)


def test_ece_two_bins_weighted_by_counts():
    # 4 items at confidence 0.95 (all correct, gap 0.05), 6 at 0.65 (3 correct, gap 0.15)
    labels = np.zeros(10, dtype=int)
    p = np.concatenate(
        [_one_hot_probs(np.zeros(4, int), 2, 0.95), _one_hot_probs(np.array([0, 0, 0, 1, 1, 1]), 2, 0.65)]
    )
    expected = 0.4 * 0.05 + 0.6 * 0.15
    assert expected_calibration_error(p, labels, n_bins=10) == pytest.approx(expected, abs=1e-6)


def test_four_class_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200)
    logits = rng.normal(size=(200, 4))
    logits[np.arange(200), labels] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(p, labels)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p, multi_class="ovr", average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, p.argmax(1), average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == labels))
    assert {f"recall/class_{k}" for k in range(4)} <= set(m)
    assert all(math.isfinite(v) for v in m.values())


def test_binary_auroc_is_class_one_auroc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=100)
    p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 100), 0, 1)
    m = classification_metrics(np.stack([1 - p1, p1], 1), labels)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["auroc/class_1"] == pytest.approx(m["auroc"])


def test_absent_class_gives_nan_for_it_and_averages_the_rest():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=60)  # class 3 of 4 never occurs
    p = rng.dirichlet(np.ones(4), size=60)
    m = classification_metrics(p, labels)
    assert math.isnan(m["auroc/class_3"]) and math.isnan(m["recall/class_3"])
    present = [roc_auc_score(labels == k, p[:, k]) for k in range(3)]
    assert m["auroc"] == pytest.approx(np.mean(present))
    assert math.isfinite(m["macro_f1"]) and math.isfinite(m["ece"])
    # only one class at all: AUROC undefined, accuracy still fine
    single = classification_metrics(_one_hot_probs(np.zeros(5, int), 2), np.zeros(5, int))
    assert math.isnan(single["auroc"]) and single["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.array([[0.5, np.nan], [0.5, 0.5]]), [0, 1], "NaN"),
        (np.array([[0.7, 0.7], [0.5, 0.5]]), [0, 1], "sum to 1"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, 2], "in \\[0, 1\\]"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, 1, 1], "labels"),
        (np.array([[1.0], [1.0]]), [0, 0], "K >= 2"),
        (np.array([[0.5, 0.5]]), [0.5], "integer"),
    ],
)
def test_validation_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(probs, labels)


def test_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        classification_metrics(np.array([[0.5, 0.5]]), [0], n_bins=0)


# ----------------------------------------------------------------------------------------------
# robustness study on synthetic slices
# ----------------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[:32, :32]
_BRAIN = ((_YY - 16) ** 2 / 13**2 + (_XX - 16) ** 2 / 11**2) <= 1
_BLOB = ((_YY - 14) ** 2 + (_XX - 19) ** 2) <= 9


def _slices(n: int, seed: int = 0, contrast: np.ndarray | None = None) -> list[torch.Tensor]:
    """Raw 32x32 "brain" slices (intensity ~100); a bright blob of the given contrast (0 = none)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = _BRAIN * 100.0 * (1 + 0.05 * rng.standard_normal((32, 32)))
        im = im + _BLOB * (0.0 if contrast is None else contrast[i])
        out.append(torch.tensor(np.clip(im, 0, None)[None], dtype=torch.float32))
    return out


def _mean_intensity_model(threshold: float, slope: float = 200.0):
    """Class 1 ("tumour") when the normalised slice is darker on average (a bright blob sets the scale)."""

    def predict_proba(x: torch.Tensor) -> np.ndarray:
        p1 = torch.sigmoid((threshold - x.mean(dim=(1, 2, 3))) * slope)
        return torch.stack([1 - p1, p1], 1).numpy()

    return predict_proba


@pytest.fixture(scope="module")
def toy():
    n = 60
    labels = np.arange(n) % 2
    contrast = np.where(labels == 1, np.random.default_rng(5).uniform(40, 80, n), 0.0)
    images = _slices(n, seed=0, contrast=contrast)
    normalise = PercentileScaleIntensity()
    feats = torch.stack([normalise(im) for im in images]).mean(dim=(1, 2, 3)).numpy()
    threshold = float((feats[labels == 0].mean() + feats[labels == 1].mean()) / 2)
    return images, labels, [f"sub-{i:03d}/z{i}" for i in range(n)], normalise, threshold


def test_accuracy_drops_with_noise_level(toy):
    images, labels, ids, normalise, thr = toy
    ev = RobustnessEvaluation({"mean": _mean_intensity_model(thr)}, images, labels, ids, normalise)
    rows = ev.run()
    acc = {(r["corruption"], r["level"]): r["accuracy"] for r in rows}
    assert acc[(CLEAN, 0)] >= 0.95
    for kind in ("gaussian", "rician"):
        curve = [acc[(CLEAN, 0)]] + [acc[(kind, lv)] for lv in (1, 2, 3)]
        assert curve[3] <= curve[2] <= curve[1] <= curve[0]
        assert curve[3] < curve[0] - 0.1
    # default grid: at least 5 kinds x 3 levels, plus clean
    kinds = {r["corruption"] for r in rows} - {CLEAN}
    assert len(kinds) >= 5 and len(rows) == 1 + 3 * len(kinds)
    assert {r["severity"] for r in rows if r["corruption"] == "gaussian"} == set(SEVERITIES["gaussian"])


def test_models_see_byte_identical_inputs_and_probs_are_cached(toy):
    images, labels, ids, normalise, thr = toy
    calls = {"vandal": 0, "honest": 0}

    def vandal(x: torch.Tensor) -> np.ndarray:  # overwrites its input in place
        calls["vandal"] += 1
        x.mul_(0.0)
        return np.full((x.shape[0], 2), 0.5)

    honest_fn = _mean_intensity_model(thr)

    def honest(x: torch.Tensor) -> np.ndarray:
        calls["honest"] += 1
        return honest_fn(x)

    grid = [("gaussian", 1), ("gaussian", 3), ("bias_field", 2)]
    ev = RobustnessEvaluation(
        {"vandal": vandal, "honest": honest}, images, labels, ids, normalise, grid=grid, batch_size=16
    )
    rows = ev.run()
    assert len(rows) == 2 * (1 + len(grid))
    assert {(r["model"], r["corruption"], r["level"]) for r in rows} == {
        (m, c, lv) for m in ("vandal", "honest") for c, lv in [(CLEAN, 0), *grid]
    }
    by_setting: dict = {}
    for r in rows:
        by_setting.setdefault((r["corruption"], r["level"]), set()).add(r["input_hash"])
    for setting, hashes in by_setting.items():
        assert hashes == {ev.input_hashes[setting]}  # both models got the set that was built
    assert len({ev.input_hashes[s] for s in by_setting}) == len(by_setting)  # settings differ
    # the in-place vandal, called first, did not spoil the honest model's clean input
    honest_clean = next(r for r in rows if r["model"] == "honest" and r["corruption"] == CLEAN)
    assert honest_clean["accuracy"] >= 0.95
    # deterministic: rebuilding a corrupted set gives the same bytes
    again = RobustnessEvaluation({"honest": honest}, images, labels, ids, normalise, grid=grid, batch_size=16)
    assert torch.equal(again.test_set("gaussian", 3), ev.test_set("gaussian", 3))
    # cached probabilities: a second run calls no model
    n_calls = dict(calls)
    rows2 = ev.run()
    assert calls == n_calls
    assert [r["accuracy"] for r in rows2] == [r["accuracy"] for r in rows]
    assert ev.probabilities[("honest", "gaussian", 3)].shape == (len(labels), 2)


def test_conformal_columns_and_clean_coverage():
    # a well-specified model: labels are drawn from the model's own clean probabilities
    n_cal, n_test = 300, 300
    rng = np.random.default_rng(7)
    contrast = rng.uniform(0, 80, n_cal + n_test)
    images = _slices(n_cal + n_test, seed=3, contrast=contrast)
    normalise = PercentileScaleIntensity()
    feats = torch.stack([normalise(im) for im in images]).mean(dim=(1, 2, 3)).numpy()
    model = _mean_intensity_model(float(np.median(feats)), slope=40.0)
    probs = model(torch.stack([normalise(im) for im in images]))
    labels = (rng.uniform(size=len(images)) < probs[:, 1]).astype(int)
    cal, test = slice(0, n_cal), slice(n_cal, None)
    alpha = 0.1
    ev = RobustnessEvaluation(
        {"m": model, "no_cal": model},
        images[test],
        labels[test],
        list(range(n_test)),
        normalise,
        grid=[("rician", 2)],
        calibration_probs={"m": probs[cal]},
        calibration_labels=labels[cal],
        alphas=(alpha,),
        scores=("lac", "aps"),
    )
    rows = ev.run()
    clean = next(r for r in rows if r["model"] == "m" and r["corruption"] == CLEAN)
    for score in ("lac", "aps"):
        for metric in ("coverage", "mean_set_size", "empty_set_rate"):
            assert f"conformal/{score}/alpha0.1/{metric}" in clean
        assert clean[f"conformal/{score}/alpha0.1/coverage"] >= 1 - alpha - 0.03
    corrupted = next(r for r in rows if r["model"] == "m" and r["corruption"] == "rician")
    assert 0.0 <= corrupted["conformal/lac/alpha0.1/coverage"] <= 1.0
    no_cal = [r for r in rows if r["model"] == "no_cal"]
    assert no_cal and not any(k.startswith("conformal/") for r in no_cal for k in r)


def test_constructor_validation(toy):
    images, labels, ids, normalise, thr = toy
    model = {"m": _mean_intensity_model(thr)}
    with pytest.raises(ValueError, match="unique"):
        RobustnessEvaluation(model, images, labels, ["same"] * len(ids), normalise)
    with pytest.raises(ValueError, match="labels"):
        RobustnessEvaluation(model, images, labels[:-1], ids, normalise)
    with pytest.raises(ValueError, match="calibration_labels"):
        RobustnessEvaluation(
            model, images, labels, ids, normalise, calibration_probs={"m": np.full((4, 2), 0.5)}
        )
    with pytest.raises(ValueError, match="level"):
        RobustnessEvaluation(model, images, labels, ids, normalise, grid=[("gaussian", 0)])
    with pytest.raises(ValueError, match="unknown corruption"):
        RobustnessEvaluation(model, images, labels, ids, normalise, grid=[("blur", 1)])


def test_model_returning_logits_is_refused(toy):
    images, labels, ids, normalise, _ = toy
    ev = RobustnessEvaluation(
        {"logits": lambda x: np.zeros((x.shape[0], 2))}, images, labels, ids, normalise, grid=[]
    )
    with pytest.raises(ValueError, match="sum to 1"):
        ev.run()


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(toy):
    images, labels, ids, normalise, thr = toy
    probs = _mean_intensity_model(thr)(torch.stack([normalise(im) for im in images]))
    ev = RobustnessEvaluation(
        {"mean": _mean_intensity_model(thr), "flat model": _mean_intensity_model(thr, slope=20.0)},
        images,
        labels,
        ids,
        normalise,
        grid=[("gaussian", 1), ("gaussian", 2), ("gaussian", 3), ("gibbs", 1), ("gibbs", 3)],
        calibration_probs={"mean": probs},
        calibration_labels=labels,
    )
    return ev.run()


def test_write_robustness_table(study, tmp_path):
    paths = write_robustness_table(study, tmp_path / "out")
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(study) == 2 * 6
    assert [r["model"] for r in table] == [r["model"] for r in study]
    assert float(table[0]["accuracy"]) == pytest.approx(study[0]["accuracy"], abs=1e-4)
    # the model without calibration data has empty conformal cells
    flat = next(r for r in table if r["model"] == "flat model")
    assert flat["conformal/lac/alpha0.1/coverage"] == ""
    md = paths["md"].read_text()
    for metric in ("accuracy", "macro_f1", "auroc", "ece", "conformal/lac/alpha0.1/coverage"):
        assert f"## {metric}" in md
    # one line per model x corruption in each metric table, with a column per level 0..3
    acc_section = md.split("## accuracy")[1].split("## ")[0]
    body = [ln for ln in acc_section.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert len(body) == 2 * 2
    assert all(ln.count("|") == 2 + 4 + 1 for ln in body)
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_plot_robustness(study, tmp_path):
    paths = plot_robustness(study, tmp_path)
    assert [p.name for p in paths] == ["robustness_mean.png", "robustness_flat_model.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_robustness(study, tmp_path, metrics=("nope",))


def test_mlflow_metric_names(study):
    metrics = robustness_mlflow_metrics(study)
    assert "mean/clean/accuracy" in metrics
    assert "mean/gaussian/level3/accuracy" in metrics
    assert "mean/gibbs/level1/conformal/aps/alpha0.1/coverage" in metrics
    assert "flat model/clean/ece" in metrics
    n_numeric = sum(
        1 for r in study for k, v in r.items() if k not in ("level", "severity", "n") and isinstance(v, float)
    )
    assert len(metrics) == n_numeric  # one unique name per numeric cell
    # every class occurs in the labels, so nothing is NaN here
    assert all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="duplicate"):
        robustness_mlflow_metrics([*study, study[0]])


def test_model_names_with_slash_refused(toy):
    images, labels, ids, normalise, thr = toy
    with pytest.raises(ValueError, match="/"):
        RobustnessEvaluation({"a/b": _mean_intensity_model(thr)}, images, labels, ids, normalise)
