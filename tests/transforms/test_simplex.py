"""Multi-octave simplex noise (AnoDDPM): known values, spatial statistics, independence, transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import transforms.simplex as simplex_mod
from transforms.simplex import (
    RandSimplexNoise,
    RandSimplexNoised,
    simplex3,
    simplex3_reference,
    simplex_noise,
    simplex_noise_like,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # these checks are about values, not speed; on a busy 2-core runner torch's multi-threaded
    # eager ops can wait on a descheduled OpenMP thread at every call (seconds instead of ms)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lag_corr(x: torch.Tensor, lag: int, dim: int = -1) -> float:
    """Pooled correlation between pixels ``lag`` apart along ``dim`` (over all fields)."""
    n = x.shape[dim]
    a = x.narrow(dim, 0, n - lag).double()
    b = x.narrow(dim, lag, n - lag).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std(correction=0) * b.std(correction=0)))


# ---------------------------------------------------------------- known values


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_matches_scalar_reference_at_random_points(dtype, atol):
    g = _gen(1)
    perm = torch.randperm(256, generator=g)
    pts = (torch.rand(3, 400, generator=g, dtype=torch.float64) - 0.5) * 40
    ref = torch.tensor([simplex3_reference(*map(float, pts[:, n]), perm.tolist()) for n in range(400)])
    got = simplex3(pts[0].to(dtype), pts[1].to(dtype), pts[2].to(dtype), perm)
    assert got.dtype == dtype and got.shape == (400,)
    torch.testing.assert_close(got.double(), ref.double(), atol=atol, rtol=0)
    assert ref.abs().max() > 0.3  # not trivially zero


def test_one_permutation_per_point_set():
    g = _gen(2)
    perms = torch.stack([torch.randperm(256, generator=g) for _ in range(3)])
    pts = torch.rand(3, 3, 50, generator=g, dtype=torch.float64) * 20
    got = simplex3(pts[0], pts[1], pts[2], perms)
    for b in range(3):
        ref = [simplex3_reference(*map(float, pts[:, b, n]), perms[b].tolist()) for n in range(50)]
        torch.testing.assert_close(got[b], torch.tensor(ref, dtype=torch.float64), atol=1e-10, rtol=0)
    assert not torch.allclose(got[0], got[1])


def test_zero_at_lattice_points():
    # integer points with x + y + z == 0 are simplex lattice vertices (skew and unskew are exact there):
    # the own vertex contributes grad . 0 and every other corner lies outside radius**2 = 0.6
    perm = torch.randperm(256, generator=_gen(3))
    pts = [(0, 0, 0), (3, -1, -2), (5, 7, -12), (-4, 1, 3), (100, -50, -50), (2, 2, 2), (4, 4, 1)]
    for p in pts:
        assert simplex3_reference(*map(float, p), perm.tolist()) == 0.0
    xyz = torch.tensor(pts, dtype=torch.float64).T
    for dtype in (torch.float64, torch.float32):
        out = simplex3(xyz[0].to(dtype), xyz[1].to(dtype), xyz[2].to(dtype), perm)
        assert torch.equal(out, torch.zeros_like(out))


def test_values_lie_in_about_unit_range():
    g = _gen(4)
    perm = torch.randperm(256, generator=g)
    pts = (torch.rand(3, 100_000, generator=g) - 0.5) * 200
    v = simplex3(pts[0], pts[1], pts[2], perm)
    assert 0.85 < v.abs().max() <= 1.0
    assert abs(float(v.mean())) < 0.01 and 0.38 < float(v.std()) < 0.46


@pytest.mark.parametrize("shape", [(2, 1, 6, 7), (1, 2, 3, 4, 5)])
def test_full_pipeline_matches_reference_octave_sum(shape):
    # the whole simplex_noise path (grid, octave frequencies, z scaled like x and y, per-field
    # permutation and z) against a pure-Python octave loop over simplex3_reference;
    # x = column, y = row, z = the field's offset (+ depth index for volumes)
    f, octaves, decay = 2**-3, 3, 0.7
    out = simplex_noise(shape, f, octaves, decay, normalise=False, generator=_gen(5), dtype=torch.float64)
    n_fields = shape[0] * shape[1]
    perm, zoff = simplex_mod._draw_fields(n_fields, _gen(5), torch.device("cpu"), torch.float64)
    ref = torch.zeros((n_fields, *shape[2:]), dtype=torch.float64)
    for b in range(n_fields):
        p, z0 = perm[b].tolist(), float(zoff[b])
        for idx in np.ndindex(*shape[2:]):
            y, x = idx[0], idx[1]
            z = z0 + (idx[2] if len(idx) == 3 else 0)
            ref[(b, *idx)] = sum(
                decay**o * simplex3_reference(x * f * 2**o, y * f * 2**o, z * f * 2**o, p)
                for o in range(octaves)
            )
    torch.testing.assert_close(out, ref.view(shape), atol=1e-9, rtol=0)


@pytest.mark.parametrize("chunk", [40, 300, 2000])
def test_blocking_does_not_change_the_result(monkeypatch, chunk):
    # small blocks force the split over octaves (2000), over image rows (300, 40) and over fields
    shape = (3, 2, 12, 10)
    full = simplex_noise(shape, 2**-2, 4, normalise=False, generator=_gen(6))
    monkeypatch.setattr(simplex_mod, "_CHUNK_POINTS", chunk)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.testing.assert_close(
        simplex_noise(shape, 2**-2, 4, normalise=False, generator=_gen(6)), full, atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------- spatial statistics


def test_neighbours_correlate_and_distant_pixels_do_not():
    single = simplex_noise((48, 1, 64, 64), octaves=1, normalise=False, generator=_gen(7))
    multi = simplex_noise((48, 1, 64, 64), normalise=False, generator=_gen(8))
    for dim in (-1, -2):
        assert _lag_corr(single, 1, dim) > 0.9
        assert _lag_corr(multi, 1, dim) > 0.6  # the finest octave (1 lattice unit per pixel) decorrelates
        # >= 1 / frequency = 32 pixels apart: no shared lattice vertex at the lowest octave
        assert abs(_lag_corr(single, 32, dim)) < 0.15
        assert abs(_lag_corr(multi, 32, dim)) < 0.15
    assert _lag_corr(single, 4) > _lag_corr(single, 8) > _lag_corr(single, 16)


def test_normalised_fields_have_zero_mean_unit_std():
    x = simplex_noise((4, 3, 32, 48), generator=_gen(9))
    assert x.shape == (4, 3, 32, 48) and x.dtype == torch.float32
    std, mean = torch.std_mean(x.double().flatten(2), dim=-1, correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)
    # so each sample (all its channels) too
    std, mean = torch.std_mean(x.double().flatten(1), dim=-1, correction=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)


def test_raw_octave_sum_has_the_documented_std():
    # measured: per-field std ~0.68 at 64**2 - 256**2 with the defaults (documented in simplex_noise);
    # AnoDDPM's OpenSimplex sum is ~0.50, see docs/benchmarks.md
    raw = simplex_noise((32, 1, 64, 64), normalise=False, generator=_gen(10))
    per_field = raw.flatten(1).std(dim=1, correction=0)
    assert 0.62 < float(per_field.mean()) < 0.74
    assert float(raw.abs().max()) < (1 - 0.8**6) / (1 - 0.8)


def test_volumes():
    x = simplex_noise((2, 1, 16, 20, 24), frequency=2**-3, octaves=3, generator=_gen(11))
    assert x.shape == (2, 1, 16, 20, 24)
    torch.testing.assert_close(x.flatten(1).std(1, correction=0), torch.ones(2), atol=1e-5, rtol=0)
    for dim in (-1, -2, -3):  # smooth along the depth axis too
        assert _lag_corr(x, 1, dim) > 0.5


# ---------------------------------------------------------------- independence, determinism


def test_samples_and_channels_are_independent():
    x = simplex_noise((16, 2, 64, 64), generator=_gen(12)).flatten(2)
    fields = x.reshape(32, -1)
    corr = torch.corrcoef(fields)
    off = corr[~torch.eye(32, dtype=torch.bool)]
    assert abs(float(off.mean())) < 0.03 and float(off.abs().mean()) < 0.12
    assert float(off.abs().max()) < 0.5  # no repeated field (the reference repeats one over the batch)


def test_same_seed_same_noise_different_seed_different():
    a = simplex_noise((2, 1, 32, 32), generator=_gen(13))
    b = simplex_noise((2, 1, 32, 32), generator=_gen(13))
    c = simplex_noise((2, 1, 32, 32), generator=_gen(14))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # a generator carries on: two draws in a row differ
    g = _gen(13)
    assert not torch.allclose(
        simplex_noise((2, 1, 32, 32), generator=g), simplex_noise((2, 1, 32, 32), generator=g)
    )


def test_like_and_dtypes():
    ref = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    x = simplex_noise_like(ref, generator=_gen(15))
    assert x.shape == ref.shape and x.dtype == torch.float64 and x.device == ref.device
    h = simplex_noise((1, 1, 16, 16), generator=_gen(15), dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"frequency": 0.0}, "frequency"),
        ({"frequency": -0.5}, "frequency"),
        ({"frequency": math.inf}, "frequency"),
        ({"octaves": 0}, "octaves"),
        ({"octaves": 2.5}, "octaves"),
        ({"decay": 0.0}, "decay"),
        ({"decay": -1.0}, "decay"),
        ({"shape": (1, 16, 16)}, "shape"),
        ({"shape": (1, 1, 1, 16, 16, 16)}, "shape"),
        ({"shape": (1, 1, 0, 16)}, "shape"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    kwargs = {"shape": (1, 1, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=name):
        simplex_noise(**kwargs)


def test_transform_bad_arguments_raise():
    with pytest.raises(ValueError, match="octaves"):
        RandSimplexNoise(octaves=0)
    with pytest.raises(ValueError, match="std"):
        RandSimplexNoised(keys="image", std=-1.0)
    with pytest.raises(ValueError, match="perm"):
        simplex3(torch.zeros(3), 0.0, 0.0, torch.arange(128))
    with pytest.raises(ValueError, match="img"):
        RandSimplexNoise(prob=1.0)(torch.zeros(8, 8))


# ---------------------------------------------------------------- transforms


def test_rand_simplex_noise_array():
    img = MetaTensor(torch.zeros(2, 32, 32), meta={"filename_or_obj": "a.nii"})
    t = RandSimplexNoise(prob=1.0, std=0.5)
    t.set_random_state(0)
    out = t(img)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.nii"
    torch.testing.assert_close(out.flatten(1).std(1, correction=0), torch.full((2,), 0.5), atol=1e-4, rtol=0)
    assert _lag_corr(out.as_tensor(), 1) > 0.6  # structured, not white
    arr = RandSimplexNoise(prob=1.0, std=0.1)(np.ones((1, 16, 16), dtype=np.float32))
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 16, 16) and not np.allclose(arr, 1.0)


def test_rand_simplex_noised_prob_seed_and_shared_draw():
    img = torch.rand(1, 32, 32, generator=_gen(16))
    data = {"image": img, "recon": img.clone(), "label": torch.zeros(1, 32, 32)}

    off = RandSimplexNoised(keys=("image", "recon"), prob=0.0, std=1.0)(data)
    assert off["image"] is img and torch.equal(off["recon"], img)

    t = RandSimplexNoised(keys=("image", "recon"), prob=1.0, std=0.3).set_random_state(42)
    out = t(data)
    assert not torch.allclose(out["image"], img)
    assert torch.equal(out["image"], out["recon"])  # every key gets the same draw
    assert out["label"] is data["label"]  # keys not listed are untouched
    again = RandSimplexNoised(keys=("image", "recon"), prob=1.0, std=0.3).set_random_state(42)(data)
    assert torch.equal(again["image"], out["image"])
    assert not torch.equal(t(data)["image"], out["image"])  # the next call draws anew
