"""ForegroundMask: Otsu threshold, hole filling, largest component, dilation; 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from transforms import ForegroundMask, ForegroundMaskd, InputDataError, otsu_threshold

N = 32
AFFINE = torch.diag(torch.tensor([1.0, 1.2, 1.5, 1.0], dtype=torch.float64))


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _ellipsoid(
    shape: tuple[int, ...], radii: tuple[float, ...], centre: tuple[float, ...] | None = None
) -> np.ndarray:
    centre = centre or tuple((s - 1) / 2 for s in shape)
    grids = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0


def _head(ndim: int = 3, seed: int = 0) -> tuple[MetaTensor, np.ndarray, np.ndarray]:
    """Bright ellipsoid with a dark cavity, a separate small bright blob, on noisy background.

    Returns the image, the filled ellipsoid (the expected mask) and the blob.
    """
    rng = np.random.default_rng(seed)
    shape = (N,) * ndim
    head = _ellipsoid(shape, (12.0, 10.0, 9.0)[:ndim])
    hole = _ellipsoid(shape, (4.0, 3.0, 3.0)[:ndim])
    blob = np.zeros(shape, dtype=bool)
    blob[(slice(1, 4),) * ndim] = True
    values = np.abs(rng.normal(0.0, 0.05, size=shape))  # magnitude-image background noise
    values[head] = rng.normal(1.0, 0.08, size=int(head.sum()))
    values[hole] = rng.normal(0.1, 0.03, size=int(hole.sum()))
    values[blob] = 1.2
    img = MetaTensor(
        torch.from_numpy(values[None].astype(np.float32)),
        affine=AFFINE if ndim == 3 else torch.eye(3, dtype=torch.float64),
        meta={"filename_or_obj": "head.nii.gz"},
    )
    return img, head, blob


def test_otsu_separates_two_modes() -> None:
    x = torch.cat([torch.full((500,), 2.0), torch.full((300,), 10.0)]) + torch.linspace(0, 0.5, 800)
    t = otsu_threshold(x)
    assert float(x[:500].max()) <= t < float(x[500:].min())
    assert int((x > t).sum()) == 300
    assert otsu_threshold(torch.full((10,), 3.0)) == 3.0  # constant: nothing is above the threshold


@pytest.mark.parametrize("ndim", [2, 3])
def test_mask_is_filled_head_without_blob(ndim: int) -> None:
    img, head, blob = _head(ndim)
    mask = ForegroundMask()(img)
    assert mask.shape == (1, *img.shape[1:]) and mask.dtype == torch.uint8
    assert isinstance(mask, MetaTensor) and torch.equal(mask.affine, img.affine)
    expected = torch.from_numpy(head)[None]
    assert _dice(mask, expected) > 0.95
    assert not bool(mask[0][torch.from_numpy(blob)].any())  # the separate blob is dropped
    assert bool(mask[0][torch.from_numpy(_ellipsoid(head.shape, (3.0,) * ndim))].all())  # hole filled


def test_each_step_can_be_switched_off() -> None:
    img, head, blob = _head(3)
    blob_t, hole_t = torch.from_numpy(blob), torch.from_numpy(_ellipsoid(head.shape, (3.0, 3.0, 3.0)))
    with_blob = ForegroundMask(largest_component=False)(img)[0]
    assert bool(with_blob[blob_t].all())
    holed = ForegroundMask(fill_holes=False)(img)[0]
    assert not bool(holed[hole_t].any())
    base = ForegroundMask()(img)[0].numpy().astype(bool)
    grown = ForegroundMask(dilate=2)(img)[0].numpy().astype(bool)
    assert np.array_equal(grown, ndimage.binary_dilation(base, iterations=2))


def test_fixed_threshold_and_multichannel() -> None:
    img, head, _ = _head(3)
    fixed = ForegroundMask(threshold=0.5)(img)
    assert _dice(fixed, torch.from_numpy(head)[None]) > 0.95
    two = MetaTensor(torch.cat([torch.zeros_like(img.as_tensor()), img.as_tensor()]), affine=img.affine)
    assert not bool(ForegroundMask(channel=0)(two).any())  # channel 0 is blank
    assert torch.equal(ForegroundMask(channel=1)(two), ForegroundMask()(img))
    assert _dice(ForegroundMask(channel=None)(two), torch.from_numpy(head)[None]) > 0.95


def test_constant_image_gives_empty_mask_and_nan_raises() -> None:
    blank = MetaTensor(torch.zeros(1, 6, 6, 6))
    assert not bool(ForegroundMask()(blank).any())
    bad = torch.rand(1, 6, 6, 6)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputDataError, match=r"bad\.nii: contains 1 NaN"):
        ForegroundMask()(MetaTensor(bad, meta={"filename_or_obj": "bad.nii"}))


def test_dict_version_writes_output_key() -> None:
    img, head, _ = _head(3)
    out = ForegroundMaskd("image")({"image": img})
    assert set(out) == {"image", "image_mask"} and out["image"] is img
    assert _dice(out["image_mask"], torch.from_numpy(head)[None]) > 0.95
    out = ForegroundMaskd("image", output_keys="brain", dtype=torch.bool)({"image": img})
    assert out["brain"].dtype == torch.bool
    with pytest.raises(ValueError, match="output_keys"):
        ForegroundMaskd(["image", "t2"], output_keys="brain")
