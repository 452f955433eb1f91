"""Tests for engines.diffusion: simplex training noise, AnoDDPM reconstruction steps and anomaly maps.

Everything is tiny (32x32 images, T = 100) and runs on the CPU in seconds. The simplex generator
(``transforms.simplex``) is optional here: the plumbing is tested with a smooth stand-in injected as that module,
and the tests that need the real generator skip when it is missing.
"""

from __future__ import annotations

import itertools
import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch.utils.data import DataLoader

from engines.diffusion import (
    AnomalyInferer,
    SimplexDiffusionPrepareBatch,
    ddim_step,
    ddim_timesteps,
    ddpm_posterior_step,
    draw_noise,
    predict_x0,
)

T = 100
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny tensors gain nothing from intra-op threads, and on a busy CI core they oversubscribe badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lag1_autocorr(x: torch.Tensor) -> float:
    """Mean over samples of the correlation between horizontally adjacent pixels (about 0 for white noise)."""
    a = x[..., :, :-1].flatten(1).double()
    b = x[..., :, 1:].flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def tiny_unet(in_channels: int = 1) -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=(8, 16),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    ).eval()


def images_in_range(batch: int = 2, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth-ish test images in [-0.9, 0.9], inside the clamp range so that x0-clamping is a no-op."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, channels, SIZE, SIZE), generator=g) * 1.8 - 0.9


class OracleNet:
    """A "network" that knows x0: returns eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), so x0_hat = x0 exactly.

    It reads the schedule at the timesteps it is given, so it also checks the inferer passes the right ones.
    """

    def __init__(self, scheduler: DDPMScheduler, x0: torch.Tensor) -> None:
        self.alphas_cumprod = scheduler.alphas_cumprod.clone().double()
        self.x0 = x0.double()
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append(timesteps.clone())
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * self.x0) / (1 - a).sqrt()).to(x.dtype)


class CountingNet(torch.nn.Module):
    """Wraps a network and records the timesteps of every call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append(timesteps.clone())
        return self.net(x, timesteps)


def _smooth_noise(
    shape: tuple[int, ...],
    frequency: float = 2**-5,
    octaves: int = 6,
    decay: float = 0.8,
    normalise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stand-in for transforms.simplex.simplex_noise: upsampled coarse Gaussian noise, unit variance per sample."""
    b, c, h, w = shape
    coarse = torch.randn((b, c, 4, 4), generator=generator, device=device)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    field = (field - field.mean((1, 2, 3), keepdim=True)) / field.std((1, 2, 3), keepdim=True)
    return field.to(dtype)


