"""Split conformal prediction sets on cached probabilities: known answers, the marginal coverage
guarantee, and MAPIE as an independent cross-check (engines/conformal.py)."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from engines.conformal import (
    CachedProbaClassifier,
    conformal_report,
    conformal_sets,
    conformal_threshold,
    conformity_scores,
    mapie_conformal_sets,
    prediction_sets,
    set_metrics,
)

SCORES = ("lac", "aps", "raps")
# MAPIE warns when a class is missing from the calibration labels; the constructed cases do that on purpose
_MAPIE_FEW_LABELS = "ignore:WARNING. your conformalization dataset has less labels:UserWarning"
ALPHAS = (0.1, 0.05)


def _synthetic(
    n: int, k: int = 6, seed: int = 0, concentration: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet probabilities and labels drawn from them: a calibrated classifier, exchangeable items."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, concentration), size=n)
    p = np.clip(p, 1e-12, None)  # Dirichlet(0.5) underflows to exact zeros now and then
    p /= p.sum(axis=1, keepdims=True)
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return p, np.minimum(y, k - 1)


def _mapie():
    return pytest.importorskip("mapie", reason="MAPIE (mapie>=1,<2) is the cross-check")


class _NoJitter(np.random.RandomState):
    """MAPIE subtracts ``uniform() * p_y`` from every APS/RAPS calibration score; zeros give the
    non-randomised scores, so MAPIE's sets can be compared with ours exactly."""

    def uniform(self, low=0.0, high=1.0, size=None):  # type: ignore[override]
        return np.zeros(size)


# ----------------------------------------------------------------------------------------------
# threshold
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "alpha", "k"),
    [
        (19, 0.1, 18),  # ceil(20 * 0.9) = 18: not the 19th (empirical 0.9 quantile would give 17.1)
        (20, 0.1, 19),  # ceil(21 * 0.9) = ceil(18.9)
        (9, 0.1, 9),  # the smallest n with a finite threshold: the largest score
        (39, 0.05, 38),  # ceil(40 * 0.95)
        (100, 0.05, 96),  # ceil(101 * 0.95) = ceil(95.95)
        (4, 0.5, 3),  # ceil(5 * 0.5) = ceil(2.5)
    ],
)
def test_threshold_is_the_finite_sample_order_statistic(n: int, alpha: float, k: int) -> None:
    scores = np.random.default_rng(n).permutation(np.arange(1, n + 1)).astype(float)
    assert conformal_threshold(scores, alpha) == k
    assert k == math.ceil((n + 1) * (1 - alpha) - 1e-9)


def test_threshold_with_ties_is_still_an_order_statistic() -> None:
    scores = np.array([0.3, 0.1, 0.3, 0.3, 0.2, 0.9, 0.1, 0.3, 0.5])  # n = 9, alpha = 0.3: 7th value
    assert conformal_threshold(scores, 0.3) == np.sort(scores)[6] == 0.3


def test_threshold_too_few_points_says_infinite() -> None:
    assert conformal_threshold(np.arange(9.0), 0.1) == 8.0
    with pytest.raises(ValueError, match=r"too few calibration points.*infinite.*1/alpha - 1 = 9"):
        conformal_threshold(np.arange(8.0), 0.1)
    with pytest.raises(ValueError, match="too few calibration points"):
        conformal_sets(*_synthetic(18), _synthetic(5)[0], alpha=0.05)


# ----------------------------------------------------------------------------------------------
# constructed cases with known answers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORES)
def test_perfect_classifier_gives_singletons(score: str) -> None:
    rng = np.random.default_rng(0)
    cal_y, test_y = rng.integers(0, 4, 50), rng.integers(0, 4, 30)
    cal_p, test_p = np.eye(4)[cal_y], np.eye(4)[test_y]
    sets = conformal_sets(cal_p, cal_y, test_p, 0.1, score)
    np.testing.assert_array_equal(sets, np.eye(4, dtype=bool)[test_y])
    m = set_metrics(sets, test_y)
    assert m["coverage"] == 1.0 and m["mean_set_size"] == 1.0 and m["empty_set_rate"] == 0.0


