"""Study-level ViT, its MAE / diffusion-MAE decoders and the fine-tuning classifier (networks/study_vit.py)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import PatchEmbeddingBlock
from monai.networks.schedulers import DDPMScheduler

from networks.study_vit import (
    VIT_SIZES,
    DiffusionMAEDecoder,
    MAEDecoder,
    StudyClassifier,
    StudyMAE,
    StudyViTEncoder,
    pack_views,
    patchify,
    random_masking,
    size_preset,
    unpatchify,
)


def _encoder(bottleneck: bool = True, seed: int = 0) -> StudyViTEncoder:
    torch.manual_seed(seed)
    return StudyViTEncoder(
        img_size=32,
        patch_size=8,
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=2,
        bottleneck=bottleneck,
    ).eval()


def _batch_1_2_5(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(3, 5, 1, 32, 32, generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :1], mask[1, :2], mask[2, :5] = True, True, True
    return views, mask


@torch.no_grad()
def test_studies_of_1_2_5_views_are_independent() -> None:
    enc = _encoder()
    views, mask = _batch_1_2_5()
    ref = enc(views, mask)
    assert ref.shape == (3, 32)
    for study in range(3):
        changed = views.clone()
        changed[study] = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(10 + study))
        out = enc(changed, mask)
        for other in range(3):
            if other == study:
                assert (out[other] - ref[other]).abs().max() > 1e-3  # its own embedding moves
            else:
                torch.testing.assert_close(out[other], ref[other], rtol=0, atol=1e-6)
    # each study alone gives the embedding it has in the batch: nothing leaks between studies
    for study in range(3):
        n = int(mask[study].sum())
        alone = enc(views[study : study + 1, :n], None)
        torch.testing.assert_close(alone[0], ref[study], rtol=0, atol=1e-5)


@torch.no_grad()
def test_padded_views_are_never_read() -> None:
    enc = _encoder()
    views, mask = _batch_1_2_5()
    ref = enc(views, mask)
    junk = views.clone()
    junk[~mask] = 1e6
    torch.testing.assert_close(enc(junk, mask), ref)


@torch.no_grad()
def test_views_exchange_information_only_through_the_bottleneck_token() -> None:
    views, mask = _batch_1_2_5()
    changed = views.clone()
    changed[2, 4] = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(3))

    def tokens_of_view0_of_study2(enc: StudyViTEncoder, v: torch.Tensor) -> torch.Tensor:
        images, idx = pack_views(v, mask)
        tokens = enc.encode_packed(images, idx, 3)
        return tokens[3]  # packed order: study 0 (1 view), study 1 (2), then study 2's first view

    with_bottleneck = _encoder(bottleneck=True)
    a, b = (
        tokens_of_view0_of_study2(with_bottleneck, views),
        tokens_of_view0_of_study2(with_bottleneck, changed),
    )
    # view 0's own patch tokens change although only view 4 did: information went through the cls token
    assert (a[1:] - b[1:]).abs().max() > 1e-3
    assert (a[0] - b[0]).abs().max() > 1e-3
    # the same encoder without the bottleneck: view 0 is untouched, so patch tokens never attend across views
    without = _encoder(bottleneck=False)
    without.load_state_dict(with_bottleneck.state_dict())
    torch.testing.assert_close(
        tokens_of_view0_of_study2(without, views), tokens_of_view0_of_study2(without, changed)
    )
    # with the bottleneck every view of a study carries the same final cls token
    images, idx = pack_views(views, mask)
    cls = with_bottleneck.encode_packed(images, idx, 3)[:, 0]
    torch.testing.assert_close(cls[3:], cls[3:4].expand(5, -1))


def test_pack_views_errors() -> None:
    views, mask = _batch_1_2_5()
    mask[1] = False
    with pytest.raises(ValueError, match=r"batch positions \[1\] have no view"):
        pack_views(views, mask)
    with pytest.raises(ValueError, match=r"\(B, V, C, H, W\)"):
        pack_views(views[0], None)
    with pytest.raises(ValueError, match="view_mask must be"):
        pack_views(views, mask[:, :3])
    with pytest.raises(ValueError, match=r"views must be \(B, V, 1, 32, 32\)"):
        _encoder()(torch.zeros(1, 2, 1, 16, 16))


def test_patchify_matches_the_patch_embedding_order_and_round_trips() -> None:
    x = torch.randn(2, 1, 32, 32)
    p = patchify(x, 8)
    assert p.shape == (2, 16, 64)
    torch.testing.assert_close(unpatchify(p, 8, (4, 4), 1), x)
    # a single bright patch at grid (row 1, column 2) is token 1 * 4 + 2 in both orders
    img = torch.zeros(1, 1, 32, 32)
    img[..., 8:16, 16:24] = 1.0
    assert patchify(img, 8)[0].abs().sum(-1).nonzero().flatten().tolist() == [6]
    emb = PatchEmbeddingBlock(1, 32, 8, 16, 2, proj_type="conv", pos_embed_type="none", spatial_dims=2)
    with torch.no_grad():
        emb.patch_embeddings.bias.zero_()
        tokens = emb(img)
    assert tokens[0].abs().sum(-1).nonzero().flatten().tolist() == [6]


def test_random_masking_counts_and_seeding() -> None:
    ids, mask = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4, 4) and mask.shape == (4, 16)
    assert mask.sum(1).tolist() == [12] * 4
    assert not mask.gather(1, ids).any()  # kept patches are exactly the unmasked ones
    assert torch.equal(ids, ids.sort(1).values)
    ids2, _ = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, ids2)
    assert random_masking(1, 16, 0.99)[0].shape == (1, 1)  # at least one patch stays visible
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(1, 16, 1.0)


def _mae(scheme: str, **kw) -> StudyMAE:
    enc = _encoder()
    cls = MAEDecoder if scheme == "mae" else DiffusionMAEDecoder
    torch.manual_seed(1)
    return StudyMAE(enc, cls(16, 64, 32, 32, 64, 1, 2), scheme, **kw)


def test_training_output_shapes_and_loss_positions() -> None:
    views, mask = _batch_1_2_5()
    for scheme in ("mae", "diffusion"):
        out = _mae(scheme).train()(views, mask)
        assert out["pred"].shape == out["target"].shape == (8, 16, 64)
        assert out["mask"].sum(1).tolist() == [12] * 8
        assert out["study_index"].tolist() == [0, 1, 1, 2, 2, 2, 2, 2]
        # the target is the packed views' own pixels
        torch.testing.assert_close(out["target"], patchify(views[mask], 8))
    out = _mae("diffusion").train()(views, mask)
    assert out["timesteps"].shape == (8,) and int(out["timesteps"].max()) < 1000


def test_norm_pix_target_is_per_patch_standardised() -> None:
    views, mask = _batch_1_2_5()
    t = _mae("mae", norm_pix_loss=True).train()(views, mask)["target"]
    torch.testing.assert_close(t.mean(-1), torch.zeros(8, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(8, 16), atol=1e-3, rtol=0)


def test_scheme_and_schedule_errors() -> None:
    enc = _encoder()
    with pytest.raises(ValueError, match="scheme must be one of"):
        StudyMAE(enc, MAEDecoder(16, 64, 32), "vae")
    with pytest.raises(ValueError, match="needs a DiffusionMAEDecoder"):
        StudyMAE(enc, MAEDecoder(16, 64, 32), "diffusion")
    with pytest.raises(ValueError, match="norm_pix_loss applies to the 'mae' scheme only"):
        StudyMAE(enc, DiffusionMAEDecoder(16, 64, 32), "diffusion", norm_pix_loss=True)
    short = DDPMScheduler(num_train_timesteps=100, schedule="linear_beta", beta_start=1e-4, beta_end=0.01)
    with pytest.raises(ValueError, match="must end near pure noise"):
        StudyMAE(enc, DiffusionMAEDecoder(16, 64, 32), "diffusion", scheduler=short)
    # the default cosine schedule does end near pure noise
    assert (
        float(StudyMAE(enc, DiffusionMAEDecoder(16, 64, 32), "diffusion").scheduler.alphas_cumprod[-1]) < 1e-3
    )


@torch.no_grad()
def test_diffusion_decoder_uses_t() -> None:
    m = _mae("diffusion").eval()
    views, mask = _batch_1_2_5()
    images, idx = pack_views(views, mask)
    ids, _ = random_masking(8, 16, 0.75, generator=torch.Generator().manual_seed(0))
    tokens = m.encoder.encode_packed(images, idx, 3, ids)
    noisy = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1))
    a = m.decoder(tokens, ids, noisy, torch.full((8,), 10))
    b = m.decoder(tokens, ids, noisy, torch.full((8,), 900))
    assert (a - b).abs().mean() > 1e-3
    torch.testing.assert_close(m.decoder(tokens, ids, noisy, torch.full((8,), 10)), a)  # deterministic
    # and it reads the noisy masked patches (not only the visible context)
    c = m.decoder(tokens, ids, noisy + 1.0, torch.full((8,), 10))
    assert (a - c).abs().mean() > 1e-3


@torch.no_grad()
def test_reconstruction_pastes_the_visible_pixels_back() -> None:
    views, mask = _batch_1_2_5()
    for scheme in ("mae", "diffusion"):
        m = _mae(scheme).eval()
        r = m.reconstruct(views, mask, steps=3, generator=torch.Generator().manual_seed(0), return_chain=True)
        truth, vis = patchify(views[mask], 8), ~r["mask"]
        for key in ("recon", "first", "masked"):
            torch.testing.assert_close(patchify(r[key], 8)[vis], truth[vis])
        assert (patchify(r["masked"], 8)[r["mask"]] == 0).all()
        if scheme == "diffusion":
            assert len(r["chain"]) == 4  # the starting noise + one frame per step
            torch.testing.assert_close(r["chain"][-1], r["recon"])
    # the same generator seed draws the same masks for both schemes (the evaluation figures rely on it)
    a = _mae("mae").eval().reconstruct(views, mask, generator=torch.Generator().manual_seed(5))["mask"]
    b = (
        _mae("diffusion")
        .eval()
        .reconstruct(views, mask, steps=2, generator=torch.Generator().manual_seed(5))["mask"]
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        _mae("diffusion").eval().reconstruct(views, mask, steps=0)


class _GaussianPosteriorMean(torch.nn.Module):
    """An exact x0-predictor for data whose masked pixels are i.i.d. N(mu, sigma^2): E[x0 | x_t].

    For x_t = sqrt(a) x0 + sqrt(1 - a) eps, E[x0 | x_t] = mu + sqrt(a) sigma^2 / (a sigma^2 + 1 - a) (x_t - sqrt(a) mu),
    with a = alpha_bar_t. It ignores the context tokens (the masked pixels are independent of the visible ones).
    """

    def __init__(self, mu: float, sigma: float, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.var = mu, sigma**2
        self.register_buffer("abar", alphas_cumprod.double())
        self.calls: list[list[int]] = []

    def forward(self, tokens, ids_keep, noisy, timesteps):
        self.calls.append(timesteps.tolist())
        a = self.abar[timesteps.long()].reshape(-1, 1, 1)
        x = noisy.double()
        return (self.mu + a.sqrt() * self.var / (a * self.var + 1 - a) * (x - a.sqrt() * self.mu)).to(
            noisy.dtype
        )


def _exact_posterior_mae(mu: float, sigma: float) -> StudyMAE:
    torch.manual_seed(0)
    enc = StudyViTEncoder(img_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
    m = StudyMAE(enc, DiffusionMAEDecoder(16, 16, 32, 32, 64, 1, 2), "diffusion", mask_ratio=0.75).eval()
    m.decoder = _GaussianPosteriorMean(mu, sigma, m.scheduler.alphas_cumprod)
    return m


def _ddim_coefficients(
    abar: torch.Tensor, timesteps: list[int], mu: float, var: float
) -> list[tuple[float, float]]:
    """Scalar DDIM recursion for the exact Gaussian model, in float64: every iterate is alpha * mu + c * z, where z
    is the starting noise; returns (alpha, c) of each step's x0 estimate."""
    alpha, c, out = 0.0, 1.0, []
    for i, t in enumerate(timesteps):
        a = float(abar[t])
        k = a**0.5 * var / (a * var + 1 - a)
        x0 = (1 + k * (alpha - a**0.5), k * c)  # mu + k (x - sqrt(a) mu)
        out.append(x0)
        if i + 1 < len(timesteps):
            eps = ((alpha - a**0.5 * x0[0]) / (1 - a) ** 0.5, (c - a**0.5 * x0[1]) / (1 - a) ** 0.5)
            a_next = float(abar[timesteps[i + 1]])
            alpha = a_next**0.5 * x0[0] + (1 - a_next) ** 0.5 * eps[0]
            c = a_next**0.5 * x0[1] + (1 - a_next) ** 0.5 * eps[1]
    return out


