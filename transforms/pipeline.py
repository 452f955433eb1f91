"""The standard volume loading pipeline: read, check, reorient, resample, normalise.

Failures caused by input files surface as :class:`~transforms.errors.InputDataError` naming the file:

* :class:`LoadVolumed` turns reader failures (missing, truncated or unreadable files) into one;
* MONAI's ``Compose`` wraps every exception raised inside a transform in ``RuntimeError("applying
  transform ...")``; :class:`InputCheckedCompose` re-raises the ``InputDataError`` found in that chain, so
  callers can catch it by type. (MONAI datasets that run transforms themselves, e.g. ``CacheDataset``,
  still wrap it; the message with the file name is then in the exception chain.)
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import DtypeLike, KeysCollection
from monai.data.image_reader import ImageReader, PydicomReader, is_dicom_path
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple

from transforms.errors import InputDataError
from transforms.intensity import MaskedZScored, PercentileScaleIntensityd
from transforms.validate import CheckImaged, CheckMaskMatchesd

__all__ = [
    "GreyscaleD",
    "GreyscaleDict",
    "Greyscaled",
    "InputCheckedCompose",
    "LoadVolumeD",
    "LoadVolumeDict",
    "LoadVolumed",
    "find_input_error",
    "slice_loading_transforms",
    "volume_loading_transforms",
]


def _names(path: Any) -> list[str]:
    return [os.fspath(p) for p in ensure_tuple(path) if isinstance(p, (str, os.PathLike))]


class LoadVolumed(LoadImaged):
    """``LoadImaged`` that reads DICOM series folders with ``PydicomReader`` and names the file on failure.

    MONAI's automatic reader choice goes by file suffix, and ``PydicomReader`` (the only DICOM reader
    available without ``itk``) ends up as the catch-all; choosing it explicitly for DICOM paths (a folder,
    a ``.dcm`` file or a file with a DICOM preamble) makes the choice independent of which optional reader
    packages are installed. Other paths use MONAI's choice (``NibabelReader`` for NIfTI). Only
    ``image_only=True`` is supported: metadata travels in the MetaTensor.

    Args:
        keys: keys holding a path (or a list of paths, stacked as channels).
        reader: a reader for every path, overriding the automatic choice.
        dtype: dtype of the loaded arrays.
        allow_missing_keys: don't raise if a key is missing.
        kwargs: passed to ``LoadImaged``.

    Raises:
        InputDataError: from ``__call__``, naming the file, when it does not exist or cannot be read.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: ImageReader | str | None = None,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        if not kwargs.pop("image_only", True):
            raise ValueError("LoadVolumed supports only image_only=True: metadata travels in the MetaTensor.")
        super().__init__(
            keys, reader=reader, dtype=dtype, image_only=True, allow_missing_keys=allow_missing_keys, **kwargs
        )
        self._dicom_reader = PydicomReader() if reader is None else None

    def __call__(
        self, data: Mapping[Hashable, Any], reader: ImageReader | None = None
    ) -> dict[Hashable, Any]:
        """Load every key of ``data``.

        Args:
            data: dictionary with paths under ``keys``.
            reader: a reader overriding every other choice for this call.

        Returns:
            A shallow copy of ``data`` with MetaTensors under ``keys``.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            names = _names(path)
            first = names[0] if names else None
            for name in names:
                if not os.path.exists(os.path.expanduser(name)):
                    raise InputDataError("file does not exist", name)
            chosen = reader
            if chosen is None and self._dicom_reader is not None and names and is_dicom_path(names):
                chosen = self._dicom_reader
            if names and len(names) == 1 and os.path.isdir(names[0]) and is_dicom_path(names):
                # PydicomReader stacks whatever slices the folder holds: a missing or duplicated slice, a
                # second series or mixed orientations would give a silently wrong volume
                from data_prep.dicom import check_dicom_series

                check_dicom_series(names[0])
            try:
                d[key] = self._loader(path, chosen)
            except InputDataError:
                raise
            except Exception as e:
                detail = (str(e).strip().splitlines() or [""])[0]
                raise InputDataError(
                    f"cannot be read as an image ({type(e).__name__}: {detail})", first
                ) from e
        return d


def find_input_error(exc: BaseException | None) -> InputDataError | None:
    """The first :class:`InputDataError` in the cause/context chain of ``exc`` (``exc`` included).

    Args:
        exc: an exception, e.g. the ``RuntimeError`` raised by MONAI's ``Compose``.

    Returns:
        The ``InputDataError``, or ``None``.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputDataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class InputCheckedCompose(Compose):
    """A MONAI ``Compose`` that lets :class:`InputDataError` through instead of a ``RuntimeError``.

    MONAI wraps every exception raised in a transform in ``RuntimeError("applying transform ...")``. For
    bad input files the useful error is the ``InputDataError`` naming the file; it is re-raised (as a new
    ``InputDataError`` with the same fault and path, chained to the MONAI error so the failing transform
    stays visible). Other exceptions are unchanged.
    """

    def __call__(
        self,
        input_: Any,
        start: int = 0,
        end: int | None = None,
        threading: bool = False,
        lazy: bool | None = None,
    ) -> Any:
        """Run the transforms, see ``monai.transforms.Compose``."""
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except InputDataError:
            raise
        except Exception as e:
            found = find_input_error(e)
            if found is None:
                raise
            raise InputDataError(found.fault, found.path) from e