def test_lac_known_answer() -> None:
    # calibration scores 1 - p_y = 0.1, 0.2, ..., 0.9 (n = 9): at alpha = 0.2 the threshold is the
    # ceil(10 * 0.8) = 8th smallest, 0.8, so a class is in the set when its probability is >= 0.2
    s = np.arange(1, 10) / 10
    cal_p = np.stack([1 - s, s], axis=1)
    cal_y = np.zeros(9, int)
    assert conformal_threshold(conformity_scores(cal_p, cal_y, "lac"), 0.2) == pytest.approx(0.8)
    test_p = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.15, 0.85]])
    sets = conformal_sets(cal_p, cal_y, test_p, 0.2, "lac")
    np.testing.assert_array_equal(sets, [[True, False], [True, True], [True, True], [False, True]])


def test_aps_and_raps_known_answer() -> None:
    p = np.array([[0.5, 0.3, 0.15, 0.05]])  # cumulative 0.5, 0.8, 0.95, 1.0
    assert conformity_scores(p, [2], "aps") == pytest.approx([0.95])
    # RAPS, k_reg = 1, lam = 0.1: the class at rank 3 pays 0.1 * (3 - 1)
    assert conformity_scores(p, [2], "raps", k_reg=1, lam=0.1) == pytest.approx([1.15])
    # threshold 0.7: rank 2 (cumulative 0.8) is the first to reach it and is included
    np.testing.assert_array_equal(prediction_sets(p, 0.7, "aps"), [[True, True, False, False]])
    np.testing.assert_array_equal(
        prediction_sets(p, 0.7, "aps", include_last=False), [[True, False, False, False]]
    )
    np.testing.assert_array_equal(
        prediction_sets(p, 0.8, "aps", include_last=False), [[True, True, False, False]]
    )
    # regularised cumulative 0.5, 0.9, 1.15, 1.3
    np.testing.assert_array_equal(
        prediction_sets(p, 0.85, "raps", k_reg=1, lam=0.1), [[True, True, False, False]]
    )
    np.testing.assert_array_equal(
        prediction_sets(p, 1.0, "raps", k_reg=1, lam=0.1), [[True, True, True, False]]
    )
    np.testing.assert_array_equal(prediction_sets(p, 1.0, "aps"), [[True, True, True, True]])
    # a tie at the boundary: classes 1 and 2 are both in, whichever of them is ranked 2nd
    np.testing.assert_array_equal(
        prediction_sets(np.array([[0.4, 0.3, 0.3]]), 0.6, "aps"), [[True, True, True]]
    )


def test_set_metrics_per_class_constructed() -> None:
    sets = np.array(
        [
            [True, False, False],  # y=0 covered, size 1
            [True, True, False],  # y=0 covered, size 2
            [False, True, False],  # y=0 missed, size 1
            [True, False, True],  # y=0 covered, size 2
            [False, True, True],  # y=1 covered, size 2
            [False, False, False],  # y=1 missed, empty
        ]
    )
    labels = np.array([0, 0, 0, 0, 1, 1])
    m = set_metrics(sets, labels, num_classes=3)
    assert m["coverage"] == pytest.approx(4 / 6)
    assert m["coverage/class_0"] == pytest.approx(0.75)
    assert m["coverage/class_1"] == pytest.approx(0.5)
    assert math.isnan(m["coverage/class_2"]) and math.isnan(m["mean_set_size/class_2"])
    assert m["min_class_coverage"] == pytest.approx(0.5)
    assert m["mean_set_size"] == pytest.approx(8 / 6)
    assert m["mean_set_size/class_0"] == pytest.approx(1.5)
    assert m["mean_set_size/class_1"] == pytest.approx(1.0)
    assert m["empty_set_rate"] == pytest.approx(1 / 6)
    assert m["singleton_rate"] == pytest.approx(2 / 6)
    assert [m[f"set_size_rate/{s}"] for s in range(4)] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 0.0])