@torch.no_grad()
def test_diffusion_reconstruction_walks_the_listed_timesteps_once_each() -> None:
    """The chain calls the decoder once per step, at round(linspace(T - 1, 0, steps)), for every view, and keeps
    steps + 1 frames (the starting noise, then one per step)."""
    views = torch.randn(3, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for steps in (1, 4, 10):
        m = _exact_posterior_mae(0.0, 1.0)
        r = m.reconstruct(views, steps=steps, generator=torch.Generator().manual_seed(1), return_chain=True)
        expected = torch.linspace(999, 0, steps).round().long().tolist()
        assert [c[0] for c in m.decoder.calls] == expected
        assert all(c == [c[0]] * 3 for c in m.decoder.calls)
        assert len(r["chain"]) == steps + 1
        torch.testing.assert_close(r["chain"][-1], r["recon"])
    assert expected[0] == 999 and expected[-1] == 0


@torch.no_grad()
def test_diffusion_reconstruction_with_an_exact_posterior_model_has_the_known_answer() -> None:
    """With an exact model of Gaussian masked pixels, every quantity of the reconstruction has a closed form.

    - The first step (from pure noise at t = T - 1, where alpha_bar ~ 2e-9) returns the posterior mean
      E[x0 | x_T], which is almost the constant mu: it carries no detail.
    - The DDIM chain is linear in the starting noise z: every estimate is alpha * mu + c * z with (alpha, c) from
      the scalar recursion, so the reconstruction equals it element by element.
    - Detail, what iterating buys (seed 003's claim): the spread of the final reconstruction around mu is c_final
      times that of z, against c_first for the first step, for the same z — a ratio with no sampling error, and
      c_final approaches sigma (a sample of the data) as the steps grow.
    - Squared error to the truth, which iterating does not buy: the posterior mean's error is the posterior
      variance (about sigma^2), a sample's is sigma^2 + c_final^2 (about 2 sigma^2). That is why no test may ask a
      model's iterative reconstruction to beat its first step in squared error.
    """
    mu, sigma = 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    views = mu + sigma * torch.randn(256, 1, 1, 16, 16, generator=g)
    m = _exact_posterior_mae(mu, sigma)
    abar = m.scheduler.alphas_cumprod.double()
    final_c = []
    for steps in (2, 10, 50):
        r = m.reconstruct(views, steps=steps, generator=torch.Generator().manual_seed(1), return_chain=True)
        masked = r["mask"]
        z = patchify(r["chain"][0], 4)[masked]  # the starting noise of the masked patches
        truth = patchify(views[:, 0], 4)[masked]
        first, recon = patchify(r["first"], 4)[masked], patchify(r["recon"], 4)[masked]
        coef = _ddim_coefficients(abar, torch.linspace(999, 0, steps).round().long().tolist(), mu, sigma**2)
        (a1, c1), (af, cf) = coef[0], coef[-1]
        torch.testing.assert_close(first, (a1 * mu + c1 * z).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recon, (af * mu + cf * z).float(), rtol=1e-4, atol=1e-5)
        assert abs(a1 - 1) < 1e-6 and c1 < 1e-4 * sigma  # the first step is the constant mu, up to 1e-4 sigma
        ratio = float((recon - af * mu).std() / (first - a1 * mu).std())
        assert ratio == pytest.approx(cf / c1, rel=1e-3)
        final_c.append(cf)
        # squared error: n = 256 views x 12 masked patches x 16 pixels = 49,152 values; the mean of n squared
        # Gaussians of variance v has standard deviation v * sqrt(2 / n) = 0.64 % of v, so 4 % is > 6 SD
        n = truth.numel()
        assert n == 256 * 12 * 16
        posterior_var = (
            sigma**2 * (1 - float(abar[999])) / (float(abar[999]) * sigma**2 + 1 - float(abar[999]))
        )
        assert float(((first - truth) ** 2).mean()) == pytest.approx(posterior_var, rel=0.04)
        assert float(((recon - truth) ** 2).mean()) == pytest.approx(sigma**2 + cf**2, rel=0.04)
    # more steps: the sample's spread approaches the data's (each discrete DDIM step of the exact Gaussian model
    # shrinks it by a factor that is at most 1 by Cauchy-Schwarz; the gap closes as 1 / steps: 3 % at 50 steps,
    # 0.2 % at every one of the 1000 steps, checked on the recursion the chain was just shown to follow)
    every_step = _ddim_coefficients(abar, list(range(999, -1, -1)), mu, sigma**2)[-1][1]
    assert final_c[0] < final_c[1] < final_c[2] < every_step <= sigma
    assert every_step == pytest.approx(sigma, rel=0.005)


def test_classifier_and_presets() -> None:
    enc = _encoder()
    clf = StudyClassifier(enc, num_labels=8).eval()
    views, mask = _batch_1_2_5()
    with torch.no_grad():
        logits = clf(views, mask)
        assert logits.shape == (3, 8)
        torch.testing.assert_close(logits, clf.head(enc(views, mask)))
    assert set(VIT_SIZES) == {"xs", "s", "b"}
    for name, p in VIT_SIZES.items():
        assert (
            p["hidden_size"] % p["num_heads"] == 0 and p["decoder_hidden_size"] % p["decoder_num_heads"] == 0
        ), name
    assert size_preset("xs", num_layers=2)["num_layers"] == 2
    with pytest.raises(ValueError, match="size must be one of"):
        size_preset("xl")
    with pytest.raises(ValueError, match="unknown size keys"):
        size_preset("xs", depth=3)


def test_every_trainable_parameter_gets_a_gradient() -> None:
    """DistributedDataParallel waits for a gradient of every trainable parameter: none may be left unused."""
    views, mask = _batch_1_2_5()
    for scheme in ("mae", "diffusion"):
        m = _mae(scheme).train()
        out = m(views, mask)
        ((out["pred"] - out["target"]) ** 2).mean().backward()
        unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == [], (scheme, unused)
    clf = StudyClassifier(_encoder().train(), 3)
    clf(views, mask).sum().backward()
    assert [n for n, p in clf.named_parameters() if p.requires_grad and p.grad is None] == []
