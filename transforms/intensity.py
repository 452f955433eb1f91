"""Intensity normalisation with statistics taken inside a foreground mask.

Both transforms are hand-written rather than wrappers of MONAI's ``ScaleIntensityRangePercentiles`` and
``NormalizeIntensity``: neither accepts an external mask (``NormalizeIntensity(nonzero=True)`` only knows
"non-zero", which is wrong for MR where background noise is non-zero), and on a constant image both
quietly produce something undefined instead of a documented value (``ScaleIntensityRange`` warns and
shifts the image; ``NormalizeIntensity`` divides by 1). Here a constant image gives a fixed documented
output (``on_constant="fill"``) or an :class:`~transforms.errors.InputDataError` (``"raise"``), and NaN/Inf
voxels always raise, naming the file: the outputs never contain NaN or Inf.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, look_up_option
from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

from transforms.errors import InputDataError
from transforms.validate import check_finite, image_name, prepare_mask

__all__ = [
    "MaskedZScore",
    "MaskedZScoreD",
    "MaskedZScoreDict",
    "MaskedZScored",
    "PercentileScaleIntensity",
    "PercentileScaleIntensityD",
    "PercentileScaleIntensityDict",
    "PercentileScaleIntensityd",
    "quantiles",
]

_ON_CONSTANT = ("fill", "raise")


def quantiles(values: torch.Tensor, q: Sequence[float]) -> list[float]:
    """Percentiles of a 1D tensor with linear interpolation (numpy's default method).

    ``torch.quantile`` refuses inputs above 2**24 elements (a 256**3 volume), so this sorts once instead.

    Args:
        values: 1D tensor, not empty.
        q: percentiles in [0, 100].

    Returns:
        One float per entry of ``q``.
    """
    s = torch.sort(values.reshape(-1)).values.to(torch.float64)
    n = s.numel()
    out = []
    for p in q:
        pos = float(p) / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


def _work_tensor(img: torch.Tensor) -> torch.Tensor:
    x = img.as_tensor() if isinstance(img, MetaTensor) else img
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _groups(x: torch.Tensor, channel_wise: bool) -> list[slice]:
    return [slice(c, c + 1) for c in range(x.shape[0])] if channel_wise else [slice(None)]


def _masked_values(x: torch.Tensor, m: torch.Tensor | None, mask_obj: Any, img_name: str) -> torch.Tensor:
    if m is None:
        return x.reshape(-1)
    values = x[m.expand_as(x)]
    if values.numel() == 0:
        raise InputDataError(
            f"foreground mask is empty (no voxel > 0) for image {img_name}; statistics are undefined",
            image_name(mask_obj, default=img_name),
        )
    return values


def _prepare(img: Any, mask: Any) -> tuple[torch.Tensor, str, torch.Tensor, torch.Tensor | None]:
    """Shared prologue of the normalisers: tensor, file name, finite check, working copy, mask."""
    img_t = convert_to_tensor(img, track_meta=isinstance(img, MetaTensor))
    name = image_name(img_t)
    check_finite(img_t, name)
    x = _work_tensor(img_t)
    return img_t, name, x, None if mask is None else prepare_mask(mask, x)


def _channel_groups(
    x: torch.Tensor, m: torch.Tensor | None, channel_wise: bool, mask_obj: Any, name: str
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Yield ``(group, values of the group, its mask, the voxels the statistics come from)``."""
    for g in _groups(x, channel_wise):
        xg = x[g]
        mg = None if m is None else (m[g] if m.shape[0] > 1 else m)
        yield g, xg, mg, _masked_values(xg, mg, mask_obj, name)


class PercentileScaleIntensity(Transform):
    """Clip to the ``[lower, upper]`` percentiles and scale linearly to ``[b_min, b_max]``.

    Percentiles are computed over the voxels inside ``mask`` (or the whole image), pooled over channels
    unless ``channel_wise``; the scaling is applied to every voxel. With ``clip=True`` (default) the output
    range is exactly ``[b_min, b_max]``: ``(0, 1)`` and ``(-1, 1)`` are the usual choices for diffusion
    models.

    A constant image (more precisely: equal ``lower`` and ``upper`` percentiles, e.g. an all-zero image)
    has no intensity range to scale. ``on_constant="fill"`` returns ``b_min`` everywhere (per channel when
    ``channel_wise``); ``on_constant="raise"`` raises :class:`InputDataError`.

    Args:
        lower: lower percentile in [0, 100].
        upper: upper percentile in [0, 100], greater than ``lower``.
        b_min: output value of the lower percentile.
        b_max: output value of the upper percentile.
        clip: clip to ``[b_min, b_max]``; if False, values beyond the percentiles extrapolate linearly.
        channel_wise: compute percentiles for each channel separately.
        on_constant: ``"fill"`` or ``"raise"``, see above.
        dtype: output dtype.

    Raises:
        InputDataError: from ``__call__``, naming the file, for NaN/Inf voxels, an empty mask, a mask on
            another grid, or a constant image with ``on_constant="raise"``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        lower: float = 0.5,
        upper: float = 99.5,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        channel_wise: bool = False,
        on_constant: str = "fill",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        if b_min == b_max:
            raise ValueError(f"b_min and b_max must differ, got {b_min}.")
        self.lower, self.upper = float(lower), float(upper)
        self.b_min, self.b_max = float(b_min), float(b_max)
        self.clip = clip
        self.channel_wise = channel_wise
        self.on_constant = look_up_option(on_constant, _ON_CONSTANT)
        self.dtype = dtype

    def __call__(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scale ``img``.

        Args:
            img: channel-first image ``(C, *spatial)``.
            mask: optional foreground mask (``> 0`` is foreground), ``(1 or C, *spatial)``.

        Returns:
            The scaled image, a MetaTensor with ``img``'s metadata if ``img`` is one.
        """
        img_t, name, x, m = _prepare(img, mask)
        out = torch.empty_like(x)
        lo_out, hi_out = min(self.b_min, self.b_max), max(self.b_min, self.b_max)
        for g, xg, _, values in _channel_groups(x, m, self.channel_wise, mask, name):
            a_min, a_max = quantiles(values, (self.lower, self.upper))
            # Bounds as tensors of the working dtype: clip and subtract with the very same rounded
            # values, so (x - lo) / (hi - lo) is provably within [0, 1] in floating point.
            lo = torch.tensor(a_min, dtype=x.dtype)
            hi = torch.tensor(a_max, dtype=x.dtype)
            width = hi - lo
            if not bool(width > 0):
                if self.on_constant == "raise":
                    raise InputDataError(
                        f"has no intensity range to scale: its {self.lower}th and {self.upper}th percentiles "
                        f"are both {a_min:.6g} (constant image?)",
                        name,
                    )
                out[g] = self.b_min
                continue
            xs = xg.clamp(lo, hi) if self.clip else xg
            out[g] = (xs - lo) / width * (self.b_max - self.b_min) + self.b_min
        if self.clip:
            out.clamp_(lo_out, hi_out)  # exact range even with rounding in the affine map
        elif not bool(torch.isfinite(out).all()):
            raise InputDataError("percentile scaling without clipping overflowed (range too narrow)", name)
        return convert_to_dst_type(out, dst=img_t, dtype=self.dtype)[0]


class PercentileScaleIntensityd(MapTransform):
    """Dictionary version of :class:`PercentileScaleIntensity`.

    Args:
        keys: keys of the images to scale.
        lower: see :class:`PercentileScaleIntensity`.
        upper: see :class:`PercentileScaleIntensity`.
        b_min: see :class:`PercentileScaleIntensity`.
        b_max: see :class:`PercentileScaleIntensity`.
        clip: see :class:`PercentileScaleIntensity`.
        channel_wise: see :class:`PercentileScaleIntensity`.
        on_constant: see :class:`PercentileScaleIntensity`.
        dtype: see :class:`PercentileScaleIntensity`.
        mask_key: key of the foreground mask the percentiles are computed in; ``None`` uses every voxel.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = PercentileScaleIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        channel_wise: bool = False,
        on_constant: str = "fill",
        dtype: torch.dtype = torch.float32,
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = PercentileScaleIntensity(
            lower, upper, b_min, b_max, clip, channel_wise, on_constant, dtype
        )
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Scale every key of ``data``; returns a shallow copy."""
        d = dict(data)
        mask = _get_mask(d, self.mask_key)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], mask)
        return d


