"""Latent pipelines of the robust classifier (seed 000): autoencoder latents, a latent DDPM that corrupts a latent
to a level t* and cleans it back, classifiers on latents, and class-conditional latent sampling for augmentation.

* :class:`AutoencoderKLLoss` trains MONAI's ``AutoencoderKL`` in a stock ``SupervisedTrainer`` (its forward returns
  ``(reconstruction, z_mu, z_sigma)``; MONAI has no loss that takes that tuple).
* :class:`LatentEncoder` turns images into latents (posterior mean, scaled) with a frozen autoencoder.
* :class:`LatentDiffusionPrepareBatch` trains a denoiser on latents with a stock ``SupervisedTrainer`` and
  ``DiffusionInferer``: MONAI's ``LatentDiffusionInferer`` needs the autoencoder as a call argument (a trainer passes
  one network) and ``DiffusionPrepareBatch`` draws noise shaped like the *images*, not the latents.
* :class:`CorruptClean` noises a latent to ``t_star`` (seeded, so evaluation is deterministic) and denoises it back
  with ``k`` deterministic DDIM steps: small off-manifold perturbations of the latent (the effect of image noise and
  artefacts) are pulled back to what the denoiser learnt.
* :class:`LatentPipeline` chains encoder → optional corrupt-and-clean → head: the hybrid model of seed 000 and the
  plain "head on latents" models are the same class with or without the middle stage.
* :func:`sample_latents` draws class-conditional latents with DDIM for diffusion augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.networks.schedulers import Scheduler
from torch import nn

from engines.diffusion import _check_epsilon, _plain, batch_class_labels, ddim_step, ddim_timesteps

__all__ = [
    "AutoencoderKLLoss",
    "CorruptClean",
    "LatentDiffusionPrepareBatch",
    "LatentEncoder",
    "LatentPipeline",
    "sample_latents",
]


class AutoencoderKLLoss(nn.Module):
    """L1 reconstruction + ``kl_weight`` x KL(q(z|x) || N(0, I)) for ``AutoencoderKL``'s ``(recon, z_mu, z_sigma)``.

    Args:
        kl_weight: weight of the KL term (small: the latent should stay informative, e.g. 1e-6 as in MONAI's
            latent-diffusion tutorials).

    Raises:
        ValueError: for a negative weight.
    """

    def __init__(self, kl_weight: float = 1e-6) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = float(kl_weight)

    def forward(self, pred: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: ``(reconstruction, z_mu, z_sigma)`` from ``AutoencoderKL.forward``.
            target: the input images.

        Returns:
            The scalar loss.
        """
        recon, mu, sigma = pred
        rec = torch.nn.functional.l1_loss(recon.float(), _plain(target).float())
        # KL of a diagonal Gaussian to N(0, I), summed over latent elements, averaged over the batch
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
        return rec + self.kl_weight * kl.flatten(1).sum(1).mean()


class LatentEncoder(nn.Module):
    """Images → latents with a (frozen) MONAI ``AutoencoderKL``: the posterior mean times ``scale``.

    The mean, not a sample, so the same image always gives the same latent (evaluation, cached datasets).

    Args:
        autoencoder: a trained ``AutoencoderKL`` (anything with ``encode(x) -> (z_mu, z_sigma)``).
        scale: factor applied to the latents (latent-diffusion practice: about ``1 / std`` of the training
            latents, so the denoiser sees unit-variance data).
        freeze: turn off the autoencoder's gradients and keep it in eval mode.
    """

    def __init__(self, autoencoder: nn.Module, scale: float = 1.0, freeze: bool = True) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.scale = float(scale)
        self.freeze = freeze
        if freeze:
            self.autoencoder.requires_grad_(False)

    def train(self, mode: bool = True) -> LatentEncoder:
        """Set the training mode; a frozen autoencoder stays in eval mode (its norms and dropout unchanged).

        Args:
            mode: training mode for this module.

        Returns:
            This module.
        """
        super().train(mode)
        if self.freeze:
            self.autoencoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode.

        Args:
            x: images ``(B, C, H, W)``.

        Returns:
            Latents ``(B, latent_channels, h, w)``.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            mu, _ = self.autoencoder.encode(_plain(x))
        return mu * self.scale


class LatentDiffusionPrepareBatch(PrepareBatch):
    """``prepare_batch`` that trains a noise predictor on latents in a stock ``SupervisedTrainer``.

    Images are encoded (no gradient) by ``encoder``; noise and timesteps are drawn for the latents; the result is
    ``(latents, noise, (), {"noise", "timesteps"[, "class_labels"]})`` for ``DiffusionInferer`` (or
    :class:`engines.diffusion.ClassConditionalDiffusionInferer` with ``class_key``).

    Args:
        encoder: images → latents (e.g. :class:`LatentEncoder`).
        num_train_timesteps: ``T``.
        image_key: batch key of the images.
        class_key: optional key of a class index per sample (class-conditional denoiser).
    """

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        num_train_timesteps: int,
        image_key: str = "image",
        class_key: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.num_train_timesteps = int(num_train_timesteps)
        self.image_key, self.class_key = image_key, class_key

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        """Encode the batch and draw the diffusion training targets.

        Args:
            batchdata: a collated batch.
            device: target device.
            non_blocking: passed to ``Tensor.to``.
            kwargs: further ``Tensor.to`` arguments.

        Returns:
            ``(latents, noise, (), infer_kwargs)``.

        Raises:
            KeyError: naming ``class_key`` when it is set and missing.
        """
        images, _ = default_prepare_batch(
            {"image": batchdata[self.image_key]}, device, non_blocking, **kwargs
        )
        with torch.no_grad():
            latents = self.encoder(images)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        infer_kwargs: dict[str, torch.Tensor] = {"noise": noise, "timesteps": timesteps}
        if self.class_key is not None:
            infer_kwargs["class_labels"] = batch_class_labels(batchdata, self.class_key, latents.device)
        return latents, noise, (), infer_kwargs


