"""Latent pipelines: autoencoder loss, frozen encoder, latent-diffusion prepare-batch, corrupt-and-clean, the
pipeline module and class-conditional latent sampling. Known answers come from the exact noise predictor of
Gaussian data (tests/engines/_toy.GaussianEps)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from engines.latent import (
    AutoencoderKLLoss,
    CorruptClean,
    LatentClassifierPrepareBatch,
    LatentDiffusionPrepareBatch,
    LatentEncoder,
    LatentPipeline,
    LatentScaleHandler,
    SyntheticLatents,
    TimestepClassifier,
    latent_scale,
    read_latent_scale,
    sample_latents,
)
from tests.engines._toy import GaussianEps
from transforms.errors import InputDataError

T = 1000


def _ae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        latent_channels=2,
        num_res_blocks=1,
        attention_levels=(False, False),
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def test_autoencoder_loss_known_values() -> None:
    x = torch.rand(2, 1, 8, 8)
    zero = torch.zeros(2, 3, 4, 4)
    one = torch.ones(2, 3, 4, 4)
    loss = AutoencoderKLLoss(kl_weight=1.0)
    assert float(loss((x, zero, one), x)) == pytest.approx(0.0, abs=1e-7), "perfect recon, prior posterior"
    # mu = 1, sigma = 1: KL = 0.5 per latent element, 48 elements per sample
    assert float(loss((x, one, one), x)) == pytest.approx(24.0)
    assert float(AutoencoderKLLoss(0.0)((x + 0.5, one, one), x)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderKLLoss(-1)


def test_latent_encoder_is_the_scaled_posterior_mean_and_stays_frozen() -> None:
    ae = _ae()
    enc = LatentEncoder(ae, scale=0.5)
    x = torch.rand(3, 1, 16, 16)
    mu, _ = ae.encode(x)
    enc.train()
    assert not ae.training, "a frozen autoencoder stays in eval mode"
    z = enc(x)
    assert z.shape == (3, 2, 8, 8) and torch.allclose(z, 0.5 * mu)
    assert torch.equal(enc(x), z), "deterministic (the mean, not a sample)"
    assert not z.requires_grad and all(not p.requires_grad for p in ae.parameters())


def test_latent_diffusion_prepare_batch_noises_latents() -> None:
    enc = LatentEncoder(_ae())
    prep = LatentDiffusionPrepareBatch(enc, T, class_key="class_label")
    batch = {"image": torch.rand(4, 1, 16, 16), "class_label": torch.tensor([0, 1, 1, 0])}
    latents, target, args, kw = prep(batch)
    assert latents.shape == (4, 2, 8, 8) and target.shape == latents.shape, "noise has the latents' shape"
    assert torch.equal(kw["noise"], target) and args == ()
    assert (
        kw["timesteps"].shape == (4,) and 0 <= int(kw["timesteps"].min()) and int(kw["timesteps"].max()) < T
    )
    assert kw["class_labels"].tolist() == [0, 1, 1, 0]
    assert torch.allclose(latents, enc(batch["image"]))
    with pytest.raises(KeyError, match="class_label"):
        prep({"image": batch["image"]})


def test_corrupt_clean_keeps_less_of_the_input_as_t_star_grows() -> None:
    """With the exact denoiser of N(0, 0.3²) data: t* = 0 is the identity, small t* nearly returns the input,
    large t* forgets it (the output's correlation with the input falls); the same seed gives the same output."""
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    eps = GaussianEps(sched, sigma=0.3)
    z = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.3
    assert torch.equal(CorruptClean(eps, sched, t_star=0)(z), z)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    outs = {t: CorruptClean(eps, sched, t_star=t, steps=10, seed=3)(z) for t in (5, 200, 600, 1000)}
    cors = [corr(outs[t], z) for t in (5, 200, 600, 1000)]
    assert cors[0] > 0.99 and all(a > b for a, b in itertools.pairwise(cors)), cors
    assert cors[-1] < 0.2, "from pure noise nothing of the input is left"
    assert torch.equal(outs[200], CorruptClean(eps, sched, t_star=200, steps=10, seed=3)(z))
    assert not torch.equal(outs[200], CorruptClean(eps, sched, t_star=200, steps=10, seed=4)(z))
    with pytest.raises(ValueError, match="t_star"):
        CorruptClean(eps, sched, t_star=T + 1)
    with pytest.raises(ValueError, match="steps"):
        CorruptClean(eps, sched, steps=0)


def test_latent_pipeline_and_sampling() -> None:
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    enc = LatentEncoder(_ae())
    head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    x = torch.rand(2, 1, 16, 16)
    plain = LatentPipeline(enc, head)
    assert torch.allclose(plain(x), head(enc(x))) and plain(x).shape == (2, 3)
    hybrid = LatentPipeline(enc, head, CorruptClean(GaussianEps(sched), sched, t_star=50, steps=5))
    assert hybrid.latents(x).shape == (2, 2, 8, 8)
    assert not torch.allclose(hybrid(x), plain(x)), "the latent is corrupted and cleaned before the head"
    # unconditional DDIM from pure noise with the exact denoiser of N(0.5, 0.3²) data gives that distribution
    draws = sample_latents(GaussianEps(sched, mu=0.5, sigma=0.3), sched, (64, 2, 8, 8), steps=50, seed=0)
    assert abs(float(draws.mean()) - 0.5) < 0.02 and abs(float(draws.std()) - 0.3) < 0.03
    assert torch.equal(
        draws, sample_latents(GaussianEps(sched, mu=0.5, sigma=0.3), sched, (64, 2, 8, 8), seed=0)
    )
    # class-conditional: the label reaches the denoiser
    seen: list = []

    def cond(z, t, class_labels=None):
        seen.append(class_labels)
        return torch.zeros_like(z)

    sample_latents(cond, sched, (3, 2, 4, 4), class_label=2, steps=3)
    assert len(seen) == 3 and all(s.tolist() == [2, 2, 2] for s in seen)


def test_frozen_encoder_passes_gradients_to_the_input() -> None:
    """Explanations (SHAP, Grad-CAM) of a latent pipeline need d logit / d image through the frozen encoder."""
    enc = LatentEncoder(_ae())
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    enc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.autoencoder.parameters()), "the frozen weights get no gradient"


