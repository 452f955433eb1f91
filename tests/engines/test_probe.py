"""Linear probing of frozen study embeddings (engines/probe.py): masked multi-label metrics with
hand-computed answers, the masked BCE, the MAE probe's structure, and fitting on synthetic features
whose best linear classifier is known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from engines.probe import (
    LinearProbe,
    MaskedBCEWithLogitsLoss,
    _pos_weight,
    fit_linear_probe,
    multilabel_metrics,
    probe_probabilities,
)

# ----------------------------------------------------------------------------------------------
# multilabel_metrics
# ----------------------------------------------------------------------------------------------

# Positives score 0.8 and 0.35, negatives 0.1 and 0.4: of the 4 (positive, negative) pairs only
# (0.35, 0.4) is misordered, so AUROC = 3/4. Ranked by score: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-);
# average precision = sum over positives of (recall step) * (precision there) = 0.5 * 1/1 + 0.5 * 2/3.
PROBS_A = [0.1, 0.4, 0.35, 0.8]
LABELS_A = [0, 0, 1, 1]
AUROC_A = 0.75
AUPRC_A = 0.5 + 0.5 * 2 / 3
# A perfectly ranked second label: AUROC = AUPRC = 1.
PROBS_B = [0.9, 0.2, 0.7, 0.3]
LABELS_B = [1, 0, 1, 0]


def test_metrics_known_answers_and_names() -> None:
    probs = np.stack([PROBS_A, PROBS_B], axis=1)
    labels = np.stack([LABELS_A, LABELS_B], axis=1)
    m = multilabel_metrics(probs, labels, names=["effusion", "nodule"])
    assert m["auroc/effusion"] == pytest.approx(AUROC_A)
    assert m["auprc/effusion"] == pytest.approx(AUPRC_A)
    assert m["auroc/nodule"] == pytest.approx(1.0)
    assert m["auprc/nodule"] == pytest.approx(1.0)
    assert m["n_pos/effusion"] == 2.0
    assert m["n_pos/nodule"] == 2.0
    assert m["mean_auroc"] == pytest.approx((AUROC_A + 1.0) / 2)
    assert m["mean_auprc"] == pytest.approx((AUPRC_A + 1.0) / 2)
    assert m["n_labels_defined"] == 2.0
    assert all(isinstance(v, float) for v in m.values())


def test_metrics_default_names_and_torch_input() -> None:
    probs = torch.tensor([PROBS_A, PROBS_B]).T
    labels = torch.tensor([LABELS_A, LABELS_B], dtype=torch.float32).T
    m = multilabel_metrics(probs, labels)
    assert set(m) == {
        "auroc/label_0",
        "auprc/label_0",
        "n_pos/label_0",
        "auroc/label_1",
        "auprc/label_1",
        "n_pos/label_1",
        "mean_auroc",
        "mean_auprc",
        "n_labels_defined",
    }
    assert m["auroc/label_0"] == pytest.approx(AUROC_A)
    assert m["auprc/label_0"] == pytest.approx(AUPRC_A, abs=1e-6)  # float32 input


def test_metrics_ignore_masked_entries() -> None:
    # LABELS_A with two masked studies appended; their scores would break the ranking if counted
    # (0.99 as a negative, 0.0 as a positive)
    probs = np.array([[*PROBS_A, 0.99, 0.0]]).T
    labels = np.array([[*LABELS_A, -1, -1]]).T
    m = multilabel_metrics(probs, labels)
    assert m["auroc/label_0"] == pytest.approx(AUROC_A)
    assert m["auprc/label_0"] == pytest.approx(AUPRC_A)
    assert m["n_pos/label_0"] == 2.0
    # changing the probability of a masked entry changes nothing
    probs2 = probs.copy()
    probs2[4, 0], probs2[5, 0] = 0.0, 1.0
    assert multilabel_metrics(probs2, labels) == m
    # and the result is that of the unmasked subset
    assert multilabel_metrics(probs[:4], labels[:4]) == m


def test_metrics_undefined_label_is_nan_and_left_out_of_means() -> None:
    # label 1: after masking only negatives remain (its one positive-looking study is masked)
    probs = np.stack([PROBS_A, [0.3, 0.6, 0.1, 0.9]], axis=1)
    labels = np.stack([LABELS_A, [0, 0, 0, -1]], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = multilabel_metrics(probs, labels, names=["a", "b"])
    assert math.isnan(m["auroc/b"])
    assert math.isnan(m["auprc/b"])
    assert m["n_pos/b"] == 0.0
    assert m["mean_auroc"] == pytest.approx(AUROC_A)
    assert m["mean_auprc"] == pytest.approx(AUPRC_A)
    assert m["n_labels_defined"] == 1.0


def test_metrics_no_label_defined_gives_nan_means_without_warning() -> None:
    probs = np.array([[0.2, 0.5], [0.7, 0.1]])
    labels = np.array([[1, -1], [1, 0]])  # label 0 only positives, label 1 only one negative
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = multilabel_metrics(probs, labels)
    assert math.isnan(m["mean_auroc"])
    assert math.isnan(m["mean_auprc"])
    assert m["n_labels_defined"] == 0.0
    assert m["n_pos/label_0"] == 2.0


@pytest.mark.parametrize(
    ("probs", "labels", "names", "match"),
    [
        (np.full((4, 2), 0.5), np.zeros((4, 3)), None, "same shape"),
        (np.full(4, 0.5), np.zeros(4), None, "2-D"),
        (np.array([[0.5], [1.2]]), np.array([[0], [1]]), None, r"\[0, 1\]"),
        (np.array([[0.5], [np.nan]]), np.array([[0], [1]]), None, "finite"),
        (np.array([[0.5], [0.6]]), np.array([[0], [2]]), None, "-1 \\(masked\\)"),
        (np.full((2, 2), 0.5), np.zeros((2, 2)), ["only_one"], "names has 1 entries but there are 2"),
        (np.full((2, 2), 0.5), np.zeros((2, 2)), ["x", "x"], "distinct"),
    ],
)
def test_metrics_reject_bad_input(probs, labels, names, match) -> None:
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(probs, labels, names)


# ----------------------------------------------------------------------------------------------
# MaskedBCEWithLogitsLoss
# ----------------------------------------------------------------------------------------------


def test_masked_bce_equals_bce_on_observed_entries() -> None:
    # logit 0 gives BCE log 2 whatever the target
    loss = MaskedBCEWithLogitsLoss()(torch.zeros(3, 2), torch.tensor([[1.0, -1], [0, 1], [-1, -1]]))
    assert loss.item() == pytest.approx(math.log(2))
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 1.5]])
    labels = torch.tensor([[1.0, -1, 0], [0, 1, -1]])
    observed = labels >= 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[observed], labels[observed])
    assert MaskedBCEWithLogitsLoss()(logits, labels).item() == pytest.approx(expected.item())


def test_masked_bce_pos_weight_and_inf_on_masked_entry() -> None:
    # a positive at logit 0 costs pos_weight * log 2, a negative log 2: mean (3 + 1) log 2 / 2
    loss = MaskedBCEWithLogitsLoss(pos_weight=torch.tensor([3.0]))(
        torch.zeros(2, 1), torch.tensor([[1.0], [0.0]])
    )
    assert loss.item() == pytest.approx(2 * math.log(2))
    # an infinite logit on a masked entry must not leak into the loss or the gradient
    logits = torch.tensor([[0.0, math.inf]], requires_grad=True)
    loss = MaskedBCEWithLogitsLoss()(logits, torch.tensor([[1.0, -1.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert logits.grad is not None
    assert logits.grad.tolist() == [[pytest.approx(-0.5), 0.0]]  # d/dz BCE(z, 1) at 0 = sigmoid(0) - 1


def test_masked_bce_all_masked_is_zero_with_gradient() -> None:
    logits = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = MaskedBCEWithLogitsLoss()(logits, torch.full((3, 2), -1.0))
    assert loss.ndim == 0
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 2))


def test_masked_bce_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        MaskedBCEWithLogitsLoss()(torch.zeros(2, 3), torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------
# LinearProbe
# ----------------------------------------------------------------------------------------------


def test_linear_probe_structure() -> None:
    probe = LinearProbe(8, 3)
    assert isinstance(probe.bn, torch.nn.BatchNorm1d)
    assert not probe.bn.affine
    assert probe.bn.eps == 1e-6
    assert list(probe.bn.parameters()) == []
    params = dict(probe.named_parameters())
    assert set(params) == {"linear.weight", "linear.bias"}
    assert params["linear.weight"].shape == (3, 8)
    assert probe(torch.randn(5, 8, generator=torch.Generator().manual_seed(0))).shape == (5, 3)


# ----------------------------------------------------------------------------------------------
# fit_linear_probe / probe_probabilities
# ----------------------------------------------------------------------------------------------

DIM = 16
# Two orthonormal directions, fixed: label j is the sign of the projection on direction j.
_DIRECTIONS = np.linalg.qr(np.random.default_rng(123).standard_normal((DIM, 2)))[0]
# Every study is pushed this far from both decision boundaries (noise std 1 per dimension), so the
# distribution is linearly separable with a margin and a fitted direction a few degrees off the true
# one still ranks (almost) every held-out pair correctly. Without a margin, 200 studies in 16
# dimensions only pin the direction down to held-out AUROCs of about 0.985-0.995, even for an
# unregularised logistic regression fitted to convergence.
_MARGIN = 1.0


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, DIM)`` (shifted and scaled, for the BatchNorm to undo) and labels ``(n, 2)``."""
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    z = x @ _DIRECTIONS
    # orthonormal directions: moving along one leaves the projection on the other unchanged
    x = x + (_MARGIN * np.sign(z)) @ _DIRECTIONS.T
    labels = (z > 0).astype(np.float64)
    return 5.0 * x + 3.0, labels


