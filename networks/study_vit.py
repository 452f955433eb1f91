"""Study-level ViT (one bottleneck cls token shared by the views of a study), its MAE and diffusion-MAE
decoders, and the fine-tuning classifier of ``diffusion_mae``.

Why not MONAI's ``ViT`` / ``MaskedAutoEncoderViT`` as they are: both encode one image per sequence and
have no hook between transformer blocks, where the study bottleneck has to average the views' cls
tokens; ``MaskedAutoEncoderViT`` also masks with an unseeded ``torch.multinomial`` on the CPU and has no
timestep-conditioned decoder. The building blocks are MONAI's: ``PatchEmbeddingBlock`` (conv patch
projection + fixed sin-cos position embedding), ``TransformerBlock`` (attention through
``scaled_dot_product_attention``), ``build_sincos_position_embedding``, the diffusion UNet's
``get_timestep_embedding`` and the ``DDPMScheduler`` of ``monai.networks.schedulers``.

Views are *packed*: a batch ``(B, V, C, H, W)`` with a ``view_mask`` ``(B, V)`` becomes ``N`` real views
``(N, C, H, W)`` and a ``study_index`` ``(N,)``; padded views are never computed. Every view is its own
attention sequence (patch tokens never attend across views); after every block the cls tokens of a
study are replaced by their mean (the study-level bottleneck, Nagrani et al. 2021), so the only path
between the views of a study is that token and no study depends on another study's views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from monai.networks.schedulers import DDPMScheduler
from torch import nn

__all__ = [
    "VIT_SIZES",
    "DiffusionMAEDecoder",
    "MAEDecoder",
    "StudyClassifier",
    "StudyMAE",
    "StudyViTEncoder",
    "encoder_kwargs",
    "pack_views",
    "patchify",
    "random_masking",
    "size_preset",
    "study_mean",
    "unpatchify",
]

#: encoder / decoder sizes (seed 003's ``--encoder_size``): ``xs`` for the CPU demo and quick studies,
#: ``s`` (ViT-S/DeiT-S widths) and ``b`` (ViT-B with MAE-base's 8-block 512-wide decoder) for GPUs
VIT_SIZES: dict[str, dict[str, int]] = {
    "xs": {
        "hidden_size": 192,
        "mlp_dim": 768,
        "num_layers": 6,
        "num_heads": 3,
        "decoder_hidden_size": 128,
        "decoder_mlp_dim": 512,
        "decoder_num_layers": 2,
        "decoder_num_heads": 4,
    },
    "s": {
        "hidden_size": 384,
        "mlp_dim": 1536,
        "num_layers": 12,
        "num_heads": 6,
        "decoder_hidden_size": 256,
        "decoder_mlp_dim": 1024,
        "decoder_num_layers": 4,
        "decoder_num_heads": 8,
    },
    "b": {
        "hidden_size": 768,
        "mlp_dim": 3072,
        "num_layers": 12,
        "num_heads": 12,
        "decoder_hidden_size": 512,
        "decoder_mlp_dim": 2048,
        "decoder_num_layers": 8,
        "decoder_num_heads": 16,
    },
}

SCHEMES = ("mae", "diffusion")


def _block(
    hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0, qkv_bias: bool = True
) -> TransformerBlock:
    """A MONAI ``TransformerBlock`` (self-attention through ``scaled_dot_product_attention``).

    MONAI builds its ``norm_cross_attn`` LayerNorm even without cross-attention and never uses it; its
    parameters are frozen so that ``DistributedDataParallel`` does not wait for gradients that never come.
    """
    block = TransformerBlock(
        hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, use_flash_attention=True
    )
    block.norm_cross_attn.requires_grad_(False)
    return block


def pack_views(
    views: torch.Tensor, view_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real views of a padded batch of studies, and the study each one belongs to.

    Args:
        views: ``(B, V, C, H, W)``.
        view_mask: ``(B, V)`` booleans, True for a real view; None: every view is real.

    Returns:
        ``(packed, study_index)``: ``(N, C, H, W)`` in study order, and ``(N,)`` long indices into ``B``.

    Raises:
        ValueError: wrong dimensions, a mask of another shape, or a study without any view.
    """
    if views.ndim != 5:
        raise ValueError(f"views must be (B, V, C, H, W), got shape {tuple(views.shape)}.")
    b, v = views.shape[:2]
    if view_mask is None:
        view_mask = torch.ones(b, v, dtype=torch.bool, device=views.device)
    view_mask = view_mask.to(device=views.device, dtype=torch.bool)
    if tuple(view_mask.shape) != (b, v):
        raise ValueError(f"view_mask must be (B, V) = {(b, v)}, got {tuple(view_mask.shape)}.")
    empty = (~view_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"studies at batch positions {empty} have no view (all of view_mask is False).")
    study_index = view_mask.nonzero()[:, 0]
    return views[view_mask], study_index


