"""The subject-level bootstrap on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from engines.anomaly_eval import ranking_metrics
from engines.bootstrap import (
    RankingHistograms,
    bootstrap_interval,
    paired_difference,
    percentile_interval,
    subject_resamples,
    weighted_mean,
    weighted_ratio,
)


def test_resamples_keep_every_stratum_size_and_draw_each_subject_uniformly():
    strata = ["healthy"] * 6 + ["glioma"] * 3 + ["meningioma"]
    m = subject_resamples(len(strata), n_boot=4000, strata=strata, seed=1)
    assert m.shape == (4000, 10)
    assert (m.sum(axis=1) == 10).all()
    assert (m[:, :6].sum(axis=1) == 6).all() and (m[:, 6:9].sum(axis=1) == 3).all()
    assert (m[:, 9] == 1).all()  # a stratum of one is always drawn once
    # a subject's multiplicity in a stratum of k is Binomial(k, 1/k): mean 1, variance 1 - 1/k
    assert m[:, :6].mean() == pytest.approx(1.0, abs=0.03)
    assert m[:, :6].var() == pytest.approx(1 - 1 / 6, rel=0.06)
    # the same seed gives the same draws (a report can be reproduced)
    assert (subject_resamples(10, 50, strata, seed=1) == subject_resamples(10, 50, strata, seed=1)).all()


def test_resamples_reject_bad_arguments_with_the_fault():
    with pytest.raises(ValueError, match="at least one subject"):
        subject_resamples(0)
    with pytest.raises(ValueError, match="n_boot"):
        subject_resamples(3, n_boot=0)
    with pytest.raises(ValueError, match="2 labels for 3 subjects"):
        subject_resamples(3, strata=["a", "b"])


def test_interval_of_a_mean_matches_the_normal_theory_interval():
    """For the mean of n i.i.d. normal values the bootstrap distribution is close to N(xbar, s_n^2 / n)
    (s_n: the plug-in SD); with 20,000 replicates the percentile bounds' Monte-Carlo error is about 0.02 SE, so
    a tolerance of 0.1 SE is five of those."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=400)
    m = subject_resamples(x.size, n_boot=20000, seed=2)
    iv = bootstrap_interval(weighted_mean(x), m)
    se = x.std() / math.sqrt(x.size)  # plug-in SD: what the bootstrap estimates
    assert iv.point == pytest.approx(x.mean(), abs=1e-12)
    assert iv.low == pytest.approx(x.mean() - 1.959964 * se, abs=0.1 * se)
    assert iv.high == pytest.approx(x.mean() + 1.959964 * se, abs=0.1 * se)
    assert iv.n_boot == 20000 and iv.n_undefined == 0 and iv.level == 0.95