def test_fit_separable_features_held_out_auroc() -> None:
    x, y = _separable(200, seed=0)
    y[np.random.default_rng(1).random(200) < 0.2, 1] = -1  # 20 % of label 1 masked
    probe = fit_linear_probe(torch.as_tensor(x, dtype=torch.float32), y, seed=0)
    assert not probe.training
    x_test, y_test = _separable(1000, seed=99)
    m = multilabel_metrics(probe_probabilities(probe, x_test), y_test)
    assert m["auroc/label_0"] >= 0.99
    assert m["auroc/label_1"] >= 0.99


def test_fit_is_deterministic_and_leaves_global_rng_alone() -> None:
    x, y = _separable(64, seed=2)
    state = torch.random.get_rng_state()
    a = fit_linear_probe(x, y, epochs=20, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = fit_linear_probe(x, y, epochs=20, seed=7)
    c = fit_linear_probe(x, y, epochs=20, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_fit_batchnorm_statistics_are_the_training_features() -> None:
    # full batch and momentum=None: the running statistics are exactly the features' mean and
    # unbiased variance, also when no optimisation step runs
    x, y = _separable(50, seed=3)
    for epochs in (0, 5):
        probe = fit_linear_probe(x, y, epochs=epochs)
        xt = torch.as_tensor(x, dtype=torch.float32)
        torch.testing.assert_close(probe.bn.running_mean, xt.mean(0))
        torch.testing.assert_close(probe.bn.running_var, xt.var(0, unbiased=True))


def test_pos_weight_known_values() -> None:
    labels = torch.tensor([[1.0, 0, 1, -1], [0, 0, 1, -1], [0, -1, 0, -1], [0, 0, 1, -1], [-1, 0, 1, -1]])
    # label 0: 3 negatives / 1 positive; label 1: no positive -> 1; label 2: 1/4 clamped up to 1;
    # label 3: all masked -> 1
    assert _pos_weight(labels).tolist() == [3.0, 1.0, 1.0, 1.0]
    rare = torch.zeros(300, 1)
    rare[0] = 1.0
    assert _pos_weight(rare).tolist() == [100.0]  # 299 clamped down to 100


def test_pos_weight_raises_rare_label_probabilities() -> None:
    # a rare, noisy label: the top 5 % of a noisy linear score (10 positives out of 200)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, DIM))
    score = x @ rng.standard_normal(DIM) + 2.0 * rng.standard_normal(200)
    y = (score >= np.quantile(score, 0.95)).astype(np.float64)[:, None]
    positive = y[:, 0] == 1
    assert positive.sum() == 10
    plain = probe_probabilities(fit_linear_probe(x, y), x)[:, 0].numpy()
    weighted = probe_probabilities(fit_linear_probe(x, y, pos_weight=True), x)[:, 0].numpy()
    # weighting the positives 19x pushes their probabilities up (measured: about 0.47 -> 0.91)
    assert weighted[positive].mean() > plain[positive].mean() + 0.2
    # and every probability up, the negatives' too: the weighted probe is no longer calibrated
    assert weighted.mean() > plain.mean()


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (np.zeros((1, 4)), np.zeros((1, 2)), "at least 2 studies"),
        (np.zeros((5, 4)), np.zeros((4, 2)), "5 studies but labels has 4"),
        (np.array([[0.0, 1.0], [np.inf, 0.0]]), np.zeros((2, 1)), "finite"),
        (np.zeros((3, 4)), np.array([[0.0], [1.0], [0.5]]), "-1 \\(masked\\)"),
        (np.zeros(4), np.zeros((4, 1)), "2-D"),
    ],
)
def test_fit_rejects_bad_input(features, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_linear_probe(features, labels, epochs=1)


def test_probe_probabilities_are_eval_mode_sigmoid_on_cpu() -> None:
    x, y = _separable(40, seed=4)
    probe = fit_linear_probe(x, y, epochs=10)
    probe.train()  # the caller's mode must survive the call
    # a batch of 2 has very different statistics from the training set: eval mode must not use them
    probs = probe_probabilities(probe, x[:2])
    assert probe.training
    assert probs.dtype == torch.float32
    assert probs.device.type == "cpu"
    assert not probs.requires_grad
    probe.eval()
    with torch.no_grad():
        expected = torch.sigmoid(probe(torch.as_tensor(x[:2], dtype=torch.float32)))
    torch.testing.assert_close(probs, expected)


def test_fit_treats_features_as_frozen() -> None:
    # features still attached to an encoder's graph: fitting must not backpropagate into it
    x, y = _separable(30, seed=5)
    weight = torch.ones(DIM, requires_grad=True)
    features = torch.as_tensor(x, dtype=torch.float32) * weight
    fit_linear_probe(features, y, epochs=3)
    assert weight.grad is None