# ----------------------------------------------------------------------------------------------
# properties on synthetic data
# ----------------------------------------------------------------------------------------------


def test_marginal_coverage_over_random_splits() -> None:
    p, y = _synthetic(2000, seed=1)
    n_cal, splits = 500, 60
    rng = np.random.default_rng(2)
    variants = [("lac", {}), ("aps", {}), ("raps", {}), ("aps", {"include_last": False})]
    variants.append(("raps", {"include_last": False, "k_reg": 2, "lam": 0.05}))
    cov: dict[tuple[int, float], list[float]] = {(i, a): [] for i in range(len(variants)) for a in ALPHAS}
    for _ in range(splits):
        perm = rng.permutation(len(y))
        cal, test = perm[:n_cal], perm[n_cal:]
        for i, (score, kw) in enumerate(variants):
            for a in ALPHAS:
                sets = conformal_sets(p[cal], y[cal], p[test], a, score, **kw)
                cov[(i, a)].append(set_metrics(sets, y[test])["coverage"])
    for i, (score, kw) in enumerate(variants):
        for a in ALPHAS:
            mean = float(np.mean(cov[(i, a)]))
            assert mean >= 1 - a - 0.01, (score, kw, a, mean)  # the marginal guarantee (>= 1 - alpha)
            if score == "lac" or kw.get("include_last") is False:
                # {y : S <= tau} is tight: E[coverage] = k / (n + 1) <= 1 - alpha + 1 / (n + 1)
                assert mean <= 1 - a + 1 / (n_cal + 1) + 0.01, (score, kw, a, mean)
            else:
                # the crossing class makes the default APS/RAPS conservative, never anti-conservative
                assert mean <= 1.0


@pytest.mark.parametrize("score", SCORES)
def test_sets_are_nested_as_alpha_decreases(score: str) -> None:
    p, y = _synthetic(1500, seed=3)
    sets = [conformal_sets(p[:700], y[:700], p[700:], a, score) for a in (0.3, 0.2, 0.1, 0.05, 0.01)]
    for small, large in itertools.pairwise(sets):
        assert (small <= large).all()  # a set at a larger alpha is a subset of the one at a smaller alpha
    assert sets[-1].sum() > sets[0].sum()


def test_raps_with_lambda_zero_equals_aps() -> None:
    p, y = _synthetic(800, seed=4)
    for k_reg in (0, 1, 3):
        np.testing.assert_array_equal(
            conformity_scores(p, y, "raps", k_reg=k_reg, lam=0.0), conformity_scores(p, y, "aps")
        )
        for a in ALPHAS:
            np.testing.assert_array_equal(
                conformal_sets(p[:400], y[:400], p[400:], a, "raps", k_reg=k_reg, lam=0.0),
                conformal_sets(p[:400], y[:400], p[400:], a, "aps"),
            )
    # and the penalty does shrink sets: a check that lam reaches the computation at all
    big = conformal_sets(p[:400], y[:400], p[400:], 0.1, "aps").sum()
    assert conformal_sets(p[:400], y[:400], p[400:], 0.1, "raps", k_reg=1, lam=0.2).sum() < big


def test_aps_raps_never_empty_lac_can_be() -> None:
    p, y = _synthetic(1000, seed=5, concentration=1.0)
    for a in (0.5, 0.3, *ALPHAS):
        for score in ("aps", "raps"):
            sets = conformal_sets(p[:500], y[:500], p[500:], a, score)
            assert set_metrics(sets, y[500:])["empty_set_rate"] == 0.0
    # the contrast that makes the check meaningful: at a large alpha LAC does leave sets empty
    lac = conformal_sets(p[:500], y[:500], p[500:], 0.5, "lac")
    assert set_metrics(lac, y[500:])["empty_set_rate"] > 0.0