def _ddim_chain(
    scheduler: Scheduler,
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t_index: int,
    steps: int,
    class_labels: torch.Tensor | None,
    clip_range: tuple[float, float] | None,
) -> torch.Tensor:
    taus = ddim_timesteps(t_index, steps)
    for i, t in enumerate(taus):
        prev = taus[i + 1] if i + 1 < len(taus) else -1
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = denoiser(x, ts) if class_labels is None else denoiser(x, ts, class_labels=class_labels)
        x, _ = ddim_step(scheduler, eps, t, prev, x, clip_range)
    return x


class CorruptClean(nn.Module):
    """Noise a latent to ``t_star`` diffusion steps and denoise it back with ``steps`` DDIM steps.

    Args:
        denoiser: the latent noise predictor ``(z_t, t) -> eps``.
        scheduler: its training scheduler (epsilon prediction).
        t_star: number of forward diffusion steps (``1 <= t_star <= T``); 0 makes the module the identity.
        steps: DDIM steps of the clean-up (capped at ``t_star``).
        seed: seed of the corruption noise (a fresh generator per call: the same latent always gets the same
            noise, so evaluations are deterministic); ``None`` uses the global RNG.
        clip_range: clamp of the x0 estimates (``None``: latents are unbounded).

    Raises:
        ValueError: for ``t_star`` outside ``[0, T]``, ``steps < 1`` or a non-epsilon scheduler.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: Scheduler,
        t_star: int = 100,
        steps: int = 10,
        seed: int | None = 0,
        clip_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        _check_epsilon(scheduler)
        num_t = int(scheduler.num_train_timesteps)
        if not 0 <= int(t_star) <= num_t:
            raise ValueError(f"t_star must be in [0, {num_t}], got {t_star}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.denoiser, self.scheduler = denoiser, scheduler
        self.t_star, self.steps, self.seed, self.clip_range = int(t_star), int(steps), seed, clip_range

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Corrupt and clean.

        Args:
            z: latents ``(B, C, h, w)``.

        Returns:
            The cleaned latents, same shape.
        """
        if self.t_star == 0:
            return z
        gen = None if self.seed is None else torch.Generator(device=z.device).manual_seed(self.seed)
        noise = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
        t_index = self.t_star - 1
        ts = torch.full((z.shape[0],), t_index, device=z.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(z, noise, ts)
        return _ddim_chain(self.scheduler, self.denoiser, noisy, t_index, self.steps, None, self.clip_range)


class LatentPipeline(nn.Module):
    """encoder → (corrupt-and-clean) → head, as one classifier ``images -> logits``.

    Args:
        encoder: images → latents.
        head: latents → logits (an MLP head, a ResNet head, a noise-aware classifier wrapped to take ``t = 0``).
        corrupt_clean: optional :class:`CorruptClean` between them (the hybrid pipeline of seed 000).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, corrupt_clean: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.head, self.corrupt_clean = encoder, head, corrupt_clean

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """The latents the head sees (after corrupt-and-clean when present).

        Args:
            x: images.

        Returns:
            Latents.
        """
        z = self.encoder(x)
        return self.corrupt_clean(z) if self.corrupt_clean is not None else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify images.

        Args:
            x: images ``(B, C, H, W)``.

        Returns:
            Logits ``(B, K)``.
        """
        return self.head(self.latents(x))


@torch.no_grad()
def sample_latents(
    denoiser: Callable[..., torch.Tensor],
    scheduler: Scheduler,
    shape: Sequence[int],
    class_label: int | None = None,
    steps: int = 50,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw latents from pure noise with deterministic DDIM (class-conditional when ``class_label`` is given).

    Args:
        denoiser: the latent noise predictor (class-conditional: accepts ``class_labels``).
        scheduler: its training scheduler.
        shape: ``(N, C, h, w)`` of the latents to draw.
        class_label: the class to condition on, or ``None`` (unconditional).
        steps: DDIM steps from ``T - 1`` to the clean latent.
        seed: seed of the starting noise.
        device: where to sample.

    Returns:
        Latents of ``shape``.
    """
    _check_epsilon(scheduler)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, device=device)
    labels = None if class_label is None else torch.full((x.shape[0],), int(class_label), device=device)
    return _ddim_chain(scheduler, denoiser, x, int(scheduler.num_train_timesteps) - 1, steps, labels, None)
