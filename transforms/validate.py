"""Input checks that fail early, with a message naming the offending file.

Bad voxels (NaN/Inf), a 4D series where a volume is expected or a mask written on another grid all
pass silently through MONAI's loading transforms and surface much later as NaN losses or shape errors
deep inside a network. These transforms stop the pipeline at the first transform that can see the
problem and raise :class:`~transforms.errors.InputDataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from transforms.errors import InputDataError, source_name

__all__ = [
    "CheckImage",
    "CheckImageD",
    "CheckImageDict",
    "CheckImaged",
    "CheckMaskMatches",
    "CheckMaskMatchesD",
    "CheckMaskMatchesDict",
    "CheckMaskMatchesd",
    "check_finite",
    "count_nonfinite",
    "image_name",
    "prepare_mask",
]


def image_name(img: Any, default: str = "<in-memory image>") -> str:
    """The source file of ``img`` (its ``filename_or_obj``), or ``default`` if it is not a MetaTensor.

    Args:
        img: an image, usually a MetaTensor loaded by ``LoadImage``.
        default: returned when no file is recorded.

    Returns:
        The file name to put in error messages.
    """
    return source_name(img.meta if isinstance(img, MetaTensor) else None, default)


def count_nonfinite(img: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """Count NaN and infinite voxels.

    Args:
        img: any array.

    Returns:
        ``(n_nan, n_inf)``; ``(0, 0)`` for integer or boolean arrays, which cannot hold either.
    """
    t = torch.as_tensor(img)
    if not (t.is_floating_point() or t.is_complex()):
        return 0, 0
    t = t.as_subclass(torch.Tensor) if isinstance(t, MetaTensor) else t
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def check_finite(img: torch.Tensor | np.ndarray, name: str | None = None) -> None:
    """Raise if ``img`` holds NaN or Inf voxels.

    Args:
        img: the image to check.
        name: the file to name in the error; defaults to ``img``'s ``filename_or_obj``.

    Raises:
        InputDataError: with the counts of NaN and Inf voxels.
    """
    n_nan, n_inf = count_nonfinite(img)
    if n_nan or n_inf:
        raise InputDataError(
            f"contains {n_nan} NaN and {n_inf} Inf voxels (of {int(np.prod(img.shape))})",
            name or image_name(img),
        )


def prepare_mask(mask: torch.Tensor | np.ndarray, img: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """A boolean, channel-first mask that broadcasts against the channel-first ``img``.

    Voxels with a value ``> 0`` are foreground (MONAI's ``is_positive`` convention, so both 0/1 masks and
    label maps work). A mask with one channel (or none) applies to every channel of ``img``; a mask with
    as many channels as ``img`` applies channel by channel; any other channel count is reduced with
    "foreground in any channel".

    Args:
        mask: ``(C', *spatial)`` or ``(*spatial)`` array.
        img: the channel-first image ``(C, *spatial)`` the mask belongs to.
        what: how to call the mask in error messages.

    Returns:
        A bool tensor of shape ``(1, *spatial)`` or ``(C, *spatial)`` on ``img``'s device.

    Raises:
        InputDataError: naming the mask file when its spatial shape differs from the image's.
    """
    m = torch.as_tensor(mask)
    name = image_name(m)
    m = m.as_subclass(torch.Tensor) if isinstance(m, MetaTensor) else m
    spatial = tuple(img.shape[1:])
    if m.ndim == len(spatial):  # no channel axis
        m = m.unsqueeze(0)
    if tuple(m.shape[1:]) != spatial:
        raise InputDataError(
            f"{what} spatial shape {tuple(m.shape[1:])} differs from the image's {spatial}"
            f" (image: {image_name(img)})",
            name,
        )
    m = m.to(device=img.device) > 0
    if m.shape[0] not in (1, img.shape[0]):
        m = m.any(dim=0, keepdim=True)
    return m


def _is_channel_last_file(img: Any) -> bool:
    # LoadImage records where the file kept its non-spatial axis; -1 means the file itself was 4D
    # (e.g. a NIfTI time series) and EnsureChannelFirst turned the 4th axis into channels.
    if not isinstance(img, MetaTensor):
        return False
    dim = img.meta.get("original_channel_dim", None)
    try:
        return int(dim) == -1
    except (TypeError, ValueError):
        return False


class CheckImage(Transform):
    """Check a channel-first image and return it unchanged.

    Args:
        expected_spatial_dims: required number of spatial dimensions (``img.ndim - 1``); ``None`` skips.
        expected_channels: required number of channels; ``None`` skips. With ``1``, a 4D file whose 4th
            axis became channels (a time series, a stack of b-values) is reported as "4D".
        allow_nonfinite: if False, NaN or Inf voxels are an error.
        allow_constant: if False, an image whose voxels all have the same value is an error.
        min_value: voxels below this value are an error; ``None`` skips. The MRI bundles set -200: MR
            magnitude images are non-negative and z-scored or rescaled ones stay far above it, while a CT in
            Hounsfield units (air -1000) fed to an MRI model falls below it and would otherwise be
            normalised into a plausible-looking but meaningless input.

    Raises:
        InputDataError: from ``__call__``, naming the file, for an empty image, a wrong dimensionality or
            channel count, non-finite voxels, (optionally) a constant image or values below ``min_value``.
    """

    def __init__(
        self,
        expected_spatial_dims: int | None = 3,
        expected_channels: int | None = None,
        allow_nonfinite: bool = False,
        allow_constant: bool = True,
        min_value: float | None = None,
    ) -> None:
        self.expected_spatial_dims = expected_spatial_dims
        self.expected_channels = expected_channels
        self.allow_nonfinite = allow_nonfinite
        self.allow_constant = allow_constant
        self.min_value = min_value

    def __call__(self, img: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Check ``img``.

        Args:
            img: channel-first image ``(C, *spatial)``.
            name: file to name in errors; defaults to the MetaTensor's ``filename_or_obj``.

        Returns:
            ``img``, unchanged.
        """
        name = name or image_name(img)
        shape = tuple(img.shape)
        spatial_dims = len(shape) - 1
        if self.expected_spatial_dims is not None and spatial_dims != self.expected_spatial_dims:
            if _is_channel_last_file(img) and shape[0] > 1:
                # the file's last axis became channels: name the dimensionality the user stored
                stored = (*shape[1:], shape[0])
                raise InputDataError(
                    f"is {len(stored)}D (shape {stored} as stored) where a {self.expected_spatial_dims}D "
                    "image is expected",
                    name,
                )
            raise InputDataError(
                f"is {spatial_dims}D (spatial shape {shape[1:]}, channel-first shape {shape}) where a "
                f"{self.expected_spatial_dims}D volume is expected",
                name,
            )
        if int(np.prod(shape)) == 0:
            raise InputDataError(f"is empty (shape {shape})", name)
        if self.expected_channels is not None and shape[0] != self.expected_channels:
            if _is_channel_last_file(img):
                stored = (*shape[1:], shape[0])
                raise InputDataError(
                    f"is {len(stored)}D (shape {stored} as stored) where a {spatial_dims}D volume with "
                    f"{self.expected_channels} channel(s) is expected",
                    name,
                )
            raise InputDataError(
                f"has {shape[0]} channels (shape {shape}) where {self.expected_channels} is expected", name
            )
        if not self.allow_nonfinite:
            check_finite(img, name)
        if not self.allow_constant:
            t = torch.as_tensor(img)
            if bool(t.max() == t.min()):
                raise InputDataError(f"is constant (every voxel is {t.flatten()[0].item()})", name)
        if self.min_value is not None:
            t = torch.as_tensor(img)
            lo = float(t.min())
            if lo < self.min_value:
                hi = float(t.max())
                raise InputDataError(
                    f"has values down to {lo:g} (range [{lo:g}, {hi:g}]), below the {self.min_value:g} this "
                    "bundle accepts: MRI and radiograph intensities are non-negative; is this a CT in Hounsfield "
                    "units or another modality?",
                    name,
                )
        return img


class CheckImaged(MapTransform):
    """Dictionary version of :class:`CheckImage`.

    Args:
        keys: keys of the images to check.
        expected_spatial_dims: see :class:`CheckImage`.
        expected_channels: see :class:`CheckImage`.
        allow_nonfinite: see :class:`CheckImage`.
        allow_constant: see :class:`CheckImage`.
        min_value: see :class:`CheckImage`.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        expected_spatial_dims: int | None = 3,
        expected_channels: int | None = None,
        allow_nonfinite: bool = False,
        allow_constant: bool = True,
        min_value: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckImage(
            expected_spatial_dims, expected_channels, allow_nonfinite, allow_constant, min_value
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check every key; returns a shallow copy of ``data``."""
        d = dict(data)
        for key in self.key_iterator(d):
            self.checker(d[key])
        return d


class CheckMaskMatches(Transform):
    """Check that a mask lies on its image's voxel grid: same spatial shape and affine.

    Args:
        atol: absolute tolerance on affine entries (mm); headers written by different tools differ by
            float rounding, which must not fail the check.
        what: how to call the checked image in messages (``"mask"``, ``"label"``, ``"image"``).

    Raises:
        InputDataError: from ``__call__``, naming the mask file (and the image file in the message).
    """

    def __init__(self, atol: float = 1e-3, what: str = "mask") -> None:
        self.atol = atol
        self.what = what

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Check ``mask`` against ``img``.

        Args:
            img: channel-first image.
            mask: channel-first mask.

        Returns:
            ``mask``, unchanged.
        """
        img_name, mask_name = image_name(img), image_name(mask)
        if tuple(mask.shape[1:]) != tuple(img.shape[1:]):
            raise InputDataError(
                f"{self.what} spatial shape {tuple(mask.shape[1:])} differs from the spatial shape "
                f"{tuple(img.shape[1:])} of its image {img_name}",
                mask_name,
            )
        # Only MetaTensors carry a geometry; a plain tensor has nothing to compare.
        if isinstance(img, MetaTensor) and isinstance(mask, MetaTensor):
            a = img.affine.detach().cpu().to(torch.float64)
            b = mask.affine.detach().cpu().to(torch.float64)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=0.0, atol=self.atol):
                diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
                raise InputDataError(
                    f"{self.what} affine differs from the affine of its image {img_name} (largest difference "
                    f"{diff:.4g} > atol {self.atol}); {self.what} affine\n{np.array2string(b.numpy(), precision=4)}"
                    f"\nimage affine\n{np.array2string(a.numpy(), precision=4)}",
                    mask_name,
                )
        return mask


class CheckMaskMatchesd(MapTransform):
    """Dictionary version of :class:`CheckMaskMatches`: check each mask key against ``image_key``.

    Place it after any reorientation applied to both image and masks (e.g. ``Orientationd``): arrays are
    voxel-aligned exactly when, at that point, shapes and affines agree, even if the files were written
    with different axis orders.

    Args:
        image_key: key of the reference image.
        mask_keys: keys of the masks that must lie on the image's grid.
        atol: see :class:`CheckMaskMatches`.
        what: see :class:`CheckMaskMatches`.
        allow_missing_keys: don't raise if a mask key (or the image key) is missing.
    """

    def __init__(
        self,
        image_key: str,
        mask_keys: KeysCollection,
        atol: float = 1e-3,
        what: str = "mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(mask_keys, allow_missing_keys)
        self.image_key = image_key
        self.checker = CheckMaskMatches(atol, what)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Check every mask key; returns a shallow copy of ``data``."""
        d = dict(data)
        if self.image_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"image key {self.image_key!r} is not in the data (keys: {list(d)})")
        for key in self.key_iterator(d):
            self.checker(d[self.image_key], d[key])
        return d


CheckImageD = CheckImageDict = CheckImaged
CheckMaskMatchesD = CheckMaskMatchesDict = CheckMaskMatchesd
