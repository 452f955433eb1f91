"""A foreground (head/brain) mask computed from intensity, for images that come without one.

MONAI has the pieces only partly: ``KeepLargestConnectedComponent`` needs scikit-image (not a dependency
of this project) and ``monai.transforms.ForegroundMask`` is an HSV threshold for pathology slides. So the
steps are done here with torch (Otsu's threshold, vectorised on a histogram) and ``scipy.ndimage``
(components, hole filling, dilation), for 2D and 3D alike.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor
from scipy import ndimage

from transforms.validate import check_finite, image_name

__all__ = [
    "ForegroundMask",
    "ForegroundMaskD",
    "ForegroundMaskDict",
    "ForegroundMaskd",
    "largest_component",
    "otsu_threshold",
]


def otsu_threshold(img: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the histogram split maximising the between-class variance.

    Same convention as ``skimage.filters.threshold_otsu``: the threshold is a bin centre and foreground is
    ``img > threshold``.

    Args:
        img: any tensor of finite values.
        bins: number of histogram bins.

    Returns:
        The threshold; for a constant image, its value (so that ``img > threshold`` is empty).
    """
    x = torch.as_tensor(img)
    x = (x.as_tensor() if isinstance(x, MetaTensor) else x).reshape(-1).to(torch.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return lo
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    # weights and means of the class below (w0, m0) and above (w1, m1) every possible split
    w0 = torch.cumsum(counts, 0)
    w1 = torch.cumsum(counts.flip(0), 0).flip(0)
    m0 = torch.cumsum(counts * centres, 0) / w0.clamp_min(1e-12)
    m1 = (torch.cumsum((counts * centres).flip(0), 0) / w1.flip(0).clamp_min(1e-12)).flip(0)
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(torch.argmax(between))])


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Keep only the largest connected component of a boolean array.

    Args:
        mask: boolean array, any number of dimensions.
        connectivity: neighbourhood, 1 (faces) up to ``mask.ndim`` (corners).

    Returns:
        A boolean array; all False if ``mask`` is empty.
    """
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    return labels == int(np.argmax(sizes))


class ForegroundMask(Transform):
    """Single-channel foreground mask ``(1, *spatial)`` of a channel-first image, 2D or 3D.

    Steps: threshold (Otsu or a fixed value; foreground is ``> threshold``), keep the largest connected
    component (drops noise specks and separate blobs), fill holes (dark cavities such as ventricles or
    air sinuses completely enclosed by foreground), dilate by ``dilate`` voxels. A constant image gives an
    empty mask.

    Args:
        threshold: ``"otsu"`` or a fixed intensity.
        fill_holes: fill enclosed holes.
        largest_component: keep only the largest connected component.
        dilate: number of one-voxel dilation steps (face neighbourhood) applied last.
        channel: channel the mask is computed from; ``None`` uses the mean over channels.
        connectivity: neighbourhood for components and holes, 1 (faces) up to the number of spatial dims.
        bins: histogram bins for Otsu's threshold.
        dtype: output dtype (``torch.uint8`` by default; ``torch.bool`` works too).

    Raises:
        InputDataError: from ``__call__``, naming the file, for NaN/Inf voxels.
    """

    def __init__(
        self,
        threshold: str | float = "otsu",
        fill_holes: bool = True,
        largest_component: bool = True,
        dilate: int = 0,
        channel: int | None = 0,
        connectivity: int = 1,
        bins: int = 256,
        dtype: torch.dtype = torch.uint8,
    ) -> None:
        if isinstance(threshold, str) and threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}.")
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0, got {dilate}.")
        self.threshold = threshold
        self.fill_holes = fill_holes
        self.largest_component = largest_component
        self.dilate = int(dilate)
        self.channel = channel
        self.connectivity = connectivity
        self.bins = bins
        self.dtype = dtype

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Compute the mask of ``img``.

        Args:
            img: channel-first image ``(C, *spatial)``.

        Returns:
            ``(1, *spatial)`` mask with ``img``'s metadata (affine) if ``img`` is a MetaTensor.
        """
        img_t = convert_to_tensor(img, track_meta=isinstance(img, MetaTensor))
        check_finite(img_t, image_name(img_t))
        x = img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t
        x = x.to(torch.float32)
        x = x.mean(dim=0) if self.channel is None else x[self.channel]
        t = otsu_threshold(x, self.bins) if self.threshold == "otsu" else float(self.threshold)
        fg = (x > t).cpu().numpy()
        structure = ndimage.generate_binary_structure(fg.ndim, self.connectivity)
        if self.largest_component and fg.any():
            fg = largest_component(fg, self.connectivity)
        if self.fill_holes:
            fg = ndimage.binary_fill_holes(fg, structure=structure)
        if self.dilate:
            fg = ndimage.binary_dilation(
                fg, structure=ndimage.generate_binary_structure(fg.ndim, 1), iterations=self.dilate
            )
        out = torch.from_numpy(np.ascontiguousarray(fg))[None].to(x.device)
        return convert_to_dst_type(out, dst=img_t, dtype=self.dtype)[0]


class ForegroundMaskd(MapTransform):
    """Dictionary version of :class:`ForegroundMask`: writes the mask of each key to a new key.

    Args:
        keys: keys of the images.
        output_keys: keys for the masks, one per key; ``None`` appends ``output_postfix`` to each key.
        output_postfix: used when ``output_keys`` is None (``"image"`` -> ``"image_mask"``).
        threshold: see :class:`ForegroundMask`.
        fill_holes: see :class:`ForegroundMask`.
        largest_component: see :class:`ForegroundMask`.
        dilate: see :class:`ForegroundMask`.
        channel: see :class:`ForegroundMask`.
        connectivity: see :class:`ForegroundMask`.
        bins: see :class:`ForegroundMask`.
        dtype: see :class:`ForegroundMask`.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        output_postfix: str = "_mask",
        threshold: str | float = "otsu",
        fill_holes: bool = True,
        largest_component: bool = True,
        dilate: int = 0,
        channel: int | None = 0,
        connectivity: int = 1,
        bins: int = 256,
        dtype: torch.dtype = torch.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_keys is None:
            self.output_keys = tuple(f"{k}{output_postfix}" for k in self.keys)
        else:
            self.output_keys = ensure_tuple(output_keys)
            if len(self.output_keys) != len(self.keys):
                raise ValueError(f"got {len(self.keys)} keys but {len(self.output_keys)} output_keys.")
        self.masker = ForegroundMask(
            threshold, fill_holes, largest_component, dilate, channel, connectivity, bins, dtype
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add a mask for every key; returns a shallow copy of ``data``."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.masker(d[key])
        return d


ForegroundMaskD = ForegroundMaskDict = ForegroundMaskd
