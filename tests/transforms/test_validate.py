"""CheckImage / CheckMaskMatchesd: every bad input raises InputDataError naming the file."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from transforms import (
    CheckImage,
    CheckImaged,
    CheckMaskMatches,
    CheckMaskMatchesd,
    InputDataError,
    count_nonfinite,
)

NAME = "/pacs/export/sub-12/ses-1/T1w.nii.gz"
AFFINE = torch.tensor(
    [[0.0, 0.0, 1.2, -90.0], [1.0, 0.0, 0.0, -120.0], [0.0, 1.0, 0.0, -100.0], [0, 0, 0, 1]]
)


def _img(shape: tuple[int, ...], name: str = NAME, fill: float | None = None, **meta) -> MetaTensor:
    data = torch.rand(shape) if fill is None else torch.full(shape, fill)
    return MetaTensor(data, affine=AFFINE, meta={"filename_or_obj": name, **meta})


def test_good_image_passes_unchanged() -> None:
    img = _img((1, 4, 5, 6))
    assert CheckImage(allow_constant=False, expected_channels=1)(img) is img
    out = CheckImaged(["image", "label"])({"image": img, "label": _img((1, 4, 5, 6), "seg.nii.gz")})
    assert out["image"] is img


def test_nonfinite_voxels_are_counted() -> None:
    img = _img((1, 4, 4, 4))
    img[0, 0, 0, :2] = float("nan")
    img[0, 1, 1, 1] = float("inf")
    img[0, 2, 2, 2] = float("-inf")
    assert count_nonfinite(img) == (2, 2)
    with pytest.raises(
        InputDataError, match=r"^/pacs/export/sub-12/ses-1/T1w\.nii\.gz: contains 2 NaN and 2 Inf"
    ):
        CheckImage()(img)
    with pytest.raises(InputDataError, match=r"T1w\.nii\.gz: contains 2 NaN"):
        CheckImaged("image")({"image": img})
    assert CheckImage(allow_nonfinite=True)(img) is img
    assert count_nonfinite(torch.zeros(3, dtype=torch.int16)) == (0, 0)


def test_wrong_dimensionality() -> None:
    with pytest.raises(
        InputDataError, match=r"T1w\.nii\.gz: is 4D \(spatial shape \(4, 4, 4, 3\).*3D volume is expected"
    ):
        CheckImage()(_img((1, 4, 4, 4, 3)))
    with pytest.raises(
        InputDataError, match=r"T1w\.nii\.gz: is 2D \(spatial shape \(4, 5\).*3D volume is expected"
    ):
        CheckImage()(_img((1, 4, 5)))
    assert CheckImage(expected_spatial_dims=2)(_img((1, 4, 5))).shape == (1, 4, 5)
    assert CheckImage(expected_spatial_dims=None)(_img((1, 4, 5, 6, 7))).ndim == 5


def test_four_d_file_turned_into_channels() -> None:
    # what LoadImage + EnsureChannelFirst make of a 4D NIfTI: the 4th axis became 3 channels
    img = _img((3, 4, 5, 6), original_channel_dim=-1)
    with pytest.raises(InputDataError, match=r"T1w\.nii\.gz: is 4D \(shape \(4, 5, 6, 3\) as stored\)"):
        CheckImage(expected_channels=1)(img)
    with pytest.raises(InputDataError, match=r"has 3 channels"):
        CheckImage(expected_channels=1)(_img((3, 4, 5, 6)))
    assert CheckImage()(img) is img  # channels unchecked by default


def test_constant_and_empty_images() -> None:
    flat = _img((1, 3, 3, 3), fill=0.0)
    assert CheckImage()(flat) is flat
    with pytest.raises(InputDataError, match=r"T1w\.nii\.gz: is constant \(every voxel is 0\.0\)"):
        CheckImage(allow_constant=False)(flat)
    with pytest.raises(InputDataError, match=r"T1w\.nii\.gz: is empty"):
        CheckImage()(_img((1, 0, 3, 3)))


def test_mask_shape_mismatch_names_the_mask() -> None:
    img, mask = _img((1, 4, 5, 6)), _img((1, 4, 5, 7), name="/pacs/sub-12/brainmask.nii.gz")
    with pytest.raises(
        InputDataError,
        match=r"^/pacs/sub-12/brainmask\.nii\.gz: mask spatial shape \(4, 5, 7\) differs.*T1w\.nii\.gz",
    ):
        CheckMaskMatchesd("image", "brain")({"image": img, "brain": mask})


def test_mask_affine_mismatch_names_the_mask() -> None:
    img = _img((1, 4, 5, 6))
    mask = _img((1, 4, 5, 6), name="seg.nii.gz")
    shifted = mask.affine.clone()
    shifted[0, 3] += 0.5
    mask.affine = shifted
    with pytest.raises(InputDataError, match=r"^seg\.nii\.gz: mask affine differs.*T1w\.nii\.gz.*0\.5"):
        CheckMaskMatchesd("image", ["seg"])({"image": img, "seg": mask})
    with pytest.raises(InputDataError, match=r"^seg\.nii\.gz: label affine differs"):
        CheckMaskMatches(what="label")(img, mask)
    # float noise from another writer is tolerated
    close = _img((1, 4, 5, 6), name="seg.nii.gz")
    close.affine = AFFINE.to(torch.float64) + 1e-5
    out = CheckMaskMatchesd("image", ["seg"])({"image": img, "seg": close})
    assert out["seg"] is close


def test_mask_check_missing_keys() -> None:
    img = _img((1, 4, 5, 6))
    with pytest.raises(KeyError):
        CheckMaskMatchesd("image", ["seg"])({"image": img})
    assert "seg" not in CheckMaskMatchesd("image", ["seg"], allow_missing_keys=True)({"image": img})
    with pytest.raises(KeyError, match="image"):
        CheckMaskMatchesd("image", ["seg"])({"seg": img})
