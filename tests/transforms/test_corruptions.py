"""Deterministic corruptions: identity at level 0, monotonic severity, seeds, and one physical property per kind."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms import (
    CORRUPTIONS,
    SEVERITIES,
    Corrupt,
    CorruptD,
    Corruptd,
    CorruptDict,
    InputDataError,
    corrupt,
    corruption_grid,
    corruption_seed,
    robust_max,
)

AFFINE = torch.diag(torch.tensor([0.9, 0.9, 3.0, 1.0], dtype=torch.float64))
SEEDLESS_KINDS = ("gibbs", "ghosting")
TORCHIO_KINDS = ("motion", "ghosting")


def _needs(kind: str) -> None:
    if kind in TORCHIO_KINDS:
        pytest.importorskip("torchio")


def _brain(n: int = 32, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """A (1, n, n) phantom: scalp ring, CSF gap, brain with ventricle and a bright lesion, zero background."""
    y, x = torch.meshgrid(
        torch.linspace(-1, 1, n, dtype=torch.float64),
        torch.linspace(-1, 1, n, dtype=torch.float64),
        indexing="ij",
    )
    r = (x / 0.75) ** 2 + (y / 0.9) ** 2
    img = torch.zeros(n, n, dtype=torch.float64)
    img[r < 1] = 0.9
    img[r < 0.85] = 0.1
    img[r < 0.78] = 0.55 + 0.1 * torch.sin(8 * x[r < 0.78]) * torch.sin(6 * y[r < 0.78])
    img[(x / 0.12) ** 2 + ((y - 0.05) / 0.3) ** 2 < 1] = 0.15
    img[((x - 0.3) / 0.1) ** 2 + ((y + 0.3) / 0.1) ** 2 < 1] = 1.0
    return (img * scale)[None].to(dtype)


def _meta(img: torch.Tensor, name: str = "sub-01_T1w.nii.gz") -> MetaTensor:
    return MetaTensor(img, affine=AFFINE, meta={"filename_or_obj": name})


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean())


def _kspace(img: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(img).double()
    dims = tuple(range(1, x.ndim))
    return torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)


# ------------------------------------------------------------------------------------ the tables


def test_severity_table_and_grid() -> None:
    assert set(SEVERITIES) == set(CORRUPTIONS)
    assert {"gaussian", "rician", "bias_field", "spikes", "gibbs", "motion", "ghosting"} <= set(CORRUPTIONS)
    for kind, levels in SEVERITIES.items():
        assert len(levels) >= 3, kind
        assert all(b > a > 0 for a, b in itertools.pairwise(levels)), kind
    grid = corruption_grid()
    assert grid == [(k, lv) for k in CORRUPTIONS for lv in range(1, len(SEVERITIES[k]) + 1)]
    assert len(set(grid)) == len(grid) == sum(len(v) for v in SEVERITIES.values())
    assert corruption_grid(["gibbs"]) == [("gibbs", 1), ("gibbs", 2), ("gibbs", 3)]
    with pytest.raises(ValueError):
        corruption_grid(["blur"])


def test_robust_max_ignores_background_and_outliers() -> None:
    img = torch.zeros(2, 40, 20)
    img[0, :20] = 100.0  # half the image; the zero background must not pull the percentile down
    img[0, 0, 0] = 1e6  # one outlier above the 99.5th percentile of 400 voxels
    assert robust_max(img).tolist() == [100.0, 0.0]


# --------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_level_zero_is_identity(kind: str) -> None:
    img = _meta(_brain())
    out = corrupt(img, kind, 0, seed=3)
    assert out is img
    assert torch.equal(Corrupt(kind, 0)(img), img)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_error_increases_strictly_with_level(kind: str) -> None:
    _needs(kind)
    img = _brain()
    errors = [_mse(corrupt(img, kind, level, seed=0), img) for level in range(len(SEVERITIES[kind]) + 1)]
    assert errors[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] > 1.5 * errors[1], errors  # the top level is clearly stronger than the mildest


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_same_seed_same_output(kind: str) -> None:
    _needs(kind)
    img = _brain()
    a = corrupt(img, kind, 2, seed=7)
    b = corrupt(img.clone(), kind, 2, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(img, _brain())  # the input is not modified in place
    if kind in SEEDLESS_KINDS:
        assert torch.equal(corrupt(img, kind, 2, seed=8), a)  # deterministic artefacts ignore the seed
    else:
        assert not torch.allclose(corrupt(img, kind, 2, seed=8), a)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_scale_invariance(kind: str) -> None:
    """Any non-negative scale works: corrupting 1000 * image gives 1000 * the corrupted image."""
    _needs(kind)
    img = _brain(dtype=torch.float64)
    small = corrupt(img, kind, 2, seed=1)
    big = corrupt(img * 1000.0, kind, 2, seed=1)
    tol = 1e-4 if kind in TORCHIO_KINDS else 1e-9  # TorchIO computes in float32
    assert torch.allclose(big / 1000.0, small, atol=tol, rtol=0)
    assert _mse(small, img) > 1e-5


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_shape_dtype_and_metadata_preserved(kind: str) -> None:
    _needs(kind)
    img = _meta(_brain())
    out = corrupt(img, kind, 3, seed=0)
    assert isinstance(out, MetaTensor)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert torch.equal(out.affine, AFFINE) and out.meta["filename_or_obj"] == "sub-01_T1w.nii.gz"
    assert not torch.equal(out.as_tensor(), img.as_tensor())
    # numpy in, numpy out; float64 stays float64
    arr = _brain(dtype=torch.float64).numpy()
    out_np = corrupt(arr, kind, 1, seed=0)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64 and out_np.shape == arr.shape


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_volume_with_two_channels(kind: str) -> None:
    _needs(kind)
    base = _brain(16, scale=1.0)[0]
    vol = torch.stack([base] * 6, dim=-1)  # (16, 16, 6)
    img = _meta(torch.stack([vol, 300.0 * vol]))  # two channels on different scales
    out = corrupt(img, kind, 2, seed=0)
    assert out.shape == img.shape and out.dtype == img.dtype and torch.equal(out.affine, AFFINE)
    rel = [_mse(out[c], img[c]) / float(img[c].max()) ** 2 for c in range(2)]
    assert rel[0] > 0 and rel[1] > 0
    assert math.isclose(rel[0], rel[1], rel_tol=0.5)  # severity is relative to each channel's scale


def test_integer_image_is_rounded_and_clipped() -> None:
    img = (_brain() * 200).to(torch.int16)
    out = corrupt(img, "gaussian", 3, seed=0)
    assert out.dtype == torch.int16
    reference = corrupt(img.double(), "gaussian", 3, seed=0)
    assert torch.equal(out, reference.round().to(torch.int16))


def test_channel_without_signal_is_unchanged() -> None:
    img = torch.cat([_brain(), torch.zeros(1, 32, 32)])
    out = corrupt(img, "rician", 3, seed=0)
    assert torch.equal(out[1], img[1])
    assert _mse(out[0], img[0]) > 1e-4


# --------------------------------------------------------------------------- per-kind physics


def test_rician_bias_on_zero_background_gaussian_mean_zero() -> None:
    img = torch.zeros(1, 64, 64)
    img[0, 24:40, 24:40] = 1.0  # robust max 1; everything else is a zero background
    background = torch.ones(64, 64, dtype=torch.bool)
    background[20:44, 20:44] = False
    n = int(background.sum())
    sigma = SEVERITIES["rician"][2]
    rician = corrupt(img, "rician", 3, seed=0)[0][background].double()
    assert float(rician.min()) >= 0.0
    # magnitude of complex Gaussian noise on zero signal is Rayleigh: mean sigma * sqrt(pi / 2)
    expected = sigma * math.sqrt(math.pi / 2)
    assert abs(float(rician.mean()) - expected) < 0.05 * expected
    sigma_g = SEVERITIES["gaussian"][2]
    gauss = corrupt(img, "gaussian", 3, seed=0)[0][background].double()
    assert abs(float(gauss.mean())) < 4 * sigma_g / math.sqrt(n)
    assert abs(float(gauss.std()) - sigma_g) < 0.05 * sigma_g


@pytest.mark.parametrize("level", [1, 2, 3])
def test_gibbs_truncates_kspace(level: int) -> None:
    img = _brain(64, dtype=torch.float64)
    out = corrupt(img, "gibbs", level, seed=0)
    alpha = SEVERITIES["gibbs"][level - 1]
    radius = (1 - alpha) * 64 * math.sqrt(2) / 2  # MONAI's GibbsNoise cut-off
    k = torch.arange(64, dtype=torch.float64) - 32
    dist = torch.sqrt(k.view(-1, 1) ** 2 + k.view(1, -1) ** 2)
    outside = dist > radius + 1  # +1: MONAI centres the disc at (n - 1) / 2, the DC sits at n / 2
    energy_in, energy_out = _kspace(img).abs() ** 2, _kspace(out).abs() ** 2
    assert float(energy_in[0][outside].sum()) > 1e-3 * float(energy_in.sum())  # there was something to cut
    assert float(energy_out[0][outside].sum()) < 1e-20 * float(energy_out.sum())
    inside = dist < radius - 1
    assert torch.allclose(
        _kspace(out)[0][inside], _kspace(img)[0][inside], atol=1e-8 * float(energy_in.sum()) ** 0.5
    )


@pytest.mark.parametrize("level", [1, 3])
def test_spikes_put_energy_at_one_kspace_location(level: int) -> None:
    img = _brain(64, dtype=torch.float64, scale=500.0)
    out = corrupt(img, "spikes", level, seed=5)
    diff = (_kspace(out) - _kspace(img)).abs().flatten() ** 2
    top = torch.topk(diff, 2).values
    # one spike and its Hermitian mirror (the image is real) hold all of the change
    assert float(top.sum()) > (1 - 1e-9) * float(diff.sum())
    # the stripe pattern has the documented amplitude: severity * robust max
    amplitude = float((out - img).abs().max())
    expected = SEVERITIES["spikes"][level - 1] * float(robust_max(img)[0])
    assert 0.8 * expected < amplitude < 1.2 * expected
    # the spike is away from the centre of k-space
    loc = int(torch.argmax(diff)) % 4096
    row, col = divmod(loc, 64)
    assert max(abs(row - 32), abs(col - 32)) >= 0.25 * 32 - 1


@pytest.mark.parametrize("level", [1, 3])
def test_bias_field_is_multiplicative_and_smooth(level: int) -> None:
    s = SEVERITIES["bias_field"][level - 1]
    n = 64
    flat = torch.full((1, n, n), 3.0, dtype=torch.float64)
    field = corrupt(flat, "bias_field", level, seed=2) / 3.0
    log_field = torch.log(field[0])
    # the field is centred with peak-to-peak exactly the severity: within [exp(-s/2), exp(s/2)]
    assert math.isclose(float(log_field.max() - log_field.min()), s, rel_tol=1e-9)
    assert math.isclose(float(log_field.max()), s / 2, rel_tol=1e-9)
    # smooth: a centred degree-3 polynomial bounded by s/2 has slope <= 9 * s/2 on [-1, 1] (Markov's
    # inequality), i.e. <= 9 * s / (n - 1) from one pixel to the next
    bound = 9 * s / (n - 1)
    assert float(log_field.diff(dim=0).abs().max()) <= bound
    assert float(log_field.diff(dim=1).abs().max()) <= bound
    # multiplicative: the same seed multiplies any image by the same field
    img = _brain(n, dtype=torch.float64, scale=250.0)
    out = corrupt(img, "bias_field", level, seed=2)
    assert torch.allclose(out, img * field, rtol=1e-12, atol=0)
    assert torch.equal(out[img == 0], img[img == 0])  # zero stays zero


@pytest.mark.parametrize("phase_axis", [0, 1])
def test_ghosting_makes_copies_shifted_along_phase_axis(phase_axis: int) -> None:
    pytest.importorskip("torchio")
    img = _brain(32)
    diff = (corrupt(img, "ghosting", 3, seed=0, phase_axis=phase_axis) - img)[0].double()
    assert float(diff.abs().max()) > 0.05
    # the change is periodic with a quarter of the field of view along the phase-encode axis only:
    # it consists of ghost copies of the image shifted by multiples of n / 4
    along = torch.roll(diff, 8, dims=phase_axis)
    across = torch.roll(diff, 8, dims=1 - phase_axis)
    assert float((along - diff).abs().max()) < 1e-5
    assert float((across - diff).abs().max()) > 0.05


@pytest.mark.parametrize("phase_axis", [0, 1])
def test_motion_corrupts_only_outer_phase_encode_lines(phase_axis: int) -> None:
    pytest.importorskip("torchio")
    n = 32
    img = _brain(n)
    out = corrupt(img, "motion", 2, seed=0, phase_axis=phase_axis)
    diff = (_kspace(out) - _kspace(img))[0].abs()
    per_line = diff.sum(dim=1 - phase_axis)  # change per phase-encode line
    s = SEVERITIES["motion"][1]
    k = torch.arange(n) - n // 2
    central = k.abs() < (1 - s) / 2 * n - 1  # acquired while the head was in its reference pose
    scale = float(_kspace(img).abs().max())
    assert float(per_line[central].max()) < 1e-5 * scale
    assert float(per_line[~central].mean()) > 1e-3 * scale


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("level", [0, 2])
def test_nonfinite_input_raises(level: int) -> None:
    img = _meta(_brain())
    img[0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN") as err:
        corrupt(img, "gaussian", level, seed=0)
    assert "sub-01_T1w.nii.gz" in str(err.value)
    inf = _brain()
    inf[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 Inf"):
        Corrupt("gibbs", 1)(inf)


def test_normalised_image_raises() -> None:
    img = _brain()
    zscored = (img - img.mean()) / img.std()
    with pytest.raises(InputDataError, match="de-normalised"):
        corrupt(zscored, "rician", 1, seed=0)
    slightly_negative = img.clone()
    slightly_negative[0, 0, 0] = -0.01  # resampling undershoot is tolerated
    assert corrupt(slightly_negative, "rician", 1, seed=0).shape == img.shape


def test_invalid_arguments_raise() -> None:
    img = _brain()
    with pytest.raises(ValueError):
        corrupt(img, "blur", 1)
    with pytest.raises(ValueError, match="level"):
        corrupt(img, "gibbs", len(SEVERITIES["gibbs"]) + 1)
    with pytest.raises(ValueError, match="level"):
        Corrupt("gibbs", -1)
    with pytest.raises(ValueError, match="seed"):
        corrupt(img, "gaussian", 1, seed=-1)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        corrupt(img[0], "gaussian", 1)
    with pytest.raises(ValueError, match="phase_axis"):
        corrupt(img, "gibbs", 1, phase_axis=2)


# ------------------------------------------------------------------------------------ seeds, dict


def test_corruption_seed_is_stable_and_distinguishes_parts() -> None:
    # a fixed value: the seed must not change between processes (Python's str hash is randomised)
    assert corruption_seed(0, "sub-01", "image") == corruption_seed(0, "sub-01", "image")
    assert corruption_seed(0, "sub-01", "image") == 5241122678430721301
    assert corruption_seed(0, torch.tensor([3]), "image") == corruption_seed(0, 3, "image")
    assert corruption_seed(0, np.int64(3)) == corruption_seed(0, 3) != corruption_seed(0, "3")
    assert corruption_seed(0, "a") != corruption_seed(1, "a")
    assert 0 <= corruption_seed(2**40, "x") < 2**63


def test_dict_transform_seeds_per_item_and_key() -> None:
    img = _meta(_brain())
    t = Corruptd(keys=["t1", "t2"], kind="rician", level=2, seed=11, id_key="subject")
    a = t({"t1": img, "t2": img.clone(), "subject": "sub-01"})
    b = t({"t1": img, "t2": img.clone(), "subject": "sub-01"})
    c = t({"t1": img, "t2": img.clone(), "subject": "sub-02"})
    assert torch.equal(a["t1"], b["t1"]) and torch.equal(a["t2"], b["t2"])  # same item -> same images
    assert not torch.allclose(a["t1"], c["t1"])  # another item -> another draw
    assert not torch.allclose(a["t1"], a["t2"])  # independent noise per key
    assert torch.equal(a["t1"], corrupt(img, "rician", 2, corruption_seed(11, "sub-01", "t1")))
    assert isinstance(a["t1"], MetaTensor) and torch.equal(a["t1"].affine, AFFINE)
    assert a["subject"] == "sub-01"
    no_id = Corruptd(keys="t1", kind="rician", level=2, seed=11)({"t1": img})
    assert torch.equal(no_id["t1"], corrupt(img, "rician", 2, corruption_seed(11, "t1")))
    assert CorruptD is Corruptd and CorruptDict is Corruptd
    with pytest.raises(KeyError, match="subject"):
        t({"t1": img, "t2": img})
    identity = Corruptd(keys="t1", kind="motion", level=0)({"t1": img})
    assert identity["t1"] is img
