"""PercentileScaleIntensity and MaskedZScore: known answers, masks, constant and non-finite inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms import (
    InputDataError,
    MaskedZScore,
    MaskedZScored,
    PercentileScaleIntensity,
    PercentileScaleIntensityd,
    quantiles,
)

AFFINE = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))


def _img(values: torch.Tensor, name: str = "sub-01_T1w.nii.gz") -> MetaTensor:
    return MetaTensor(values.to(torch.float32), affine=AFFINE, meta={"filename_or_obj": name})


def _ramp() -> MetaTensor:
    """Values 0..100, one of each, shape (1, 1, 1, 101)."""
    return _img(torch.arange(101, dtype=torch.float32).reshape(1, 1, 1, 101))


def test_quantiles_match_numpy() -> None:
    x = torch.from_numpy(np.random.default_rng(1).normal(size=1001).astype(np.float32))
    q = [0.0, 0.5, 25.0, 50.0, 99.5, 100.0]
    assert np.allclose(quantiles(x, q), np.percentile(x.numpy().astype(np.float64), q), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("b_min", "b_max"), [(0.0, 1.0), (-1.0, 1.0)])
def test_percentile_scaling_known_answer(b_min: float, b_max: float) -> None:
    img = _ramp()
    out = PercentileScaleIntensity(lower=10, upper=90, b_min=b_min, b_max=b_max)(img)
    x = torch.arange(101, dtype=torch.float32)
    expected = ((x.clamp(10, 90) - 10) / 80) * (b_max - b_min) + b_min
    assert torch.allclose(out.flatten(), expected, atol=1e-6)
    assert float(out.min()) == b_min and float(out.max()) == b_max
    assert out.dtype == torch.float32
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, AFFINE)
    assert out.meta["filename_or_obj"] == "sub-01_T1w.nii.gz"


def test_percentile_scaling_interpolates_like_numpy() -> None:
    img = _img(torch.arange(10, dtype=torch.float32).reshape(1, 1, 1, 10))
    out = PercentileScaleIntensity(lower=25, upper=75, clip=False)(img)  # percentiles 2.25 and 6.75
    expected = (torch.arange(10, dtype=torch.float32) - 2.25) / 4.5
    assert torch.allclose(out.flatten(), expected, atol=1e-6)


def test_default_range_is_exact_on_random_data() -> None:
    img = _img(torch.from_numpy(np.random.default_rng(2).gamma(2.0, 100.0, size=(1, 12, 13, 14))))
    for b_min, b_max in [(0.0, 1.0), (-1.0, 1.0)]:
        out = PercentileScaleIntensity(b_min=b_min, b_max=b_max)(img)
        assert float(out.min()) == b_min and float(out.max()) == b_max
        assert bool(torch.isfinite(out).all())


def test_percentiles_are_taken_inside_the_mask() -> None:
    img = _img(torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10))
    mask = (img >= 50).to(torch.uint8)
    out = PercentileScaleIntensity(lower=0, upper=100)(img, mask)
    # inside the mask the range is 50..99; everything below is clipped to b_min
    assert torch.allclose(out.flatten()[50:], (torch.arange(50, 100) - 50) / 49.0, atol=1e-6)
    assert bool((out.flatten()[:50] == 0).all())


def test_channel_wise_scales_each_channel_to_full_range() -> None:
    base = torch.arange(20, dtype=torch.float32).reshape(1, 1, 4, 5)
    img = _img(torch.cat([base, base * 10 + 1000]))
    out = PercentileScaleIntensity(lower=0, upper=100, channel_wise=True)(img)
    for c in range(2):
        assert float(out[c].min()) == 0.0 and float(out[c].max()) == 1.0
        assert torch.allclose(out[c], base[0] / 19.0, atol=1e-6)
    pooled = PercentileScaleIntensity(lower=0, upper=100)(img)
    assert float(pooled[0].max()) < 0.02  # pooled statistics: channel 0 is tiny next to channel 1


@pytest.mark.parametrize("value", [0.0, 7.0])
@pytest.mark.parametrize(("b_min", "b_max"), [(0.0, 1.0), (-1.0, 1.0)])
def test_constant_image_fills_b_min(value: float, b_min: float, b_max: float) -> None:
    img = _img(torch.full((1, 4, 4, 4), value))
    out = PercentileScaleIntensity(b_min=b_min, b_max=b_max)(img)
    assert bool(torch.isfinite(out).all())
    assert bool((out == b_min).all())


def test_constant_image_raises_when_asked() -> None:
    img = _img(torch.zeros(1, 4, 4, 4), name="blank.nii.gz")
    with pytest.raises(InputDataError, match=r"blank\.nii\.gz.*no intensity range"):
        PercentileScaleIntensity(on_constant="raise")(img)
    with pytest.raises(ValueError):
        PercentileScaleIntensity(on_constant="ignore")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_names_the_file(bad: float) -> None:
    values = torch.rand(1, 4, 4, 4)
    values[0, 1, 2, 3] = bad
    img = _img(values, name="/data/sub-07/anat/sub-07_T2w.nii.gz")
    kind = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    for xform in (PercentileScaleIntensity(), MaskedZScore()):
        with pytest.raises(InputDataError, match=rf"sub-07_T2w\.nii\.gz: contains {kind} voxels"):
            xform(img)


def test_empty_and_misshaped_masks_name_the_mask_file() -> None:
    img = _img(torch.rand(1, 4, 4, 4))
    empty = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "brain_mask.nii.gz"})
    wrong = MetaTensor(torch.ones(1, 4, 4, 5), meta={"filename_or_obj": "brain_mask.nii.gz"})
    for xform in (PercentileScaleIntensity(), MaskedZScore()):
        with pytest.raises(InputDataError, match=r"brain_mask\.nii\.gz: foreground mask is empty"):
            xform(img, empty)
        with pytest.raises(InputDataError, match=r"brain_mask\.nii\.gz: mask spatial shape \(4, 4, 5\)"):
            xform(img, wrong)


def test_percentile_dict_version_uses_mask_key() -> None:
    img = _img(torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10))
    data = {"image": img, "mask": (img >= 50).to(torch.uint8), "id": "s1"}
    out = PercentileScaleIntensityd("image", lower=0, upper=100, b_min=-1.0, mask_key="mask")(data)
    assert float(out["image"].flatten()[50]) == -1.0 and float(out["image"].max()) == 1.0
    assert out["mask"] is data["mask"] and out["id"] == "s1"
    with pytest.raises(KeyError, match="brain"):
        PercentileScaleIntensityd("image", mask_key="brain")(data)


def _head(seed: int = 3) -> tuple[MetaTensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, 20),) * 3, indexing="ij")
    inside = (xx**2 + yy**2 + zz**2) < 0.6
    values = rng.normal(0.1, 0.05, size=inside.shape)
    values[inside] = rng.normal(5.0, 3.0, size=int(inside.sum()))
    return _img(torch.from_numpy(values)[None]), torch.from_numpy(inside)[None]


def test_masked_zscore_statistics_inside_mask() -> None:
    img, mask = _head()
    out = MaskedZScore()(img, mask)
    inside = out[mask].double()
    assert abs(float(inside.mean())) < 1e-5
    assert abs(float(inside.std(correction=0)) - 1.0) < 1e-5
    assert bool((out[~mask] == 0).all())  # documented default: outside = 0 (the foreground mean)
    assert out.dtype == torch.float32 and torch.equal(out.affine, AFFINE)

    x, m = img.as_tensor().double(), mask
    mean, std = x[m].mean(), x[m].std(correction=0)
    loose = MaskedZScore(outside_value=None)(img, mask)
    assert torch.allclose(loose.double(), (x - mean) / std, atol=1e-5)
    assert bool((MaskedZScore(outside_value=-3.0)(img, mask)[~mask] == -3.0).all())


def test_zscore_without_mask_uses_all_voxels_and_channel_wise() -> None:
    rng = np.random.default_rng(4)
    img = _img(torch.from_numpy(np.stack([rng.normal(2, 3, (6, 6, 6)), rng.normal(-50, 0.5, (6, 6, 6))])))
    out = MaskedZScore(channel_wise=True)(img)
    for c in range(2):
        assert abs(float(out[c].double().mean())) < 1e-5
        assert abs(float(out[c].double().std(correction=0)) - 1.0) < 1e-5
    pooled = MaskedZScore()(img)
    assert abs(float(pooled.double().mean())) < 1e-5
    assert float(pooled[1].double().std(correction=0)) < 0.1


def test_zscore_constant_image() -> None:
    img = _img(torch.full((1, 4, 4, 4), 3.0), name="flat.nii.gz")
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3, 1:3] = True
    out = MaskedZScore(outside_value=-1.0)(img, mask)
    assert bool(torch.isfinite(out).all())
    assert bool((out[mask] == 0).all()) and bool((out[~mask] == -1.0).all())
    assert bool((MaskedZScore()(_img(torch.zeros(1, 3, 3, 3))) == 0).all())
    with pytest.raises(InputDataError, match=r"flat\.nii\.gz: is constant inside the mask"):
        MaskedZScore(on_constant="raise")(img, mask)


def test_zscore_dict_version() -> None:
    img, mask = _head(5)
    out = MaskedZScored(["image"], mask_key="brain")({"image": img, "brain": mask.to(torch.uint8)})
    assert abs(float(out["image"][mask].double().mean())) < 1e-5
    assert bool((out["image"][~mask] == 0).all())