def volume_loading_transforms(
    keys: Sequence[str] | str = ("image",),
    mask_keys: Sequence[str] | str = (),
    spacing: Sequence[float] | float | None = None,
    normalise: str | None = "percentile",
    *,
    orientation: str | None = "RAS",
    expected_channels: int | None = 1,
    normalise_mask_key: str | None = None,
    lower: float = 0.5,
    upper: float = 99.5,
    b_min: float = 0.0,
    b_max: float = 1.0,
    on_constant: str = "fill",
    image_interp: str = "bilinear",
    reader: ImageReader | str | None = None,
    allow_constant: bool = True,
    min_value: float | None = None,
) -> InputCheckedCompose:
    """Transforms that load 3D volumes (and their masks) as checked, RAS, normalised MetaTensors.

    Order: :class:`LoadVolumed` (NIfTI via nibabel, DICOM series folders via ``PydicomReader``),
    ``EnsureChannelFirstd``, :class:`~transforms.validate.CheckImaged` (3D, channels, finite voxels),
    ``Orientationd``, :class:`~transforms.validate.CheckMaskMatchesd` (masks and further images on the first
    image's grid; after reorientation, so files that differ only in axis order are accepted), optional
    ``Spacingd`` (masks with nearest-neighbour interpolation), then the normalisation of ``keys``.

    Args:
        keys: image keys; the first is the reference grid.
        mask_keys: mask/label keys, loaded and resampled alongside but not normalised.
        spacing: target voxel size in mm (one value or one per axis); ``None`` keeps the native grid.
        normalise: ``"percentile"`` (:class:`~transforms.intensity.PercentileScaleIntensityd`), ``"zscore"``
            (:class:`~transforms.intensity.MaskedZScored`) or ``None``.
        orientation: axis codes for ``Orientationd``; ``None`` keeps the stored orientation.
        expected_channels: channels each image must have (1 rejects 4D files such as time series);
            ``None`` accepts any.
        normalise_mask_key: mask key inside which normalisation statistics are computed; ``None`` uses
            every voxel.
        lower: lower percentile for ``"percentile"``.
        upper: upper percentile for ``"percentile"``.
        b_min: output minimum for ``"percentile"``.
        b_max: output maximum for ``"percentile"``.
        on_constant: ``"fill"`` or ``"raise"`` for constant images, see the normalisation transforms.
        image_interp: interpolation of images in ``Spacingd``.
        reader: force one reader for every file (see :class:`LoadVolumed`).
        allow_constant: if False, an image whose voxels all share one value (an all-zero export, a blank
            series) is an error naming the file; inference sets this (there is nothing to detect or classify).
        min_value: images with voxels below it are an error (see :class:`~transforms.validate.CheckImage`;
            the MRI bundles' inference uses -200 to refuse CT Hounsfield units).

    Returns:
        An :class:`InputCheckedCompose` (a ``monai.transforms.Compose``).

    Raises:
        ValueError: for an unknown ``normalise`` or a ``normalise_mask_key`` not in ``mask_keys``.
    """
    keys, mask_keys = tuple(ensure_tuple(keys)), tuple(ensure_tuple(mask_keys))
    if not keys:
        raise ValueError("keys must name at least one image.")
    if normalise not in (None, "percentile", "zscore"):
        raise ValueError(f"normalise must be 'percentile', 'zscore' or None, got {normalise!r}.")
    if normalise_mask_key is not None and normalise_mask_key not in mask_keys:
        raise ValueError(f"normalise_mask_key {normalise_mask_key!r} must be one of mask_keys {mask_keys}.")
    all_keys = keys + mask_keys
    xforms: list[Any] = [
        LoadVolumed(all_keys, reader=reader),
        EnsureChannelFirstd(all_keys),
        CheckImaged(
            keys,
            expected_spatial_dims=3,
            expected_channels=expected_channels,
            allow_constant=allow_constant,
            min_value=min_value,
        ),
    ]
    if mask_keys:
        xforms.append(CheckImaged(mask_keys, expected_spatial_dims=3))
    if orientation:
        # labels=None: read the axis labels from the MetaTensor's "space" (RAS for every MONAI reader)
        xforms.append(Orientationd(all_keys, axcodes=orientation, labels=None))
    if len(keys) > 1:
        xforms.append(CheckMaskMatchesd(keys[0], keys[1:], what="image"))
    if mask_keys:
        xforms.append(CheckMaskMatchesd(keys[0], mask_keys))
    if spacing is not None:
        # a bare number would set only the first axis in Spacingd (it pads with the last given value,
        # but documents the single number as "first dimension"): make the isotropic intent explicit
        spacing = (
            tuple(float(s) for s in ensure_tuple(spacing))
            if isinstance(spacing, Sequence)
            else (float(spacing),) * 3
        )
        modes = (image_interp,) * len(keys) + ("nearest",) * len(mask_keys)
        xforms.append(Spacingd(all_keys, pixdim=spacing, mode=modes))
    if normalise == "percentile":
        xforms.append(
            PercentileScaleIntensityd(
                keys, lower, upper, b_min, b_max, on_constant=on_constant, mask_key=normalise_mask_key
            )
        )
    elif normalise == "zscore":
        xforms.append(MaskedZScored(keys, mask_key=normalise_mask_key, on_constant=on_constant))
    return InputCheckedCompose(xforms)