def test_null_class_dropout() -> None:
    enc = LatentEncoder(_ae())
    batch = {"image": torch.rand(64, 1, 16, 16), "label": torch.arange(64) % 3}
    torch.manual_seed(0)
    _, _, _, kw = LatentDiffusionPrepareBatch(enc, T, class_key="label", null_class=3, uncond_prob=0.5)(batch)
    dropped = kw["class_labels"] == 3
    assert 16 < int(dropped.sum()) < 48, "about half the labels become the null class"
    assert torch.equal(kw["class_labels"][~dropped], batch["label"][~dropped]), "the others are unchanged"
    _, _, _, kw = LatentDiffusionPrepareBatch(enc, T, class_key="label", null_class=3)(batch)
    assert torch.equal(kw["class_labels"], batch["label"]), "uncond_prob 0: no label is dropped"
    with pytest.raises(ValueError, match="null_class"):
        LatentDiffusionPrepareBatch(enc, T, class_key="label", uncond_prob=0.2)
    with pytest.raises(ValueError, match="uncond_prob"):
        LatentDiffusionPrepareBatch(enc, T, class_key="label", null_class=3, uncond_prob=1.0)


def test_corrupt_clean_passes_the_null_class_at_every_step() -> None:
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    seen: list = []

    def cond(z, t, class_labels=None):
        seen.append(class_labels)
        return torch.zeros_like(z)

    CorruptClean(cond, sched, t_star=100, steps=4, class_label=5)(torch.zeros(2, 2, 4, 4))
    assert len(seen) == 4 and all(s.tolist() == [5, 5] for s in seen)


def test_timestep_classifier_gives_the_fixed_timestep() -> None:
    seen: list = []

    def clf(z, t):
        seen.append(t)
        return z.flatten(1)[:, :2]

    out = TimestepClassifier(clf, timestep=7)(torch.rand(3, 2, 4, 4))
    assert out.shape == (3, 2) and seen[0].tolist() == [7, 7, 7] and seen[0].dtype == torch.long


def test_latent_scale_known_answer_and_file(tmp_path: Path) -> None:
    class Doubler(nn.Module):
        def encode(self, x):
            return 2 * x, torch.ones_like(x)

    x = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    loader = [{"image": x[i : i + 8]} for i in range(0, 40, 8)]
    expected = 1.0 / float((2 * x).double().std(unbiased=False))
    assert latent_scale(Doubler(), loader) == pytest.approx(expected, rel=1e-9)
    assert latent_scale(Doubler(), loader, max_batches=1) == pytest.approx(
        1.0 / float((2 * x[:8]).double().std(unbiased=False)), rel=1e-9
    )
    with pytest.raises(ValueError, match="no batches"):
        latent_scale(Doubler(), [])
    with pytest.raises(ValueError, match="collapsed"):
        latent_scale(Doubler(), [torch.ones(4, 1, 2, 2)])

    path = tmp_path / "scale.json"
    LatentScaleHandler(Doubler(), lambda: loader, path)(None)  # a loader factory is called when needed
    assert read_latent_scale(path) == pytest.approx(expected, rel=1e-9)
    assert json.loads(path.read_text())["latent_std"] == pytest.approx(1 / expected)
    with pytest.raises(InputDataError, match="train the autoencoder first"):
        read_latent_scale(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"scale": -1}')
    with pytest.raises(InputDataError, match="positive"):
        read_latent_scale(tmp_path / "bad.json")


