"""Split conformal prediction sets for image classifiers, from cached class probabilities.

A classifier's softmax outputs on a held-out *calibration* set (``(n, K)`` probabilities and the
true labels) turn its outputs on a *test* set into prediction sets that contain the true class with
probability at least ``1 - alpha`` (marginally, over exchangeable calibration and test data;
Vovk et al. 2005, Angelopoulos & Bates 2021). Everything works on numpy arrays, so the probabilities
are computed once (by the bundle's evaluation) and every score and ``alpha`` is evaluated offline.

Scores (a *larger* score means the label fits the input *worse*; ``S(x, y)`` for every class ``y``):

- ``"lac"`` (Sadinle et al. 2019): ``S(x, y) = 1 - p_y``. Smallest sets on average, but sets can be
  empty and their size adapts poorly to how hard an input is.
- ``"aps"`` (Romano et al. 2020), *non-randomised*: sort the classes by decreasing probability;
  ``S(x, y)`` is the total probability of the classes ranked at or above ``y``.
- ``"raps"`` (Angelopoulos et al. 2021), *non-randomised*: APS plus ``lam * max(0, rank(y) - k_reg)``
  (rank 1-based), which penalises long tails of unlikely classes, so sets get smaller.

Sets. With ``tau`` the finite-sample conformal threshold of the calibration scores
(:func:`conformal_threshold`):

- LAC: ``{y : S(x, y) <= tau}``;
- APS / RAPS: the top-ranked classes up to and including the first one whose (regularised)
  cumulative score reaches ``tau`` (the class that *crosses* the threshold is included, so a set is
  never empty), plus every class tied in probability with that last class (so a set never depends
  on the arbitrary order of ties). This is the deterministic variant of Angelopoulos & Bates'
  "gentle introduction" (the default, ``include_last=True``); it covers at least ``1 - alpha``,
  often noticeably more, since the crossing class is always added. The one degenerate exception to
  the guarantee: a true class given a probability below the tie tolerance (1e-8) may be left out.
- APS / RAPS with ``include_last=False``: ``{y : S(x, y) <= tau}``, like LAC. Coverage is then
  tight (between ``1 - alpha`` and ``1 - alpha + 1/(n + 1)`` without ties), but sets can be empty.

Scores within 1e-8 of the threshold count as equal to it (rounding must not decide membership).

The randomised variants, exact in expectation but different on every call, are not implemented.

Why our own implementation and not MAPIE's (MAPIE 1.x, ``SplitConformalClassifier``, is used as a
cross-check in the tests, through :class:`CachedProbaClassifier`):

- MAPIE's APS and RAPS calibration scores are always randomised (it subtracts ``U * p_y``,
  ``U ~ Uniform(0, 1)``, from every calibration score, whatever ``include_last_label`` says), so it
  has no non-randomised APS/RAPS, and its sets change with the seed;
- MAPIE's RAPS does not take ``k_reg`` and ``lambda``: it tunes them on a random 20 % of the
  calibration data, which is then lost to the quantile;
- MAPIE refuses ``n < 1/alpha`` calibration points, although ``n >= 1/alpha - 1`` already gives a
  finite threshold (e.g. ``n = 9`` at ``alpha = 0.1``).

MAPIE 1.6's *quantile* itself is the finite-sample order statistic (``np.quantile`` at level
``ceil((n + 1)(1 - alpha)) / n`` with ``method="lower"``; checked in the tests, since an earlier
``method="higher"`` took one order statistic too many, MAPIE PR #973). With MAPIE's randomisation
switched off, its sets equal ours exactly (also checked in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "DEFAULT_K_REG",
    "DEFAULT_LAM",
    "SCORES",
    "CachedProbaClassifier",
    "alpha_tag",
    "conformal_report",
    "conformal_sets",
    "conformal_threshold",
    "conformity_scores",
    "mapie_conformal_sets",
    "prediction_sets",
    "set_metrics",
]

Score = Literal["lac", "aps", "raps"]
SCORES: tuple[str, ...] = ("lac", "aps", "raps")

# RAPS defaults. The paper tunes both on held-out data (k_reg: a high quantile of the true class's
# rank; lambda in {0.001, 0.01, 0.1, 0.2, 0.5}); medical classifiers have few classes and are usually
# right at rank 1, so every class after the top one gets a small penalty
DEFAULT_K_REG: int = 1
DEFAULT_LAM: float = 0.01

# scores closer than this are ties: the same number computed two ways (1 - (1 - s) and s, or two
# cumulative sums) differs in the last bits, and rounding must not decide set membership. MAPIE uses
# the same tolerance, so the two agree exactly
_TIE_ATOL = 1e-8

# cached probabilities may be float16 (eps ~1e-3) or renormalised after a cast; anything further off
# is not a probability vector (logits, or one-vs-rest sigmoids)
_PROB_ATOL = 1e-3


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _check_probs(probs: Any, name: str) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(
            f"{name}: expected class probabilities of shape (n, K) with n >= 1, K >= 2, got {p.shape}"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: probabilities contain NaN or inf")
    if (p < 0).any():
        raise ValueError(f"{name}: probabilities must be >= 0, got a minimum of {p.min():g}")
    err = np.abs(p.sum(axis=1) - 1.0)
    if (err > _PROB_ATOL).any():
        i = int(err.argmax())
        raise ValueError(
            f"{name}: every row must sum to 1 (within {_PROB_ATOL:g}); row {i} sums to {p[i].sum():.6g} "
            "(pass softmax probabilities, not logits)"
        )
    return p


def _check_labels(labels: Any, n: int, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels of shape ({n},), got shape {y.shape}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError(f"{name}: labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name}: labels must be in [0, {num_classes - 1}] for {num_classes} classes, "
            f"got {int(y[bad][0])} ({int(bad.sum())} out of range)"
        )
    return y


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (the miscoverage rate, e.g. 0.1), got {alpha!r}")
    return a


def _score_params(score: str, score_kwargs: Mapping[str, Any]) -> tuple[int, float, bool]:
    """``(k_reg, lam, include_last)`` of a score; APS is RAPS with ``lam = 0``."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    allowed = {"lac": (), "aps": ("include_last",), "raps": ("k_reg", "lam", "include_last")}[score]
    unknown = sorted(set(score_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"score {score!r} takes {list(allowed) or 'no'} parameters, got {unknown}")
    include_last = score_kwargs.get("include_last", True)
    if not isinstance(include_last, (bool, np.bool_)):
        raise ValueError(f"{score}: include_last must be a bool, got {include_last!r}")
    if score != "raps":
        return 0, 0.0, bool(include_last)
    k_reg = score_kwargs.get("k_reg", DEFAULT_K_REG)
    lam = score_kwargs.get("lam", DEFAULT_LAM)
    if isinstance(k_reg, bool) or not isinstance(k_reg, (int, np.integer)) or k_reg < 0:
        raise ValueError(f"raps: k_reg must be an integer >= 0, got {k_reg!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer)) or not lam >= 0:
        raise ValueError(f"raps: lam must be a number >= 0, got {lam!r}")
    return int(k_reg), float(lam), bool(include_last)


# ----------------------------------------------------------------------------------------------
# scores, threshold, sets
# ----------------------------------------------------------------------------------------------


def _sorted_cumulative(p: np.ndarray, k_reg: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Classes by decreasing probability (``order``) and the (regularised) cumulative score at each
    rank (``(m, K)``, non-decreasing along a row)."""
    # stable sort: tied classes keep index order, so calibration scores are reproducible
    order = np.argsort(-p, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    if lam > 0:
        ranks = np.arange(1, p.shape[1] + 1, dtype=np.float64)
        cum = cum + lam * np.maximum(ranks - k_reg, 0.0)
    return order, cum


def _scores(p: np.ndarray, y: np.ndarray, score: str, k_reg: int, lam: float) -> np.ndarray:
    if score == "lac":
        return 1.0 - p[np.arange(len(y)), y]
    order, cum = _sorted_cumulative(p, k_reg, lam)
    rank0 = np.argmax(order == y[:, None], axis=1)  # 0-based rank of the true class
    return cum[np.arange(len(y)), rank0]


def _sets(
    p: np.ndarray, threshold: float, score: str, k_reg: int, lam: float, include_last: bool
) -> np.ndarray:
    if score == "lac":
        return 1.0 - p <= threshold + _TIE_ATOL
    order, cum = _sorted_cumulative(p, k_reg, lam)
    if not include_last:
        s = np.empty_like(cum)
        np.put_along_axis(s, order, cum, axis=1)  # back to class order: s[i, y] = S(x_i, y)
        return s <= threshold + _TIE_ATOL
    reached = cum >= threshold - _TIE_ATOL
    # the first rank whose cumulative score reaches the threshold (the whole row when none does,
    # e.g. a threshold above 1 for APS)
    last = np.where(reached.any(axis=1), reached.argmax(axis=1), p.shape[1] - 1)
    p_last = p[np.arange(len(p)), order[np.arange(len(p)), last]]
    # by probability rather than by rank: classes tied with the last one are all in or all out
    return p >= p_last[:, None] - _TIE_ATOL


def conformity_scores(probs: Any, labels: Any, score: Score = "lac", **score_kwargs: Any) -> np.ndarray:
    """Conformity scores of the true labels (larger = the label fits worse).

    Args:
        probs: class probabilities, ``(n, K)``, rows summing to 1.
        labels: true class indices, ``(n,)``.
        score: ``"lac"``, ``"aps"`` or ``"raps"`` (see the module docstring).
        score_kwargs: ``"raps"``: ``k_reg`` (int >= 0, default :data:`DEFAULT_K_REG`) and ``lam``
            (float >= 0, default :data:`DEFAULT_LAM`); ``"aps"`` and ``"raps"``: ``include_last``
            (bool, default True; it changes the sets, not the scores).

    Returns:
        Float64 array ``(n,)``.

    Raises:
        ValueError: bad probabilities, labels, score name or score parameters.
    """
    k_reg, lam, _ = _score_params(score, score_kwargs)
    p = _check_probs(probs, "probs")
    y = _check_labels(labels, p.shape[0], p.shape[1], "labels")
    return _scores(p, y, score, k_reg, lam)


def conformal_threshold(scores: Any, alpha: float) -> float:
    """Finite-sample split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest score.

    With ``n`` calibration scores exchangeable with the test score, the test score is at most this
    order statistic with probability at least ``1 - alpha`` (and less than ``1 - alpha + 1/(n + 1)``
    without ties). The plain empirical ``(1 - alpha)`` quantile would under-cover.

    Args:
        scores: calibration conformity scores, ``(n,)``.
        alpha: miscoverage rate in (0, 1).

    Returns:
        The threshold, one of the scores.

    Raises:
        ValueError: ``alpha`` outside (0, 1), scores empty, not 1-D or not finite, or too few
            scores: ``n < 1/alpha - 1`` puts the order statistic past the largest score, i.e. the
            threshold is infinite and every set would hold every class.
    """
    a = _check_alpha(alpha)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores: expected a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    n = s.size
    # alphas such as 0.1 are not exact in binary: rounding keeps a product that is an integer in
    # decimal (20 * 0.9 = 18) from being bumped to the next integer by a representation error
    k = math.ceil(round((n + 1) * (1.0 - a), 9))
    if k > n:
        raise ValueError(
            f"too few calibration points for alpha={a:g}: with n={n} the conformal threshold is the "
            f"ceil((n+1)(1-alpha)) = {k}-th smallest score, past the largest, i.e. infinite (every "
            f"set would contain every class); need n >= 1/alpha - 1 = {1.0 / a - 1.0:g}"
        )
    return float(np.partition(s, k - 1)[k - 1])


def prediction_sets(probs: Any, threshold: float, score: Score = "lac", **score_kwargs: Any) -> np.ndarray:
    """Prediction sets for a given threshold (see the module docstring for the rule of each score).

    Args:
        probs: class probabilities, ``(m, K)``, rows summing to 1.
        threshold: a conformal threshold from :func:`conformal_threshold` on the same score.
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        score_kwargs: ``k_reg``, ``lam`` and ``include_last`` (as in :func:`conformity_scores`).

    Returns:
        Bool array ``(m, K)``: ``[i, k]`` is True when class ``k`` is in the set of item ``i``.

    Raises:
        ValueError: bad probabilities, threshold, score name or score parameters.
    """
    k_reg, lam, include_last = _score_params(score, score_kwargs)
    p = _check_probs(probs, "probs")
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold is NaN")
    return _sets(p, t, score, k_reg, lam, include_last)


def _threshold_and_sets(
    cal_probs: Any,
    cal_labels: Any,
    test_probs: Any,
    alpha: float,
    score: str,
    score_kwargs: Mapping[str, Any],
) -> tuple[float, np.ndarray]:
    k_reg, lam, include_last = _score_params(score, score_kwargs)
    pc = _check_probs(cal_probs, "cal_probs")
    yc = _check_labels(cal_labels, pc.shape[0], pc.shape[1], "cal_labels")
    pt = _check_probs(test_probs, "test_probs")
    if pt.shape[1] != pc.shape[1]:
        raise ValueError(f"test_probs has {pt.shape[1]} classes, cal_probs has {pc.shape[1]}")
    tau = conformal_threshold(_scores(pc, yc, score, k_reg, lam), alpha)
    return tau, _sets(pt, tau, score, k_reg, lam, include_last)


def conformal_sets(
    cal_probs: Any,
    cal_labels: Any,
    test_probs: Any,
    alpha: float,
    score: Score = "lac",
    **score_kwargs: Any,
) -> np.ndarray:
    """Split-conformal prediction sets at miscoverage ``alpha``.

    Args:
        cal_probs: calibration class probabilities, ``(n, K)``, rows summing to 1.
        cal_labels: calibration true labels, ``(n,)``, in ``[0, K)``.
        test_probs: test class probabilities, ``(m, K)``.
        alpha: miscoverage rate in (0, 1); sets cover the true class with probability >= 1 - alpha.
        score: ``"lac"``, ``"aps"`` or ``"raps"`` (non-randomised; see the module docstring).
        score_kwargs: ``"raps"``: ``k_reg`` (default :data:`DEFAULT_K_REG`) and ``lam`` (default
            :data:`DEFAULT_LAM`); ``"aps"``/``"raps"``: ``include_last`` (default True: the class
            crossing the threshold is in the set, so sets are never empty).

    Returns:
        Bool array ``(m, K)``.

    Raises:
        ValueError: probabilities of the wrong shape, not finite, negative or not summing to 1;
            labels out of range; ``alpha`` outside (0, 1); fewer than ``1/alpha - 1`` calibration
            points; an unknown score or score parameter.
    """
    return _threshold_and_sets(cal_probs, cal_labels, test_probs, alpha, score, score_kwargs)[1]


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def set_metrics(sets: Any, labels: Any, num_classes: int | None = None) -> dict[str, float]:
    """Coverage and size of prediction sets, overall and per true class.

    Args:
        sets: bool array ``(m, K)`` from :func:`conformal_sets`.
        labels: true labels of the test items, ``(m,)``.
        num_classes: ``K``, checked against ``sets`` when given.

    Returns:
        Flat dict of floats:

        - ``"coverage"``: fraction of items whose set contains the true class;
        - ``"mean_set_size"``, ``"empty_set_rate"``, ``"singleton_rate"``;
        - ``"set_size_rate/<s>"`` for ``s`` in ``0..K``: fraction of sets of size ``s``;
        - ``"coverage/class_<k>"`` and ``"mean_set_size/class_<k>"``: among items whose *true*
          class is ``k`` (NaN when there is none);
        - ``"min_class_coverage"``: the smallest per-class coverage (NaN-ignoring): conformal
          coverage is only marginal, and a rare class can be covered much less often.

    Raises:
        ValueError: ``sets`` not a 2-D bool array, ``num_classes`` disagreeing with it, or labels
            of the wrong length or out of range.
    """
    s = np.asarray(sets)
    if s.ndim != 2 or s.dtype != np.bool_:
        raise ValueError(f"sets: expected a bool array (m, K), got dtype {s.dtype} and shape {s.shape}")
    m, k = s.shape
    if num_classes is not None and num_classes != k:
        raise ValueError(f"num_classes={num_classes} but sets has {k} columns")
    if m == 0:
        raise ValueError("sets: no test items")
    y = _check_labels(labels, m, k, "labels")
    covered = s[np.arange(m), y]
    size = s.sum(axis=1)
    out: dict[str, float] = {
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "empty_set_rate": float((size == 0).mean()),
        "singleton_rate": float((size == 1).mean()),
    }
    hist = np.bincount(size, minlength=k + 1) / m
    out.update({f"set_size_rate/{i}": float(hist[i]) for i in range(k + 1)})
    per_class = []
    for c in range(k):
        sel = y == c
        cov = float(covered[sel].mean()) if sel.any() else math.nan
        per_class.append(cov)
        out[f"coverage/class_{c}"] = cov
        out[f"mean_set_size/class_{c}"] = float(size[sel].mean()) if sel.any() else math.nan
    finite = [c for c in per_class if not math.isnan(c)]
    out["min_class_coverage"] = min(finite) if finite else math.nan
    return out


def alpha_tag(alpha: float) -> str:
    """Stable metric-name tag of a miscoverage rate: 0.1 -> ``"alpha0.1"``, 0.05 -> ``"alpha0.05"``.

    Args:
        alpha: the miscoverage rate.

    Returns:
        ``"alpha"`` followed by ``alpha`` formatted with ``%g``.
    """
    return f"alpha{round(float(alpha), 9):g}"


def conformal_report(
    cal_probs: Any,
    cal_labels: Any,
    test_probs: Any,
    test_labels: Any,
    alphas: Iterable[float] = (0.1, 0.05),
    scores: Sequence[str] = SCORES,
    score_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Every score at every ``alpha``, as flat metric names for MLflow.

    Args:
        cal_probs: calibration class probabilities, ``(n, K)``.
        cal_labels: calibration true labels, ``(n,)``.
        test_probs: test class probabilities, ``(m, K)``.
        test_labels: test true labels, ``(m,)``.
        alphas: miscoverage rates.
        scores: score names among ``"lac"``, ``"aps"``, ``"raps"``.
        score_kwargs: per-score parameters, e.g. ``{"raps": {"k_reg": 2, "lam": 0.1}}``.

    Returns:
        ``"<score>/alpha<alpha>/<metric>"`` -> value for every metric of :func:`set_metrics` and
        ``"threshold"``, e.g. ``"lac/alpha0.1/coverage"``; plus ``"n_calibration"`` and
        ``"n_test"``.

    Raises:
        ValueError: as :func:`conformal_sets` and :func:`set_metrics`, or no score/alpha given.
    """
    alphas = tuple(alphas)
    scores = tuple(scores)
    if not alphas or not scores:
        raise ValueError("conformal_report needs at least one alpha and one score")
    kwargs = dict(score_kwargs or {})
    unknown = sorted(set(kwargs) - set(scores))
    if unknown:
        raise ValueError(f"score_kwargs for scores not in {scores}: {unknown}")
    pt = _check_probs(test_probs, "test_probs")
    yt = _check_labels(test_labels, pt.shape[0], pt.shape[1], "test_labels")
    out: dict[str, float] = {}
    for score in scores:
        for alpha in alphas:
            tau, sets = _threshold_and_sets(cal_probs, cal_labels, pt, alpha, score, kwargs.get(score, {}))
            prefix = f"{score}/{alpha_tag(alpha)}"
            out[f"{prefix}/threshold"] = tau
            out.update({f"{prefix}/{k}": v for k, v in set_metrics(sets, yt).items()})
    out["n_calibration"] = float(np.shape(cal_probs)[0])
    out["n_test"] = float(pt.shape[0])
    return out


# ----------------------------------------------------------------------------------------------
# MAPIE cross-check
# ----------------------------------------------------------------------------------------------


class CachedProbaClassifier:
    """A "prefit" classifier whose ``predict_proba`` returns cached probability rows.

    MAPIE calls the classifier it wraps; its single feature is the row index into ``probs``, so
    ``X = np.arange(n)[:, None]`` selects rows ``0..n-1``. The class needs no scikit-learn base
    class (MAPIE's prefit path only calls ``predict_proba``/``predict`` and reads ``classes_``), so
    importing this module does not import scikit-learn.

    Args:
        probs: class probabilities of every item, calibration and test, ``(N, K)``.
    """

    def __init__(self, probs: Any) -> None:
        self.probs = _check_probs(probs, "probs")
        self.classes_ = np.arange(self.probs.shape[1])
        self.n_features_in_ = 1

    def fit(self, X: Any, y: Any = None) -> CachedProbaClassifier:
        """Nothing to fit: the probabilities are cached. Returns ``self``."""
        return self

    def _rows(self, X: Any) -> np.ndarray:
        idx = np.asarray(X)
        if idx.ndim != 2 or idx.shape[1] != 1:
            raise ValueError(f"X: expected row indices of shape (n, 1), got {idx.shape}")
        return idx[:, 0].astype(np.int64)

    def predict_proba(self, X: Any) -> np.ndarray:
        """The cached rows selected by ``X[:, 0]``, ``(n, K)``."""
        return self.probs[self._rows(X)]

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each selected row, ``(n,)``."""
        return self.predict_proba(X).argmax(axis=1)


def mapie_conformal_sets(
    cal_probs: Any,
    cal_labels: Any,
    test_probs: Any,
    alpha: float,
    score: Score = "lac",
    random_state: Any = 0,
) -> tuple[np.ndarray, Any]:
    """MAPIE's split-conformal sets on cached probabilities (a cross-check of :func:`conformal_sets`).

    MAPIE (``mapie>=1,<2``) is imported here, not at module import: it imports scikit-learn, which
    is slow. Remember the differences listed in the module docstring: randomised APS/RAPS
    calibration scores (``random_state`` seeds them) and RAPS parameters tuned by MAPIE on part of
    the calibration data.

    Args:
        cal_probs: calibration class probabilities, ``(n, K)``.
        cal_labels: calibration true labels, ``(n,)``.
        test_probs: test class probabilities, ``(m, K)``.
        alpha: miscoverage rate in (0, 1).
        score: ``"lac"``, ``"aps"`` or ``"raps"``.
        random_state: passed to MAPIE (an int or a ``np.random.RandomState``).

    Returns:
        ``(sets, fitted)``: bool array ``(m, K)`` (``include_last_label=True``) and the fitted
        ``mapie.classification.SplitConformalClassifier``, for its scores and quantile.

    Raises:
        ValueError: bad inputs (as :func:`conformal_sets`); MAPIE raises its own errors, e.g. for
            ``n < 1/alpha``.
    """
    from mapie.classification import SplitConformalClassifier

    a = _check_alpha(alpha)
    _score_params(score, {})
    pc = _check_probs(cal_probs, "cal_probs")
    yc = _check_labels(cal_labels, pc.shape[0], pc.shape[1], "cal_labels")
    pt = _check_probs(test_probs, "test_probs")
    if pt.shape[1] != pc.shape[1]:
        raise ValueError(f"test_probs has {pt.shape[1]} classes, cal_probs has {pc.shape[1]}")
    n = pc.shape[0]
    est = CachedProbaClassifier(np.concatenate([pc, pt]))
    ids = np.arange(n + pt.shape[0])[:, None]
    mapie = SplitConformalClassifier(
        estimator=est,
        confidence_level=1.0 - a,
        conformity_score=score,
        prefit=True,
        random_state=random_state,
    )
    mapie.conformalize(ids[:n], yc)
    _, sets = mapie.predict_set(ids[n:], conformity_score_params={"include_last_label": True})
    return np.asarray(sets[:, :, 0], dtype=bool), mapie
