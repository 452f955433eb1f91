"""Simplex-noise diffusion training and AnoDDPM-style anomaly inference on top of MONAI's diffusion tools.

Method: J. Wyatt, A. Leach, S. M. Schmon, C. G. Willcocks, "AnoDDPM: Anomaly Detection With Denoising
Diffusion Probabilistic Models Using Simplex Noise", CVPR Workshops 2022, pp. 650-656.

* :class:`SimplexDiffusionPrepareBatch` replaces the Gaussian training noise of MONAI's
  ``DiffusionPrepareBatch`` with multi-octave simplex noise, so a stock ``SupervisedTrainer`` with a
  ``DiffusionInferer`` trains an AnoDDPM noise predictor.
* :class:`AnomalyInferer` noises an image part-way (``t_start`` of the ``T`` training steps), reconstructs
  it (one-shot x0 prediction, the full DDPM reverse chain, or a short DDIM chain) and returns the squared
  residual as the anomaly map.
* :func:`ddpm_posterior_step` and :func:`ddim_step` are the reverse steps the inferer uses. They exist because
  MONAI's ``DDPMScheduler.step`` always draws its own Gaussian noise (AnoDDPM needs simplex noise in the reverse
  steps too) and ``DDIMScheduler.step`` hard-wires the previous timestep to ``t - T // num_inference_steps``
  (a partial chain needs an arbitrary sub-sequence from ``t_start`` down to 0). Both are tested against the
  MONAI steps they replace.

Timestep convention: ``t_start`` counts forward diffusion steps, as in AnoDDPM's ``sample_distance`` and the
DDPM paper's ``x_t`` (``1 <= t_start <= T``). MONAI indexes its schedules from 0, so the noised image is
``scheduler.add_noise(x0, noise, t_start - 1)`` and the network sees the timestep ``t_start - 1``; the DDPM
reverse chain then takes exactly ``t_start`` network calls (indices ``t_start - 1, ..., 0``) and ends at a clean
image, as in the AnoDDPM code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.layers import median_filter
from monai.networks.schedulers import Scheduler

__all__ = [
    "AnomalyInferer",
    "ClassConditionalDiffusionInferer",
    "SimplexDiffusionPrepareBatch",
    "batch_class_labels",
    "ddim_reversed_step",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_posterior_step",
    "draw_noise",
    "predict_x0",
]

NOISE_TYPES = ("simplex", "gaussian")
RECON_MODES = ("one_shot", "ddpm", "ddim")


def draw_noise(
    shape: Sequence[int],
    noise_type: str = "simplex",
    frequency: float = 2**-5,
    octaves: int = 6,
    decay: float = 0.8,
    normalise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw a zero-mean, unit-variance noise field, simplex (AnoDDPM) or Gaussian.

    Args:
        shape: ``(B, C, H, W)`` or ``(B, C, H, W, D)`` for simplex noise; any shape for Gaussian noise.
        noise_type: ``"simplex"`` (one independent multi-octave field per sample and channel) or ``"gaussian"``.
        frequency: simplex base frequency (cycles per pixel of the first octave).
        octaves: number of simplex octaves.
        decay: amplitude factor between consecutive octaves (AnoDDPM's "persistence").
        normalise: simplex only: scale each field to mean 0, std 1 (default, what the DDPM maths assumes).
            ``False`` gives the raw octave sum (std about 0.4) as the AnoDDPM code uses it.
        generator: random generator; for Gaussian noise it must live on ``device``.
        device: device of the returned tensor.
        dtype: dtype of the returned tensor.

    Returns:
        The noise tensor of shape ``shape``.

    Raises:
        ValueError: if ``noise_type`` is unknown or simplex noise is asked for a shape of rank other than 4 or 5.
    """
    shape = tuple(int(s) for s in shape)
    if noise_type == "gaussian":
        # torch.randn with an explicit size/generator/device, exactly as MONAI's DDPMScheduler.step draws its
        # noise, so that the same seed gives the same stream in both (the equality test relies on it).
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if noise_type == "simplex":
        if len(shape) not in (4, 5):
            raise ValueError(f"simplex noise needs a (B, C, H, W) or (B, C, H, W, D) shape, got {shape}.")
        # imported lazily: the simplex generator is optional for Gaussian-only use of this module
        from transforms.simplex import simplex_noise

        return simplex_noise(
            shape,
            frequency=frequency,
            octaves=octaves,
            decay=decay,
            normalise=normalise,
            generator=generator,
            device=device,
            dtype=dtype,
        )
    raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}.")


