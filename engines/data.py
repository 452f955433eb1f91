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

__all__ = ["SliceDataset", "healthy_slices_only"]


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