@pytest.fixture
def fake_simplex(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Install the stand-in as ``transforms.simplex`` for one test; returns the list of recorded calls."""
    calls: list[dict[str, Any]] = []

    def simplex_noise(shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        calls.append({"shape": tuple(shape), **kwargs})
        return _smooth_noise(tuple(shape), **kwargs)

    module = types.ModuleType("transforms.simplex")
    module.simplex_noise = simplex_noise  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transforms.simplex", module)
    return calls


# --------------------------------------------------------------------------------------------- noise


def test_draw_noise_gaussian_is_seeded_white_noise() -> None:
    a = draw_noise((4, 1, SIZE, SIZE), "gaussian", generator=torch.Generator().manual_seed(1))
    b = draw_noise((4, 1, SIZE, SIZE), "gaussian", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05
    assert abs(lag1_autocorr(a)) < 0.1


def test_draw_noise_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="noise_type"):
        draw_noise((1, 1, 4, 4), "perlin")
    with pytest.raises(ValueError, match="simplex noise needs"):
        draw_noise((1, 1, 4), "simplex")


def test_draw_noise_forwards_simplex_arguments(fake_simplex: list[dict[str, Any]]) -> None:
    g = torch.Generator().manual_seed(0)
    out = draw_noise(
        (3, 2, 16, 16),
        "simplex",
        frequency=0.1,
        octaves=3,
        decay=0.5,
        normalise=False,
        generator=g,
        dtype=torch.float64,
    )
    assert out.shape == (3, 2, 16, 16) and out.dtype == torch.float64
    (call,) = fake_simplex
    assert call["shape"] == (3, 2, 16, 16)
    assert (call["frequency"], call["octaves"], call["decay"]) == (0.1, 3, 0.5)
    assert call["generator"] is g and call["dtype"] == torch.float64 and call["normalise"] is False


def test_real_simplex_noise_is_correlated_and_independent_per_sample() -> None:
    pytest.importorskip("transforms.simplex")
    g = torch.Generator().manual_seed(0)
    noise = draw_noise((4, 1, SIZE, SIZE), "simplex", generator=g)
    assert noise.shape == (4, 1, SIZE, SIZE) and noise.dtype == torch.float32
    assert lag1_autocorr(noise) > 0.5
    flat = noise.flatten(1)
    assert not torch.allclose(flat[0], flat[1])
    # unit variance per sample, as the simplex API promises
    assert torch.allclose(flat.std(1), torch.ones(4), atol=0.1)


# --------------------------------------------------------------------------------------------- training


def test_prepare_batch_validates_arguments() -> None:
    with pytest.raises(ValueError, match="noise_type"):
        SimplexDiffusionPrepareBatch(T, noise_type="uniform")
    with pytest.raises(ValueError, match="max_timestep"):
        SimplexDiffusionPrepareBatch(T, max_timestep=0)
    with pytest.raises(ValueError, match="max_timestep"):
        SimplexDiffusionPrepareBatch(T, max_timestep=T + 1)


def test_prepare_batch_noise_and_timesteps(fake_simplex: list[dict[str, Any]]) -> None:
    images = torch.zeros(16, 1, SIZE, SIZE, dtype=torch.float64)
    prep = SimplexDiffusionPrepareBatch(
        T, noise_type="simplex", frequency=0.05, octaves=2, decay=0.7, normalise=False, max_timestep=7
    )
    inputs, target, args, kwargs = prep({"image": images})
    assert inputs is images and args == ()
    assert target is kwargs["noise"] and target.shape == images.shape and target.dtype == torch.float64
    (call,) = fake_simplex
    assert (call["frequency"], call["octaves"], call["decay"], call["normalise"]) == (0.05, 2, 0.7, False)
    assert call["device"] == images.device and call["dtype"] == torch.float64
    ts = kwargs["timesteps"]
    assert ts.shape == (16,) and ts.dtype == torch.long
    assert int(ts.min()) >= 0 and int(ts.max()) < 7
    # default: all T timesteps, as AnoDDPM trains
    torch.manual_seed(0)
    ts_all = SimplexDiffusionPrepareBatch(T, noise_type="gaussian").get_timesteps(torch.zeros(4000, 1, 1, 1))
    assert int(ts_all.min()) == 0 and int(ts_all.max()) == T - 1


@pytest.mark.parametrize("noise_type", ["gaussian", "stand_in_simplex", "simplex"])
def test_prepare_batch_trains_in_supervised_trainer(noise_type: str, request: pytest.FixtureRequest) -> None:
    """A stock SupervisedTrainer + DiffusionInferer trains on the prepared noise; the loss target is that noise."""
    if noise_type == "simplex":
        pytest.importorskip("transforms.simplex")
    elif noise_type == "stand_in_simplex":
        request.getfixturevalue("fake_simplex")
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet().train()
    before = [p.detach().clone() for p in net.parameters()]
    images = images_in_range(batch=8, seed=1)
    loader = DataLoader([{"image": im} for im in images], batch_size=4, shuffle=False)

    seen_noise: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    losses: list[float] = []

    class RecordingInferer(DiffusionInferer):
        def __call__(self, inputs: torch.Tensor, diffusion_model: Any, noise: torch.Tensor, **kw: Any) -> Any:  # type: ignore[override]
            seen_noise.append(noise)
            return super().__call__(inputs, diffusion_model, noise=noise, **kw)

    def loss_function(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        targets.append(target)
        loss = F.mse_loss(pred, target)
        losses.append(float(loss.detach()))
        return loss

    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=loss_function,
        inferer=RecordingInferer(scheduler),
        prepare_batch=SimplexDiffusionPrepareBatch(
            T, noise_type="gaussian" if noise_type == "gaussian" else "simplex"
        ),
    )
    trainer.run()

    assert len(targets) == 4 and len(seen_noise) == 4
    assert all(t is n for t, n in zip(targets, seen_noise, strict=True))
    all_targets = torch.cat(targets)
    r = lag1_autocorr(all_targets)
    if noise_type == "gaussian":
        assert abs(r) < 0.1
    else:
        assert r > 0.5
    # a fresh field every iteration
    assert not torch.allclose(targets[0], targets[2])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


# --------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("timestep", [0, 1, 37, T - 1])
def test_ddpm_posterior_step_equals_monai_step(timestep: int, variance_type: str, clip: bool) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T, variance_type=variance_type, clip_sample=clip)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 1, SIZE, SIZE, generator=g) * 1.5
    eps = torch.randn(2, 1, SIZE, SIZE, generator=g)

    ref_prev, ref_x0 = scheduler.step(eps, timestep, sample, generator=torch.Generator().manual_seed(7))
    noise = draw_noise(sample.shape, "gaussian", generator=torch.Generator().manual_seed(7))
    clip_range = tuple(scheduler.clip_sample_values) if clip else None
    prev, x0 = ddpm_posterior_step(scheduler, eps, timestep, sample, noise, clip_range=clip_range)

    assert (prev - ref_prev).abs().max() <= 1e-6
    assert (x0 - ref_x0).abs().max() <= 1e-6


def test_ddpm_posterior_step_rejects_bad_input() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="noise is required"):
        ddpm_posterior_step(scheduler, x, 5, x, None)
    with pytest.raises(ValueError, match="learned-variance"):
        ddpm_posterior_step(scheduler, torch.zeros(1, 2, 4, 4), 5, x, x)
    learned = DDPMScheduler(num_train_timesteps=T, variance_type="learned")
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_posterior_step(learned, x, 5, x, x)


@pytest.mark.parametrize("timestep", [T - 1, 50, 9, 3])
def test_ddim_step_equals_monai_step_where_expressible(timestep: int) -> None:
    """DDIMScheduler.step goes to ``t - T // n``; our step with that prev_timestep must agree exactly."""
    ddpm = DDPMScheduler(num_train_timesteps=T)
    ddim = DDIMScheduler(num_train_timesteps=T)
    ddim.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 1, SIZE, SIZE, generator=g) * 1.5
    eps = torch.randn(2, 1, SIZE, SIZE, generator=g)
    ref_prev, ref_x0 = ddim.step(eps, timestep, sample)
    prev, x0 = ddim_step(ddpm, eps, timestep, timestep - T // 10, sample, clip_range=(-1.0, 1.0))
    assert (prev - ref_prev).abs().max() <= 1e-6
    assert (x0 - ref_x0).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="prev_timestep"):
        ddim_step(ddpm, eps, 5, 5, sample)


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(99, 10) == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    assert ddim_timesteps(4, 10) == [4, 3, 2, 1, 0]  # capped at one step per index
    assert ddim_timesteps(7, 1) == [7]
    assert ddim_timesteps(0, 3) == [0]
    for t in range(0, 60):
        for k in (1, 2, 3, 7, 10):
            taus = ddim_timesteps(t, k)
            assert taus[0] == t and taus[-1] == (0 if k > 1 else t)
            assert len(taus) == min(k, t + 1) and all(a > b for a, b in itertools.pairwise(taus))