def test_report_keys_and_values() -> None:
    p, y = _synthetic(900, seed=6, k=3)
    r = conformal_report(p[:400], y[:400], p[400:], y[400:], score_kwargs={"raps": {"lam": 0.0}})
    for score in SCORES:
        for a, tag in zip(ALPHAS, ("alpha0.1", "alpha0.05"), strict=True):
            m = set_metrics(
                conformal_sets(
                    p[:400], y[:400], p[400:], a, score, **({"lam": 0.0} if score == "raps" else {})
                ),
                y[400:],
            )
            for key, value in m.items():
                got = r[f"{score}/{tag}/{key}"]
                assert got == value or (math.isnan(got) and math.isnan(value))
            assert r[f"{score}/{tag}/threshold"] == conformal_threshold(
                conformity_scores(p[:400], y[:400], score, **({"lam": 0.0} if score == "raps" else {})), a
            )
    assert r["raps/alpha0.1/mean_set_size"] == r["aps/alpha0.1/mean_set_size"]  # lam = 0 reached RAPS
    assert r["n_calibration"] == 400 and r["n_test"] == 500
    assert all(isinstance(v, float) for v in r.values())


# ----------------------------------------------------------------------------------------------
# MAPIE cross-check
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(_MAPIE_FEW_LABELS)
def test_mapie_quantile_is_the_finite_sample_order_statistic() -> None:
    """MAPIE has had an off-by-one quantile (MAPIE PR #973): count the calibration items whose own
    class falls inside MAPIE's LAC threshold; with distinct scores that count is the order statistic."""
    _mapie()
    rng = np.random.default_rng(7)
    for n in range(10, 70, 3):
        s = rng.permutation(np.arange(1, n + 1)) / (n + 1)  # distinct LAC scores, 1 - p_0
        cal_p = np.stack([1 - s, s], axis=1)
        cal_y = np.zeros(n, int)
        for a in (0.1, 0.05, 0.2, 0.33):
            if n < 1 / a:  # MAPIE's own minimum (see the next test)
                continue
            sets, _ = mapie_conformal_sets(cal_p, cal_y, cal_p, a, "lac")
            k = math.ceil((n + 1) * (1 - a) - 1e-9)
            assert int(sets[:, 0].sum()) == k, (n, a)
            assert conformal_threshold(s, a) == np.sort(s)[k - 1]
            np.testing.assert_array_equal(conformal_sets(cal_p, cal_y, cal_p, a, "lac"), sets)


@pytest.mark.filterwarnings(_MAPIE_FEW_LABELS)
def test_mapie_refuses_the_smallest_valid_calibration_set() -> None:
    """A documented difference: n = 1/alpha - 1 gives a finite threshold (the largest score); MAPIE
    asks for n >= 1/alpha."""
    _mapie()
    p, y = _synthetic(20, seed=8)
    assert conformal_sets(p[:9], y[:9], p[9:], 0.1, "lac").shape == (11, 6)
    with pytest.raises(ValueError, match="too low"):
        mapie_conformal_sets(p[:9], y[:9], p[9:], 0.1, "lac")


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mapie_agrees_lac_and_aps(alpha: float) -> None:
    _mapie()
    p, y = _synthetic(1600, seed=9)
    cal, test = slice(0, 600), slice(600, None)
    lac, _ = mapie_conformal_sets(p[cal], y[cal], p[test], alpha, "lac")
    assert (lac == conformal_sets(p[cal], y[cal], p[test], alpha, "lac")).all(axis=1).mean() == 1.0
    aps, _ = mapie_conformal_sets(p[cal], y[cal], p[test], alpha, "aps", random_state=_NoJitter(0))
    assert (aps == conformal_sets(p[cal], y[cal], p[test], alpha, "aps")).all(axis=1).mean() == 1.0


def test_mapie_agrees_raps_with_its_tuned_parameters() -> None:
    """MAPIE tunes k_reg and lambda on a random 20 % of the calibration data; with those values and
    the remaining 80 % our RAPS gives the same sets."""
    _mapie()
    p, y = _synthetic(1600, seed=10)
    n = 800
    for alpha in ALPHAS:
        sets, fitted = mapie_conformal_sets(p[:n], y[:n], p[n:], alpha, "raps", random_state=_NoJitter(1))
        score = fitted._mapie_classifier.conformity_score_function_  # MAPIE 1.x internals
        kept = np.setdiff1d(np.arange(n), score.X_raps[:, 0].astype(int))
        k_reg = int(np.ravel(score.k_star)[0])
        lam = float(np.ravel(score.lambda_star)[0])
        ours = conformal_sets(p[kept], y[kept], p[n:], alpha, "raps", k_reg=k_reg, lam=lam)
        assert (ours == sets).all(axis=1).mean() == 1.0, (alpha, k_reg, lam)


