"""Datasets of 2D slices cut from 3D volumes, for the 2D bundles.

MONAI's ``CacheDataset`` caches one entry per *input item*; a volume → slices transform is
one-to-many with a variable count per volume (the foreground filter drops a different number of
slices from each brain), so caching it there would make every dataset item a whole volume's list
of slices and every batch a variable number of slices. :class:`SliceDataset` instead runs the
deterministic part once per volume (load, check, reorient, normalise, slice, resize), keeps the
slices in memory as independent items, and applies the random transforms per slice and epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import DataLoader
from monai.data import Dataset as MonaiDataset
from monai.transforms import apply_transform
from monai.utils import ensure_tuple

__all__ = [
    "SliceDataset",
    "class_weights",
    "class_weights_from_labels",
    "healthy_slices_only",
    "healthy_volumes",
    "subset_by_kind",
]


def _identity_collate(batch: list[Any]) -> list[Any]:
    return batch


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of 3D volumes as dataset items, cached after the deterministic transforms.

    Args:
        data: datalist items (dicts with file paths under the image/mask keys).
        volume_transform: deterministic transforms of one item that end in a one-to-many slicing
            transform (e.g. ``transforms.VolumeToSlicesd``) and so return a list of slice dicts;
            per-slice deterministic transforms (resize, pad) may follow it in the same ``Compose``.
        transform: random transforms applied to a slice every time it is drawn (augmentation).
        slice_filter: optional predicate on a prepared slice dict; slices for which it returns
            ``False`` are dropped (e.g. :func:`healthy_slices_only`).
        num_workers: worker processes that prepare volumes in parallel (0: in this process).
        drop_keys: keys removed from every slice after preparation (large or unneeded entries).

    Raises:
        ValueError: when no slice is left, naming the number of volumes read.
    """

    def __init__(
        self,
        data: Sequence[dict],
        volume_transform: Callable,
        transform: Callable | None = None,
        slice_filter: Callable[[dict], bool] | None = None,
        num_workers: int = 0,
        drop_keys: Sequence[str] | str = (),
    ) -> None:
        self.transform = transform
        drop = set(ensure_tuple(drop_keys))
        loader = DataLoader(
            MonaiDataset(list(data), transform=volume_transform),
            batch_size=1,
            num_workers=num_workers,
            collate_fn=_identity_collate,
        )
        self.slices: list[dict] = []
        for (slices,) in loader:
            for s in slices if isinstance(slices, list) else [slices]:
                if slice_filter is None or slice_filter(s):
                    self.slices.append({k: v for k, v in s.items() if k not in drop})
        if not self.slices:
            raise ValueError(
                f"SliceDataset: no slice left from {len(data)} volume(s); check the foreground filter."
            )

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> dict:
        item = self.slices[index]
        return apply_transform(self.transform, item) if self.transform is not None else dict(item)


def healthy_slices_only(label_key: str = "label") -> Callable[[dict], bool]:
    """A slice filter that keeps slices without lesion voxels (or items without a label).

    Args:
        label_key: key of the lesion mask slice.

    Returns:
        A predicate for :class:`SliceDataset`'s ``slice_filter``.
    """

    def keep(s: dict) -> bool:
        lab = s.get(label_key)
        return lab is None or not bool(torch.as_tensor(lab).any())

    return keep


def healthy_volumes(items: Sequence[dict], label_key: str = "label", kind_key: str = "kind") -> list[dict]:
    """The datalist items of lesion-free volumes (for thresholds fixed on healthy data only).

    An item is healthy when its ``kind`` is ``"healthy"``; without a ``kind``, when it has no lesion
    mask or its mask is empty (read from disk).

    Args:
        items: datalist items.
        label_key: key of the lesion-mask path.
        kind_key: key of the subject kind.

    Returns:
        The healthy items, in their order.

    Raises:
        ValueError: when none is healthy (thresholds need healthy volumes).
    """
    import nibabel as nib
    import numpy as np

    def healthy(it: dict) -> bool:
        if kind_key in it:
            return str(it[kind_key]).lower() == "healthy"
        if not it.get(label_key):
            return True
        return not np.asanyarray(nib.load(it[label_key]).dataobj).any()

    out = [it for it in items if healthy(it)]
    if not out:
        raise ValueError(
            f"no healthy volume among {len(items)} datalist items (by '{kind_key}' or an empty mask)"
        )
    return out


def subset_by_kind(items: Sequence[dict], n: int | None, kind_key: str = "kind") -> list[dict]:
    """The first ``n`` items, taken round-robin over their kinds (healthy, glioma, ...).

    ``items[:n]`` of a datalist sorted by subject can hold one kind only; a small run (a smoke test,
    a quick look) needs every kind. Items without a kind count as one kind.

    Args:
        items: datalist items.
        n: how many to keep; ``None`` keeps all (in their order).

    Returns:
        The chosen items, in datalist order.
    """
    if n is None or n >= len(items):
        return list(items)
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(str(it.get(kind_key, "")), []).append(i)
    chosen: list[int] = []
    queues = [list(g) for g in groups.values()]
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return [items[i] for i in sorted(chosen)]


def class_weights(dataset: SliceDataset, num_classes: int, label_key: str = "class_label") -> torch.Tensor:
    """Inverse-frequency class weights for ``CrossEntropyLoss(weight=...)``: ``N / (C * n_c)``.

    Lesion slices are a small minority of a brain volume's slices (about 6 % in the demo cohort);
    unweighted, a classifier that always answers "healthy" is 94 % accurate and its gradient says
    nothing about lesions. Loss weights, unlike a weighted sampler, also work unchanged under a
    ``DistributedSampler``.

    Args:
        dataset: a :class:`SliceDataset` whose slices carry ``label_key``.
        num_classes: number of classes ``C``.
        label_key: key of the class index.

    Returns:
        A float tensor of ``C`` weights (a class without slices gets weight 0).

    Raises:
        ValueError: if a slice has a class index outside ``[0, C)``.
    """
    return class_weights_from_labels([int(s[label_key]) for s in dataset.slices], num_classes)


def class_weights_from_labels(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (C * n_c)`` of a list of class indices (see :func:`class_weights`).

    Args:
        labels: class indices, e.g. ``[d["label"] for d in datalist_items]``.
        num_classes: number of classes ``C``.

    Returns:
        A float tensor of ``C`` weights (a class without items gets weight 0).

    Raises:
        ValueError: if an index is outside ``[0, C)``.
    """
    labels = torch.tensor([int(v) for v in labels], dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}), got {sorted(set(labels.tolist()))}")
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.where(
        counts > 0, labels.numel() / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts)
    )
    return weights.float()
