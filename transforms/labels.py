"""Slice-level class labels derived from lesion masks, in the class order a datalist declares.

The noise-aware classifier of guided DDIM (Wolleb et al., 2022) learns "healthy" vs "diseased" per 2D slice.
Volumetric datasets (BraTS, the demo cohort) carry a lesion mask per volume, not a label per slice, so the slice
label is read off the mask after slicing. The index of each class comes from the datalist's ``class_names``
(not from a hard-wired 0/1): guidance toward "healthy" must use the same order the classifier was trained with.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["AMBIGUOUS", "SliceClassLabelD", "SliceClassLabelDict", "SliceClassLabeld", "known_class_only"]

AMBIGUOUS = -1


class SliceClassLabeld(MapTransform):
    """Add a class index per slice: ``diseased`` if its lesion mask has at least ``min_pixels`` voxels,
    ``healthy`` if it has none, :data:`AMBIGUOUS` (-1) in between (a sliver of lesion: drop such slices
    with :func:`known_class_only` rather than teach the classifier a label it cannot see).

    An item that already has ``output_key`` (a 2D dataset labelled per image) is left as it is.

    Args:
        keys: the lesion-mask key (one key).
        class_names: the class names by index, e.g. the datalist's ``class_names``.
        output_key: where the class index goes.
        healthy_name: name of the lesion-free class in ``class_names``.
        diseased_name: name of the lesion class in ``class_names``.
        min_pixels: lesion voxels needed in the slice for ``diseased``.
        allow_missing_keys: items without a mask keep no label instead of raising.

    Raises:
        ValueError: if a class name is missing from ``class_names`` or several keys are given.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        class_names: Sequence[str] = ("healthy", "diseased"),
        output_key: str = "class_label",
        healthy_name: str = "healthy",
        diseased_name: str = "diseased",
        min_pixels: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SliceClassLabeld takes one lesion-mask key, got {self.keys}")
        names = list(class_names)
        for n in (healthy_name, diseased_name):
            if n not in names:
                raise ValueError(f"class {n!r} is not in class_names {names}")
        self.healthy = names.index(healthy_name)
        self.diseased = names.index(diseased_name)
        self.output_key = output_key
        self.min_pixels = max(int(min_pixels), 1)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Label one slice.

        Args:
            data: a slice dict with the lesion mask under the key.

        Returns:
            A copy with ``output_key`` set to the class index (an ``int``).
        """
        d = dict(data)
        if self.output_key in d:
            return d
        for key in self.key_iterator(d):
            mask = d[key]
            mask = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
            n = int((mask > 0).sum())
            if n == 0:
                d[self.output_key] = self.healthy
            elif n >= self.min_pixels:
                d[self.output_key] = self.diseased
            else:
                d[self.output_key] = AMBIGUOUS
        return d


def known_class_only(label_key: str = "class_label") -> Any:
    """A slice filter (for :class:`engines.SliceDataset`) that drops :data:`AMBIGUOUS` slices.

    Args:
        label_key: the class-index key.

    Returns:
        A predicate on slice dicts.
    """

    def keep(s: Mapping) -> bool:
        return int(s.get(label_key, AMBIGUOUS)) != AMBIGUOUS

    return keep


SliceClassLabelD = SliceClassLabelDict = SliceClassLabeld
