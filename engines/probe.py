"""Linear probing of frozen study embeddings for multi-label findings, and its metrics.

A ViT encoder turns every radiology study into one embedding; each study carries a multi-label
finding vector whose entries are ``1`` (positive), ``0`` (negative) or ``-1`` (uncertain or not
reported, *masked*: ignored by the loss and by every metric). The probe is the linear-probe protocol
of the MAE paper (He et al., CVPR 2022, Appendix A.2): a ``BatchNorm1d`` *without* affine parameters
(it only standardises the features, whose scale differs a lot between encoders) followed by one
linear layer, trained on the frozen features with a (here: masked) binary cross-entropy.

- :func:`multilabel_metrics`: per-label and mean AUROC / AUPRC with the masked entries left out;
- :class:`MaskedBCEWithLogitsLoss`: BCE with logits averaged over the non-masked entries;
- :class:`LinearProbe`: non-affine BatchNorm, then ``Linear``;
- :func:`fit_linear_probe`: full-batch AdamW on cached features, deterministic for a seed, without
  touching the global RNG;
- :func:`probe_probabilities`: sigmoid probabilities of a fitted probe, on the CPU.

Conventions: features are ``(n, D)``, labels and probabilities ``(n, L)``; both numpy arrays and
torch tensors are accepted; metrics that are undefined for the data at hand are ``NaN``, never an
exception, and the means leave them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MASKED",
    "LinearProbe",
    "MaskedBCEWithLogitsLoss",
    "fit_linear_probe",
    "multilabel_metrics",
    "probe_probabilities",
]

MASKED = -1
"""Label value of an uncertain or missing finding: ignored by the loss and the metrics."""

# Bounds of the automatic positive-class weight: below 1 it would *down*-weight the positives of a
# majority-positive label (the point is only to help rare findings), above 100 a label with a handful
# of positives would dominate the loss and the probe would overfit those few studies.
_POS_WEIGHT_MIN = 1.0
_POS_WEIGHT_MAX = 100.0


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of an array-like or (possibly CUDA, possibly grad-tracking) tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_label_values(labels: np.ndarray, name: str = "labels") -> None:
    """Raise unless every entry of ``labels`` is -1, 0 or 1 (NaN fails too: NaN is not in the set)."""
    bad = ~np.isin(labels, (MASKED, 0, 1))
    if bad.any():
        values = np.unique(labels[bad])[:5]
        raise ValueError(
            f"{name} must contain only 1 (positive), 0 (negative) or -1 (masked), got e.g. {values.tolist()}"
        )


def _to_tensor(x: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """A float32 tensor on ``device`` (the probe's dtype), from an array-like or tensor.

    Tensors are detached: the features are *frozen*, and a graph back into the encoder would make the
    second training step fail ("backward through the graph a second time") and keep it in memory.
    """
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def multilabel_metrics(probs: Any, labels: Any, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-label and mean AUROC and AUPRC of multi-label probabilities, masked entries left out.

    For every label ``j`` (called ``names[j]``, or ``label_<j>`` without names) the studies whose
    label is ``-1`` are dropped, then:

    - ``auroc/<name>``: area under the ROC curve (scikit-learn ``roc_auc_score``);
    - ``auprc/<name>``: average precision (scikit-learn ``average_precision_score``, the step-wise
      area under the precision-recall curve, not the trapezoidal one, which is optimistic);
    - ``n_pos/<name>``: number of positives.

    AUROC and AUPRC are ``NaN`` when, after masking, the label has no positive or no negative (both
    are undefined then; AUPRC without negatives would be a meaningless 1). The summaries:

    - ``mean_auroc``, ``mean_auprc``: unweighted means over the labels where the metric is defined,
      ``NaN`` when it is defined for none;
    - ``n_labels_defined``: number of labels where it is defined.

    Args:
        probs: predicted probabilities ``(n, L)``, finite, in ``[0, 1]`` (sigmoid outputs, not logits).
        labels: findings ``(n, L)`` with values ``1``, ``0`` or ``-1`` (masked).
        names: ``L`` distinct label names used in the keys; default ``label_0 .. label_<L-1>``.

    Returns:
        Flat dict of floats, keys as above (per-label keys in label order, then the summaries).

    Raises:
        ValueError: ``probs`` or ``labels`` not 2-D or of different shapes; ``probs`` not finite or
            outside ``[0, 1]``; label values other than -1, 0, 1; ``names`` of the wrong length or
            with duplicates.
    """
    # scikit-learn takes about a second to import; only metric computations should pay for it
    from sklearn.metrics import average_precision_score, roc_auc_score

    p = _to_numpy(probs)
    y = _to_numpy(labels)
    if p.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"probs and labels must be 2-D (n_studies, n_labels), got shapes {p.shape} and {y.shape}"
        )
    if p.shape != y.shape:
        raise ValueError(f"probs and labels must have the same shape, got {p.shape} and {y.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probs must be finite (found NaN or inf)")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"probs must lie in [0, 1] (probabilities, not logits), got range [{p.min():g}, {p.max():g}]"
        )
    _check_label_values(y)
    n_labels = p.shape[1]
    if names is None:
        keys = [f"label_{j}" for j in range(n_labels)]
    else:
        keys = [str(name) for name in names]
        if len(keys) != n_labels:
            raise ValueError(f"names has {len(keys)} entries but there are {n_labels} labels")
        if len(set(keys)) != len(keys):
            # duplicates would silently overwrite each other's metrics in the flat dict
            raise ValueError(f"names must be distinct, got {keys}")

    out: dict[str, float] = {}
    aurocs: list[float] = []
    auprcs: list[float] = []
    for j, key in enumerate(keys):
        kept = y[:, j] != MASKED
        target = y[kept, j]
        score = p[kept, j]
        n_pos = int((target == 1).sum())
        n_neg = int((target == 0).sum())
        if n_pos > 0 and n_neg > 0:
            auroc = float(roc_auc_score(target, score))
            auprc = float(average_precision_score(target, score))
            aurocs.append(auroc)
            auprcs.append(auprc)
        else:
            auroc = auprc = math.nan
        out[f"auroc/{key}"] = auroc
        out[f"auprc/{key}"] = auprc
        out[f"n_pos/{key}"] = float(n_pos)
    # explicit NaN instead of np.nanmean([]), which warns "Mean of empty slice"
    out["mean_auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
    out["mean_auprc"] = float(np.mean(auprcs)) if auprcs else math.nan
    out["n_labels_defined"] = float(len(aurocs))
    return out


# ----------------------------------------------------------------------------------------------
# loss and probe
# ----------------------------------------------------------------------------------------------


class MaskedBCEWithLogitsLoss(torch.nn.Module):
    """Binary cross-entropy with logits, averaged over the entries whose label is not ``-1``.

    The mean is over the *non-masked entries* (not over studies, nor per label first), so every
    observed finding counts once, whichever label it belongs to.

    Args:
        pos_weight: optional weight of the positive term per label, shape ``(L,)`` (as in
            :class:`torch.nn.BCEWithLogitsLoss`); kept as a buffer, so it follows ``.to(device)``.
    """

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Masked mean BCE.

        Args:
            logits: ``(n, L)`` raw scores.
            labels: ``(n, L)`` with values ``1``, ``0`` or ``-1`` (masked).

        Returns:
            Scalar loss; ``0`` when every entry is masked, still connected to ``logits`` so that
            ``backward()`` works (with zero gradients) in a step where no label was observed.

        Raises:
            ValueError: ``logits`` and ``labels`` of different shapes.
        """
        if logits.shape != labels.shape:
            raise ValueError(
                f"logits and labels must have the same shape, got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        observed = labels >= 0
        if not bool(observed.any()):
            return (logits * 0).sum()
        # masked targets become 0 only so that the elementwise loss is defined; they are dropped below
        targets = labels.clamp(min=0).to(logits.dtype)
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        per_entry = F.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=pos_weight, reduction="none"
        )
        # where() rather than multiplying by the mask: an inf logit on a masked entry gives an inf loss
        # there, and inf * 0 would turn the whole mean into NaN
        per_entry = torch.where(observed, per_entry, torch.zeros_like(per_entry))
        return per_entry.sum() / observed.sum()


class LinearProbe(torch.nn.Module):
    """MAE linear probe: ``BatchNorm1d`` without affine parameters, then one ``Linear`` layer.

    The BatchNorm only standardises the frozen features (its running statistics are buffers, not
    parameters), so the probe stays a linear classifier; MAE adds it because the scale of features
    differs between encoders and would otherwise change the effective learning rate.

    Args:
        in_features: embedding size ``D``.
        num_labels: number of findings ``L``.
    """

    def __init__(self, in_features: int, num_labels: int) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(in_features, affine=False, eps=1e-6)
        self.linear = torch.nn.Linear(in_features, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, L)`` of features ``(n, D)``."""
        return self.linear(self.bn(x))


# ----------------------------------------------------------------------------------------------
# fitting and prediction
# ----------------------------------------------------------------------------------------------


def _pos_weight(labels: torch.Tensor) -> torch.Tensor:
    """Per-label ``negatives / positives`` over the non-masked entries, clamped to ``[1, 100]``.

    A label without positives gets weight 1 (there is nothing to up-weight).
    """
    n_pos = (labels == 1).sum(dim=0).to(torch.float32)
    n_neg = (labels == 0).sum(dim=0).to(torch.float32)
    ratio = n_neg / n_pos.clamp(min=1.0)
    ratio = torch.where(n_pos > 0, ratio, torch.ones_like(ratio))
    return ratio.clamp(_POS_WEIGHT_MIN, _POS_WEIGHT_MAX)


def fit_linear_probe(
    features: Any,
    labels: Any,
    epochs: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
    pos_weight: bool = False,
) -> LinearProbe:
    """Fit a :class:`LinearProbe` on frozen features with full-batch AdamW and the masked BCE.

    Every epoch is one step on all ``n`` studies (cached embeddings fit in memory, and full batches
    make the fit deterministic and independent of any data order). The linear layer is initialised as
    in MAE's linear probing (weights ``trunc_normal(std=0.01)``, bias 0) from ``seed``, inside
    :func:`torch.random.fork_rng`, so the same seed gives the same probe and the caller's global RNG
    state is left exactly as it was. The BatchNorm uses a cumulative average (``momentum=None``):
    with the same batch every step its running statistics are then exactly the training features'
    mean and (unbiased) variance, rather than an exponential average still converging.

    Args:
        features: ``(n, D)`` embeddings, finite, ``n >= 2``; the probe is trained on their device
            (CPU for numpy input), in float32.
        labels: ``(n, L)`` findings with values ``1``, ``0`` or ``-1`` (masked).
        epochs: number of full-batch steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (decoupled; applies to the linear layer only, since the
            BatchNorm has no parameters).
        seed: seed of the initialisation.
        pos_weight: weight each label's positives by ``negatives / positives`` (non-masked entries,
            clamped to ``[1, 100]``, 1 for a label without positives), for rare findings.

    Returns:
        The fitted probe, in eval mode, on the features' device.

    Raises:
        ValueError: features not 2-D, not finite or fewer than 2 studies (BatchNorm needs two to
            estimate a variance); labels not 2-D, of another length or with values other than -1, 0,
            1; ``epochs < 0`` or ``lr <= 0``.
    """
    device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    x = _to_tensor(features, device)
    y = _to_tensor(labels, device)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n_studies, dim), got shape {tuple(x.shape)}")
    if y.ndim != 2:
        raise ValueError(f"labels must be 2-D (n_studies, n_labels), got shape {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 studies to fit a probe (BatchNorm statistics), got {x.shape[0]}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"features has {x.shape[0]} studies but labels has {y.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features must be finite (found NaN or inf)")
    _check_label_values(y.cpu().numpy())
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")

    # devices=[]: the initialisation runs on the CPU, so only the CPU generator needs forking (and
    # fork_rng would otherwise warn about, or touch, every visible CUDA device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(x.shape[1], y.shape[1])
        torch.nn.init.trunc_normal_(probe.linear.weight, std=0.01)
        torch.nn.init.zeros_(probe.linear.bias)
    probe.bn.momentum = None
    probe = probe.to(device)

    criterion = MaskedBCEWithLogitsLoss(_pos_weight(y) if pos_weight else None).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    for _ in range(int(epochs)):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(probe(x), y)
        loss.backward()
        optimizer.step()
    if epochs == 0:
        # no training step ran, so the running statistics are still 0 / 1: fill them once
        with torch.no_grad():
            probe(x)
    return probe.eval()


def probe_probabilities(probe: torch.nn.Module, features: Any) -> torch.Tensor:
    """Sigmoid probabilities of a probe, computed in eval mode without gradients.

    Args:
        probe: a fitted :class:`LinearProbe` (or any module mapping ``(n, D)`` to logits ``(n, L)``).
        features: ``(n, D)`` embeddings; moved to the probe's device.

    Returns:
        ``(n, L)`` float32 probabilities on the CPU.

    Raises:
        ValueError: features not 2-D.
    """
    param = next(probe.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = _to_tensor(features, device)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n_studies, dim), got shape {tuple(x.shape)}")
    was_training = probe.training
    # eval mode: BatchNorm must use the training set's statistics, not those of this batch
    probe.eval()
    try:
        with torch.no_grad():
            probs = torch.sigmoid(probe(x))
    finally:
        # give the probe back in the mode it came in, so a caller's training loop is not disturbed
        probe.train(was_training)
    return probs.float().cpu()