# --------------------------------------------------------------------------------------------- reconstruction


def test_one_shot_is_exact_with_true_noise() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x0 = images_in_range(batch=3)
    eps = draw_noise(x0.shape, "gaussian", generator=torch.Generator().manual_seed(5))
    calls: list[torch.Tensor] = []

    def true_noise_net(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        calls.append(timesteps)
        return eps

    inferer = AnomalyInferer(scheduler, t_start=60, recon="one_shot", noise_type="gaussian")
    out = inferer(x0, true_noise_net, noise=eps)
    assert len(calls) == 1 and torch.equal(calls[0], torch.full((3,), 59))
    assert torch.equal(out["noise"], eps)
    assert torch.allclose(out["noisy"], scheduler.add_noise(x0, eps, torch.full((3,), 59)))
    assert (out["recon"] - x0).abs().max() < 1e-5
    assert out["anomaly_map"].abs().max() < 1e-9


def test_one_shot_exposes_drawn_noise_and_clamps() -> None:
    """Without a supplied noise the inferer exposes the one it drew; reconstructions stay in the clip range."""
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x0 = images_in_range(batch=2)
    inferer = AnomalyInferer(scheduler, t_start=T, recon="one_shot", noise_type="gaussian", seed=4)
    first = inferer(x0, lambda x, t: torch.zeros_like(x))
    assert first["noise"].shape == x0.shape
    assert float(first["recon"].abs().max()) <= 1.0
    out = inferer(x0, lambda x, t: first["noise"])
    assert (out["recon"] - x0).abs().max() < 1e-4


@pytest.mark.parametrize("noise_type", ["gaussian", "stand_in_simplex"])
def test_ddpm_chain_with_oracle_makes_t_calls_and_recovers_x0(
    noise_type: str, request: pytest.FixtureRequest
) -> None:
    calls = request.getfixturevalue("fake_simplex") if noise_type == "stand_in_simplex" else None
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x0 = images_in_range(batch=2)
    oracle = OracleNet(scheduler, x0)
    t_start = 25
    inferer = AnomalyInferer(
        scheduler,
        t_start=t_start,
        recon="ddpm",
        noise_type="gaussian" if calls is None else "simplex",
        seed=0,
    )
    out = inferer(x0, oracle)
    assert len(oracle.calls) == t_start
    assert [int(c[0]) for c in oracle.calls] == list(range(t_start - 1, -1, -1))
    assert all(c.shape == (2,) and bool((c == c[0]).all()) for c in oracle.calls)
    assert (out["recon"] - x0).abs().max() < 1e-3
    assert (out["noisy"] - x0).abs().mean() > 0.05  # it really was noised
    if calls is not None:
        # forward noise + one simplex field per reverse step with t > 0: the AnoDDPM reverse noise is simplex
        assert len(calls) == 1 + (t_start - 1)


def test_ddpm_chain_equals_monai_scheduler_loop_for_gaussian_noise() -> None:
    """End to end: the Gaussian DDPM path is MONAI's add_noise + DDPMScheduler.step loop with the same generator."""
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet()
    x0 = images_in_range(batch=2)
    t_start = 8
    out = AnomalyInferer(scheduler, t_start=t_start, recon="ddpm", noise_type="gaussian", seed=11)(x0, net)

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=g)
        x = scheduler.add_noise(x0, noise, torch.full((2,), t_start - 1))
        for t in range(t_start - 1, -1, -1):
            x, _ = scheduler.step(net(x, torch.full((2,), t)), t, x, generator=g)
    assert (out["recon"] - x).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("t_start", "k", "expected_calls"), [(80, 10, 10), (40, 7, 7), (5, 10, 5), (1, 3, 1)]
)
def test_ddim_with_oracle_makes_k_calls_and_recovers_x0(t_start: int, k: int, expected_calls: int) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x0 = images_in_range(batch=2)
    oracle = OracleNet(scheduler, x0)
    inferer = AnomalyInferer(
        scheduler, t_start=t_start, recon="ddim", ddim_steps=k, noise_type="gaussian", seed=1
    )
    out = inferer(x0, oracle)
    assert len(oracle.calls) == expected_calls
    ts = [int(c[0]) for c in oracle.calls]
    assert ts == ddim_timesteps(t_start - 1, k) and ts[0] == t_start - 1 and ts[-1] == 0
    assert (out["recon"] - x0).abs().max() < 1e-4


