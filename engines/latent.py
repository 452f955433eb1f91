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

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.networks.schedulers import Scheduler
from torch import nn

from data_prep.atomic import atomic_write_text
from engines.diffusion import _check_epsilon, _plain, batch_class_labels, ddim_step, ddim_timesteps
from transforms.errors import InputDataError

if TYPE_CHECKING:
    from ignite.engine import Engine

logger = logging.getLogger(__name__)

__all__ = [
    "AutoencoderKLLoss",
    "CorruptClean",
    "LatentClassifierPrepareBatch",
    "LatentDiffusionPrepareBatch",
    "LatentEncoder",
    "LatentPipeline",
    "LatentScaleHandler",
    "SyntheticLatents",
    "TimestepClassifier",
    "latent_scale",
    "read_latent_scale",
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
        # a frozen encoder has requires_grad off on its weights, but gradients still flow to the input:
        # SHAP and Grad-CAM of a latent pipeline need d(logit)/d(image) through the encoder
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
        null_class: with ``class_key``: the index of the "no class" embedding (classifier-free diffusion
            training, Ho & Salimans 2022). Each label is replaced by it with probability ``uncond_prob``, so one
            denoiser both samples a chosen class (augmentation) and denoises without a class (corrupt-and-clean
            of an unlabelled image).
        uncond_prob: probability of the null class per sample (needs ``null_class``).

    Raises:
        ValueError: ``uncond_prob`` outside ``[0, 1)``, or a positive ``uncond_prob`` without ``null_class``
            or ``class_key``.
    """

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        num_train_timesteps: int,
        image_key: str = "image",
        class_key: str | None = None,
        null_class: int | None = None,
        uncond_prob: float = 0.0,
    ) -> None:
        if not 0.0 <= uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1), got {uncond_prob}")
        if uncond_prob > 0 and (null_class is None or class_key is None):
            raise ValueError(
                "uncond_prob > 0 needs class_key and null_class (the index of the 'no class' embedding)"
            )
        self.encoder = encoder
        self.num_train_timesteps = int(num_train_timesteps)
        self.image_key, self.class_key = image_key, class_key
        self.null_class, self.uncond_prob = null_class, float(uncond_prob)

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
            labels = batch_class_labels(batchdata, self.class_key, latents.device)
            if self.uncond_prob > 0:
                drop = torch.rand(labels.shape, device=labels.device) < self.uncond_prob
                labels = torch.where(drop, torch.full_like(labels, int(self.null_class)), labels)
            infer_kwargs["class_labels"] = labels
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
        class_label: class index passed to a class-conditional denoiser at every step, e.g. its null class
            (see :class:`LatentDiffusionPrepareBatch`); ``None`` for an unconditional denoiser.

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
        class_label: int | None = None,
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
        self.class_label = None if class_label is None else int(class_label)

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
        labels = None if self.class_label is None else torch.full_like(ts, self.class_label)
        return _ddim_chain(self.scheduler, self.denoiser, noisy, t_index, self.steps, labels, self.clip_range)


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


# ----------------------------------------------------------------------------------------------
# latent scale: one number shared by the latent DDPM, the heads and the evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def latent_scale(
    autoencoder: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str = "cpu",
    image_key: str = "image",
    max_batches: int | None = 50,
) -> float:
    """``1 / std`` of the posterior means of ``autoencoder`` over ``loader`` (latent-diffusion practice).

    The latent DDPM's schedule assumes unit-variance data; an autoencoder's latents have whatever scale its
    training gave them. Rombach et al. (2022) rescale by one scalar computed on training latents.

    Args:
        autoencoder: anything with ``encode(x) -> (z_mu, z_sigma)``.
        loader: batches (dicts with ``image_key``, or image tensors).
        device: where to encode.
        image_key: key of the images in dict batches.
        max_batches: use at most this many batches (``None``: all).

    Returns:
        The scale factor.

    Raises:
        ValueError: an empty loader or constant latents (std 0: a collapsed autoencoder).
    """
    was_training = autoencoder.training
    autoencoder.eval()
    total, total_sq, count = 0.0, 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[image_key] if isinstance(batch, Mapping) else batch
            mu, _ = autoencoder.encode(_plain(torch.as_tensor(x)).to(device).float())
            mu = mu.double()
            total += float(mu.sum())
            total_sq += float((mu * mu).sum())
            count += mu.numel()
    finally:
        autoencoder.train(was_training)
    if count == 0:
        raise ValueError("latent_scale: the loader gave no batches")
    var = total_sq / count - (total / count) ** 2
    if not var > 1e-12:
        raise ValueError(
            f"latent_scale: the latents are constant (variance {var:.3g}); the autoencoder collapsed"
        )
    return 1.0 / math.sqrt(var)


def read_latent_scale(path: str | os.PathLike) -> float:
    """The scale written by :class:`LatentScaleHandler`.

    Args:
        path: the JSON file.

    Returns:
        The scale factor.

    Raises:
        InputDataError: naming the file when it is missing (train the autoencoder first) or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            "latent scale file does not exist: train the autoencoder first (configs/train_autoencoder.json), "
            "which writes it beside autoencoder.pt",
            path,
        )
    try:
        value = float(json.loads(path.read_text())["scale"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputDataError(
            f"malformed latent scale file ({type(e).__name__}: {e}); expected {{'scale': x}}", path
        ) from e
    if not (math.isfinite(value) and value > 0):
        raise InputDataError(f"latent scale must be a positive finite number, got {value}", path)
    return value


class LatentScaleHandler:
    """Ignite handler: when the autoencoder's training completes, write its latent scale as JSON.

    Args:
        autoencoder: the network being trained.
        loader: the training data (un-augmented is best, but any representative loader does), or a
            zero-argument function returning it (built only when the scale is computed).
        path: the JSON file (written atomically): ``{"scale": s, "latent_std": 1 / s}``.
        device: where to encode.
        max_batches: see :func:`latent_scale`.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        loader: Iterable[Any] | Callable[[], Iterable[Any]],
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        max_batches: int | None = 50,
    ) -> None:
        self.autoencoder, self.loader, self.path = autoencoder, loader, Path(path)
        self.device, self.max_batches = device, max_batches

    def attach(self, engine: Engine) -> None:
        """Run at ``COMPLETED`` (also when a time budget ends the run early).

        Args:
            engine: the autoencoder's trainer.
        """
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Compute and write the scale.

        Args:
            engine: the trainer.
        """
        loader = (
            self.loader() if callable(self.loader) and not isinstance(self.loader, Iterable) else self.loader
        )
        scale = latent_scale(self.autoencoder, loader, self.device, max_batches=self.max_batches)
        atomic_write_text(self.path, json.dumps({"scale": scale, "latent_std": 1.0 / scale}, indent=2) + "\n")
        logger.info("latent scale %.4f written to %s", scale, self.path)


# ----------------------------------------------------------------------------------------------
# classifiers on latents
# ----------------------------------------------------------------------------------------------


class TimestepClassifier(nn.Module):
    """A noise-aware classifier ``(z_t, t) -> logits`` used as a plain classifier ``z -> logits`` at a fixed t.

    Args:
        classifier: the noise-aware classifier.
        timestep: the timestep it is given (0: clean latents).
    """

    def __init__(self, classifier: nn.Module, timestep: int = 0) -> None:
        super().__init__()
        self.classifier, self.timestep = classifier, int(timestep)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Classify latents.

        Args:
            z: latents ``(B, C, h, w)``.

        Returns:
            Logits.
        """
        ts = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        return self.classifier(z, ts)


class SyntheticLatents:
    """A bank of class-conditional latents drawn once with the latent DDPM (diffusion augmentation, seed 000).

    ``per_class`` latents of every class are sampled with deterministic DDIM from seeded noise the first
    time the bank is used (the denoiser's weights must be loaded by then), then kept: they enlarge the
    training set of a latent head through :class:`LatentClassifierPrepareBatch`.

    Args:
        denoiser: the class-conditional latent noise predictor.
        scheduler: its training scheduler.
        latent_shape: ``(C, h, w)`` of one latent.
        num_classes: classes to sample (``0..num_classes-1``).
        per_class: latents per class.
        steps: DDIM steps per sample.
        seed: base seed (class ``k`` uses ``seed + k``).
        device: where to sample.
        batch_size: latents per denoiser call.

    Raises:
        ValueError: ``per_class < 1`` or ``num_classes < 2``.
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        scheduler: Scheduler,
        latent_shape: Sequence[int],
        num_classes: int,
        per_class: int = 64,
        steps: int = 50,
        seed: int = 0,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.denoiser, self.scheduler = denoiser, scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.num_classes, self.per_class, self.steps = int(num_classes), int(per_class), int(steps)
        self.seed, self.device, self.batch_size = int(seed), device, int(batch_size)
        self._latents: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def _build(self) -> None:
        was_training = getattr(self.denoiser, "training", False)
        if isinstance(self.denoiser, nn.Module):
            self.denoiser.eval()
        parts, labels = [], []
        try:
            for k in range(self.num_classes):
                for j, start in enumerate(range(0, self.per_class, self.batch_size)):
                    n = min(self.batch_size, self.per_class - start)
                    parts.append(
                        sample_latents(
                            self.denoiser,
                            self.scheduler,
                            (n, *self.latent_shape),
                            class_label=k,
                            steps=self.steps,
                            seed=self.seed + 1000 * k + j,
                            device=self.device,
                        ).cpu()
                    )
                    labels.append(torch.full((n,), k, dtype=torch.long))
        finally:
            if isinstance(self.denoiser, nn.Module):
                self.denoiser.train(was_training)
        self._latents, self._labels = torch.cat(parts), torch.cat(labels)
        logger.info(
            "diffusion augmentation: %d synthetic latents (%d per class)", len(self._labels), self.per_class
        )

    @property
    def latents(self) -> torch.Tensor:
        """The synthetic latents ``(num_classes * per_class, C, h, w)`` (sampled on first access)."""
        if self._latents is None:
            self._build()
        return self._latents

    @property
    def labels(self) -> torch.Tensor:
        """Their class indices."""
        if self._labels is None:
            self._build()
        return self._labels

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` latents and labels drawn uniformly with replacement.

        Args:
            n: how many.
            generator: optional CPU generator.

        Returns:
            ``(latents, labels)`` on the CPU.
        """
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.latents[idx], self.labels[idx]


class LatentClassifierPrepareBatch(PrepareBatch):
    """``prepare_batch`` that trains (or validates) a classifier *on latents* in a stock Ignite engine.

    Images are encoded (no gradient; the encoder is frozen), optionally passed through a corrupt-and-clean
    module (the hybrid pipeline's head is trained on what it will see), optionally noised to a random (or fixed)
    timestep for a noise-aware classifier (then ``{"timesteps": t}`` goes to the network), and optionally
    joined by synthetic latents from a :class:`SyntheticLatents` bank (diffusion augmentation).

    Args:
        encoder: images → latents.
        corrupt_clean: optional latents → latents (e.g. :class:`CorruptClean` with ``seed=None`` in training).
        scheduler: with ``max_timestep`` or ``timestep``: the latents are noised with ``scheduler.add_noise``
            and the timesteps are passed to the network (noise-aware classifier).
        max_timestep: training: ``t`` uniform in ``[0, max_timestep)`` per sample.
        timestep: evaluation: this fixed ``t`` for every sample (noise drawn from a generator seeded with
            ``seed`` on each call, so validation is repeatable).
        synthetic: a :class:`SyntheticLatents` bank.
        synthetic_per_batch: synthetic latents appended to each batch (needs ``synthetic``).
        image_key: batch key of the images.
        label_key: batch key of the class indices.
        seed: seed of the fixed-timestep noise.

    Raises:
        ValueError: both ``max_timestep`` and ``timestep``, either without ``scheduler``, or synthetic latents
            without a bank.
    """

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        corrupt_clean: Callable[[torch.Tensor], torch.Tensor] | None = None,
        scheduler: Scheduler | None = None,
        max_timestep: int | None = None,
        timestep: int | None = None,
        synthetic: SyntheticLatents | None = None,
        synthetic_per_batch: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        seed: int = 0,
    ) -> None:
        if max_timestep is not None and timestep is not None:
            raise ValueError("give max_timestep (training) or timestep (evaluation), not both")
        if (max_timestep is not None or timestep is not None) and scheduler is None:
            raise ValueError("noising latents needs the scheduler")
        if synthetic_per_batch and synthetic is None:
            raise ValueError("synthetic_per_batch > 0 needs a SyntheticLatents bank")
        self.encoder, self.corrupt_clean, self.scheduler = encoder, corrupt_clean, scheduler
        self.max_timestep = None if max_timestep is None else int(max_timestep)
        self.timestep = None if timestep is None else int(timestep)
        self.synthetic, self.synthetic_per_batch = synthetic, int(synthetic_per_batch)
        self.image_key, self.label_key, self.seed = image_key, label_key, int(seed)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> (
        tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]
    ):
        """Encode, transform and (optionally) noise the batch.

        Args:
            batchdata: a collated batch.
            device: target device.
            non_blocking: passed to ``Tensor.to``.
            kwargs: further ``Tensor.to`` arguments.

        Returns:
            ``(latents, labels)``, or ``(latents_t, labels, (), {"timesteps": t})`` when noising.

        Raises:
            KeyError: naming a missing image or label key.
        """
        for key in (self.image_key, self.label_key):
            if key not in batchdata:
                raise KeyError(f"batch has no {key!r}; keys: {sorted(batchdata)}")
        images, labels = default_prepare_batch(
            {"image": batchdata[self.image_key], "label": batchdata[self.label_key]},
            device,
            non_blocking,
            **kwargs,
        )
        labels = _plain(labels).long().view(-1)
        with torch.no_grad():
            z = self.encoder(images)
            if self.corrupt_clean is not None:
                z = self.corrupt_clean(z)
        z = _plain(z).detach()
        if self.synthetic_per_batch:
            sz, sl = self.synthetic.draw(self.synthetic_per_batch)
            z = torch.cat([z, sz.to(device=z.device, dtype=z.dtype)])
            labels = torch.cat([labels, sl.to(labels.device)])
        if self.max_timestep is None and self.timestep is None:
            return z, labels
        if self.max_timestep is not None:
            t = torch.randint(0, self.max_timestep, (z.shape[0],), device=z.device).long()
            noise = torch.randn_like(z)
        else:
            t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = torch.randn(z.shape, generator=gen).to(device=z.device, dtype=z.dtype)
        z_t = z if self.timestep == 0 else self.scheduler.add_noise(z, noise, t)
        return z_t, labels, (), {"timesteps": t}