def study_mean(x: torch.Tensor, study_index: torch.Tensor, num_studies: int) -> torch.Tensor:
    """Mean of the rows of ``x`` per study (``index_add`` rather than a loop: one kernel for the batch).

    Args:
        x: ``(N, D)`` one row per view.
        study_index: ``(N,)`` study of each row, in ``[0, num_studies)``.
        num_studies: ``B``.

    Returns:
        ``(B, D)``.
    """
    sums = torch.zeros(num_studies, x.shape[-1], dtype=x.dtype, device=x.device).index_add(0, study_index, x)
    counts = torch.bincount(study_index, minlength=num_studies).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, H, W)`` → ``(N, L, p·p·C)`` in the row-major patch order of ``PatchEmbeddingBlock``."""
    return rearrange(images, "n c (h p1) (w p2) -> n (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, L, p·p·C)`` → ``(N, C, H, W)``."""
    return rearrange(
        patches,
        "n (h w) (p1 p2 c) -> n c (h p1) (w p2)",
        h=grid[0],
        w=grid[1],
        p1=patch_size,
        p2=patch_size,
        c=channels,
    )


def random_masking(
    n: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-view random masking (argsort of uniform noise, as in He et al.'s reference code).

    Args:
        n: number of views.
        num_patches: patches per view ``L``.
        mask_ratio: fraction masked, in ``[0, 1)``; at least one patch stays visible.
        device: where the indices live.
        generator: a seeded generator (on ``device``) for reproducible masks; None: the global RNG.

    Returns:
        ``(ids_keep, mask)``: ``(N, K)`` sorted indices of the visible patches and ``(N, L)`` booleans,
        True where masked.

    Raises:
        ValueError: a ratio outside ``[0, 1)``.
    """
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    keep = max(1, round(num_patches * (1.0 - float(mask_ratio))))
    noise = torch.rand(n, num_patches, generator=generator, device=device)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(n, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


class StudyViTEncoder(nn.Module):
    """ViT encoder of a study of 1..V views with a study-level bottleneck cls token.

    Args:
        in_channels: image channels.
        img_size: square view side (views are resized to it by the loading transforms).
        patch_size: square patch side; divides ``img_size``.
        hidden_size: token width.
        mlp_dim: transformer MLP width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        dropout_rate: dropout in the blocks.
        qkv_bias: bias of the attention projections.
        bottleneck: average the cls tokens of a study after every block (the method); False gives
            independent views whose cls tokens are averaged only at the end (an ablation).

    Raises:
        ValueError: ``img_size`` not divisible by ``patch_size`` or ``hidden_size`` by ``num_heads``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: int = 64,
        patch_size: int = 8,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_layers: int = 6,
        num_heads: int = 3,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        bottleneck: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}.")
        self.in_channels = int(in_channels)
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.hidden_size = int(hidden_size)
        self.bottleneck = bool(bottleneck)
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="sincos",
            dropout_rate=dropout_rate,
            spatial_dims=2,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(
            _block(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def _check(self, views: torch.Tensor) -> None:
        if views.ndim != 5 or tuple(views.shape[2:]) != (self.in_channels, self.img_size, self.img_size):
            raise ValueError(
                f"views must be (B, V, {self.in_channels}, {self.img_size}, {self.img_size}), "
                f"got {tuple(views.shape)}."
            )

    def encode_packed(
        self,
        images: torch.Tensor,
        study_index: torch.Tensor,
        num_studies: int,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens of packed views.

        Args:
            images: ``(N, C, H, W)`` real views.
            study_index: ``(N,)`` study of each view.
            num_studies: ``B``.
            ids_keep: ``(N, K)`` visible patches (MAE masking); None: all patches.

        Returns:
            ``(N, 1 + K, D)`` normalised tokens; token 0 is the study's bottleneck cls token (identical
            for the views of a study when ``bottleneck``).
        """
        tokens = self.patch_embedding(images)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        h = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            h = block(h)
            if self.bottleneck:
                cls = study_mean(h[:, 0], study_index, num_studies)[study_index]
                h = torch.cat([cls[:, None], h[:, 1:]], dim=1)
        return self.norm(h)

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Study embeddings: the final bottleneck token (the mean of the views' cls tokens without it).

        Args:
            views: ``(B, V, C, H, W)``, padded views anywhere ``view_mask`` is False.
            view_mask: ``(B, V)``; None: all views real.

        Returns:
            ``(B, hidden_size)``.
        """
        self._check(views)
        images, study_index = pack_views(views, view_mask)
        tokens = self.encode_packed(images, study_index, views.shape[0])
        return study_mean(tokens[:, 0], study_index, views.shape[0])


class MAEDecoder(nn.Module):
    """MAE decoder (He et al. 2021): encoder tokens + learned mask tokens at the masked positions, fixed
    sin-cos positions, a few transformer blocks, a linear map to the pixels of every patch.

    Args:
        num_patches: ``L``; must be a square number (square views).
        patch_dim: pixels per patch ``p·p·C``.
        encoder_hidden_size: encoder token width.
        hidden_size: decoder width.
        mlp_dim: decoder MLP width.
        num_layers: decoder blocks.
        num_heads: decoder heads.
    """

    def __init__(
        self,
        num_patches: int,
        patch_dim: int,
        encoder_hidden_size: int,
        hidden_size: int = 128,
        mlp_dim: int = 512,
        num_layers: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"num_patches must be a square number, got {num_patches}.")
        self.num_patches = num_patches
        self.hidden_size = hidden_size
        self.embed = nn.Linear(encoder_hidden_size, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pos_embedding = build_sincos_position_embedding([side, side], hidden_size, spatial_dims=2)
        self.blocks = nn.ModuleList(_block(hidden_size, mlp_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.pred = nn.Linear(hidden_size, patch_dim)

    def _place(self, tokens: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Encoder patch tokens scattered into ``fill`` (N, L, d) at their positions, plus positions."""
        x = self.embed(tokens)
        full = fill.scatter(1, ids_keep[..., None].expand(-1, -1, self.hidden_size), x[:, 1:])
        return x[:, :1], full + self.pos_embedding.to(full.dtype)

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return self.pred(self.norm(h))[:, 1:]

    def forward(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch.

        Args:
            tokens: ``(N, 1 + K, D)`` encoder output (cls first).
            ids_keep: ``(N, K)`` positions of the visible patches.

        Returns:
            ``(N, L, patch_dim)``.
        """
        fill = self.mask_token.to(tokens.dtype).expand(tokens.shape[0], self.num_patches, -1)
        cls, full = self._place(tokens, ids_keep, fill)
        return self._decode(torch.cat([cls, full], dim=1))


class DiffusionMAEDecoder(MAEDecoder):
    """Diffusion-MAE decoder (Wei et al. 2023, DiffMAE): the masked patches enter as *noisy pixels* x_t
    (linearly embedded), the visible positions carry the encoder's features, every token gets the
    embedding of the timestep t, and the output is the prediction of the clean pixels x0 of every patch.

    Args: as :class:`MAEDecoder`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.mask_token  # masked positions hold the embedded noisy patches instead
        d = self.hidden_size
        self.noisy_embed = nn.Linear(self.pred.out_features, d)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        ids_keep: torch.Tensor,
        noisy_patches: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Predicted clean pixels of every patch.

        Args:
            tokens: ``(N, 1 + K, D)`` encoder output.
            ids_keep: ``(N, K)`` visible positions.
            noisy_patches: ``(N, L, patch_dim)``; only the masked positions are read.
            timesteps: ``(N,)`` or a scalar: the diffusion step of each view's masked patches.

        Returns:
            ``(N, L, patch_dim)`` predicted x0.
        """
        n = tokens.shape[0]
        timesteps = torch.as_tensor(timesteps, device=tokens.device).reshape(-1).expand(n)
        cls, full = self._place(tokens, ids_keep, self.noisy_embed(noisy_patches.to(tokens.dtype)))
        temb = self.time_embed(get_timestep_embedding(timesteps, self.hidden_size).to(tokens.dtype))
        h = torch.cat([cls, full], dim=1) + temb[:, None]
        return self._decode(h)


class StudyMAE(nn.Module):
    """Masked image modelling of studies: the :class:`StudyViTEncoder` plus a decoder of ``scheme``.

    ``forward`` (training) masks ``mask_ratio`` of every view's patches at random and returns the
    prediction, the target and the mask, so the loss (:func:`engines.study.MaskedPatchLoss`) is over
    masked patches only:

    - ``mae``: the decoder predicts the pixels of the masked patches from mask tokens; with
      ``norm_pix_loss`` the target is each patch normalised by its own mean and variance (MAE's option);
    - ``diffusion``: the masked patches x0 are noised to x_t at a step t drawn uniformly per view from
      ``scheduler`` (which must end near pure noise), the decoder, told t, predicts x0.

    ``reconstruct`` (inference) pastes the visible pixels back around the prediction; for ``diffusion``
    it starts the masked patches from pure noise and runs ``steps`` DDIM steps (predict x0, re-noise to
    the next step, repeat), returning the first step's x0 estimate and the chain as well.

    Args:
        encoder: the study encoder.
        decoder: an :class:`MAEDecoder` (``mae``) or :class:`DiffusionMAEDecoder` (``diffusion``).
        scheme: ``mae`` or ``diffusion``.
        mask_ratio: fraction of each view's patches masked in training.
        norm_pix_loss: per-patch normalised targets (``mae`` only).
        scheduler: the training noise schedule (``diffusion``); default: MONAI ``DDPMScheduler`` with
            1000 cosine steps (ᾱ at the last step ≈ 2e-9).

    Raises:
        ValueError: an unknown scheme, a decoder of the other scheme, ``norm_pix_loss`` with ``diffusion``
            (the noised pixels would then not be an image), a schedule whose last ᾱ exceeds 0.01.
    """

    def __init__(
        self,
        encoder: StudyViTEncoder,
        decoder: MAEDecoder,
        scheme: str = "mae",
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        scheduler: DDPMScheduler | None = None,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}.")
        if (scheme == "diffusion") != isinstance(decoder, DiffusionMAEDecoder):
            raise ValueError(
                f"scheme {scheme!r} needs a {'Diffusion' if scheme == 'diffusion' else ''}MAEDecoder."
            )
        if scheme == "diffusion" and norm_pix_loss:
            raise ValueError("norm_pix_loss applies to the 'mae' scheme only.")
        random_masking(1, 4, mask_ratio)  # validates the ratio now rather than at the first batch
        self.encoder = encoder
        self.decoder = decoder
        self.scheme = scheme
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        if scheme == "diffusion":
            scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
            last = float(scheduler.alphas_cumprod[-1])
            if last > 0.01:
                raise ValueError(
                    f"the diffusion schedule must end near pure noise (last alpha_cumprod <= 0.01), got {last:.3g}."
                )
        self.scheduler = scheduler

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` → ``(N, L, p·p·C)``."""
        return patchify(images, self.patch_size)

    def images(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, L, p·p·C)`` → ``(N, C, H, W)``."""
        return unpatchify(patches, self.patch_size, self.encoder.grid, self.encoder.in_channels)

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training step's prediction (random masks, and random timesteps for ``diffusion``).

        Args:
            views: ``(B, V, C, H, W)``.
            view_mask: ``(B, V)``; None: all views real.

        Returns:
            ``{"pred", "target"}`` ``(N, L, p·p·C)``, ``"mask"`` ``(N, L)`` (True = masked, the loss
            positions), ``"study_index"`` ``(N,)`` and, for ``diffusion``, ``"timesteps"`` ``(N,)``.
        """
        self.encoder._check(views)
        images, study_index = pack_views(views, view_mask)
        n = images.shape[0]
        ids_keep, mask = random_masking(n, self.encoder.num_patches, self.mask_ratio, device=images.device)
        tokens = self.encoder.encode_packed(images, study_index, views.shape[0], ids_keep)
        target = self.patches(images)
        out: dict[str, torch.Tensor] = {"mask": mask, "study_index": study_index}
        if self.scheme == "mae":
            if self.norm_pix_loss:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1e-6).sqrt()
            out["pred"] = self.decoder(tokens, ids_keep)
        else:
            assert self.scheduler is not None
            t = torch.randint(0, self.scheduler.num_train_timesteps, (n,), device=images.device)
            noisy = self.scheduler.add_noise(target, torch.randn_like(target), t)
            out["pred"] = self.decoder(tokens, ids_keep, noisy, t)
            out["timesteps"] = t
        out["target"] = target
        return out

    @torch.no_grad()
    def reconstruct(
        self,
        views: torch.Tensor,
        view_mask: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        steps: int = 10,
        generator: torch.Generator | None = None,
        ids_keep: torch.Tensor | None = None,
        return_chain: bool = False,
    ) -> dict[str, Any]:
        """Reconstruct masked views (no gradients; call ``eval()`` first).

        Args:
            views: ``(B, V, C, H, W)``.
            view_mask: ``(B, V)``.
            mask_ratio: default: the training ratio.
            steps: DDIM steps of the ``diffusion`` reconstruction (ignored for ``mae``).
            generator: seeds the masks and the starting noise (on the views' device).
            ids_keep: ``(N, K)`` visible patches to use instead of random ones.
            return_chain: also return the image after every step (``diffusion``).

        Returns:
            ``"masked"`` (masked input, masked patches at 0), ``"recon"`` (visible pixels pasted back
            around the prediction) and ``"first"`` (the first step's estimate, pasted likewise; equal to
            ``recon`` for ``mae``), all ``(N, C, H, W)``; ``"mask"`` ``(N, L)``; ``"study_index"`` ``(N,)``;
            ``"chain"``: a list of ``(N, C, H, W)`` (x_t of the masked patches at each step, then the
            final x0) when ``return_chain``.

        Raises:
            ValueError: ``steps < 1``.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        self.encoder._check(views)
        images, study_index = pack_views(views, view_mask)
        n, num_patches = images.shape[0], self.encoder.num_patches
        if ids_keep is None:
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            ids_keep, mask = random_masking(n, num_patches, ratio, device=images.device, generator=generator)
        else:
            mask = torch.ones(n, num_patches, dtype=torch.bool, device=images.device).scatter(
                1, ids_keep, False
            )
        tokens = self.encoder.encode_packed(images, study_index, views.shape[0], ids_keep)
        truth = self.patches(images)
        m = mask[..., None]

        def paste(pred: torch.Tensor) -> torch.Tensor:
            return self.images(torch.where(m, pred, truth))

        out: dict[str, Any] = {
            "masked": paste(torch.zeros_like(truth)),
            "mask": mask,
            "study_index": study_index,
        }
        if self.scheme == "mae":
            pred = self.decoder(tokens, ids_keep)
            if self.norm_pix_loss:
                # the prediction is per-patch normalised: show it with the visible patches' mean and scale
                # (the masked patches' own statistics are unknown at inference)
                vis = truth[~mask].reshape(-1, truth.shape[-1])
                pred = pred * vis.std() + vis.mean()
            out["recon"] = out["first"] = paste(pred)
            return out
        assert self.scheduler is not None
        # DDIM (eta = 0) with an x0-predicting decoder, written out rather than MONAI's DDIMScheduler.step:
        # that step re-noises to t - T // steps while its set_timesteps lists round(linspace(T - 1, 0, steps)),
        # so the sample it returns is not at the next listed step; here x is re-noised exactly to the next one
        abar = self.scheduler.alphas_cumprod.to(device=truth.device, dtype=truth.dtype)
        timesteps = torch.linspace(self.scheduler.num_train_timesteps - 1, 0, steps).round().long().tolist()
        x = torch.randn(truth.shape, generator=generator, device=truth.device, dtype=truth.dtype)
        chain = [paste(x)] if return_chain else []
        for i, t in enumerate(timesteps):
            x0 = self.decoder(tokens, ids_keep, x, torch.full((n,), t, device=truth.device))
            if i == 0:
                out["first"] = paste(x0)
            if i + 1 < len(timesteps):
                eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
                t_next = timesteps[i + 1]
                x = abar[t_next].sqrt() * x0 + (1 - abar[t_next]).sqrt() * eps
            if return_chain:
                chain.append(paste(x if i + 1 < len(timesteps) else x0))
        out["recon"] = paste(x0)
        if return_chain:
            out["chain"] = chain
        return out


class StudyClassifier(nn.Module):
    """Fine-tuning model: the study encoder and a linear head on the study embedding (multi-label logits).

    Args:
        encoder: a (pretrained) :class:`StudyViTEncoder`.
        num_labels: findings.
        dropout: dropout before the head.
    """

    def __init__(self, encoder: StudyViTEncoder, num_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, num_labels)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # small head init, as MAE's fine-tuning recipe
        nn.init.zeros_(self.head.bias)

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, num_labels)`` logits."""
        return self.head(self.dropout(self.encoder(views, view_mask)))


def size_preset(size: str, **overrides: Any) -> dict[str, int]:
    """Encoder/decoder widths of a size preset, with overrides.

    Args:
        size: ``xs``, ``s`` or ``b``.
        overrides: keys of :data:`VIT_SIZES` entries to replace.

    Returns:
        A new dict.

    Raises:
        ValueError: an unknown size or override key.
    """
    if size not in VIT_SIZES:
        raise ValueError(f"size must be one of {sorted(VIT_SIZES)}, got {size!r}.")
    unknown = set(overrides) - set(VIT_SIZES[size])
    if unknown:
        raise ValueError(f"unknown size keys {sorted(unknown)}; expected {sorted(VIT_SIZES[size])}.")
    return {**VIT_SIZES[size], **overrides}


def encoder_kwargs(preset: Mapping[str, int]) -> dict[str, int]:
    """The :class:`StudyViTEncoder` arguments of a preset."""
    return {k: int(preset[k]) for k in ("hidden_size", "mlp_dim", "num_layers", "num_heads")}