def test_ddim_is_deterministic_given_the_forward_noise() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet()
    x0 = images_in_range(batch=2)
    noise = draw_noise(x0.shape, "gaussian", generator=torch.Generator().manual_seed(2))
    a = AnomalyInferer(scheduler, 30, recon="ddim", ddim_steps=4, noise_type="gaussian", seed=1)(
        x0, net, noise=noise
    )
    b = AnomalyInferer(scheduler, 30, recon="ddim", ddim_steps=4, noise_type="gaussian", seed=9)(
        x0, net, noise=noise
    )
    assert torch.equal(a["recon"], b["recon"])


def test_predict_x0_matches_formula() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x = torch.randn(1, 1, 8, 8)
    eps = torch.randn(1, 1, 8, 8)
    a = scheduler.alphas_cumprod[42]
    expected = (x - (1 - a).sqrt() * eps) / a.sqrt()
    assert torch.allclose(predict_x0(scheduler, eps, 42, x, clip_range=None), expected)
    assert float(predict_x0(scheduler, eps * 50, 42, x).abs().max()) <= 1.0


def test_volumes_work_with_gaussian_noise() -> None:
    """(B, C, H, W, D) inputs: one-shot is exact with the true noise; the median filter runs in 3D."""
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x0 = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    eps = draw_noise(x0.shape, "gaussian", generator=torch.Generator().manual_seed(1))
    out = AnomalyInferer(scheduler, 40, recon="one_shot", noise_type="gaussian", median=3)(
        x0, lambda x, t: eps, noise=eps
    )
    assert (out["recon"] - x0).abs().max() < 1e-5
    assert out["anomaly_map"].shape == (2, 1, 8, 8, 8)


