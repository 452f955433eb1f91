"""Cut a 3D volume into 2D slices, and put (processed) slices back into the volume they came from.

Geometry conventions
--------------------
Volumes are channel-first MetaTensors ``(C, X, Y, Z)``; ``axis`` counts spatial axes (0, 1, 2), so
slicing along ``axis`` selects tensor dimension ``axis + 1``. Every slice is a ``(C, H, W)`` MetaTensor
whose in-plane axes are the two remaining volume axes in their original order.

Each slice's ``affine`` is a 3x3 (2D) affine, because MONAI's 2D spatial transforms (``Spacing``,
``Orientation``, ``Resize``, ``Rotate90``, ...) read ``affine`` as ``(spatial_dims + 1)`` square; a 4x4
affine on a 2D image is truncated to its top-left block, which for sagittal slices of a RAS volume is
singular (``Spacing`` then fails). The 2D affine maps pixel ``(h, w)`` to the two world (RAS) axes that
the slice plane is most aligned with, in RAS order: axial slices of a RAS volume get (R, A), coronal (R,
S), sagittal (A, S). For axis-aligned volumes (anything after ``Orientationd``) it is exactly those rows
of the 3D affine, translated to the slice; for oblique volumes its linear part is the closest one that
keeps the true in-plane pixel spacing and angle (see :func:`slice_affine_2d`). The exact 3D geometry is
kept in the metadata: ``source_affine``, ``source_shape``, ``slice_axis`` and ``slice_index``
(:func:`slice_affine_3d` turns these into the slice's 4x4 world affine), and :class:`SlicesToVolume` uses
them to rebuild the volume.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import decollate_batch
from monai.transforms import MapTransform, Transform
from monai.transforms.traits import MultiSampleTrait, ReduceTrait
from monai.utils import ensure_tuple_rep
from monai.utils.type_conversion import convert_to_tensor

from transforms.errors import InputDataError, source_name
from transforms.validate import image_name

__all__ = [
    "SLICE_META_KEYS",
    "SlicesToVolume",
    "SlicesToVolumeD",
    "SlicesToVolumeDict",
    "SlicesToVolumed",
    "VolumeToSlices",
    "VolumeToSlicesD",
    "VolumeToSlicesDict",
    "VolumeToSlicesd",
    "foreground_fraction",
    "slice_affine_2d",
    "slice_affine_3d",
]

#: metadata keys :class:`VolumeToSlices` adds to every slice (and :class:`SlicesToVolume` removes).
SLICE_META_KEYS = ("slice_index", "slice_axis", "source_shape", "source_affine")

_RAS_PAIRS = ((0, 1), (0, 2), (1, 2))


def _check_axis(axis: int) -> int:
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be a spatial axis 0, 1 or 2, got {axis}.")
    return axis


def _plain(t: torch.Tensor) -> torch.Tensor:
    # Work on plain tensors so that MetaTensor's __torch_function__ does not copy metadata (and
    # affines) around for every intermediate result.
    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


def _as_affine(affine: Any) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine))
    return a.to(torch.float64)


def slice_affine_3d(source_affine: Any, axis: int, index: int) -> torch.Tensor:
    """The exact 4x4 world affine of one slice, seen as a one-voxel-thick volume.

    Args:
        source_affine: 4x4 affine of the volume.
        axis: spatial axis the slice was taken along (0, 1 or 2).
        index: position of the slice along ``axis``.

    Returns:
        A float64 4x4 tensor mapping slice voxel ``(h, w, 0)`` to world coordinates.
    """
    axis = _check_axis(axis)
    a = _as_affine(source_affine)
    in_plane = [i for i in range(3) if i != axis]
    # p maps slice voxel (h, w, k, 1) to volume voxel: (h, w) go to the in-plane axes, k + index to axis.
    p = torch.zeros(4, 4, dtype=torch.float64)
    p[in_plane[0], 0] = 1.0
    p[in_plane[1], 1] = 1.0
    p[axis, 2] = 1.0
    p[axis, 3] = float(index)
    p[3, 3] = 1.0
    return a @ p


def slice_affine_2d(source_affine: Any, axis: int, index: int) -> torch.Tensor:
    """A 3x3 (2D) affine for one slice, usable by MONAI's 2D spatial transforms.

    The two world axes (rows of the 3D affine) kept are the pair onto which the slice plane projects with
    the largest area, in RAS order. If the plane is parallel to them (axis-aligned volumes) the result is
    exactly those rows of :func:`slice_affine_3d`. Otherwise projecting would shrink the pixel spacing, so
    the linear part is replaced by the matrix closest to the projection (orthogonal polar factor) that has
    the true in-plane metric: column norms equal the pixel spacing and the angle between the columns is
    the true one. The translation is the projected position of pixel (0, 0).

    Args:
        source_affine: 4x4 affine of the volume.
        axis: spatial axis the slice was taken along (0, 1 or 2).
        index: position of the slice along ``axis``.

    Returns:
        A float64 3x3 tensor.
    """
    e = slice_affine_3d(source_affine, axis, index)
    cols = e[:3, :2]  # world step of one pixel along h and along w
    dets = [abs(float(torch.linalg.det(cols[list(pair)]))) for pair in _RAS_PAIRS]
    pair = list(_RAS_PAIRS[int(np.argmax(dets))])
    dropped = next(i for i in range(3) if i not in pair)
    linear = cols[pair]
    gram = cols.T @ cols
    if float(cols[dropped].abs().max()) > 1e-9 * float(cols.abs().max()) and max(dets) > 0:
        evals, evecs = torch.linalg.eigh(gram)
        g_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
        g_inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
        u, _, vh = torch.linalg.svd(linear @ g_inv_half)
        linear = (u @ vh) @ g_half
    out = torch.eye(3, dtype=torch.float64)
    out[:2, :2] = linear
    out[:2, 2] = e[pair, 3]
    return out


def foreground_fraction(volume: torch.Tensor, axis: int, threshold: float = 0.0) -> torch.Tensor:
    """Fraction of foreground pixels in every slice of a channel-first volume.

    A voxel is foreground when any channel is ``> threshold``.

    Args:
        volume: ``(C, X, Y, Z)`` volume (image or mask).
        axis: spatial axis to slice along.
        threshold: intensity above which a voxel is foreground.

    Returns:
        A float tensor with one value in [0, 1] per slice along ``axis``.
    """
    axis = _check_axis(axis)
    fg = (_plain(volume) > threshold).any(dim=0)
    other = [i for i in range(3) if i != axis]
    return fg.to(torch.float32).mean(dim=other)


def _check_volume(img: torch.Tensor, what: str = "image") -> None:
    if img.ndim != 4:
        raise InputDataError(
            f"{what} has shape {tuple(img.shape)}; slicing needs a channel-first 3D volume (C, X, Y, Z)",
            image_name(img),
        )


class VolumeToSlices(Transform, MultiSampleTrait):
    """Cut a channel-first volume ``(C, X, Y, Z)`` into a list of 2D MetaTensors ``(C, H, W)``.

    Slices with too little foreground can be dropped: a slice is kept when the fraction of its voxels that
    are foreground (any channel ``> foreground_threshold``, in the image or in a separate ``mask``) is at
    least ``min_foreground``. The default ``min_foreground=0`` keeps every slice.

    Every slice's ``meta`` is a deep copy of the volume's (so ``filename_or_obj`` is kept) plus
    ``slice_index`` (int), ``slice_axis`` (int), ``source_shape`` (int64 numpy array, the volume's spatial
    shape) and ``source_affine`` (float64 4x4 tensor); its ``affine`` is the 3x3 affine of
    :func:`slice_affine_2d` (see the module docstring). ``applied_operations`` of the volume are not carried
    to the slices: 3D operations cannot be inverted on a 2D slice.

    Args:
        axis: spatial axis to slice along (0, 1 or 2); 2 gives axial slices of a RAS volume.
        min_foreground: minimum foreground fraction in [0, 1] for a slice to be kept.
        foreground_threshold: intensity above which a voxel is foreground.

    Raises:
        InputDataError: from ``__call__``, if the image is not a channel-first 3D volume or the mask does not
            have the image's spatial shape.
    """

    def __init__(self, axis: int = 2, min_foreground: float = 0.0, foreground_threshold: float = 0.0) -> None:
        self.axis = _check_axis(axis)
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {min_foreground}.")
        self.min_foreground = float(min_foreground)
        self.foreground_threshold = float(foreground_threshold)

    def kept_indices(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> list[int]:
        """Indices along ``axis`` of the slices that pass the foreground filter.

        Args:
            img: ``(C, X, Y, Z)`` volume.
            mask: optional volume with the same spatial shape that decides the foreground instead of ``img``.

        Returns:
            Sorted slice indices.
        """
        _check_volume(img)
        if self.min_foreground <= 0.0:
            return list(range(img.shape[self.axis + 1]))
        source = img
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.ndim == 3:
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[1:]) != tuple(img.shape[1:]):
                raise InputDataError(
                    f"foreground mask spatial shape {tuple(mask.shape[1:])} differs from the spatial shape "
                    f"{tuple(img.shape[1:])} of image {image_name(img)}",
                    image_name(mask),
                )
            source = mask
        frac = foreground_fraction(source, self.axis, self.foreground_threshold)
        return torch.nonzero(frac >= self.min_foreground).flatten().tolist()

    def slices_at(self, img: torch.Tensor, indices: Sequence[int]) -> list[MetaTensor]:
        """Cut the given slices out of ``img`` (no filtering).

        Args:
            img: ``(C, X, Y, Z)`` volume (a MetaTensor, or a tensor taken to have an identity affine).
            indices: slice positions along ``axis``.

        Returns:
            One ``(C, H, W)`` MetaTensor per index, each owning its memory.
        """
        _check_volume(img)
        img = img if isinstance(img, MetaTensor) else MetaTensor(torch.as_tensor(img))
        source_affine = _as_affine(img.affine)
        data = img.as_tensor()
        base_meta = {k: v for k, v in img.meta.items() if k != "affine"}
        source_shape = np.asarray(img.shape[1:], dtype=np.int64)
        out = []
        for i in indices:
            # clone: a view would keep the whole volume alive for as long as any one slice is cached
            pixels = data.select(self.axis + 1, int(i)).clone(memory_format=torch.contiguous_format)
            meta = deepcopy(base_meta)
            meta.update(
                slice_index=int(i),
                slice_axis=self.axis,
                source_shape=source_shape.copy(),
                source_affine=source_affine.clone(),
            )
            out.append(
                MetaTensor(pixels, affine=slice_affine_2d(source_affine, self.axis, int(i)), meta=meta)
            )
        return out

    def __call__(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> list[MetaTensor]:
        """Slice ``img``.

        Args:
            img: ``(C, X, Y, Z)`` volume.
            mask: optional foreground volume deciding which slices are kept (see class docstring).

        Returns:
            The kept slices in increasing index order; an empty list if none passes the filter.
        """
        img = convert_to_tensor(img, track_meta=True)
        return self.slices_at(img, self.kept_indices(img, mask))


class VolumeToSlicesd(MapTransform, MultiSampleTrait):
    """Dictionary version of :class:`VolumeToSlices`: one output dictionary per kept slice.

    Every key in ``keys`` (e.g. image, label, brain mask) is cut at the same indices; the foreground
    filter is evaluated on ``foreground_key``. Other entries are deep-copied into every output (as
    MONAI's ``RandCropByPosNegLabeld`` does), so drop large entries you do not need before slicing. Each
    output also gets ``slice_index_key`` set to the slice position (an int).

    Args:
        keys: keys of the volumes to slice; all must have the same spatial shape.
        axis: see :class:`VolumeToSlices`.
        min_foreground: see :class:`VolumeToSlices`.
        foreground_threshold: see :class:`VolumeToSlices`.
        foreground_key: key of the volume that decides the foreground; defaults to the first key. It need
            not be one of ``keys``.
        slice_index_key: key under which the slice index is written.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        InputDataError: from ``__call__``, naming the file, when volumes disagree in spatial shape or are
            not 3D.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = 2,
        min_foreground: float = 0.0,
        foreground_threshold: float = 0.0,
        foreground_key: str | None = None,
        slice_index_key: str = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slicer = VolumeToSlices(axis, min_foreground, foreground_threshold)
        self.foreground_key = foreground_key
        self.slice_index_key = slice_index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        """Slice every key of ``data``.

        Args:
            data: a dictionary with channel-first volumes under ``keys``.

        Returns:
            One dictionary per kept slice, in increasing index order.
        """
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return [d]
        vols = {k: convert_to_tensor(d[k], track_meta=True) for k in keys}
        ref = vols[keys[0]]
        _check_volume(ref)
        for k in keys[1:]:
            _check_volume(vols[k], str(k))
            if tuple(vols[k].shape[1:]) != tuple(ref.shape[1:]):
                raise InputDataError(
                    f"{k!s} spatial shape {tuple(vols[k].shape[1:])} differs from the spatial shape "
                    f"{tuple(ref.shape[1:])} of {keys[0]!s} ({image_name(ref)}); they cannot be sliced together",
                    image_name(vols[k]),
                )
        fg_key = self.foreground_key if self.foreground_key is not None else keys[0]
        if fg_key not in d:
            raise KeyError(f"foreground_key {fg_key!r} is not in the data (keys: {list(d)})")
        fg = vols[fg_key] if fg_key in vols else convert_to_tensor(d[fg_key], track_meta=True)
        indices = self.slicer.kept_indices(ref, None if fg_key == keys[0] else fg)
        sliced = {k: self.slicer.slices_at(vols[k], indices) for k in keys}
        rest = {k: v for k, v in d.items() if k not in sliced}
        results = []
        for n, i in enumerate(indices):
            out = deepcopy(rest)
            out.update({k: sliced[k][n] for k in keys})
            out[self.slice_index_key] = int(i)
            results.append(out)
        return results


def _meta_scalar(value: Any) -> int:
    # After collation and decollation metadata scalars come back as 0-d tensors or arrays.
    return int(np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value).reshape(-1)[0])