def test_synthetic_latents_per_class_and_deterministic() -> None:
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")

    def cond(z, t, class_labels=None):  # the exact denoiser of N(class, 0.1²) data, per sample
        return _eps(sched, z, t, class_labels.float().view(-1, 1, 1, 1), 0.1)

    bank = SyntheticLatents(
        cond, sched, (2, 4, 4), num_classes=3, per_class=5, steps=20, seed=1, batch_size=2
    )
    assert len(bank) == 15 and bank.latents.shape == (15, 2, 4, 4)
    assert bank.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for k in range(3):
        assert abs(float(bank.latents[bank.labels == k].mean()) - k) < 0.1, "class k's latents sit at k"
    again = SyntheticLatents(
        cond, sched, (2, 4, 4), num_classes=3, per_class=5, steps=20, seed=1, batch_size=2
    )
    assert torch.equal(bank.latents, again.latents)
    z, y = bank.draw(7, torch.Generator().manual_seed(0))
    assert z.shape == (7, 2, 4, 4) and all(abs(float(z[i].mean()) - int(y[i])) < 0.2 for i in range(7))
    with pytest.raises(ValueError, match="per_class"):
        SyntheticLatents(cond, sched, (2, 4, 4), num_classes=3, per_class=0)


def _eps(
    sched: DDPMScheduler, z: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, sigma: float
) -> torch.Tensor:
    # exact eps of x0 ~ N(mu, sigma²): E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma² + 1 - a)
    a = sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(z)
    return (1 - a).sqrt() * (z - a.sqrt() * mu) / (a * sigma**2 + 1 - a)


def test_latent_classifier_prepare_batch() -> None:
    enc = LatentEncoder(_ae())
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    batch = {"image": torch.rand(4, 1, 16, 16), "label": torch.tensor([0, 1, 1, 0])}
    z, y = LatentClassifierPrepareBatch(enc)(batch)
    assert torch.allclose(z, enc(batch["image"])) and y.tolist() == [0, 1, 1, 0] and not z.requires_grad
    # corrupt-and-clean stage
    z2, _ = LatentClassifierPrepareBatch(enc, corrupt_clean=lambda v: v + 1)(batch)
    assert torch.allclose(z2, z + 1)
    # noise-aware training: random t below max_timestep, passed as a keyword
    zt, _, args, kw = LatentClassifierPrepareBatch(enc, scheduler=sched, max_timestep=50)(batch)
    assert args == () and kw["timesteps"].shape == (4,) and int(kw["timesteps"].max()) < 50
    assert not torch.allclose(zt, z)
    # fixed timestep: repeatable
    a = LatentClassifierPrepareBatch(enc, scheduler=sched, timestep=300, seed=2)(batch)
    b = LatentClassifierPrepareBatch(enc, scheduler=sched, timestep=300, seed=2)(batch)
    assert torch.equal(a[0], b[0]) and a[3]["timesteps"].tolist() == [300] * 4
    # t = 0: clean latents, the network is told t = 0
    c = LatentClassifierPrepareBatch(enc, scheduler=sched, timestep=0)(batch)
    assert torch.equal(c[0], z)

    class Bank:
        def draw(self, n):
            return torch.full((n, 2, 8, 8), 9.0), torch.full((n,), 2)

    zs, ys = LatentClassifierPrepareBatch(enc, synthetic=Bank(), synthetic_per_batch=3)(batch)
    assert zs.shape == (7, 2, 8, 8) and ys.tolist() == [0, 1, 1, 0, 2, 2, 2] and float(zs[4:].min()) == 9.0
    with pytest.raises(ValueError, match="not both"):
        LatentClassifierPrepareBatch(enc, scheduler=sched, max_timestep=5, timestep=1)
    with pytest.raises(ValueError, match="scheduler"):
        LatentClassifierPrepareBatch(enc, timestep=1)
    with pytest.raises(ValueError, match="SyntheticLatents"):
        LatentClassifierPrepareBatch(enc, synthetic_per_batch=2)
    with pytest.raises(KeyError, match="label"):
        LatentClassifierPrepareBatch(enc)({"image": batch["image"]})