def test_mapie_randomised_aps_scores_differ_by_the_jitter() -> None:
    """The exact known difference of MAPIE's default APS: each calibration score is ours minus
    U * p_y with U uniform in [0, 1)."""
    _mapie()
    p, y = _synthetic(300, seed=11)
    _, fitted = mapie_conformal_sets(p[:200], y[:200], p[200:], 0.1, "aps", random_state=0)
    theirs = np.ravel(fitted.conformity_scores)
    ours = conformity_scores(p[:200], y[:200], "aps")
    u = (ours - theirs) / p[np.arange(200), y[:200]]
    assert (u >= -1e-9).all() and (u <= 1 + 1e-9).all()
    assert np.ptp(u) > 0.5  # genuinely random, not a constant shift


def test_cached_classifier_returns_rows() -> None:
    p, _ = _synthetic(10, k=3, seed=12)
    est = CachedProbaClassifier(p).fit(None)
    np.testing.assert_array_equal(est.predict_proba(np.array([[3], [0]])), p[[3, 0]])
    np.testing.assert_array_equal(est.predict(np.array([[5]])), [p[5].argmax()])
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])


def test_mapie_is_not_imported_at_module_level() -> None:
    # engines/__init__.py imports eagerly: mapie (and through it sklearn) must only load on use
    tree = ast.parse((Path(__file__).resolve().parents[2] / "engines" / "conformal.py").read_text())
    top = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
    top += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not [m for m in top if m.split(".")[0] in ("mapie", "sklearn")]


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_errors() -> None:
    p, y = _synthetic(60, k=3, seed=13)
    with pytest.raises(ValueError, match=r"sum to 1.*row 0 sums to 2"):
        conformal_sets(p * 2, y, p, 0.1)
    with pytest.raises(ValueError, match="not logits"):
        conformal_sets(p, y, np.abs(np.log(p)), 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        conformal_sets(np.array([[1.5, -0.5]] * 30), np.zeros(30, int), p[:, :2], 0.1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*got 3"):
        conformal_sets(p, np.where(y == 0, 3, y), p, 0.1)
    with pytest.raises(ValueError, match="integer class indices"):
        conformal_sets(p, y + 0.5, p, 0.1)
    with pytest.raises(ValueError, match="expected 60 labels"):
        conformal_sets(p, y[:-1], p, 0.1)
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            conformal_sets(p, y, p, bad)
    with pytest.raises(ValueError, match="score must be one of"):
        conformal_sets(p, y, p, 0.1, "thr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'lac' takes no parameters.*k_reg"):
        conformal_sets(p, y, p, 0.1, "lac", k_reg=2)
    with pytest.raises(ValueError, match="lam must be a number >= 0"):
        conformal_sets(p, y, p, 0.1, "raps", lam=-1.0)
    with pytest.raises(ValueError, match="k_reg must be an integer"):
        conformal_sets(p, y, p, 0.1, "raps", k_reg=1.5)
    with pytest.raises(ValueError, match="test_probs has 2 classes"):
        conformal_sets(p, y, p[:, :2] / p[:, :2].sum(1, keepdims=True), 0.1)
    with pytest.raises(ValueError, match="bool array"):
        set_metrics(np.ones((3, 2)), [0, 1, 0])
    with pytest.raises(ValueError, match="num_classes=3"):
        set_metrics(np.ones((3, 2), bool), [0, 1, 0], num_classes=3)
    with pytest.raises(ValueError, match="score_kwargs for scores not in"):
        conformal_report(p, y, p, y, scores=("lac",), score_kwargs={"raps": {"lam": 0.1}})