class SlicesToVolume(Transform, ReduceTrait):
    """Stack 2D slices ``(C, H, W)`` back into the ``(C, X, Y, Z)`` volume they were cut from.

    The inverse of :class:`VolumeToSlices`: slice ``k`` goes to position ``slice_index`` along ``axis``;
    positions without a slice (dropped by the foreground filter) are filled with ``fill_value``. The output
    is a MetaTensor with the source affine and the first slice's metadata minus :data:`SLICE_META_KEYS`.
    Being a ``ReduceTrait``, it receives the whole list inside a MONAI ``Compose``.

    Args:
        source_shape: spatial shape ``(X, Y, Z)`` of the volume; ``None`` reads the slices' ``source_shape``.
        source_affine: 4x4 affine of the volume; ``None`` reads the slices' ``source_affine`` (identity if the
            slices carry none).
        axis: spatial axis the slices were cut along; ``None`` reads the slices' ``slice_axis``.
        fill_value: value of positions no slice was given for.

    Raises:
        InputDataError: from ``__call__``, naming the source file, when a slice has the wrong shape, an index
            is out of range or appears twice.
    """

    def __init__(
        self,
        source_shape: Sequence[int] | None = None,
        source_affine: Any = None,
        axis: int | None = None,
        fill_value: float = 0.0,
    ) -> None:
        self.source_shape = None if source_shape is None else tuple(int(s) for s in source_shape)
        self.source_affine = None if source_affine is None else _as_affine(source_affine)
        self.axis = None if axis is None else _check_axis(axis)
        self.fill_value = fill_value

    def __call__(
        self, slices: Sequence[torch.Tensor] | torch.Tensor, slice_indices: Sequence[int] | None = None
    ) -> MetaTensor:
        """Stack ``slices``.

        Args:
            slices: a sequence of ``(C, H, W)`` tensors, or one ``(N, C, H, W)`` tensor (e.g. a collated
                batch; a batched MetaTensor is decollated to read per-slice metadata).
            slice_indices: position of each slice along ``axis``; ``None`` reads each slice's
                ``meta["slice_index"]``.

        Returns:
            The ``(C, X, Y, Z)`` volume.
        """
        if isinstance(slices, MetaTensor) and slices.is_batch:
            items = list(decollate_batch(slices, detach=False))
        elif isinstance(slices, torch.Tensor):
            items = list(slices.unbind(0))
        else:
            items = list(slices)
        if not items:
            raise ValueError("SlicesToVolume needs at least one slice.")
        metas = [t.meta if isinstance(t, MetaTensor) else {} for t in items]
        name = source_name(metas[0])

        def from_meta(key: str) -> Any:
            if key not in metas[0]:
                raise ValueError(
                    f"{name}: slices carry no {key!r} metadata; pass it to SlicesToVolume explicitly."
                )
            return metas[0][key]

        if slice_indices is None:
            for k, m in enumerate(metas):
                if "slice_index" not in m:
                    raise ValueError(f"{name}: slice {k} has no 'slice_index' metadata; pass slice_indices.")
            slice_indices = [_meta_scalar(m["slice_index"]) for m in metas]
        if len(slice_indices) != len(items):
            raise ValueError(f"got {len(items)} slices but {len(slice_indices)} slice indices.")
        axis = self.axis if self.axis is not None else _check_axis(_meta_scalar(from_meta("slice_axis")))
        shape = self.source_shape
        if shape is None:
            value = from_meta("source_shape")
            value = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
            shape = tuple(int(s) for s in value.reshape(-1, value.shape[-1])[0])
        if len(shape) != 3:
            raise ValueError(f"source_shape must have 3 entries, got {shape}.")
        affine = self.source_affine
        if affine is None:
            affine = _as_affine(metas[0]["source_affine"]) if "source_affine" in metas[0] else torch.eye(4)
            affine = affine.reshape(-1, 4, 4)[0]  # a collated affine has a batch axis

        planes = [_plain(t) for t in items]
        in_plane = tuple(s for i, s in enumerate(shape) if i != axis)
        channels = planes[0].shape[0] if planes[0].ndim == 3 else "C"
        expected = (channels, *in_plane)
        for k, p in enumerate(planes):
            if tuple(p.shape) != expected:
                raise InputDataError(
                    f"slice {k} (index {slice_indices[k]}) has shape {tuple(p.shape)}, expected {expected} "
                    f"for axis {axis} of a volume with spatial shape {shape}",
                    name,
                )
        idx = torch.as_tensor([int(i) for i in slice_indices], dtype=torch.long)
        bad = idx[(idx < 0) | (idx >= shape[axis])]
        if bad.numel():
            raise InputDataError(
                f"slice index {int(bad[0])} is out of range for axis {axis} of size {shape[axis]}", name
            )
        uniq, counts = torch.unique(idx, return_counts=True)
        if bool((counts > 1).any()):
            raise InputDataError(f"slice index {int(uniq[counts > 1][0])} is given more than once", name)

        dtype, device = planes[0].dtype, planes[0].device
        stacked = torch.stack([p.to(dtype=dtype, device=device) for p in planes], dim=axis + 1)
        out = torch.full((expected[0], *shape), self.fill_value, dtype=dtype, device=device)
        out.index_copy_(axis + 1, idx.to(device), stacked)
        meta = {k: deepcopy(v) for k, v in metas[0].items() if k not in (*SLICE_META_KEYS, "affine")}
        return MetaTensor(out, affine=affine, meta=meta)


