"""Multi-view studies: load a study's 1..5 views as one ``(V, 1, S, S)`` tensor, and batch studies of
different view counts with a view mask."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data.utils import list_data_collate
from monai.transforms import MapTransform

from transforms.errors import InputDataError
from transforms.pipeline import slice_loading_transforms

__all__ = ["LoadStudyD", "LoadStudyDict", "LoadStudyd", "collate_studies"]


class LoadStudyd(MapTransform):
    """Load the views of a study (a list of paths) into one tensor.

    Every view goes through :func:`transforms.pipeline.slice_loading_transforms` (NIfTI, DICOM, PNG/JPEG;
    RGB → grey; checked 2D; longest side to ``image_size`` with the aspect ratio kept, zero padding to a
    square; whole-image 0.5-99.5 percentile scaling to ``[b_min, b_max]``), so an axial 80 x 96 slice and
    a 2544 x 3056 chest radiograph both come out ``(1, S, S)``. The list becomes ``(V, 1, S, S)``.
    ``labels`` (if present) becomes a float tensor.

    Args:
        keys: keys holding lists of view paths (default ``views``).
        image_size: output side ``S``.
        b_min: intensity of the 0.5th percentile.
        b_max: intensity of the 99.5th percentile.
        max_views: most views accepted per study.
        label_key: the findings vector to convert (None: none).
        allow_constant: if False, a view whose pixels all share one value is an error (inference sets it).
        min_value: views with values below it are an error (e.g. CT Hounsfield units; see
            :class:`transforms.validate.CheckImage`).
        allow_missing_keys: skip absent keys.

    Raises:
        InputDataError: a study without views or with more than ``max_views``; a view that cannot be
            read (the message names the file).
    """

    def __init__(
        self,
        keys: KeysCollection = "views",
        image_size: int = 64,
        b_min: float = -1.0,
        b_max: float = 1.0,
        max_views: int = 5,
        label_key: str | None = "labels",
        allow_constant: bool = True,
        min_value: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_views = int(max_views)
        self.label_key = label_key
        self.per_view = slice_loading_transforms(
            ("image",),
            image_size,
            normalise=True,
            b_min=b_min,
            b_max=b_max,
            allow_constant=allow_constant,
            min_value=min_value,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key]
            if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
                paths = [paths]
            if not 1 <= len(paths) <= self.max_views:
                raise InputDataError(
                    f"a study must have 1 to {self.max_views} views, this one has {len(paths)}",
                    paths[0] if paths else None,
                )
            d[key] = torch.stack([self.per_view({"image": p})["image"] for p in paths])
        if self.label_key is not None and self.label_key in d:
            d[self.label_key] = torch.as_tensor(d[self.label_key], dtype=torch.float32)
        return d


LoadStudyD = LoadStudyDict = LoadStudyd


def collate_studies(
    batch: Sequence[Mapping[str, Any]], views_key: str = "views", mask_key: str = "view_mask"
) -> dict[str, Any]:
    """Batch studies of different view counts: views zero-padded to the largest count, plus a mask.

    MONAI's ``pad_list_data_collate`` pads *spatial* dimensions; here the view axis is padded and the
    mask records which views are real, so the encoder never computes the padding (it packs real views).

    Args:
        batch: items with ``views_key`` ``(V_i, C, H, W)`` tensors of one ``(C, H, W)``.
        views_key: the views key.
        mask_key: the output mask key.

    Returns:
        ``views_key`` ``(B, V_max, C, H, W)``, ``mask_key`` ``(B, V_max)`` bool, every other key collated
        by MONAI's ``list_data_collate`` (tensors stacked, strings and lists of paths as lists).

    Raises:
        ValueError: an empty batch, or views of different shapes.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch of studies.")
    views = [torch.as_tensor(b[views_key]) for b in batch]
    shapes = {tuple(v.shape[1:]) for v in views}
    if len(shapes) != 1:
        raise ValueError(f"views of one batch must share (C, H, W); got {sorted(shapes)}.")
    v_max = max(v.shape[0] for v in views)
    padded = views[0].new_zeros((len(views), v_max, *views[0].shape[1:]))
    mask = torch.zeros(len(views), v_max, dtype=torch.bool)
    for i, v in enumerate(views):
        padded[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    # view path lists differ in length, which list_data_collate cannot transpose: keep them as lists
    ragged = {k for k, val in batch[0].items() if isinstance(val, (list, tuple))}
    rest = list_data_collate(
        [{k: val for k, val in b.items() if k != views_key and k not in ragged} for b in batch]
    )
    out = dict(rest) if isinstance(rest, Mapping) else {}
    out.update({k: [b[k] for b in batch] for k in ragged if k != views_key})
    out[views_key] = padded
    out[mask_key] = mask
    return out