LoadVolumeD = LoadVolumeDict = LoadVolumed


class Greyscaled(MapTransform):
    """Channel-first RGB(A) images → one grey channel (mean of R, G, B); single-channel images unchanged.

    2D datasets shipped as JPEG/PNG (Kaggle brain-tumour MRI) are often stored as three identical channels;
    MONAI has no colour-to-grey transform. The mean keeps the intensity scale of a grey image saved as RGB
    exactly. Alpha is dropped.

    Args:
        keys: image keys.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert every key.

        Args:
            data: a dict with channel-first images.

        Returns:
            A shallow copy with grey images.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] in (3, 4):
                d[key] = (
                    img[:3].mean(dim=0, keepdim=True)
                    if hasattr(img, "dim")
                    else img[:3].mean(0, keepdims=True)
                )
        return d


GreyscaleD = GreyscaleDict = Greyscaled


def slice_loading_transforms(
    keys: Sequence[str] | str = ("image",),
    image_size: int = 64,
    normalise: bool = True,
    *,
    lower: float = 0.5,
    upper: float = 99.5,
    b_min: float = 0.0,
    b_max: float = 1.0,
    on_constant: str = "fill",
    reader: ImageReader | str | None = None,
    allow_constant: bool = True,
    min_value: float | None = None,
) -> InputCheckedCompose:
    """Transforms that load 2D slices (NIfTI, DICOM, PNG/JPEG) as checked, square, one-channel images.

    Order: :class:`LoadVolumed`, ``EnsureChannelFirstd``, :class:`Greyscaled` (RGB files → one channel),
    :class:`~transforms.validate.CheckImaged` (2D, one channel, finite), ``Resized`` (longest side to
    ``image_size``, aspect ratio kept), ``SpatialPadd`` to ``image_size²`` with 0 (the raw background),
    ``EnsureTyped`` (plain tensors), then optionally the percentile normalisation. Without ``normalise`` the
    output keeps the raw, non-negative intensities, which is what :func:`transforms.corruptions.corrupt`
    expects: robustness evaluation corrupts the raw slice and normalises afterwards.

    Args:
        keys: image keys.
        image_size: output side length.
        normalise: append :class:`~transforms.intensity.PercentileScaleIntensityd` (whole-image percentiles).
        lower: lower percentile.
        upper: upper percentile.
        b_min: output minimum.
        b_max: output maximum.
        on_constant: ``"fill"`` or ``"raise"`` for constant images.
        reader: force one reader for every file.
        allow_constant: if False, a slice whose pixels all share one value is an error naming the file.
        min_value: slices with values below it are an error (see :class:`~transforms.validate.CheckImage`).

    Returns:
        An :class:`InputCheckedCompose`.

    Raises:
        ValueError: for ``image_size < 8``.
    """
    keys = tuple(ensure_tuple(keys))
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    size = int(image_size)
    xforms: list[Any] = [
        LoadVolumed(keys, reader=reader),
        EnsureChannelFirstd(keys),
        Greyscaled(keys),
        CheckImaged(
            keys,
            expected_spatial_dims=2,
            expected_channels=1,
            allow_constant=allow_constant,
            min_value=min_value,
        ),
        Resized(keys, spatial_size=size, size_mode="longest", mode="bilinear", anti_aliasing=True),
        SpatialPadd(keys, spatial_size=(size, size), value=0.0),
        EnsureTyped(keys, track_meta=False),
    ]
    if normalise:
        xforms.append(PercentileScaleIntensityd(keys, lower, upper, b_min, b_max, on_constant=on_constant))
    return InputCheckedCompose(xforms)