class SlicesToVolumed(MapTransform, ReduceTrait):
    """Dictionary version of :class:`SlicesToVolume`: turns the list made by :class:`VolumeToSlicesd` back
    into one dictionary.

    For every key the slices of all dictionaries are stacked; their positions come from each dictionary's
    ``slice_index_key`` entry, else from the slice's ``meta["slice_index"]``. Entries that are not in
    ``keys`` are taken from the first dictionary (``slice_index_key`` is dropped).

    Args:
        keys: keys of the slices to stack.
        source_shape: see :class:`SlicesToVolume`.
        source_affine: see :class:`SlicesToVolume`.
        axis: see :class:`SlicesToVolume`.
        fill_value: value of missing positions, one for all keys or one per key.
        slice_index_key: key holding the slice position in each dictionary.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_shape: Sequence[int] | None = None,
        source_affine: Any = None,
        axis: int | None = None,
        fill_value: Sequence[float] | float = 0.0,
        slice_index_key: str = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        fills = ensure_tuple_rep(fill_value, len(self.keys))
        self.stackers = {
            k: SlicesToVolume(source_shape, source_affine, axis, f)
            for k, f in zip(self.keys, fills, strict=True)
        }
        self.slice_index_key = slice_index_key

    def __call__(self, data: Sequence[Mapping[Hashable, Any]]) -> dict[Hashable, Any]:
        """Stack a sequence of slice dictionaries.

        Args:
            data: dictionaries, one per slice.

        Returns:
            One dictionary with the volumes under ``keys``.
        """
        if isinstance(data, Mapping):
            raise TypeError(
                "SlicesToVolumed expects a sequence of per-slice dictionaries, got one dictionary."
            )
        items = list(data)
        if not items:
            raise ValueError("SlicesToVolumed needs at least one slice dictionary.")
        out = {k: v for k, v in items[0].items() if k != self.slice_index_key}
        has_index = all(self.slice_index_key in it for it in items)
        indices = [_meta_scalar(it[self.slice_index_key]) for it in items] if has_index else None
        for key in self.key_iterator(items[0]):
            out[key] = self.stackers[key]([it[key] for it in items], indices)
        return out


VolumeToSlicesD = VolumeToSlicesDict = VolumeToSlicesd
SlicesToVolumeD = SlicesToVolumeDict = SlicesToVolumed