class MaskedZScore(Transform):
    """Z-score normalisation with mean and standard deviation taken inside a foreground mask.

    ``(x - mean) / std`` with the population standard deviation of the voxels inside ``mask`` (or of the
    whole image), pooled over channels unless ``channel_wise``. Voxels outside the mask are set to
    ``outside_value`` (default 0, i.e. the mean of the foreground), or normalised like the rest when it is
    ``None``.

    A constant image (standard deviation ``<= eps`` inside the mask, e.g. an all-zero image) has no
    contrast: ``on_constant="fill"`` returns 0 everywhere (``outside_value`` outside the mask, when set);
    ``on_constant="raise"`` raises :class:`InputDataError`.

    Args:
        eps: standard deviations at or below this are "constant".
        channel_wise: normalise each channel with its own statistics.
        outside_value: value for voxels outside the mask, or ``None`` to normalise them too.
        on_constant: ``"fill"`` or ``"raise"``, see above.
        dtype: output dtype.

    Raises:
        InputDataError: from ``__call__``, naming the file, for NaN/Inf voxels, an empty mask, a mask on
            another grid, or a constant image with ``on_constant="raise"``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        eps: float = 1e-8,
        channel_wise: bool = False,
        outside_value: float | None = 0.0,
        on_constant: str = "fill",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.eps = float(eps)
        self.channel_wise = channel_wise
        self.outside_value = outside_value
        self.on_constant = look_up_option(on_constant, _ON_CONSTANT)
        self.dtype = dtype

    def __call__(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``img``.

        Args:
            img: channel-first image ``(C, *spatial)``.
            mask: optional foreground mask (``> 0`` is foreground), ``(1 or C, *spatial)``.

        Returns:
            The normalised image, a MetaTensor with ``img``'s metadata if ``img`` is one.
        """
        img_t, name, x, m = _prepare(img, mask)
        out = torch.empty_like(x)
        for g, xg, mg, values in _channel_groups(x, m, self.channel_wise, mask, name):
            # float64 statistics: float32 sums over millions of voxels lose digits that matter for std.
            values = values.to(torch.float64)
            mean = values.mean()
            std = values.std(correction=0)
            if not bool(std > self.eps):
                if self.on_constant == "raise":
                    raise InputDataError(
                        f"is constant inside the mask (every voxel is {float(mean):.6g}); z-score is undefined",
                        name,
                    )
                out[g] = 0.0
            else:
                out[g] = ((xg.to(torch.float64) - mean) / std).to(x.dtype)
            if mg is not None and self.outside_value is not None:
                out[g] = torch.where(
                    mg.expand_as(xg), out[g], torch.as_tensor(self.outside_value, dtype=x.dtype)
                )
        return convert_to_dst_type(out, dst=img_t, dtype=self.dtype)[0]


