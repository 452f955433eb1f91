"""Subject-clustered bootstrap of the classification metrics: known answers on constructed probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from engines.classification_eval import classification_metrics
from engines.classification_intervals import ClassificationStatistics, classification_intervals, item_clusters


def _case(
    k: int, n_clusters: int = 12, per: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(n_clusters), per)
    labels = rng.integers(0, k, clusters.size)
    logits = rng.normal(0, 1, (clusters.size, k))
    logits[np.arange(clusters.size), labels] += 1.2  # informative, not perfect
    logits = np.round(logits, 1)  # tied probabilities
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels, clusters


def test_item_clusters_group_by_subject_and_keep_subjectless_items_apart():
    items = [{"subject": "a"}, {"subject": "b"}, {"subject": "a"}, {"image": "x.jpg"}, {"subject": ""}]
    assert item_clusters(items).tolist() == [0, 1, 0, 2, 3]
    assert item_clusters(items, ["h1", "h2", "h3", "h4", "h4"]).tolist() == [0, 1, 0, 2, 2]


@pytest.mark.parametrize("k", [2, 4])
def test_multiplicity_one_reproduces_classification_metrics(k: int):
    probs, labels, clusters = _case(k)
    sets = probs >= 0.2
    st = ClassificationStatistics(probs, labels, clusters, {"cov": sets}).statistics()
    ref = classification_metrics(probs, labels)
    ones = np.ones(12)
    for metric in ("accuracy", "macro_f1", "auroc"):
        assert float(st[metric](ones)) == pytest.approx(ref[metric], abs=1e-12), metric
    assert float(st["cov"](ones)) == pytest.approx(sets[np.arange(labels.size), labels].mean(), abs=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_a_replicate_equals_the_metrics_of_the_drawn_items(k: int):
    """Cluster 3 drawn twice, cluster 7 and 8 once: the metrics of those items, cluster 3's repeated."""
    probs, labels, clusters = _case(k, seed=1)
    st = ClassificationStatistics(probs, labels, clusters).statistics()
    w = np.zeros(12)
    w[3], w[7], w[8] = 2, 1, 1
    idx = np.concatenate([np.flatnonzero(clusters == j) for j in (3, 3, 7, 8)])
    ref = classification_metrics(probs[idx], labels[idx])
    for metric in ("accuracy", "macro_f1", "auroc"):
        got, want = float(st[metric](w)), ref[metric]
        assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=1e-12), metric


def test_intervals_and_paired_differences():
    probs, labels, clusters = _case(4, n_clusters=30, seed=2)
    worse = probs[:, ::-1]  # a different model on the same items
    models = {
        "a": ClassificationStatistics(probs, labels, clusters),
        "a_again": ClassificationStatistics(probs, labels, clusters),
        "b": ClassificationStatistics(worse, labels, clusters),
    }
    iv, diff = classification_intervals(models, n_boot=400, seed=3)
    assert set(diff) == {"a-a_again", "a-b", "a_again-b"}
    for metric in ("accuracy", "macro_f1", "auroc"):
        assert iv["a"][metric].low <= iv["a"][metric].point <= iv["a"][metric].high
        same = diff["a-a_again"][metric]
        assert (same.point, same.low, same.high) == (0.0, 0.0, 0.0)
    # reversing the informative probabilities makes the AUROC worse on every replicate
    assert diff["a-b"]["auroc"].low > 0 and diff["a-b"]["auroc"].resolved
    with pytest.raises(ValueError, match="different cluster sets"):
        classification_intervals(
            {"a": models["a"], "c": ClassificationStatistics(probs, labels, clusters % 5)}
        )
    with pytest.raises(ValueError, match="do not match"):
        ClassificationStatistics(probs, labels[:-1], clusters)


def test_multilabel_statistics_reproduce_multilabel_metrics_with_masked_entries():
    from engines.classification_intervals import MultilabelStatistics, cluster_index
    from engines.probe import multilabel_metrics

    rng = np.random.default_rng(4)
    n, findings = 40, ["a", "b", "c"]
    labels = (rng.random((n, 3)) < 0.4).astype(float)
    labels[rng.random((n, 3)) < 0.2] = -1  # masked
    labels[:, 2] = np.where(labels[:, 2] == 1, 0, labels[:, 2])  # finding c: no positive, undefined
    probs = np.clip(0.3 * labels + rng.random((n, 3)) * 0.7, 0, 1).round(2)
    subjects = [f"s{i // 2}" for i in range(n)]  # two studies per subject
    clusters = cluster_index(subjects)
    assert clusters.max() + 1 == 20 and cluster_index([None, None, "x", "x"]).tolist() == [0, 1, 2, 2]
    st = MultilabelStatistics(probs, labels, clusters, findings).statistics()
    ref = multilabel_metrics(probs, labels, findings)
    for metric in ("mean_auroc", "mean_auprc", "auroc/a", "auroc/b"):
        assert float(st[metric](np.ones(20))) == pytest.approx(ref[metric], abs=1e-12), metric
    assert np.isnan(float(st["auroc/c"](np.ones(20))))
    # subject 3 drawn three times and subject 8 once: multilabel_metrics on those studies
    w = np.zeros(20)
    w[3], w[8] = 3, 1
    idx = np.concatenate([np.flatnonzero(clusters == j) for j in (3, 3, 3, 8)])
    sub = multilabel_metrics(probs[idx], labels[idx], findings)
    got = float(st["mean_auroc"](w))
    assert (np.isnan(got) and np.isnan(sub["mean_auroc"])) or got == pytest.approx(
        sub["mean_auroc"], abs=1e-12
    )


def test_only_the_requested_pairs_are_compared():
    probs, labels, clusters = _case(2, seed=6)
    models = {k: ClassificationStatistics(probs, labels, clusters) for k in ("x", "y", "z")}
    _, diff = classification_intervals(models, n_boot=50, pairs=[("x", "z")])
    assert list(diff) == ["x-z"]
    with pytest.raises(ValueError, match="not given"):
        classification_intervals(models, n_boot=10, pairs=[("x", "w")])