def test_paired_difference_of_a_method_with_itself_is_exactly_zero():
    rng = np.random.default_rng(3)
    x = rng.random(30)
    m = subject_resamples(30, n_boot=500, seed=4)
    d = paired_difference(weighted_mean(x), weighted_mean(x), m)
    assert (d.point, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.p_le_zero == 1.0 and not d.resolved


def test_paired_difference_of_a_constant_shift_is_the_shift_while_the_unpaired_intervals_overlap():
    """B scores every subject exactly 0.05 below A, and the subjects vary by much more than that: every paired
    replicate differs by 0.05 (resolved), though the two methods' own intervals overlap widely."""
    rng = np.random.default_rng(5)
    a = rng.uniform(0.3, 0.9, size=25)
    b = a - 0.05
    m = subject_resamples(25, n_boot=2000, seed=6)
    d = paired_difference(weighted_mean(a), weighted_mean(b), m)
    assert d.point == pytest.approx(0.05, abs=1e-12)
    assert d.low == pytest.approx(0.05, abs=1e-12) and d.high == pytest.approx(0.05, abs=1e-12)
    assert d.resolved and d.p_le_zero == 0.0
    ia, ib = bootstrap_interval(weighted_mean(a), m), bootstrap_interval(weighted_mean(b), m)
    assert ib.high > ia.low  # unpaired, the difference would not look resolved


def test_weighted_ratio_is_the_pooled_rate_and_counts_a_subject_as_often_as_drawn():
    correct, items = np.array([9.0, 1.0, 5.0]), np.array([10.0, 10.0, 5.0])
    stat = weighted_ratio(correct, items)
    assert stat(np.ones(3)) == pytest.approx(15 / 25)
    assert stat(np.array([2.0, 0.0, 1.0])) == pytest.approx((18 + 5) / (20 + 5))
    assert math.isnan(float(weighted_ratio([0.0], [0.0])(np.ones(1))))
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_ratio([1.0, 2.0], [1.0])


def test_weighted_mean_leaves_undefined_subjects_out():
    stat = weighted_mean([0.2, math.nan, 0.6])
    assert stat(np.ones(3)) == pytest.approx(0.4)
    assert stat(np.array([0.0, 3.0, 1.0])) == pytest.approx(0.6)
    assert math.isnan(float(stat(np.array([0.0, 3.0, 0.0]))))


def _subjects(rng: np.random.Generator, n: int, size: int = 300) -> tuple[list[np.ndarray], list[np.ndarray]]:
    scores, labels = [], []
    for i in range(n):
        y = rng.random(size) < (0.0 if i % 3 == 0 else 0.05)
        s = rng.normal(0, 1, size) + 1.5 * y
        scores.append(np.round(s, 2))  # ties across and within subjects
        labels.append(y)
    return scores, labels


def test_exact_histograms_equal_the_pooled_metrics_and_sklearn():
    rng = np.random.default_rng(7)
    scores, labels = _subjects(rng, 9)
    h = RankingHistograms(scores, labels, max_bins=None)
    assert h.exact
    s, y = np.concatenate(scores), np.concatenate(labels)
    rm = ranking_metrics(s, y)
    assert h.auroc(np.ones(9)) == pytest.approx(rm.auroc, abs=1e-12)
    assert h.average_precision(np.ones(9)) == pytest.approx(rm.auprc, abs=1e-12)
    assert h.auroc(np.ones(9)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert h.average_precision(np.ones(9)) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # a replicate drawing subject 1 twice and 2 once equals the metric of those items pooled
    w = np.zeros(9)
    w[1], w[2] = 2, 1
    s3 = np.concatenate([scores[1], scores[1], scores[2]])
    y3 = np.concatenate([labels[1], labels[1], labels[2]])
    assert h.auroc(w) == pytest.approx(roc_auc_score(y3, s3), abs=1e-12)
    assert h.average_precision(w) == pytest.approx(average_precision_score(y3, s3), abs=1e-12)
    # scale invariance: drawing everyone twice changes nothing; a batch of replicates is row by row
    batch = np.stack([np.ones(9), 2 * np.ones(9), w])
    assert np.allclose(h.auroc(batch), [rm.auroc, rm.auroc, roc_auc_score(y3, s3)], atol=1e-12)


def test_weights_enter_as_counts():
    rng = np.random.default_rng(8)
    scores, labels = _subjects(rng, 4)
    weights = [np.full(s.shape, 3.0) for s in scores]
    a = RankingHistograms(scores, labels, weights, max_bins=None)
    b = RankingHistograms(scores, labels, max_bins=None)
    assert a.average_precision(np.ones(4)) == pytest.approx(b.average_precision(np.ones(4)), abs=1e-12)
    s, y = np.concatenate(scores), np.concatenate(labels)
    wpos = [np.where(lab, 2.0, 1.0) for lab in labels]
    c = RankingHistograms(scores, labels, wpos, max_bins=None)
    assert c.auroc(np.ones(4)) == pytest.approx(ranking_metrics(s, y, np.where(y, 2.0, 1.0)).auroc, abs=1e-12)


def test_binned_histograms_stay_close_to_the_exact_metrics():
    """Continuous scores, 60,000 items, 512 bins split between the classes' quantiles: the binned AP and AUROC
    are within 0.005 of the exact values (a tie within a bin only moves points inside one small step)."""
    rng = np.random.default_rng(9)
    scores, labels = [], []
    for _ in range(20):
        y = rng.random(3000) < 0.01
        scores.append(rng.normal(0, 1, 3000) + 2.0 * y)
        labels.append(y)
    h = RankingHistograms(scores, labels, max_bins=512)
    assert not h.exact and h.edges.size <= 512
    rm = ranking_metrics(np.concatenate(scores), np.concatenate(labels))
    assert h.average_precision(np.ones(20)) == pytest.approx(rm.auprc, abs=0.005)
    assert h.auroc(np.ones(20)) == pytest.approx(rm.auroc, abs=0.005)


def test_undefined_replicates_are_counted_not_averaged():
    """Subjects 0 and 1 have no positive item: a replicate drawing only them has no AP."""
    scores = [np.array([0.1, 0.2]), np.array([0.3, 0.4]), np.array([0.9, 0.1])]
    labels = [np.array([False, False]), np.array([False, False]), np.array([True, False])]
    h = RankingHistograms(scores, labels, max_bins=None)
    m = np.array([[1, 1, 1], [2, 1, 0], [0, 0, 3]])
    ap = h.average_precision(m)
    assert ap[0] == pytest.approx(1.0) and math.isnan(ap[1]) and ap[2] == pytest.approx(1.0)
    iv = percentile_interval(1.0, ap)
    assert iv.n_boot == 2 and iv.n_undefined == 1


def test_bad_histogram_input_names_the_subject():
    with pytest.raises(ValueError, match="subject 1: scores, labels"):
        RankingHistograms([np.zeros(2), np.zeros(3)], [np.zeros(2, bool), np.zeros(2, bool)])
    with pytest.raises(ValueError, match="subject 0: scores contain NaN"):
        RankingHistograms([np.array([np.nan])], [np.array([True])])
    h = RankingHistograms([np.zeros(2)], [np.array([True, False])])
    with pytest.raises(ValueError, match="multiplicities for 2 subjects"):
        h.auroc(np.ones(2))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(0.0, np.zeros(3), level=1.0)


def test_interval_description_and_dict():
    iv = percentile_interval(0.5, np.array([0.4, 0.5, 0.6]))
    # numpy's linear interpolation: the 2.5th percentile of three values is 0.4 + 0.05 * 0.1
    assert iv.describe(3) == "0.500 [0.405, 0.595]"
    assert iv.as_dict()["low"] == pytest.approx(0.405) and iv.resolved