# --------------------------------------------------------------------------------------------- anomaly map


def test_anomaly_map_zero_where_recon_equals_input() -> None:
    inferer = AnomalyInferer(DDPMScheduler(num_train_timesteps=T), t_start=10)
    x = images_in_range(batch=2, channels=2)
    recon = x.clone()
    recon[:, :, 5:9, 5:9] += 0.5
    amap = inferer.anomaly_map(x, recon)
    assert amap.shape == (2, 1, SIZE, SIZE)
    inside = torch.zeros_like(amap, dtype=torch.bool)
    inside[:, :, 5:9, 5:9] = True
    assert float(amap[~inside].abs().max()) == 0.0
    # squared residual summed over the two channels
    assert torch.allclose(amap[inside], torch.full_like(amap[inside], 2 * 0.25))


def test_anomaly_map_brain_mask_zeroes_outside() -> None:
    inferer = AnomalyInferer(DDPMScheduler(num_train_timesteps=T), t_start=10)
    x = images_in_range(batch=2)
    recon = torch.zeros_like(x)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[:, :, 8:24, 8:24] = 1
    amap = inferer.anomaly_map(x, recon, mask)
    assert float(amap[mask == 0].abs().max()) == 0.0
    assert torch.allclose(amap[mask == 1], (x**2)[mask == 1])
    # a boolean (B, H, W)-less (1, 1, H, W) mask broadcasts over the batch
    amap_bool = inferer.anomaly_map(x, recon, mask[:1].bool())
    assert torch.equal(amap, amap_bool)
    with pytest.raises(ValueError, match="broadcast"):
        inferer.anomaly_map(x, recon, torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match="must match"):
        inferer.anomaly_map(x, recon[:1])