class _NoiseMixin:
    """The noise settings shared by the training prepare-batch and the anomaly inferer, so both draw
    the same kind of field from one place."""

    noise_type: str
    frequency: float
    octaves: int
    decay: float
    normalise: bool

    def _set_noise(
        self, noise_type: str, frequency: float, octaves: int, decay: float, normalise: bool
    ) -> None:
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}.")
        self.noise_type, self.frequency, self.octaves = noise_type, frequency, octaves
        self.decay, self.normalise = decay, normalise

    def _noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return draw_noise(
            like.shape,
            noise_type=self.noise_type,
            frequency=self.frequency,
            octaves=self.octaves,
            decay=self.decay,
            normalise=self.normalise,
            generator=generator,
            device=like.device,
            dtype=like.dtype,
        )


def batch_class_labels(batchdata: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    """The ``(B,)`` long class indices of a batch, for a class-conditional denoiser's ``class_labels``.

    Args:
        batchdata: a collated batch.
        key: the class-index key.
        device: where the labels go.

    Returns:
        The class indices.

    Raises:
        KeyError: naming ``key`` when the batch lacks it.
    """
    if key not in batchdata:
        raise KeyError(f"batch has no {key!r} for a class-conditional denoiser; keys: {sorted(batchdata)}")
    return torch.as_tensor(batchdata[key]).long().view(-1).to(device)


class SimplexDiffusionPrepareBatch(_NoiseMixin, DiffusionPrepareBatch):
    """``prepare_batch`` for noise-prediction diffusion training with simplex noise (AnoDDPM, Wyatt et al. 2022).

    Drop-in for MONAI's ``DiffusionPrepareBatch`` in a ``SupervisedTrainer`` whose inferer is
    ``DiffusionInferer(scheduler)``: the same noise tensor is the inferer's ``noise`` keyword and the loss target,
    so the network learns to predict simplex noise. Simplex noise is spatially correlated at low frequencies, which
    is why AnoDDPM uses it: the partially noised image hides whole lesions, not just fine texture.

    Args:
        num_train_timesteps: number of diffusion steps ``T`` of the scheduler.
        condition_name: optional key of a conditioning tensor in the batch (passed as ``condition``).
        noise_type: ``"simplex"`` or ``"gaussian"`` (the latter is plain DDPM training).
        frequency: simplex base frequency.
        octaves: number of simplex octaves.
        decay: amplitude factor between octaves.
        normalise: scale each simplex field to unit variance (default); see :func:`draw_noise`.
        max_timestep: if given, timesteps are drawn from ``[0, max_timestep)`` only. AnoDDPM trains on all
            ``T`` steps (the default ``None``); a cap is useful when inference never noises beyond it.
        class_key: optional key of a class index per sample, passed as ``class_labels`` to the inferer (a
            class-conditional ``DiffusionModelUNet`` with ``num_class_embeds``; use
            :class:`ClassConditionalDiffusionInferer`).

    Raises:
        ValueError: if ``noise_type`` is unknown or ``max_timestep`` is outside ``[1, num_train_timesteps]``.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        condition_name: str | None = None,
        noise_type: str = "simplex",
        frequency: float = 2**-5,
        octaves: int = 6,
        decay: float = 0.8,
        normalise: bool = True,
        max_timestep: int | None = None,
        class_key: str | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.class_key = class_key
        self._set_noise(noise_type, frequency, octaves, decay, normalise)
        if max_timestep is not None and not 1 <= max_timestep <= num_train_timesteps:
            raise ValueError(f"max_timestep must be in [1, {num_train_timesteps}], got {max_timestep}.")
        self.max_timestep = max_timestep

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        """MONAI's diffusion prepare-batch, plus ``class_labels`` from ``class_key`` when it is set.

        Args:
            batchdata: the collated batch.
            device: target device.
            non_blocking: passed to ``Tensor.to``.
            kwargs: further ``Tensor.to`` arguments.

        Returns:
            ``(images, noise target, (), {"noise", "timesteps"[, "condition"][, "class_labels"]})``.

        Raises:
            KeyError: naming ``class_key`` when the batch lacks it.
        """
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        if self.class_key is not None:
            infer_kwargs["class_labels"] = batch_class_labels(batchdata, self.class_key, images.device)
        return images, target, args, infer_kwargs

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        """Return a noise field shaped like ``images``, on their device and dtype, one field per sample.

        Args:
            images: the training batch, ``(B, C, H, W)`` or ``(B, C, H, W, D)`` for simplex noise.

        Returns:
            Zero-mean unit-variance noise of ``images.shape``.

        Raises:
            ValueError: for simplex noise on images of rank other than 4 or 5.
        """
        # the global RNG is used (no generator) so that training randomness follows torch.manual_seed /
        # monai.utils.set_determinism, like MONAI's own torch.randn_like
        return self._noise(images)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        """Draw one timestep per sample, uniformly from ``[0, max_timestep or T)``.

        Args:
            images: the training batch (only its batch size and device are used).

        Returns:
            A ``(B,)`` long tensor of timesteps on the images' device.
        """
        high = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        return torch.randint(0, high, (images.shape[0],), device=images.device).long()


class ClassConditionalDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` that can also pass ``class_labels`` to the network.

    ``DiffusionInferer`` hands conditioning to the network as cross-attention ``context`` (or concatenated
    channels) only; the class embedding of ``DiffusionModelUNet(num_class_embeds=...)`` is reached through the
    ``class_labels`` argument, which it never passes. Without ``class_labels`` this is ``DiffusionInferer``.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: Callable[..., torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise ``inputs`` to ``timesteps`` and predict (the training forward pass).

        Args:
            inputs: clean images.
            diffusion_model: the UNet.
            noise: the noise, shaped like ``inputs``.
            timesteps: one timestep per sample.
            condition: cross-attention context (as ``DiffusionInferer``).
            mode: ``"crossattn"`` or ``"concat"`` (as ``DiffusionInferer``).
            seg: SPADE segmentation (as ``DiffusionInferer``).
            class_labels: class index per sample for a class-conditional UNet.

        Returns:
            The network's prediction.
        """
        if class_labels is None:
            return super().__call__(inputs, diffusion_model, noise, timesteps, condition, mode, seg)
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        return diffusion_model(x=noisy, timesteps=timesteps, context=condition, class_labels=class_labels)


def _coef(values: torch.Tensor, index: int, like: torch.Tensor) -> torch.Tensor:
    """One schedule value as a 0-d tensor on the sample's device (schedules start on the CPU; add_noise moves one)."""
    return values[index].to(like.device)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata: the outputs are derived maps, and plain tensors avoid per-op metadata overhead."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _check_epsilon(scheduler: Scheduler) -> None:
    prediction_type = getattr(scheduler, "prediction_type", "epsilon")
    if prediction_type != "epsilon":
        # AnoDDPM predicts the noise; sample/v-prediction networks would need other x0 formulas
        raise ValueError(
            f"only epsilon-prediction schedulers are supported, got prediction_type={prediction_type!r}."
        )


def predict_x0(
    scheduler: Scheduler,
    model_output: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """One-shot estimate of the clean image from a noise prediction (DDPM eq. 15).

    ``x0_hat = (x_t - sqrt(1 - alpha_bar_t) * eps_hat) / sqrt(alpha_bar_t)``.

    Args:
        scheduler: the training scheduler (its ``alphas_cumprod`` is used).
        model_output: predicted noise ``eps_hat``.
        timestep: MONAI timestep index ``t`` of ``sample``.
        sample: the noisy image ``x_t``.
        clip_range: ``(min, max)`` to clamp the estimate to (the data range), or ``None`` for no clamp.

    Returns:
        The estimate of ``x0``, shaped like ``sample``.
    """
    alpha_prod_t = _coef(scheduler.alphas_cumprod, timestep, sample)
    # same operation order as MONAI's schedulers so results agree bit-for-bit with scheduler.step
    x0 = (sample - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t**0.5
    if clip_range is not None:
        x0 = torch.clamp(x0, clip_range[0], clip_range[1])
    return x0


def ddpm_posterior_step(
    scheduler: Scheduler,
    model_output: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    noise: torch.Tensor | None,
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM reverse step ``x_t -> x_{t-1}`` with caller-supplied noise.

    Same maths as MONAI's ``DDPMScheduler.step`` (epsilon prediction): ``x0_hat`` from DDPM eq. 15 (clamped),
    posterior mean from DDPM eq. 7,
    ``mu = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0_hat + sqrt(alpha_t) (1 - alpha_bar_{t-1}) /
    (1 - alpha_bar_t) x_t``, plus ``sigma_t * noise`` for ``t > 0`` with the scheduler's variance type
    (``"fixed_small"``: ``sigma_t^2 = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t``, clamped at 1e-20;
    ``"fixed_large"``: ``beta_t``). It exists because ``DDPMScheduler.step`` draws its own Gaussian noise and
    AnoDDPM needs simplex noise here; with Gaussian noise drawn by ``torch.randn(sample.shape, generator=g)`` it
    equals ``scheduler.step(..., generator=g)`` exactly (tested).

    Args:
        scheduler: a ``DDPMScheduler`` (``betas``, ``alphas``, ``alphas_cumprod``, ``variance_type``).
        model_output: predicted noise ``eps_hat``, shaped like ``sample``.
        timestep: MONAI timestep index ``t`` of ``sample``.
        sample: the current noisy image ``x_t``.
        noise: unit-variance noise for the step, shaped like ``sample``; unused (may be ``None``) at ``t == 0``.
        clip_range: clamp range of ``x0_hat`` (pass the scheduler's ``clip_sample_values`` to mimic it exactly),
            or ``None`` for no clamp.

    Returns:
        ``(prev_sample, pred_original_sample)``, as ``DDPMScheduler.step``.

    Raises:
        ValueError: if shapes differ, noise is missing for ``t > 0``, or the variance type is a learned one.
    """
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output {tuple(model_output.shape)} must match sample {tuple(sample.shape)} "
            "(learned-variance outputs are not supported)."
        )
    _check_epsilon(scheduler)
    alpha_prod_t = _coef(scheduler.alphas_cumprod, timestep, sample)
    alpha_prod_t_prev = (
        _coef(scheduler.alphas_cumprod, timestep - 1, sample)
        if timestep > 0
        else scheduler.one.to(sample.device)
    )
    beta_t = _coef(scheduler.betas, timestep, sample)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    x0 = predict_x0(scheduler, model_output, timestep, sample, clip_range)
    x0_coeff = (alpha_prod_t_prev**0.5 * beta_t) / beta_prod_t
    xt_coeff = _coef(scheduler.alphas, timestep, sample) ** 0.5 * beta_prod_t_prev / beta_prod_t
    prev = x0_coeff * x0 + xt_coeff * sample

    if timestep > 0:
        if noise is None:
            raise ValueError("noise is required for timestep > 0.")
        variance_type = getattr(scheduler, "variance_type", "fixed_small")
        if variance_type == "fixed_small":
            variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta_t, min=1e-20)
        elif variance_type == "fixed_large":
            variance = beta_t
        else:
            raise ValueError(
                f"variance_type {variance_type!r} is not supported (use fixed_small or fixed_large)."
            )
        prev = prev + variance**0.5 * noise
    return prev, x0


def ddim_step(
    scheduler: Scheduler,
    model_output: torch.Tensor,
    timestep: int,
    prev_timestep: int,
    sample: torch.Tensor,
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (eta = 0) from ``timestep`` to an arbitrary earlier ``prev_timestep``.

    ``x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev) eps_hat`` (DDIM eq. 12, sigma = 0), with
    ``alpha_bar_prev = 1`` for ``prev_timestep < 0`` (MONAI's ``set_alpha_to_one``), so the last step returns
    ``x0_hat``. MONAI's ``DDIMScheduler.step`` computes the same update but fixes
    ``prev_timestep = timestep - T // num_inference_steps`` and its ``set_timesteps`` always spans ``T - 1 .. 0``,
    which cannot express a partial chain ``t_start = tau_k > ... > tau_1 >= 0``; for a step it can express the two
    agree (tested). The scheduler's ``alphas_cumprod`` is used, so a ``DDPMScheduler`` gives the same betas as a
    ``DDIMScheduler`` built with the same ``num_train_timesteps`` and schedule.

    Args:
        scheduler: a MONAI scheduler with ``alphas_cumprod``.
        model_output: predicted noise ``eps_hat``.
        timestep: current MONAI timestep index.
        prev_timestep: target timestep index (``< timestep``; negative means the clean image).
        sample: current image ``x_timestep``.
        clip_range: clamp range of ``x0_hat``, or ``None``.

    Returns:
        ``(prev_sample, pred_original_sample)``, as ``DDIMScheduler.step``.

    Raises:
        ValueError: if ``prev_timestep >= timestep``.
    """
    if prev_timestep >= timestep:
        raise ValueError(f"prev_timestep ({prev_timestep}) must be < timestep ({timestep}).")
    _check_epsilon(scheduler)
    alpha_prod_t_prev = (
        _coef(scheduler.alphas_cumprod, prev_timestep, sample)
        if prev_timestep >= 0
        else torch.tensor(1.0, device=sample.device)
    )
    x0 = predict_x0(scheduler, model_output, timestep, sample, clip_range)
    # eps_hat is the network output even after x0_hat is clamped, as in MONAI's DDIMScheduler.step
    prev = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev) ** 0.5 * model_output
    return prev, x0


def ddim_reversed_step(
    scheduler: Scheduler,
    model_output: torch.Tensor,
    timestep: int,
    next_timestep: int,
    sample: torch.Tensor,
    clip_range: tuple[float, float] | None = (-1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM *encoding* step ``x_timestep -> x_next_timestep`` (``next_timestep > timestep``).

    The DDIM update run backwards (Dhariwal & Nichol 2021, appendix F; Song et al. 2021, eq. 13 with sigma = 0):
    ``x_next = sqrt(alpha_bar_next) x0_hat + sqrt(1 - alpha_bar_next) eps_hat``, ``x0_hat`` from the noise
    prediction at ``timestep``. MONAI's ``DDIMScheduler.reversed_step`` is the same update but always moves by
    ``T // num_inference_steps``; an encoding to an arbitrary level ``L`` in ``k`` steps needs arbitrary targets.
    For a step it can express the two agree (tested).

    Args:
        scheduler: a MONAI scheduler with ``alphas_cumprod``.
        model_output: predicted noise ``eps_hat`` at ``timestep``.
        timestep: current MONAI timestep index.
        next_timestep: target timestep index (``> timestep``, ``< T``).
        sample: current image ``x_timestep``.
        clip_range: clamp range of ``x0_hat``, or ``None`` (``DDIMScheduler`` clamps when ``clip_sample``).

    Returns:
        ``(next_sample, pred_original_sample)``, as ``DDIMScheduler.reversed_step``.

    Raises:
        ValueError: if ``next_timestep`` is not in ``(timestep, T)``.
    """
    num_t = int(scheduler.num_train_timesteps)
    if not timestep < next_timestep < num_t:
        raise ValueError(f"next_timestep ({next_timestep}) must be in ({timestep}, {num_t}).")
    _check_epsilon(scheduler)
    alpha_prod_next = _coef(scheduler.alphas_cumprod, next_timestep, sample)
    x0 = predict_x0(scheduler, model_output, timestep, sample, clip_range)
    nxt = alpha_prod_next**0.5 * x0 + (1 - alpha_prod_next) ** 0.5 * model_output
    return nxt, x0


def ddim_timesteps(t_index: int, num_steps: int) -> list[int]:
    """Decreasing DDIM timestep indices from ``t_index`` to 0, evenly spaced like MONAI's ``set_timesteps``.

    Args:
        t_index: the starting MONAI timestep index (``tau_k``).
        num_steps: wanted number of steps ``k``; capped at ``t_index + 1`` (one per available index).

    Returns:
        ``[tau_k = t_index, ..., tau_1 = 0]`` with ``min(num_steps, t_index + 1)`` distinct entries.
    """
    k = min(num_steps, t_index + 1)
    if k == 1:
        return [t_index]
    # spacing >= 1 when k <= t_index + 1, so rounding keeps the values distinct
    return [int(v) for v in torch.linspace(t_index, 0, k, dtype=torch.float64).round().long()]


class AnomalyInferer(_NoiseMixin, Inferer):
    """AnoDDPM partial-diffusion reconstruction and anomaly map (Wyatt et al., CVPR Workshops 2022).

    The image is noised to ``t_start`` of the ``T`` training steps with simplex (or Gaussian) noise, denoised back
    to a "healthy" reconstruction, and the squared residual is the anomaly map. A lesion covered by the
    low-frequency simplex noise is not reconstructed, so it stands out in the residual.

    It subclasses MONAI's ``Inferer`` (which only fixes the ``__call__(inputs, network, ...)`` contract) so it can
    be the ``inferer`` of a ``SupervisedEvaluator`` or a bundle config; the evaluator's prediction is then the
    output dict. The network should be in eval mode (evaluators do that), else dropout breaks determinism.

    Timestep convention: ``t_start`` counts diffusion steps (``1 .. T``, AnoDDPM's ``sample_distance``); the noised
    image is ``scheduler.add_noise(x0, noise, t_start - 1)`` (MONAI index) and

    * ``"one_shot"``: one network call, ``x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)``;
    * ``"ddpm"``: the AnoDDPM ancestral chain, ``t_start`` network calls (indices ``t_start - 1 .. 0``) with
      fresh noise of ``noise_type`` in every step (:func:`ddpm_posterior_step`);
    * ``"ddim"``: ``min(ddim_steps, t_start)`` deterministic DDIM steps over indices evenly spaced from
      ``t_start - 1`` to 0, then to the clean image (:func:`ddim_step`).

    Every ``x0_hat`` is clamped to ``clip_range``, as AnoDDPM clamps to [-1, 1]; the scheduler's own
    ``clip_sample`` flag is not consulted. The whole batch goes through the network in one call per step.

    Args:
        scheduler: the ``DDPMScheduler`` the network was trained with (epsilon prediction).
        t_start: number of forward diffusion steps, ``1 <= t_start <= T``.
        recon: ``"one_shot"``, ``"ddpm"`` or ``"ddim"``.
        ddim_steps: number of DDIM steps ``k`` (``recon="ddim"`` only).
        noise_type: ``"simplex"`` or ``"gaussian"``, for the forward noise and the DDPM reverse noise.
        frequency: simplex base frequency.
        octaves: simplex octaves.
        decay: simplex amplitude decay between octaves.
        normalise: scale each simplex field to unit variance (default); see :func:`draw_noise`.
        median: odd median-filter size applied to the anomaly map; 0 or 1 disables it.
        seed: if given, each call draws its noise from ``torch.Generator(device).manual_seed(seed)`` on the
            images' device, so repeated calls (and every ``t`` of :meth:`sweep`) use the same noise stream;
            ``None`` uses the global RNG.
        clip_range: data range ``(min, max)`` the reconstructions are clamped to, or ``None``.

    Raises:
        ValueError: for an unknown ``recon``/``noise_type``, ``t_start`` outside ``[1, T]``, ``ddim_steps < 1``,
            an even ``median`` > 1, or a non-epsilon scheduler.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        t_start: int,
        recon: str = "ddpm",
        ddim_steps: int = 10,
        noise_type: str = "simplex",
        frequency: float = 2**-5,
        octaves: int = 6,
        decay: float = 0.8,
        normalise: bool = True,
        median: int = 0,
        seed: int | None = None,
        clip_range: tuple[float, float] | None = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if recon not in RECON_MODES:
            raise ValueError(f"recon must be one of {RECON_MODES}, got {recon!r}.")
        self._set_noise(noise_type, frequency, octaves, decay, normalise)
        if ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}.")
        if median < 0 or (median > 1 and median % 2 == 0):
            raise ValueError(f"median must be 0, 1 or an odd size >= 3, got {median}.")
        _check_epsilon(scheduler)
        self.scheduler = scheduler
        self._check_t(t_start)
        self.t_start = t_start
        self.recon = recon
        self.ddim_steps = ddim_steps
        self.median = median
        self.seed = seed
        self.clip_range = clip_range

    def _check_t(self, t_start: int) -> None:
        num_t = self.scheduler.num_train_timesteps
        if not 1 <= int(t_start) <= num_t:
            raise ValueError(f"t_start must be in [1, {num_t}] (number of diffusion steps), got {t_start}.")

    def _generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def anomaly_map(
        self, images: torch.Tensor, recon: torch.Tensor, brain_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Squared residual summed over channels, median-filtered, then masked.

        Args:
            images: the inputs ``(B, C, *spatial)``.
            recon: their reconstructions, same shape.
            brain_mask: optional mask broadcastable to ``(B, 1, *spatial)``; the map is multiplied by it
                (after the median filter, so nothing is smeared back outside the brain).

        Returns:
            The anomaly map ``(B, 1, *spatial)``.

        Raises:
            ValueError: if shapes do not match or the mask does not broadcast.
        """
        if images.shape != recon.shape:
            raise ValueError(f"images {tuple(images.shape)} and recon {tuple(recon.shape)} must match.")
        amap = ((images - recon) ** 2).sum(dim=1, keepdim=True)
        if self.median > 1:
            # MONAI's median_filter is torch-native, batched over leading dims, replicate-padded
            amap = median_filter(amap, kernel_size=self.median, spatial_dims=amap.ndim - 2)
        if brain_mask is not None:
            mask = _plain(brain_mask).to(device=amap.device, dtype=amap.dtype)
            try:
                shape = torch.broadcast_shapes(mask.shape, amap.shape)
            except RuntimeError as err:
                raise ValueError(
                    f"brain_mask {tuple(mask.shape)} does not broadcast to {tuple(amap.shape)}."
                ) from err
            if shape != amap.shape:
                raise ValueError(f"brain_mask {tuple(mask.shape)} does not broadcast to {tuple(amap.shape)}.")
            amap = amap * mask
        return amap

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        network: Callable[..., torch.Tensor],
        t_start: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise ``images`` to ``t_start`` and reconstruct them.

        Args:
            images: ``(B, C, H, W)`` or ``(B, C, H, W, D)``, in the data range.
            network: noise predictor called as ``network(x, timesteps)`` with ``timesteps`` a ``(B,)`` long tensor.
            t_start: number of diffusion steps; defaults to ``self.t_start``.
            noise: optional forward noise (shaped like ``images``) instead of a drawn one.
            generator: random generator for the noise; defaults to a fresh seeded one (or the global RNG).

        Returns:
            ``{"recon", "noisy", "noise"}``: the reconstruction, ``x_t`` and the forward noise.

        Raises:
            ValueError: for a bad ``t_start`` or a ``noise`` of the wrong shape.
        """
        t_start = self.t_start if t_start is None else int(t_start)
        self._check_t(t_start)
        images = _plain(images)
        if generator is None:
            generator = self._generator(images.device)
        if noise is None:
            noise = self._noise(images, generator)
        elif noise.shape != images.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match images {tuple(images.shape)}.")
        noise = _plain(noise).to(device=images.device, dtype=images.dtype)

        t_index = t_start - 1

        def timesteps(t: int) -> torch.Tensor:
            return torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)

        noisy = self.scheduler.add_noise(images, noise, timesteps(t_index))
        x = noisy
        if self.recon == "one_shot":
            x = predict_x0(
                self.scheduler, network(noisy, timesteps(t_index)), t_index, noisy, self.clip_range
            )
        elif self.recon == "ddpm":
            for t in range(t_index, -1, -1):
                eps = network(x, timesteps(t))
                # AnoDDPM draws the reverse-step noise from the same family as the forward noise
                z = self._noise(x, generator) if t > 0 else None
                x, _ = ddpm_posterior_step(self.scheduler, eps, t, x, z, self.clip_range)
        else:
            taus = ddim_timesteps(t_index, self.ddim_steps)
            for i, t in enumerate(taus):
                prev_t = taus[i + 1] if i + 1 < len(taus) else -1
                x, _ = ddim_step(self.scheduler, network(x, timesteps(t)), t, prev_t, x, self.clip_range)
        return {"recon": x, "noisy": noisy, "noise": noise}

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        brain_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Reconstruct ``inputs`` from ``t_start`` and compute their anomaly maps.

        Args:
            inputs: images ``(B, C, H, W)`` or ``(B, C, H, W, D)`` in the data range, on the network's device.
            network: noise predictor, called as ``network(x, timesteps)``.
            brain_mask: optional mask broadcastable to ``(B, 1, H, W)``.
            noise: optional forward noise instead of a drawn one (the reverse-step noise is still drawn).
            kwargs: ignored; accepted so MONAI evaluators may pass extra keyword arguments.

        Returns:
            ``{"recon", "anomaly_map", "noisy", "noise"}``; ``anomaly_map`` is ``(B, 1, H, W)``.
        """
        inputs = _plain(inputs)
        out = self.reconstruct(inputs, network, noise=noise)
        out["anomaly_map"] = self.anomaly_map(inputs, out["recon"], brain_mask)
        return out

    @torch.no_grad()
    def sweep(
        self,
        images: torch.Tensor,
        network: Callable[..., torch.Tensor],
        t_values: Sequence[int],
        brain_mask: torch.Tensor | None = None,
        output: str = "anomaly_map",
    ) -> dict[int, torch.Tensor]:
        """Run the inferer at several ``t_start`` values (for the evaluation's sweep over t).

        With a ``seed`` every ``t`` starts from a fresh generator with that seed, so the forward noise field is the
        same for all ``t`` (common random numbers: differences across ``t`` come from the noise level only).

        Args:
            images: images ``(B, C, H, W)`` or ``(B, C, H, W, D)``.
            network: noise predictor.
            t_values: numbers of diffusion steps to try.
            brain_mask: optional mask, as in ``__call__``.
            output: which output to collect: ``"anomaly_map"``, ``"recon"``, ``"noisy"`` or ``"noise"``.

        Returns:
            ``{t: output tensor}`` in the order of ``t_values``.

        Raises:
            ValueError: for an unknown ``output`` or a bad ``t``.
        """
        if output not in ("anomaly_map", "recon", "noisy", "noise"):
            raise ValueError(f"unknown output {output!r}.")
        images = _plain(images)
        result: dict[int, torch.Tensor] = {}
        for t in t_values:
            out = self.reconstruct(images, network, t_start=int(t))
            if output == "anomaly_map":
                result[int(t)] = self.anomaly_map(images, out["recon"], brain_mask)
            else:
                result[int(t)] = out[output]
        return result
