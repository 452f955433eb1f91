"""DDIM encoding and classifier-guided DDIM decoding for anomaly detection, and the noise-aware classifier's
training pieces.

Method: J. Wolleb, F. Bieder, R. Sandkühler, P. C. Cattin, "Diffusion Models for Medical Anomaly Detection",
MICCAI 2022 (classifier guidance from P. Dhariwal, A. Nichol, "Diffusion Models Beat GANs on Image Synthesis",
NeurIPS 2021, algorithm 2).

* :class:`GuidedDDIMInferer` encodes an image deterministically to noise level ``L`` with ``k`` DDIM steps run
  backwards, then decodes it with ``k`` DDIM steps whose noise prediction is shifted by the gradient of a
  noise-aware classifier toward the healthy class,
  ``eps' = eps - sqrt(1 - alpha_bar_t) * s * grad_x log p(healthy | x_t, t)``; the anomaly map is ``|x - x_hat|``.
  Without guidance (``s = 0``) the decoding retraces the encoding and gives the input back (up to the DDIM
  discretisation error, which falls as ``k`` grows); the guidance changes what the classifier sees as diseased.
* :class:`NoisyClassifierPrepareBatch` trains the classifier on ``x_t = q_sample(x_0, t)`` with ``t`` uniform
  (training) or on every ``t`` of a fixed grid (validation, so accuracy can be reported per ``t``).
* :func:`check_healthy_index` makes the healthy class index of the config agree with the datalist's class order:
  two public implementations of the method guide toward the wrong class because of label order.

Timestep convention (as :mod:`engines.diffusion`): ``L`` counts diffusion steps (``1 <= L <= T``); MONAI
indexes schedules from 0, so the encoding runs over indices ``tau_0 = 0 < tau_1 < ... < tau_k = L - 1`` (the
input is taken as the sample at index 0, as in the reference implementations) and the decoding back over the
same indices. The UNet and the classifier receive the same, original-scale index at every step (a public
implementation passes the re-spaced step number to the classifier instead).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.networks.layers import median_filter
from monai.networks.schedulers import Scheduler

from data_prep.atomic import atomic_path, atomic_write_text
from engines.diffusion import _check_epsilon, _plain, ddim_reversed_step, ddim_step, ddim_timesteps

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "GuidedChainFigureHandler",
    "GuidedDDIMInferer",
    "NoisyClassifierPrepareBatch",
    "check_healthy_index",
    "class_names_of",
    "guided_setting",
    "guided_settings",
    "parse_guided_setting",
    "save_class_names",
    "timestep_accuracy_metrics",
]

DEFAULT_CLASS_NAMES = ("healthy", "diseased")
_SETTING = re.compile(r"^L(\d+)_s([-+0-9.eE]+)$")


def guided_setting(level: int, scale: float) -> str:
    """The name of one (L, s) setting, e.g. ``"L500_s10"``; used as the map key and MLflow metric prefix.

    Args:
        level: noise level ``L`` (diffusion steps).
        scale: guidance scale ``s``.

    Returns:
        ``"L<level>_s<scale>"`` with the scale in the shortest exact form (``%g``).
    """
    return f"L{int(level)}_s{float(scale):g}"


def parse_guided_setting(name: str) -> tuple[int, float]:
    """Invert :func:`guided_setting`.

    Args:
        name: a setting name such as ``"L500_s10"``.

    Returns:
        ``(L, s)``.

    Raises:
        ValueError: if the name is not of that form.
    """
    m = _SETTING.match(str(name))
    if m is None:
        raise ValueError(f"not a guided-DDIM setting name (expected 'L<int>_s<float>'): {name!r}")
    return int(m.group(1)), float(m.group(2))


def guided_settings(levels: Sequence[int], scales: Sequence[float]) -> list[str]:
    """All (L, s) combinations of a sweep, L-major (the encodings of one L are shared by its scales).

    Args:
        levels: noise levels ``L``.
        scales: guidance scales ``s``.

    Returns:
        Setting names, e.g. ``["L250_s0", "L250_s10", "L500_s0", "L500_s10"]``.

    Raises:
        ValueError: if either list is empty.
    """
    if not levels or not scales:
        raise ValueError("the sweep needs at least one level L and one scale s")
    return [guided_setting(L, s) for L in levels for s in scales]


def class_names_of(datalist: str | Path | Mapping) -> list[str]:
    """The class order of a classification datalist: its top-level ``"labels"`` (class names by index).

    Args:
        datalist: a datalist JSON file or its loaded content.

    Returns:
        The class names by index; ``["healthy", "diseased"]`` when the datalist names none.

    Raises:
        ValueError: if ``labels`` is not a list of distinct strings.
    """
    content = datalist if isinstance(datalist, Mapping) else json.loads(Path(datalist).read_text())
    names = content.get("labels", list(DEFAULT_CLASS_NAMES))
    where = "" if isinstance(datalist, Mapping) else f"{datalist}: "
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(f"{where}'labels' must be a list of distinct class names, got {names!r}")
    return list(names)


def check_healthy_index(
    datalist: str | Path | Mapping, healthy_index: int, healthy_name: str = "healthy"
) -> list[str]:
    """Check that ``healthy_index`` of a config is the healthy class of the datalist the classifier learns.

    Args:
        datalist: the classifier's datalist (file or content) whose ``labels`` fix the class order.
        healthy_index: the index the guidance pushes toward.
        healthy_name: the name of the healthy class in ``labels``.

    Returns:
        The datalist's class names.

    Raises:
        ValueError: naming the datalist, its class order and the configured index when they disagree.
    """
    names = class_names_of(datalist)
    where = "the datalist" if isinstance(datalist, Mapping) else str(datalist)
    if healthy_name not in names:
        raise ValueError(f"{where}: labels {names} has no class {healthy_name!r} to guide toward")
    if not 0 <= int(healthy_index) < len(names) or names[int(healthy_index)] != healthy_name:
        raise ValueError(
            f"healthy_index {healthy_index} does not point at {healthy_name!r} in {where}: its labels are "
            f"{names}, so set healthy_index to {names.index(healthy_name)}"
        )
    return names


class GuidedDDIMInferer(Inferer):
    """Deterministic DDIM encoding to level ``L`` and classifier-guided DDIM decoding (Wolleb et al., 2022).

    ``network`` (the argument of every call) is the epsilon-prediction diffusion UNet, called as
    ``network(x, timesteps)``; the noise-aware ``classifier`` is held by the inferer and called as
    ``classifier(x, timesteps)`` returning logits. Both are used in eval mode (the bundle's evaluators set
    that for the network; the classifier is switched to eval here). Every step of the whole batch is one
    network call (and one classifier forward/backward when ``s != 0``).

    The setting of a call is ``(L, s)``; :meth:`reconstruct` takes it as the ``t_start`` argument either as a
    name ``"L<L>_s<s>"`` or as an integer ``L`` (then ``s`` is the default ``guidance_scale``), so the inferer plugs
    into :class:`engines.anomaly.VolumeAnomalyInferer` and the shared anomaly evaluation unchanged.

    Args:
        scheduler: the scheduler the UNet was trained with (its ``alphas_cumprod``; epsilon prediction).
        classifier: the noise-aware classifier ``(x_t, t) -> logits``.
        noise_level: default ``L``, the number of diffusion steps the image is encoded to (``1 <= L <= T``).
        guidance_scale: default ``s``; 0 disables guidance.
        ddim_steps: ``k``, the number of DDIM steps of the encoding and of the decoding (capped at ``L - 1``).
        healthy_index: the classifier's output index of the healthy class (see :func:`check_healthy_index`).
        clip_range: clamp range of every ``x0`` estimate (the data range), or ``None``.
        median: odd median-filter size for the anomaly map; 0 or 1 disables it.
        class_conditional: the UNet is class-conditional (``num_class_embeds``); it then receives
            ``class_labels = healthy_index`` in the encoding and in the decoding.

    Raises:
        ValueError: for a non-epsilon scheduler, a level outside ``[1, T]``, ``ddim_steps < 1``, a negative
            scale, or an even ``median`` > 1.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        classifier: torch.nn.Module,
        noise_level: int = 500,
        guidance_scale: float = 10.0,
        ddim_steps: int = 10,
        healthy_index: int = 0,
        clip_range: tuple[float, float] | None = (-1.0, 1.0),
        median: int = 0,
        class_conditional: bool = False,
    ) -> None:
        super().__init__()
        _check_epsilon(scheduler)
        self.scheduler = scheduler
        self.classifier = classifier
        self._check_level(noise_level)
        if ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}.")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
        if median < 0 or (median > 1 and median % 2 == 0):
            raise ValueError(f"median must be 0, 1 or an odd size >= 3, got {median}.")
        self.noise_level = int(noise_level)
        self.guidance_scale = float(guidance_scale)
        self.ddim_steps = int(ddim_steps)
        self.healthy_index = int(healthy_index)
        self.clip_range = clip_range
        self.median = median
        self.class_conditional = class_conditional

    def _check_level(self, level: int) -> None:
        num_t = int(self.scheduler.num_train_timesteps)
        if not 1 <= int(level) <= num_t:
            raise ValueError(
                f"noise level L must be in [1, {num_t}] (number of diffusion steps), got {level}."
            )

    def setting(self, key: int | str | None) -> tuple[int, float]:
        """Resolve a setting key to ``(L, s)``.

        Args:
            key: ``None`` (the defaults), an integer ``L`` (default ``s``) or a name ``"L<L>_s<s>"``.

        Returns:
            ``(L, s)``.

        Raises:
            ValueError: for a malformed name, a level outside ``[1, T]`` or a negative scale.
        """
        if key is None:
            level, scale = self.noise_level, self.guidance_scale
        elif isinstance(key, str) and not key.isdigit():
            level, scale = parse_guided_setting(key)
        else:
            level, scale = int(key), self.guidance_scale
        self._check_level(level)
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}.")
        return level, scale

    def timesteps(self, level: int) -> list[int]:
        """The increasing MONAI indices ``tau_0 = 0 < ... < tau_k = L - 1`` of the encoding.

        Args:
            level: noise level ``L``.

        Returns:
            ``min(k, L - 1) + 1`` indices (one index only when ``L == 1``: no step at all).
        """
        return ddim_timesteps(int(level) - 1, self.ddim_steps + 1)[::-1]

    def _call_unet(self, network: Callable, x: torch.Tensor, t: int) -> torch.Tensor:
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if self.class_conditional:
            labels = torch.full((x.shape[0],), self.healthy_index, device=x.device, dtype=torch.long)
            return network(x, ts, class_labels=labels)
        return network(x, ts)

    def guidance_gradient(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``grad_x log p(healthy | x, t)`` of the classifier, per sample.

        Args:
            x: noisy images ``x_t`` ``(B, C, H, W)``.
            t: their MONAI timestep index (the same the UNet receives).

        Returns:
            ``(gradient shaped like x, p(healthy) of shape (B,))``.
        """
        self.classifier.eval()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            logp = torch.log_softmax(self.classifier(xg, ts).float(), dim=1)[:, self.healthy_index]
            # samples are independent (the classifier normalises per sample), so the gradient of the sum is the
            # per-sample gradient
            (grad,) = torch.autograd.grad(logp.sum(), xg)
        return grad.to(x.dtype), logp.detach().exp()

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, network: Callable, level: int, record: bool = False
    ) -> dict[str, Any]:
        """Deterministic DDIM encoding of ``images`` to noise level ``level``.

        Args:
            images: ``(B, C, H, W)`` in the data range.
            network: the epsilon-prediction UNet.
            level: ``L`` (diffusion steps).
            record: keep every intermediate ``x_tau``.

        Returns:
            ``{"latent": x_L, "timesteps": [tau_0..tau_k], "chain": [x_tau_0..x_tau_k] (if record)}``.
        """
        taus = self.timesteps(level)
        x = _plain(images)
        chain = [x] if record else []
        for t, t_next in itertools.pairwise(taus):
            x, _ = ddim_reversed_step(
                self.scheduler, self._call_unet(network, x, t), t, t_next, x, self.clip_range
            )
            if record:
                chain.append(x)
        return {"latent": x, "timesteps": taus, "chain": chain}

    @torch.no_grad()
    def decode(
        self,
        latent: torch.Tensor,
        network: Callable,
        level: int,
        scale: float,
        record: bool = False,
    ) -> dict[str, Any]:
        """Classifier-guided DDIM decoding from ``x_L`` back to index 0.

        Args:
            latent: ``x_L`` from :meth:`encode`.
            network: the epsilon-prediction UNet.
            level: ``L`` of the encoding.
            scale: guidance scale ``s`` (0: plain DDIM decoding, no classifier call).
            record: keep every intermediate ``x_tau``, the classifier gradients and ``p(healthy)`` (computed for
                the record even when ``s == 0``, where they are not applied).

        Returns:
            ``{"recon": x_hat, "chain": [...], "gradients": [...], "p_healthy": [...]}`` (lists empty unless
            ``record``).
        """
        taus = self.timesteps(level)[::-1]
        x = latent
        out: dict[str, Any] = {"chain": [x] if record else [], "gradients": [], "p_healthy": []}
        for t, t_prev in itertools.pairwise(taus):
            eps = self._call_unet(network, x, t)
            if scale != 0 or record:
                grad, p = self.guidance_gradient(x, t)
                if record:
                    out["gradients"].append(grad)
                    out["p_healthy"].append(p)
            if scale != 0:
                # Dhariwal & Nichol, algorithm 2: shift the noise prediction against the class-score gradient
                eps = eps - (1 - self.scheduler.alphas_cumprod[t].to(x.device)) ** 0.5 * scale * grad
            x, _ = ddim_step(self.scheduler, eps, t, t_prev, x, self.clip_range)
            if record:
                out["chain"].append(x)
        out["recon"] = x
        return out

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        network: Callable,
        t_start: int | str | None = None,
        record: bool = False,
    ) -> dict[str, Any]:
        """Encode to ``L`` and decode with guidance scale ``s``.

        Args:
            images: ``(B, C, H, W)`` in the data range.
            network: the epsilon-prediction UNet.
            t_start: the setting: ``None``, an integer ``L`` or a name ``"L<L>_s<s>"`` (see :meth:`setting`).
            record: keep the chains (for figures).

        Returns:
            ``{"recon", "noisy" (x_L)}``, plus ``"encode_chain"``, ``"decode_chain"``, ``"gradients"``,
            ``"p_healthy"`` and ``"timesteps"`` when ``record``.
        """
        level, scale = self.setting(t_start)
        enc = self.encode(images, network, level, record)
        dec = self.decode(enc["latent"], network, level, scale, record)
        out: dict[str, Any] = {"recon": dec["recon"], "noisy": enc["latent"]}
        if record:
            out.update(
                encode_chain=enc["chain"],
                decode_chain=dec["chain"],
                gradients=dec["gradients"],
                p_healthy=dec["p_healthy"],
                timesteps=enc["timesteps"],
            )
        return out

    @torch.no_grad()
    def reconstruct_settings(
        self, images: torch.Tensor, network: Callable, settings: Sequence[int | str]
    ) -> dict[int | str, torch.Tensor]:
        """Reconstructions for several settings, encoding each level ``L`` once for all its scales.

        Args:
            images: ``(B, C, H, W)``.
            network: the epsilon-prediction UNet.
            settings: setting keys (see :meth:`setting`).

        Returns:
            ``{setting key: reconstruction}`` in the order of ``settings``.
        """
        latents: dict[int, torch.Tensor] = {}
        result: dict[int | str, torch.Tensor] = {}
        for key in settings:
            level, scale = self.setting(key)
            if level not in latents:
                latents[level] = self.encode(images, network, level)["latent"]
            result[key] = self.decode(latents[level], network, level, scale)["recon"]
        return result

    def anomaly_map(
        self, images: torch.Tensor, recon: torch.Tensor, brain_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``|x - x_hat|`` summed over channels, median-filtered, then masked.

        Args:
            images: inputs ``(B, C, H, W)``.
            recon: reconstructions, same shape.
            brain_mask: optional mask of shape ``(B, 1, H, W)`` (or broadcastable to it).

        Returns:
            ``(B, 1, H, W)``.

        Raises:
            ValueError: if the shapes differ.
        """
        if images.shape != recon.shape:
            raise ValueError(f"images {tuple(images.shape)} and recon {tuple(recon.shape)} must match.")
        amap = (_plain(images) - _plain(recon)).abs().sum(dim=1, keepdim=True)
        if self.median > 1:
            amap = median_filter(amap, kernel_size=self.median, spatial_dims=amap.ndim - 2)
        if brain_mask is not None:
            amap = amap * _plain(brain_mask).to(device=amap.device, dtype=amap.dtype)
        return amap

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable,
        brain_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Reconstruct ``inputs`` at the default setting and compute their anomaly maps.

        Args:
            inputs: images ``(B, C, H, W)``.
            network: the epsilon-prediction UNet.
            brain_mask: optional mask.
            kwargs: ignored (MONAI evaluators may pass extra keyword arguments).

        Returns:
            ``{"recon", "noisy", "anomaly_map"}``.
        """
        out = self.reconstruct(inputs, network)
        out["anomaly_map"] = self.anomaly_map(inputs, out["recon"], brain_mask)
        return out

    @torch.no_grad()
    def sweep(
        self,
        images: torch.Tensor,
        network: Callable,
        t_values: Sequence[int | str],
        brain_mask: torch.Tensor | None = None,
    ) -> dict[int | str, torch.Tensor]:
        """Anomaly maps for several settings (the evaluation's sweep over ``L`` and ``s``).

        Args:
            images: ``(B, C, H, W)``.
            network: the epsilon-prediction UNet.
            t_values: setting keys.
            brain_mask: optional mask.

        Returns:
            ``{setting key: (B, 1, H, W) map}``.
        """
        recons = self.reconstruct_settings(images, network, t_values)
        return {k: self.anomaly_map(images, r, brain_mask) for k, r in recons.items()}


class NoisyClassifierPrepareBatch(PrepareBatch):
    """``prepare_batch`` that trains a noise-aware classifier on ``x_t = q_sample(x_0, t)``.

    Training (``timestep_grid=None``): one ``t`` per sample drawn uniformly from ``[0, max_timestep or T)`` and
    Gaussian noise from the global RNG (so ``set_determinism`` governs it). Validation (``timestep_grid`` given):
    every image is repeated at every ``t`` of the grid, grid-major (the first ``B`` rows are at ``grid[0]``...),
    with noise from a generator seeded per call, so validation sees the same noisy images every epoch and
    :func:`timestep_accuracy_metrics` can report accuracy per ``t``.

    Returns ``(x_t, labels, (), {"timesteps": t})``, so a ``SimpleInferer`` calls ``classifier(x_t, timesteps=t)``.

    Args:
        scheduler: the diffusion scheduler (``add_noise``, ``num_train_timesteps``).
        label_key: batch key of the class index.
        image_key: batch key of the image.
        timestep_grid: fixed MONAI indices for validation; ``None`` for training.
        max_timestep: training only: draw ``t`` from ``[0, max_timestep)``.
        seed: seed of the validation noise.

    Raises:
        ValueError: for grid entries or ``max_timestep`` outside the schedule.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        label_key: str = "class_label",
        image_key: str = "image",
        timestep_grid: Sequence[int] | None = None,
        max_timestep: int | None = None,
        seed: int = 0,
    ) -> None:
        num_t = int(scheduler.num_train_timesteps)
        if timestep_grid is not None and not all(0 <= int(t) < num_t for t in timestep_grid):
            raise ValueError(f"timestep_grid entries must be in [0, {num_t}), got {list(timestep_grid)}")
        if max_timestep is not None and not 1 <= max_timestep <= num_t:
            raise ValueError(f"max_timestep must be in [1, {num_t}], got {max_timestep}")
        self.scheduler = scheduler
        self.label_key, self.image_key = label_key, image_key
        self.grid = None if timestep_grid is None else [int(t) for t in timestep_grid]
        self.max_timestep = max_timestep
        self.seed = seed

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        """Noise the batch and return the classifier's inputs.

        Args:
            batchdata: a collated batch with the image and class keys.
            device: target device.
            non_blocking: passed to ``Tensor.to``.
            kwargs: further ``Tensor.to`` arguments.

        Returns:
            ``(x_t, labels, (), {"timesteps": t})``.

        Raises:
            KeyError: naming the missing key when the batch has no class labels.
        """
        if self.label_key not in batchdata:
            raise KeyError(f"batch has no {self.label_key!r} (class index); keys: {sorted(batchdata)}")
        images = _plain(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        labels = torch.as_tensor(batchdata[self.label_key]).to(device=device).long().view(-1)
        b = images.shape[0]
        if self.grid is None:
            high = self.max_timestep or int(self.scheduler.num_train_timesteps)
            t = torch.randint(0, high, (b,), device=images.device).long()
            noise = torch.randn_like(images)
        else:
            g = len(self.grid)
            images = images.repeat(g, *([1] * (images.ndim - 1)))
            labels = labels.repeat(g)
            t = torch.tensor(self.grid, device=images.device).long().repeat_interleave(b)
            gen = torch.Generator(device=images.device).manual_seed(self.seed)
            noise = torch.randn(images.shape, generator=gen, device=images.device, dtype=images.dtype)
        return self.scheduler.add_noise(images, noise, t), labels, (), {"timesteps": t}


def _grid_chunk(j: int, g: int) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    def transform(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pred, label = output["pred"], output["label"]
        b = pred.shape[0] // g
        return pred[j * b : (j + 1) * b], label[j * b : (j + 1) * b]

    return transform


def timestep_accuracy_metrics(timestep_grid: Sequence[int], prefix: str = "val_acc_t") -> dict[str, Any]:
    """Ignite accuracy metrics per timestep of a :class:`NoisyClassifierPrepareBatch` validation grid.

    For ``additional_metrics`` of a ``SupervisedEvaluator`` with ``decollate=False``: the metric of grid entry
    ``j`` scores the ``j``-th block of rows of each batch, i.e. the images noised to ``timestep_grid[j]``.

    Args:
        timestep_grid: the validation grid, in the prepare-batch's order.
        prefix: metric-name prefix; names are ``<prefix><t>``.

    Returns:
        ``{name: ignite.metrics.Accuracy}``.
    """
    from ignite.metrics import Accuracy

    g = len(timestep_grid)
    return {
        f"{prefix}{int(t)}": Accuracy(output_transform=_grid_chunk(j, g)) for j, t in enumerate(timestep_grid)
    }


def save_class_names(path: str | Path, datalist: str | Path | Mapping, healthy_index: int) -> list[str]:
    """Check the healthy index against the datalist and record the classifier's class order beside its weights.

    Evaluation and inference check their ``healthy_index`` against this file (``{"labels": [...],
    "healthy_index": i}``) with :func:`check_healthy_index`, so a classifier is never guided with an index from
    another label order, even where no datalist is at hand.

    Args:
        path: the JSON file to write (atomically), e.g. ``<ckpt_dir>/classifier_labels.json``.
        datalist: the training datalist whose ``labels`` fix the class order.
        healthy_index: the configured healthy index (checked first).

    Returns:
        The class names.

    Raises:
        ValueError: if the index does not point at "healthy" in the datalist.
    """

    names = check_healthy_index(datalist, healthy_index)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path, json.dumps({"labels": names, "healthy_index": int(healthy_index)}, indent=1) + "\n"
    )
    return names


def _frames(chain: Sequence[torch.Tensor], n: int) -> list[int]:
    """At most ``n`` indices spread over a chain, always with its first and last entry."""
    if len(chain) <= n:
        return list(range(len(chain)))
    return sorted({round(i * (len(chain) - 1) / (n - 1)) for i in range(n)})


class GuidedChainFigureHandler:
    """Figures of the guided-DDIM mechanism for a few pathological test slices (as in seed 002's README).

    For each of the first ``max_subjects`` volumes with a lesion, the slice with the largest lesion area is
    encoded and decoded again at ``setting`` with every intermediate step recorded, and written to
    ``<output_dir>/figures/``:

    * ``chain_<subject>.png``: the noising chain (DDIM encoding), the guided denoising chain, and the classifier
      gradient ``grad_x log p(healthy | x_t, t)`` at every decoding step, with ``p(healthy)`` in the titles; a
      last row shows the image, the reconstruction and ``|x - x_hat|`` with the lesion outline;
    * ``chain_<subject>.gif``: the whole reconstruction (encoding, then decoding: ``2k + 1`` frames) as an
      animation.

    Args:
        inferer: the :class:`GuidedDDIMInferer` of the evaluation.
        output_dir: the evaluation output folder.
        setting: the ``(L, s)`` setting to draw (a name such as ``"L500_s10"`` or an ``L``).
        image_size: the network input size (the slice is brought to it as the volume inferer does).
        slice_axis: the slicing axis.
        max_subjects: how many pathological volumes to draw.
        max_frames: columns per chain in the PNG (the GIF has every step).
        image_key, label_key: batch keys.
    """

    def __init__(
        self,
        inferer: GuidedDDIMInferer,
        output_dir: str | Path,
        setting: int | str | None = None,
        image_size: int = 64,
        slice_axis: int = 2,
        max_subjects: int = 2,
        max_frames: int = 6,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        self.inferer = inferer
        self.output_dir = Path(output_dir) / "figures"
        self.setting = setting
        self.image_size = int(image_size)
        self.axis = int(slice_axis)
        self.max_subjects = int(max_subjects)
        self.max_frames = max(int(max_frames), 2)
        self.image_key, self.label_key = image_key, label_key
        self.written: list[Path] = []
        self._drawn = 0

    def attach(self, engine: Any) -> None:
        """Register with an Ignite engine.

        Args:
            engine: the test-set evaluator (its ``network`` is the diffusion UNet).
        """
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._draw)

    def _draw(self, engine: Any) -> None:
        from engines.anomaly import to_model_size

        if self._drawn >= self.max_subjects:
            return
        batch = engine.state.batch
        if self.label_key not in batch:
            return
        lesion = torch.as_tensor(batch[self.label_key])[0, 0] > 0  # (X, Y, Z)
        if not lesion.any():
            return
        in_plane = tuple(a for a in range(3) if a != self.axis)
        k = int(lesion.sum(dim=in_plane).argmax())
        image = _plain(torch.as_tensor(batch[self.image_key]))[0]  # (C, X, Y, Z)
        device = next(engine.network.parameters()).device
        x = to_model_size(
            torch.movedim(image, self.axis + 1, 0)[k : k + 1].float().to(device), self.image_size
        )
        les = to_model_size(
            torch.movedim(lesion[None].float(), self.axis + 1, 0)[k : k + 1].to(device),
            self.image_size,
            "nearest",
        )
        out = self.inferer.reconstruct(x, engine.network, t_start=self.setting, record=True)
        subject = str(_first_value(batch.get("subject", f"volume{engine.state.iteration:04d}")))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.written.append(self._png(subject, k, x, les, out))
        self.written.append(self._gif(subject, out))
        self._drawn += 1

    def _title(self) -> str:
        level, scale = self.inferer.setting(self.setting)
        return f"L={level}, s={scale:g}, k={len(self.inferer.timesteps(level)) - 1} DDIM steps"

    def _png(self, subject: str, k: int, x: torch.Tensor, lesion: torch.Tensor, out: dict[str, Any]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        taus = out["timesteps"]
        enc, dec, grads, ps = out["encode_chain"], out["decode_chain"], out["gradients"], out["p_healthy"]
        cols = self.max_frames
        fig, axes = plt.subplots(4, cols, figsize=(1.7 * cols, 7.4), squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()

        def show(ax: Any, a: torch.Tensor, title: str, cmap: str = "gray", **kw: Any) -> None:
            ax.imshow(a[0, 0].detach().cpu().numpy().T, origin="lower", cmap=cmap, **kw)
            ax.set_title(title, fontsize=7)

        for j, i in enumerate(_frames(enc, cols)):
            show(axes[0, j], enc[i], f"encode t={taus[i] + 1}")
        rev = taus[::-1]
        for j, i in enumerate(_frames(dec, cols)):
            show(axes[1, j], dec[i], f"decode t={rev[i] + 1}")
        for j, i in enumerate(_frames(grads, cols)):
            g = grads[i].abs()
            show(axes[2, j], g, f"|grad| t={rev[i] + 1}\np(healthy)={float(ps[i][0]):.2f}", cmap="magma")
        recon = out["recon"]
        diff = (x - recon).abs()
        # the image and its reconstruction share the data-range window; chain frames are windowed each on its own
        # (x_t leaves the data range as noise is added)
        lo, hi = (-1.0, 1.0) if self.inferer.clip_range is None else self.inferer.clip_range
        show(axes[3, 0], x, "image", vmin=lo, vmax=hi)
        show(axes[3, 1], recon, "reconstruction", vmin=lo, vmax=hi)
        show(axes[3, 2], diff, "|x - x_hat|", cmap="hot")
        for ax in axes[3, :3]:
            ax.contour(lesion[0, 0].cpu().numpy().T, [0.5], colors="cyan", linewidths=0.6)
        axes[0, 0].text(
            -0.25, 0.5, "noising", transform=axes[0, 0].transAxes, rotation=90, va="center", fontsize=8
        )
        fig.suptitle(f"{subject}, slice {k}: {self._title()}", fontsize=9)
        fig.tight_layout()
        path = self.output_dir / f"chain_{subject}.png"
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)
        return path

    def _gif(self, subject: str, out: dict[str, Any]) -> Path:
        import numpy as np
        from PIL import Image

        # x_L ends the encoding and starts the decoding: one frame
        frames = [*out["encode_chain"], *out["decode_chain"][1:]]
        # one shared intensity window (the data range) so brightness changes are real, not rescaling
        lo, hi = (-1.0, 1.0) if self.inferer.clip_range is None else self.inferer.clip_range
        scale = max(1, 256 // max(frames[0].shape[-2:]))
        images = []
        for f in frames:
            a = f[0, 0].detach().cpu().float().numpy().T[::-1]  # RAS: anterior up
            a = np.clip((a - lo) / (hi - lo), 0, 1)
            img = Image.fromarray((a * 255).astype(np.uint8))
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
            # a progress strip under the image (encoding fills it, decoding empties it) shows where in the chain
            # a frame is; it also keeps GIF writers from merging two frames that look alike
            strip = np.zeros((6, img.width), np.uint8)
            i = len(images)
            n_enc = len(out["encode_chain"]) - 1
            filled = i if i <= n_enc else 2 * n_enc - i
            strip[1:5, : round(img.width * filled / max(n_enc, 1))] = 200
            images.append(Image.fromarray(np.vstack([np.asarray(img), strip])))
        path = self.output_dir / f"chain_{subject}.gif"
        with atomic_path(path, ".gif") as tmp:
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=250, loop=0)
        return path


def _first_value(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x
