"""Anomaly-map evaluation: constructed maps with known answers (DESIGN §4, docs/evaluation.md)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from engines.anomaly_eval import (
    AnomalyEvaluator,
    PostProcess,
    dice_at_best_threshold,
    fpr_tag,
    healthy_reference_intensity,
    healthy_thresholds,
    intensity_baseline_map,
    ranking_metrics,
    thresholds_from_scores,
)

SHAPE = (32, 32, 16)


def _brain(shape: tuple[int, int, int] = SHAPE, margin: int = 2) -> np.ndarray:
    b = np.zeros(shape, bool)
    b[margin:-margin, margin:-margin, :] = True
    return b


def _lesion(shape: tuple[int, int, int] = SHAPE, z: slice = slice(4, 10)) -> np.ndarray:
    les = np.zeros(shape, bool)
    les[10:20, 8:18, z] = True  # lesion only in some slices: the others are lesion-free
    return les


# ----------------------------------------------------------------------------------------------
# threshold-free metrics
# ----------------------------------------------------------------------------------------------


def test_ranking_metrics_match_sklearn_with_ties_and_weights() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.random(3000), 2).astype(np.float32)  # many ties
    y = rng.random(3000) < 0.05 + 0.4 * s
    w = rng.random(3000)
    r = ranking_metrics(s, y)
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r.auprc == pytest.approx(average_precision_score(y, s), abs=1e-12)
    rw = ranking_metrics(s, y, sample_weight=w)
    assert rw.auroc == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert rw.auprc == pytest.approx(average_precision_score(y, s, sample_weight=w), abs=1e-12)


def test_dice_best_equals_brute_force_on_tiny_case() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.integers(0, 6, size=25).astype(np.float32)  # ties on purpose
        y = rng.random(25) < 0.4
        if not y.any():
            continue
        brute = max(
            2 * np.sum((s > t) & y) / (np.sum(s > t) + y.sum()) for t in [*np.unique(s).tolist(), -np.inf]
        )
        dice, t_best = dice_at_best_threshold(s, y)
        assert dice == pytest.approx(brute, abs=1e-12)
        # the returned threshold reproduces it under the "score > threshold" rule
        assert 2 * np.sum((s > t_best) & y) / (np.sum(s > t_best) + y.sum()) == pytest.approx(dice)


def test_degenerate_cases_give_nan_not_errors() -> None:
    r = ranking_metrics(np.array([0.1, 0.5]), np.array([False, False]))  # no positives
    assert all(math.isnan(v) for v in (r.auroc, r.auprc, r.dice_best, r.threshold_best))
    r = ranking_metrics(np.array([0.1, 0.5]), np.array([True, True]))  # no negatives
    assert math.isnan(r.auroc) and r.auprc == 1.0 and r.dice_best == 1.0
    r = ranking_metrics(np.array([]), np.array([], bool))
    assert math.isnan(r.auprc) and r.n_pos == 0


# ----------------------------------------------------------------------------------------------
# the evaluator on constructed maps
# ----------------------------------------------------------------------------------------------


def test_perfect_map() -> None:
    brain, les = _brain(), _lesion()
    # healthy maps are all 0, so every threshold is 0 and "> 0" finds exactly the lesion
    thr = healthy_thresholds([np.zeros(SHAPE, np.float32)] * 2, [brain] * 2)
    ev = AnomalyEvaluator(thresholds=thr)
    ev.add("sub-01", "glioma", les.astype(np.float32), les, brain)
    ev.add("sub-02", "healthy", np.zeros(SHAPE), None, brain)
    m = ev.compute()
    assert m["pixel_auroc"] == 1.0 and m["pixel_auprc"] == 1.0
    assert m["dice_best"] == 1.0 and m["threshold_best"] == 0.0
    assert m["slice_auroc"] == 1.0 and m["slice_ap"] == 1.0
    for tag in ("fpr1", "fpr5", "fpr10"):
        assert m[f"dice_{tag}"] == 1.0 and m[f"false_alarm_rate_{tag}"] == 0.0
        assert m[f"slice_sensitivity_{tag}"] == 1.0 and m[f"test_pixel_fpr_{tag}"] == 0.0
    assert m["glioma/pixel_auprc"] == 1.0 and m["n_slices"] == 32 and m["n_lesion_slices"] == 6


def test_random_and_inverted_maps() -> None:
    shape = (48, 48, 48)
    brain = np.ones(shape, bool)
    les = np.zeros(shape, bool)
    les[:, :24, :10] = True
    prevalence = les.mean()
    rng = np.random.default_rng(2)
    ev = AnomalyEvaluator()
    ev.add("s1", "glioma", rng.random(shape, dtype=np.float32), les, brain)
    m = ev.compute()
    assert m["pixel_auroc"] == pytest.approx(0.5, abs=0.03)
    assert m["pixel_auprc"] == pytest.approx(prevalence, abs=0.02)

    inv = AnomalyEvaluator()
    inv.add("s1", "glioma", 1.0 - les, les, brain)
    m = inv.compute()
    assert m["pixel_auroc"] == 0.0
    assert m["pixel_auprc"] == pytest.approx(prevalence)  # all positives tied at the bottom


def test_noisy_map_dice_best_within_expected_bounds() -> None:
    shape = (48, 48, 24)
    brain = np.ones(shape, bool)
    les = np.zeros(shape, bool)
    les[8:32, 8:32, :] = True
    sigma = 0.35
    rng = np.random.default_rng(3)
    noisy = les + rng.normal(0, sigma, shape).astype(np.float32)
    ev = AnomalyEvaluator()
    ev.add("s1", "glioma", noisy, les, brain)
    m = ev.compute()
    # expected Dice at threshold t: 2 P q1 / (P q1 + N q0 + P) with q1, q0 the Gaussian tails
    p, n = les.sum(), (~les).sum()
    t = np.linspace(-0.5, 1.5, 4001)
    q1, q0 = norm.sf((t - 1) / sigma), norm.sf(t / sigma)
    expected = np.max(2 * p * q1 / (p * q1 + n * q0 + p))
    assert expected - 0.01 < m["dice_best"] < expected + 0.01
    assert 0.85 < m["dice_best"] < 0.95  # and the closed-form optimum itself is ~0.92 here
    assert 0.3 < m["threshold_best"] < 0.7


def test_pooled_and_per_volume_differ_as_hand_computed() -> None:
    # A: 20 pixels, a big easy lesion (10 pixels at 1.0, healthy at 0.0)
    # B: 20 pixels, a small hard lesion (2 pixels at 0.5) below 2 healthy pixels at 0.9
    shape = (20, 1, 1)
    brain = np.ones(shape, bool)
    les_a = np.zeros(shape, bool)
    les_a[:10] = True
    map_a = les_a.astype(np.float32)
    les_b = np.zeros(shape, bool)
    les_b[:2] = True
    map_b = np.zeros(shape, np.float32)
    map_b[:2] = 0.5
    map_b[2:4] = 0.9
    ev = AnomalyEvaluator()
    ev.add("A", "glioma", map_a, les_a, brain)
    row_b = ev.add("B", "glioma", map_b, les_b, brain)
    m = ev.compute()
    # B alone: AUROC = 16/18, AP = recall 1 reached at precision 2/4
    assert row_b["pixel_auroc"] == pytest.approx(8 / 9) and row_b["pixel_auprc"] == pytest.approx(0.5)
    assert m["pixel_auprc_per_volume_mean"] == pytest.approx((1 + 0.5) / 2)
    assert m["pixel_auroc_per_volume_mean"] == pytest.approx((1 + 8 / 9) / 2)
    # pooled: 12 positives, 28 negatives; 10 pos at 1.0, 2 neg at 0.9, 2 pos at 0.5, 26 neg at 0
    assert m["pixel_auprc"] == pytest.approx(10 / 12 * 1 + 2 / 12 * 12 / 14)
    assert m["pixel_auroc"] == pytest.approx((10 * 28 + 2 * 26) / (12 * 28))
    assert m["dice_best"] == pytest.approx(2 * 12 / (14 + 12)) and m["threshold_best"] == 0.0


def test_per_kind_metrics_and_healthy_as_negatives_for_every_kind() -> None:
    shape = (32, 32, 32)
    brain, les = np.ones(shape, bool), np.zeros(shape, bool)
    les[8:20, 8:20, 8:20] = True
    rng = np.random.default_rng(4)
    ev = AnomalyEvaluator()
    ev.add("g1", "glioma", les.astype(np.float32), les, brain)
    ev.add("m1", "meningioma", rng.random(shape, dtype=np.float32), les, brain)
    ev.add("h1", "healthy", 0.99 * rng.random(shape, dtype=np.float32), None, brain)
    m = ev.compute()
    assert m["glioma/pixel_auroc"] == 1.0 and m["glioma/pixel_auprc"] == 1.0
    assert m["meningioma/pixel_auroc"] == pytest.approx(0.5, abs=0.03)
    assert m["glioma/n_subjects"] == 2 and m["meningioma/n_subjects"] == 2  # + the healthy one
    assert "healthy/pixel_auprc" not in m
    assert 0.5 < m["pixel_auroc"] < 1.0


# ----------------------------------------------------------------------------------------------
# healthy thresholds, false alarms
# ----------------------------------------------------------------------------------------------


def test_healthy_thresholds_on_uniform_maps() -> None:
    rng = np.random.default_rng(5)
    brain = _brain()
    maps = (rng.random(SHAPE, dtype=np.float32) for _ in range(6))  # a generator is fine
    thr = healthy_thresholds(maps, [brain] * 6)
    assert set(thr) == {0.01, 0.05, 0.10}
    assert thr[0.05] == pytest.approx(0.95, abs=0.01)
    assert thr[0.01] == pytest.approx(0.99, abs=0.005) and thr[0.10] == pytest.approx(0.90, abs=0.01)
    fresh = rng.random((200_000,), dtype=np.float32)
    assert np.mean(fresh > thr[0.05]) == pytest.approx(0.05, abs=0.003)
    # order statistic: at most floor(fpr * n) scores are strictly above the threshold
    s = np.arange(100, dtype=np.float32)
    t = thresholds_from_scores(s, (0.05,))[0.05]
    assert np.sum(s > t) == 5


def test_realised_fpr_on_fresh_healthy_test_volumes() -> None:
    rng = np.random.default_rng(6)
    brain = _brain()
    thr = healthy_thresholds([rng.random(SHAPE, dtype=np.float32) for _ in range(4)], [brain] * 4)
    ev = AnomalyEvaluator(thresholds=thr)
    for i in range(3):
        ev.add(f"h{i}", "healthy", rng.random(SHAPE, dtype=np.float32), None, brain)
    m = ev.compute()
    assert m["test_pixel_fpr_fpr5"] == pytest.approx(0.05, abs=0.006)
    assert math.isnan(m["dice_fpr5"]) and math.isnan(m["pixel_auprc"])  # no lesion anywhere
    assert m["false_alarm_rate_fpr5"] == 1.0  # 784 pixels per slice: every slice has an alarm


def test_false_alarm_rate_counts_hot_pixels_on_lesion_free_slices() -> None:
    brain, les = _brain(), _lesion(z=slice(0, 4))  # slices 0-3 have a lesion, 4-15 do not
    m = np.zeros(SHAPE, np.float32)
    m[les] = 1.0
    for z in (5, 9, 12):  # one hot pixel on 3 of the 12 lesion-free slices
        m[25, 25, z] = 1.0
    thr = {0.05: 0.5}
    ev = AnomalyEvaluator(thresholds=thr)
    ev.add("s1", "glioma", m, les, brain)
    r = ev.compute()
    assert r["false_alarm_rate_fpr5"] == pytest.approx(3 / 12)
    assert r["slice_sensitivity_fpr5"] == 1.0 and r["dice_fpr5"] == pytest.approx(2 * 400 / (403 + 400))
    # the same single pixels are removed by the component filter: no false alarm left
    ev = AnomalyEvaluator(post=PostProcess(min_component=2), thresholds=thr)
    ev.add("s1", "glioma", m, les, brain)
    r = ev.compute()
    assert r["false_alarm_rate_fpr5"] == 0.0 and r["dice_fpr5"] == 1.0
    assert "components < 2 voxels removed" in r["post_processing"]


# ----------------------------------------------------------------------------------------------
# post-processing
# ----------------------------------------------------------------------------------------------


def test_erosion_shrinks_brain_by_r() -> None:
    brain = np.zeros(SHAPE, bool)
    brain[4:28, 6:26, 2:14] = True
    r = 2
    e2 = PostProcess(erode=r, dims=2).region(brain)
    expected = np.zeros(SHAPE, bool)
    expected[4 + r : 28 - r, 6 + r : 26 - r, 2:14] = True  # in-plane only
    assert np.array_equal(e2, expected)
    e3 = PostProcess(erode=r, dims=3).region(brain)
    expected[:, :, : 2 + r] = False
    expected[:, :, 14 - r :] = False
    assert np.array_equal(e3, expected)
    # same as a binary erosion with a Euclidean ball of radius r, on an irregular mask too
    rng = np.random.default_rng(7)
    blob = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(SHAPE), 2) > 0.5)
    zz, yy, xx = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
    ball = zz**2 + yy**2 + xx**2 <= r * r
    assert np.array_equal(PostProcess(erode=r, dims=3).region(blob), ndimage.binary_erosion(blob, ball))
    disk = ball[:, :, r : r + 1]
    assert np.array_equal(PostProcess(erode=r, dims=2).region(blob), ndimage.binary_erosion(blob, disk))


def test_median_filter_removes_salt_pixel_and_masks() -> None:
    brain = _brain()
    m = np.zeros(SHAPE, np.float32)
    m[15, 15, 8] = 10.0
    m[~brain] = 99.0  # background errors must not leak into the brain
    out, region = PostProcess(median=3).apply_map(m, brain)
    assert out[15, 15, 8] == 0.0 and out.max() == 0.0
    assert np.array_equal(region, brain)
    out, region = PostProcess(median=3, erode=1).apply_map(
        torch.from_numpy(m)[None], torch.from_numpy(brain)[None]
    )
    assert region.sum() < brain.sum() and (out[~region] == 0).all()


def test_small_component_removal() -> None:
    b = np.zeros(SHAPE, bool)
    b[2, 2, 2:5] = True  # 3 voxels
    b[10:16, 10:15, 5] = True  # 30 voxels
    out = PostProcess(min_component=10).apply_binary(b)
    assert out.sum() == 30 and not out[2, 2, 3]
    # a column through 10 slices: 30 voxels in 3D, but 3 per slice in-plane
    col = np.zeros(SHAPE, bool)
    col[20:23, 20, 0:10] = True
    assert PostProcess(min_component=5, dims=3).apply_binary(col).sum() == 30
    assert PostProcess(min_component=5, dims=2).apply_binary(col).sum() == 0


# ----------------------------------------------------------------------------------------------
# baseline, CSV, input handling, subsampling
# ----------------------------------------------------------------------------------------------


def test_intensity_baseline() -> None:
    rng = np.random.default_rng(8)
    brain, les = _brain(), _lesion()
    img = rng.normal(0, 0.1, SHAPE).astype(np.float32)
    img[les] += 1.0  # hyperintense lesion
    ref = healthy_reference_intensity([rng.normal(0, 0.1, SHAPE)], [brain])
    assert ref == pytest.approx(0.0, abs=0.01)
    for mode in ("image", "abs_dev"):
        ev = AnomalyEvaluator()
        ev.add("s1", "glioma", intensity_baseline_map(img, brain, mode=mode, reference=ref), les, brain)
        assert ev.compute()["pixel_auroc"] > 0.99
    hypo = -img  # a dark lesion: only the absolute deviation finds it
    ev = AnomalyEvaluator()
    ev.add("s1", "glioma", intensity_baseline_map(hypo, brain, mode="image"), les, brain)
    ev.add("s2", "glioma", intensity_baseline_map(hypo, brain, mode="abs_dev"), les, brain)
    rows = ev.per_subject_rows()
    assert rows[0]["pixel_auroc"] < 0.01 and rows[1]["pixel_auroc"] > 0.99


def test_per_subject_csv(tmp_path: Path) -> None:
    brain, les = _brain(), _lesion()
    ev = AnomalyEvaluator(thresholds={0.01: 0.9, 0.05: 0.5, 0.1: 0.2})
    ev.add("sub-001", "glioma", les.astype(np.float32), les, brain)
    ev.add("sub-002", "healthy", np.zeros(SHAPE), np.zeros(SHAPE), brain)
    ev.add("sub-003", "pituitary", np.zeros(SHAPE), les, brain)
    path = ev.write_csv(tmp_path / "out" / "per_subject.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["sub-001", "sub-002", "sub-003"]
    expected = ["subject", "kind", "brain_voxels", "lesion_voxels", "lesion_voxels_excluded"]
    expected += ["pixel_auprc", "pixel_auroc", "dice_fpr1", "dice_fpr5", "dice_fpr10"]
    expected += [
        "detected_voxels_fpr1",
        "detected_voxels_fpr5",
        "detected_voxels_fpr10",
        "score_max",
        "score_mean",
    ]
    assert list(rows[0]) == expected
    assert float(rows[0]["dice_fpr5"]) == 1.0 and int(rows[0]["lesion_voxels"]) == les.sum()
    assert rows[1]["pixel_auprc"] == "nan" and rows[1]["dice_fpr5"] == "nan"
    assert float(rows[2]["pixel_auroc"]) == 0.5 and float(rows[2]["dice_fpr5"]) == 0.0
    # nothing but numbers and the given subject/kind strings
    for r in rows:
        for k, v in r.items():
            if k not in ("subject", "kind"):
                float(v)
    assert sorted(p.name for p in path.parent.iterdir()) == ["per_subject.csv"]  # no temp file left


def test_input_validation() -> None:
    brain = _brain()
    ev = AnomalyEvaluator()
    ev.add("s1", "healthy", torch.zeros((1, *SHAPE)), None, torch.from_numpy(brain)[None])
    with pytest.raises(ValueError, match="already added"):
        ev.add("s1", "healthy", np.zeros(SHAPE), None, brain)
    with pytest.raises(ValueError, match="differ in shape"):
        ev.add("s2", "glioma", np.zeros(SHAPE), np.zeros((8, 8, 8)), brain)
    with pytest.raises(ValueError, match="lesion mask is not empty"):
        ev.add("s3", "healthy", np.zeros(SHAPE), _lesion(), brain)
    with pytest.raises(ValueError, match="NaN"):
        ev.add("s4", "glioma", np.full(SHAPE, np.nan), _lesion(), brain)
    with pytest.raises(ValueError, match="single channel"):
        ev.add("s5", "glioma", np.zeros((2, *SHAPE)), _lesion(), brain)
    with pytest.raises(ValueError):
        PostProcess(median=4)
    with pytest.raises(RuntimeError):
        AnomalyEvaluator().compute()
    assert [fpr_tag(f) for f in (0.01, 0.05, 0.1, 0.005)] == ["fpr1", "fpr5", "fpr10", "fpr0.5"]


def test_subsampled_curves_are_deterministic_and_close_to_exact() -> None:
    shape = (32, 32, 32)
    brain = np.ones(shape, bool)
    rng = np.random.default_rng(9)
    subjects = []
    for i in range(4):
        les = np.zeros(shape, bool)
        les[4 + i : 14 + i, 6:16, 8:20] = True
        subjects.append((f"s{i}", les + rng.normal(0, 0.6, shape).astype(np.float32), les))

    def run(max_pixels: int | None, order: list[int]) -> dict:
        ev = AnomalyEvaluator(max_pixels_for_curves=max_pixels)
        for i in order:
            s, m, les = subjects[i]
            ev.add(s, "glioma", m, les, brain)
        return ev.compute()

    exact = run(None, [0, 1, 2, 3])
    a = run(20_000, [0, 1, 2, 3])
    b = run(20_000, [3, 1, 0, 2])
    assert a["curve_pixels"] <= 20_000 + 2 and exact["curve_pixels"] == 4 * 32**3
    for k in ("pixel_auprc", "pixel_auroc", "dice_best"):
        assert a[k] == b[k]  # independent of the order of add()
        assert a[k] == pytest.approx(exact[k], abs=0.015)
    assert a["pixel_auprc_per_volume_mean"] == exact["pixel_auprc_per_volume_mean"]  # always exact


def test_lesion_outside_eroded_brain_is_excluded_and_reported() -> None:
    brain = _brain()  # x, y in [2, 30)
    les = np.zeros(SHAPE, bool)
    les[2, 10:14, 3] = True  # on the brain edge, slice 3 only: eroded away
    les[10:14, 10:14, 8] = True  # inside, slice 8
    m = les.astype(np.float32)
    ev = AnomalyEvaluator(post=PostProcess(erode=1), slice_score="mean")
    row = ev.add("s1", "meningioma", m, les, brain)
    r = ev.compute()
    assert row["lesion_voxels"] == 16 and row["lesion_voxels_excluded"] == 4
    assert row["brain_voxels"] == 26 * 26 * 16
    # slice 3 is neither a lesion slice (nothing evaluable) nor lesion-free: left out
    assert r["n_slices"] == 15 and r["n_lesion_slices"] == 1
    assert r["slice_auroc"] == 1.0 and r["pixel_auroc"] == 1.0


def test_healthy_thresholds_use_the_same_post_processing() -> None:
    rng = np.random.default_rng(10)
    brain = _brain()
    maps = [rng.random(SHAPE, dtype=np.float32) for _ in range(3)]
    post = PostProcess(median=3, erode=1)
    thr = healthy_thresholds(maps, [brain] * 3, fprs=(0.05,), post=post)
    pooled = np.concatenate([post.apply_map(m, brain)[0][post.region(brain)] for m in maps])
    assert np.mean(pooled > thr[0.05]) <= 0.05
    assert np.mean(pooled >= thr[0.05]) > 0.05
    # the median filter narrows the score distribution: its 95 % quantile is well below 0.95
    assert thr[0.05] < 0.8


def test_curve_points_known_answers():
    from engines.anomaly_eval import curve_points

    # perfect ranking: the ROC goes through (0, 1), precision is 1 up to recall 1
    c = curve_points([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])
    assert c["fpr"][0] == c["tpr"][0] == 0.0
    assert (0.0, 1.0) in set(zip(c["fpr"], c["tpr"], strict=True))
    assert c["fpr"][-1] == c["tpr"][-1] == 1.0
    # before the first false positive every operating point has precision 1
    assert all(p == 1.0 for p, f in zip(c["precision"], c["fpr"], strict=True) if f == 0.0)
    assert c["precision"][c["recall"].index(1.0)] == 1.0
    # unthinned points integrate to ranking_metrics' AUROC (trapezoids; ties count half)
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.2
    s = rng.normal(size=500) + y
    s[:50] = np.round(s[:50])  # ties
    c = curve_points(s, y, max_points=10_000)
    auc = np.trapezoid(c["tpr"], c["fpr"])
    assert auc == pytest.approx(ranking_metrics(s, y).auroc, abs=1e-12)
    # AP = sum over operating points of (R_n - R_{n-1}) P_n
    ap = float(np.sum(np.diff(c["recall"]) * np.asarray(c["precision"][1:])))
    assert ap == pytest.approx(ranking_metrics(s, y).auprc, abs=1e-12)
    # thinning keeps both ends and at most max_points per curve
    t = curve_points(s, y, max_points=20)
    assert len(t["fpr"]) <= 20 and t["fpr"][-1] == 1.0 and t["tpr"][-1] == 1.0
    # no positives: no curve
    assert curve_points([0.1, 0.2], [0, 0]) == {"fpr": [], "tpr": [], "recall": [], "precision": []}
    with pytest.raises(ValueError, match="max_points"):
        curve_points([0.1], [1], max_points=1)


def test_evaluator_curves_match_pooled_metrics():
    ev = AnomalyEvaluator(PostProcess(erode=0, median=0, min_component=0))
    rng = np.random.default_rng(1)
    brain = np.ones((8, 8, 4), bool)
    for i in range(3):
        lesion = np.zeros_like(brain)
        lesion[2:4, 2:4, 1:3] = i > 0
        amap = rng.random(brain.shape).astype(np.float32) + lesion
        ev.add(f"s{i}", "glioma" if i else "healthy", amap, lesion if i else None, brain)
    c = ev.curves(max_points=100_000)
    res = ev.compute()
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(res["pixel_auroc"], abs=1e-9)


def _cohort(rng: np.random.Generator, gain: float) -> list[tuple[str, str, np.ndarray, np.ndarray | None]]:
    """Four lesion and three healthy volumes; the map is lesion * gain + noise."""
    out = []
    for i in range(7):
        les = _lesion(z=slice(3 + i % 3, 9 + i % 3)) if i < 4 else None
        m = rng.normal(0, 1, SHAPE).astype(np.float32)
        if les is not None:
            m = m + gain * les
        out.append((f"s{i}", "glioma" if i < 4 else "healthy", np.round(m, 3), les))
    return out


def test_bootstrap_statistics_at_multiplicity_one_reproduce_compute() -> None:
    from engines.bootstrap import paired_difference, subject_resamples

    rng = np.random.default_rng(11)
    ev = AnomalyEvaluator(thresholds={0.05: 1.5})
    for s, k, m, les in _cohort(rng, 1.5):
        ev.add(s, k, m, les, _brain())
    assert ev.subjects == [f"s{i}" for i in range(7)] and ev.kinds == ["glioma"] * 4 + ["healthy"] * 3
    res = ev.compute()
    stats = ev.bootstrap_statistics(max_bins=None)  # exact: the same numbers as compute()
    ones = np.ones(7)
    for metric in ("pixel_auprc", "pixel_auroc", "slice_auroc", "dice_fpr5"):
        assert float(stats[metric](ones)) == pytest.approx(res[metric], abs=1e-9), metric
    # a replicate that draws s0 twice and s4 once is the evaluator on those volumes
    ev2 = AnomalyEvaluator(thresholds={0.05: 1.5})
    coh = _cohort(np.random.default_rng(11), 1.5)
    for tag, (s, k, m, les) in (("a", coh[0]), ("b", coh[0]), ("c", coh[4])):
        ev2.add(s + tag, k, m, les, _brain())
    w = np.zeros(7)
    w[0], w[4] = 2, 1
    r2 = ev2.compute()
    for metric in ("pixel_auprc", "slice_auroc", "dice_fpr5"):
        assert float(stats[metric](w)) == pytest.approx(r2[metric], abs=1e-9), metric
    # binned (default) pixel metrics stay within 0.005 of the exact ones
    binned = ev.bootstrap_statistics(max_bins=256)
    assert float(binned["pixel_auprc"](ones)) == pytest.approx(res["pixel_auprc"], abs=0.005)
    # paired difference of the evaluator with itself: exactly zero
    draws = subject_resamples(7, 200, ev.kinds, seed=0)
    d = paired_difference(stats["pixel_auprc"], stats["pixel_auprc"], draws)
    assert (d.low, d.high) == (0.0, 0.0)


def test_bootstrap_weights_undo_the_pixel_subsampling() -> None:
    rng = np.random.default_rng(12)
    coh = _cohort(rng, 2.0)
    exact, sub = AnomalyEvaluator(), AnomalyEvaluator(max_pixels_for_curves=20_000)
    for s, k, m, les in coh:
        exact.add(s, k, m, les, _brain())
        sub.add(s, k, m, les, _brain())
    r = sub.compute()
    st = sub.bootstrap_statistics(max_bins=None)
    assert float(st["pixel_auprc"](np.ones(7))) == pytest.approx(r["pixel_auprc"], abs=1e-9)
    assert float(st["pixel_auprc"](np.ones(7))) == pytest.approx(exact.compute()["pixel_auprc"], abs=0.02)
