"""Latent pipelines: autoencoder loss, frozen encoder, latent-diffusion prepare-batch, corrupt-and-clean, the
pipeline module and class-conditional latent sampling. Known answers come from the exact noise predictor of
Gaussian data (tests/engines/_toy.GaussianEps)."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from engines.latent import (
    AutoencoderKLLoss,
    CorruptClean,
    LatentDiffusionPrepareBatch,
    LatentEncoder,
    LatentPipeline,
    sample_latents,
)
from tests.engines._toy import GaussianEps

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