class MaskedZScored(MapTransform):
    """Dictionary version of :class:`MaskedZScore`.

    Args:
        keys: keys of the images to normalise.
        mask_key: key of the foreground mask; ``None`` uses every voxel.
        eps: see :class:`MaskedZScore`.
        channel_wise: see :class:`MaskedZScore`.
        outside_value: see :class:`MaskedZScore`.
        on_constant: see :class:`MaskedZScore`.
        dtype: see :class:`MaskedZScore`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = MaskedZScore.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        eps: float = 1e-8,
        channel_wise: bool = False,
        outside_value: float | None = 0.0,
        on_constant: str = "fill",
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normaliser = MaskedZScore(eps, channel_wise, outside_value, on_constant, dtype)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise every key of ``data``; returns a shallow copy."""
        d = dict(data)
        mask = _get_mask(d, self.mask_key)
        for key in self.key_iterator(d):
            d[key] = self.normaliser(d[key], mask)
        return d


def _get_mask(d: Mapping[Hashable, Any], mask_key: str | None) -> Any:
    if mask_key is None:
        return None
    if mask_key not in d:
        raise KeyError(f"mask_key {mask_key!r} is not in the data (keys: {list(d)})")
    return d[mask_key]


PercentileScaleIntensityD = PercentileScaleIntensityDict = PercentileScaleIntensityd
MaskedZScoreD = MaskedZScoreDict = MaskedZScored