def test_median_filter_removes_a_hot_pixel() -> None:
    x = torch.zeros(2, 1, SIZE, SIZE)
    recon = x.clone()
    recon[0, 0, 10, 12] = 3.0
    recon[1, 0, 0, 0] = 3.0  # a corner pixel too (replicate padding)
    raw = AnomalyInferer(DDPMScheduler(num_train_timesteps=T), t_start=10).anomaly_map(x, recon)
    assert float(raw[0, 0, 10, 12]) == 9.0
    filtered = AnomalyInferer(DDPMScheduler(num_train_timesteps=T), t_start=10, median=3).anomaly_map(
        x, recon
    )
    assert filtered.shape == raw.shape and float(filtered.abs().max()) == 0.0
    # a blob larger than the window survives
    recon[0, 0, 4:10, 4:10] = 1.0
    blob = AnomalyInferer(DDPMScheduler(num_train_timesteps=T), t_start=10, median=3).anomaly_map(x, recon)
    assert float(blob[0, 0, 6, 6]) == 1.0


# --------------------------------------------------------------------------------------------- inferer behaviour


@pytest.mark.parametrize("recon", ["one_shot", "ddpm", "ddim"])
def test_same_seed_same_maps_and_shapes(recon: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet(in_channels=2)
    x = images_in_range(batch=3, channels=2)
    kw = {"recon": recon, "ddim_steps": 3, "noise_type": "gaussian", "median": 3}
    a = AnomalyInferer(scheduler, 6, seed=5, **kw)(x, net)
    b = AnomalyInferer(scheduler, 6, seed=5, **kw)(x, net)
    c = AnomalyInferer(scheduler, 6, seed=6, **kw)(x, net)
    assert a["anomaly_map"].shape == (3, 1, SIZE, SIZE)
    assert a["recon"].shape == a["noisy"].shape == a["noise"].shape == x.shape
    for key in ("anomaly_map", "recon", "noisy", "noise"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["anomaly_map"], c["anomaly_map"])
    assert not a["anomaly_map"].requires_grad


def test_same_seed_same_maps_with_real_simplex() -> None:
    pytest.importorskip("transforms.simplex")
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet()
    x = images_in_range(batch=2)
    a = AnomalyInferer(scheduler, 5, recon="ddpm", noise_type="simplex", seed=5)(x, net)
    b = AnomalyInferer(scheduler, 5, recon="ddpm", noise_type="simplex", seed=5)(x, net)
    assert torch.equal(a["anomaly_map"], b["anomaly_map"])
    assert lag1_autocorr(a["noise"]) > 0.5


def test_batch_of_four_equals_four_single_calls_given_the_noise() -> None:
    """The network sees the slices in one batch, but no slice leaks into another (per-sample computation)."""
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = CountingNet(tiny_unet())
    x = images_in_range(batch=4)
    noise = draw_noise(x.shape, "gaussian", generator=torch.Generator().manual_seed(8))
    inferer = AnomalyInferer(scheduler, 20, recon="ddim", ddim_steps=3, noise_type="gaussian")
    batched = inferer(x, net, noise=noise)
    assert len(net.calls) == 3 and all(c.shape == (4,) for c in net.calls)
    singles = [inferer(x[i : i + 1], net, noise=noise[i : i + 1]) for i in range(4)]
    for key in ("recon", "anomaly_map"):
        assert torch.allclose(batched[key], torch.cat([s[key] for s in singles]), atol=1e-5)


def test_sweep_matches_single_runs_and_reuses_the_noise() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet()
    x = images_in_range(batch=2)
    mask = torch.ones(2, 1, SIZE, SIZE)
    mask[..., :4] = 0
    inferer = AnomalyInferer(scheduler, t_start=10, recon="ddim", ddim_steps=2, noise_type="gaussian", seed=3)
    maps = inferer.sweep(x, net, [5, 20, 50], brain_mask=mask)
    assert list(maps) == [5, 20, 50]
    for t, amap in maps.items():
        single = AnomalyInferer(
            scheduler, t_start=t, recon="ddim", ddim_steps=2, noise_type="gaussian", seed=3
        )
        assert torch.equal(amap, single(x, net, brain_mask=mask)["anomaly_map"])
        assert float(amap[..., :4].abs().max()) == 0.0
    noises = inferer.sweep(x, net, [5, 50], output="noise")
    assert torch.equal(noises[5], noises[50])
    recons = inferer.sweep(x, net, [5, 50], output="recon")
    assert recons[5].shape == x.shape
    with pytest.raises(ValueError, match="output"):
        inferer.sweep(x, net, [5], output="nope")
    with pytest.raises(ValueError, match="t_start"):
        inferer.sweep(x, net, [0])


def test_inferer_runs_inside_a_supervised_evaluator() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=T)
    x = images_in_range(batch=4)
    mask = torch.zeros(4, 1, SIZE, SIZE)
    mask[..., 8:24, 8:24] = 1

    def prepare(batch: dict[str, torch.Tensor], device: Any, non_blocking: bool, **kw: Any) -> tuple:
        return batch["image"].to(device), None, (), {"brain_mask": batch["mask"].to(device)}

    loader = DataLoader([{"image": x[i], "mask": mask[i]} for i in range(4)], batch_size=2)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=tiny_unet(),
        prepare_batch=prepare,
        inferer=AnomalyInferer(scheduler, t_start=4, recon="ddpm", noise_type="gaussian", seed=0),
        decollate=False,
    )
    maps: list[torch.Tensor] = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: maps.append(e.state.output["pred"]["anomaly_map"])
    )
    evaluator.run()
    assert len(maps) == 2 and all(m.shape == (2, 1, SIZE, SIZE) for m in maps)
    assert float(torch.cat(maps)[mask == 0].abs().max()) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"t_start": 0}, "t_start"),
        ({"t_start": T + 1}, "t_start"),
        ({"recon": "ddim2"}, "recon"),
        ({"noise_type": "pink"}, "noise_type"),
        ({"ddim_steps": 0}, "ddim_steps"),
        ({"median": 4}, "median"),
        ({"median": -1}, "median"),
    ],
)
def test_inferer_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"t_start": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        AnomalyInferer(DDPMScheduler(num_train_timesteps=T), **args)


def test_inferer_rejects_non_epsilon_schedulers_and_bad_noise() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        AnomalyInferer(DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction"), t_start=10)
    inferer = AnomalyInferer(DDPMScheduler(num_train_timesteps=T), t_start=10, noise_type="gaussian")
    x = images_in_range(batch=2)
    with pytest.raises(ValueError, match="noise"):
        inferer(x, tiny_unet(), noise=torch.zeros(1, 1, SIZE, SIZE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_images_device() -> None:
    device = torch.device("cuda")
    scheduler = DDPMScheduler(num_train_timesteps=T)
    net = tiny_unet().to(device)
    x = images_in_range(batch=2).to(device)
    mask = torch.ones(2, 1, SIZE, SIZE, device=device)
    for recon in ("one_shot", "ddpm", "ddim"):
        kw: dict[str, Any] = {
            "recon": recon,
            "noise_type": "gaussian",
            "seed": 1,
            "median": 3,
        }
        a = AnomalyInferer(scheduler, 6, **kw)(x, net, brain_mask=mask)
        b = AnomalyInferer(scheduler, 6, **kw)(x, net, brain_mask=mask)
        assert a["anomaly_map"].device.type == "cuda" and torch.equal(a["anomaly_map"], b["anomaly_map"])
    oracle = OracleNet(scheduler, x)
    oracle.alphas_cumprod = oracle.alphas_cumprod.to(device)
    out = AnomalyInferer(scheduler, 30, recon="ddim", ddim_steps=5, noise_type="gaussian", seed=0)(x, oracle)
    assert (out["recon"] - x).abs().max() < 1e-4
    prep = SimplexDiffusionPrepareBatch(T, noise_type="gaussian")
    _, target, _, kwargs = prep({"image": x}, device=device)
    assert target.device.type == "cuda" and kwargs["timesteps"].device.type == "cuda"
