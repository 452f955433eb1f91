"""Explanation maps for the 2D slice classifiers, drawn as PNG artifacts for a fixed set of test slices.

* :func:`shap_maps`: SHAP values by expected gradients (``shap.GradientExplainer``), signed, with the
  input's shape; they add up to ``f(x) - E[f(background)]`` for the explained class.
* :func:`gradcam_maps`: Grad-CAM of a named layer (``monai.visualize.GradCAM``), in ``[0, 1]``.
* :func:`occlusion_maps`: occlusion sensitivity (``monai.visualize.OcclusionSensitivity``): how much
  the explained class's probability drops when a patch around each pixel is hidden.
* :func:`save_explanation_figure`: one row per slice (the slice, then every map), written atomically.
* :func:`explain_fixed_slices`: all of the above for several models on slices the caller fixes,
  written to ``<out_dir>/explanations/<model>_<id>.png``.

Classifiers take ``(B, 1, H, W)`` (any channel count works) and return logits ``(B, K)``. Every
function puts the model in eval mode and gives every submodule its own mode back afterwards, and none
of them writes into the parameters' ``.grad`` (a model being trained can be explained in between).

``shap`` is imported inside :func:`shap_maps` only: importing it takes seconds, and ``import engines``
must stay fast for the bundles that never explain anything.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from data_prep.atomic import atomic_write_bytes

__all__ = [
    "explain_fixed_slices",
    "gradcam_maps",
    "occlusion_maps",
    "save_explanation_figure",
    "shap_maps",
]

Target = int | Sequence[int] | torch.Tensor | None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    # Record every submodule's own flag: ``model.train()`` afterwards would also switch submodules the
    # caller keeps in eval on purpose (frozen BatchNorm), which MONAI's ``eval_mode`` does.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _numpy_rng_preserved() -> Iterator[None]:
    # shap seeds and draws from numpy's *global* generator; the caller's random stream (e.g. a
    # training loop's augmentation) must not depend on whether an explanation was drawn in between.
    state = np.random.get_state()  # noqa: NPY002 (the legacy global state is what shap uses)
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else fallback


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")


def _targets(model: nn.Module, images: torch.Tensor, target: Target) -> torch.Tensor:
    """The class to explain for every image: ``target`` as given, or the predicted class."""
    with torch.no_grad():
        logits = model(images)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, K), got {tuple(logits.shape)}")
    b, k = logits.shape
    if target is None:
        return logits.argmax(1).cpu()
    t = torch.as_tensor(target, dtype=torch.long).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"target has {t.numel()} entries for {b} images")
    if (t < 0).any() or (t >= k).any():
        raise ValueError(f"target classes must lie in [0, {k}), got {t.tolist()}")
    return t.clone()


class _TargetLogit(nn.Module):
    """One logit of a classifier as a ``(N, 1)`` output, so shap computes one class instead of all K.

    ``zero_grad`` is a no-op: shap's torch backend calls ``model.zero_grad()`` before each gradient,
    which would wipe the ``.grad`` a training loop accumulated in the wrapped model. shap itself only
    needs gradients with respect to the inputs (``torch.autograd.grad``), never the parameters'.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.index : self.index + 1]

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def shap_maps(
    model: nn.Module,
    images: torch.Tensor,
    background: torch.Tensor,
    target: Target = None,
    nsamples: int = 50,
    batch_size: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """SHAP values of the target class's logit by expected gradients (``shap.GradientExplainer``).

    For each image ``x`` the attribution is the mean over ``nsamples`` draws of a reference ``x'``
    from ``background`` and a point ``t ~ U(0, 1)`` of ``(x - x') * ∇f(x' + t (x - x'))``; it sums to
    ``f(x) - E[f(background)]`` up to sampling (completeness). For a linear model the gradient is
    constant, so the map is exactly ``w * (x - mean of the drawn references)``: exact for any
    ``nsamples`` when the background is one image.

    ``shap.DeepExplainer`` is not used: its DeepLIFT rules are attached to the network's modules by
    hooks, so a ReLU *module* called twice (MONAI's and torchvision's ResNets reuse ``self.relu``) gets
    the rule of the wrong call and the values no longer add up, and an in-place ReLU makes its hooks
    raise. Expected gradients only needs ``autograd``, so any differentiable network works.

    Each image is explained on its own with the same ``seed``, so a slice's map does not depend on the
    other slices of the batch, and the same call gives identical maps.

    Args:
        model: a classifier returning logits ``(B, K)``.
        images: ``(B, C, H, W)`` slices to explain (on the model's device or moved there; float32).
        background: ``(N, C, H, W)`` reference slices (e.g. a few dozen training slices); their mean
            output is the baseline the attributions explain the difference from.
        target: the class to explain: one index for all images, one per image, or ``None`` for the
            predicted class.
        nsamples: reference/interpolation draws per image (one gradient each).
        batch_size: draws per forward/backward pass.
        seed: seed of the draws.

    Returns:
        ``(B, C, H, W)`` float32 attributions (signed) on the images' device.

    Raises:
        ValueError: for inputs that are not ``(B, C, H, W)``, mismatched background, or bad targets.
        RuntimeError: if the installed shap returns an unexpected layout.
    """
    with warnings.catch_warnings():
        # shap's plotting colours call matplotlib APIs that matplotlib 3.11 marks for deprecation
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning, module=r"shap\.")
        import shap

    _check_images(images)
    if background.ndim != 4 or background.shape[1:] != images.shape[1:]:
        raise ValueError(
            f"background {tuple(background.shape)} must be (N, {', '.join(map(str, images.shape[1:]))})"
        )
    device = _device_of(model, images.device)
    # shap allocates its interpolation buffer with torch's default dtype (float32)
    x = images.detach().to(device=device, dtype=torch.float32)
    bg = background.detach().to(device=device, dtype=torch.float32)
    out = torch.empty(x.shape, dtype=torch.float32)
    with _eval_mode(model), _numpy_rng_preserved():
        targets = _targets(model, x, target)
        head = _TargetLogit(model)
        with torch.no_grad():  # the explainer's constructor runs the background once, only for shapes
            explainer = shap.GradientExplainer(head, bg, batch_size=batch_size)
        with torch.enable_grad():  # also when called from an evaluator running under no_grad
            for i in range(x.shape[0]):
                head.index = int(targets[i])
                phi = np.asarray(explainer.shap_values(x[i : i + 1], nsamples=nsamples, rseed=seed))
                # shap 0.46-0.51 stack the classes on a trailing axis: (1, C, H, W, n_outputs);
                # with the one-logit head that is (1, C, H, W, 1)
                if phi.shape != (1, *x.shape[1:], 1):
                    raise RuntimeError(
                        f"unexpected shap output shape {phi.shape}, expected {(1, *x.shape[1:], 1)}"
                    )
                out[i] = torch.from_numpy(phi[0, ..., 0].astype(np.float32))
    return out.to(images.device)


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    # per image: min -> 0, max -> 1 (a flat map -> 0). MONAI's default_normalizer maps max -> 0,
    # i.e. it flips the map, which is not what a heat map over the image should show.
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, *[1] * (x.ndim - 1))
    hi = flat.amax(1).view(-1, *[1] * (x.ndim - 1))
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def gradcam_maps(
    model: nn.Module, images: torch.Tensor, target_layer: str, target: Target = None
) -> torch.Tensor:
    """Grad-CAM of ``target_layer`` for the target class (``monai.visualize.GradCAM``).

    GradCAM runs on a deep copy of the model, because MONAI 1.6.1's ``GradCAM`` registers forward and
    backward hooks it never removes, sets ``inplace=False`` on the target layer, and calls
    ``zero_grad()`` and ``backward()`` on the network (wiping and then filling the parameters'
    ``.grad``). In the copy, every module's ``inplace`` flag is switched off as well: an in-place op
    right after the hooked layer (``conv -> ReLU(inplace=True)``) would modify the output of the
    backward hook's autograd function, which torch refuses. In-place ops called as functions in
    ``forward`` (``x.relu_()``) cannot be switched off this way.

    Images are grouped by target class and each group gets an integer ``class_idx``: with a tensor of
    per-image classes (its own default), MONAI indexes ``logits[:, classes]`` and back-propagates the sum
    of all B x B entries, mixing the classes of different images.

    Args:
        model: a classifier returning logits ``(B, K)``.
        images: ``(B, C, H, W)``.
        target_layer: the name of a layer in ``model.named_modules()`` (e.g. ``"layer4"``).
        target: the class to explain (one, one per image, or ``None`` for the predicted class).

    Returns:
        ``(B, 1, H, W)`` maps in ``[0, 1]`` (each image min-max scaled; a flat map is 0).

    Raises:
        ValueError: for a layer name not in the model, or bad inputs/targets.
    """
    from monai.visualize import GradCAM

    _check_images(images)
    if target_layer not in dict(model.named_modules()):
        raise ValueError(f"no layer named {target_layer!r} in the model")
    device = _device_of(model, images.device)
    x = images.detach().to(device)
    with _eval_mode(model):
        targets = _targets(model, x, target)
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.grad = None  # the copy's backward fills these; start empty instead of from the caller's
    for m in work.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False
    cam = GradCAM(nn_module=work, target_layers=target_layer, postprocessing=_unit_range)
    out = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32)
    with torch.enable_grad(), warnings.catch_warnings():
        # a first-layer target has no input that requires grad; the output gradients it needs still come
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for k in torch.unique(targets).tolist():
            idx = torch.nonzero(targets == k).flatten()
            maps = cam(x[idx.to(device)], class_idx=int(k))
            out[idx] = maps.detach().float().cpu()
    return out.to(images.device)


def _activate(logits: torch.Tensor) -> torch.Tensor:
    # MONAI 1.6.1's ``activate=True`` picks sigmoid vs softmax by the *input's* channel count, so a
    # single-channel MRI slice gets an independent sigmoid per logit; decide by the output instead.
    return logits.softmax(1) if logits.shape[1] > 1 else logits.sigmoid()


def occlusion_maps(
    model: nn.Module,
    images: torch.Tensor,
    mask_size: int = 8,
    overlap: float = 0.5,
    target: Target = None,
    mode: str | float = "gaussian",
    n_batch: int = 16,
) -> torch.Tensor:
    """Occlusion sensitivity (``monai.visualize.OcclusionSensitivity``) for the target class.

    MONAI slides a ``mask_size`` patch over the image and records the class probabilities with the
    patch hidden; in 1.6.1 it takes one image at a time and returns ``(1, K, H, W)`` (classes on the
    channel axis, not on a trailing axis as its docstring says). This returns the *drop* of the target
    class's probability, ``p(x) - p(x with the patch around the pixel hidden)``, so the regions the
    decision rests on are positive.

    Args:
        model: a classifier returning logits ``(B, K)``.
        images: ``(B, C, H, W)``; every spatial size must be at least ``mask_size``.
        mask_size: the side of the occluding patch.
        overlap: overlap of neighbouring patches (sliding-window overlap, in ``[0, 1)``).
        target: the class to explain (one, one per image, or ``None`` for the predicted class).
        mode: MONAI's occlusion mode: ``"gaussian"`` (multiply the patch by 1 - a Gaussian, i.e. fade
            it to 0, the background of the normalised slices), ``"mean_patch"``, ``"mean_img"`` or a
            constant value.
        n_batch: occluded copies per forward pass.

    Returns:
        ``(B, 1, H, W)`` probability drops in ``[-1, 1]``.

    Raises:
        ValueError: for bad inputs/targets or a mask larger than the image.
    """
    from monai.visualize import OcclusionSensitivity

    _check_images(images)
    if any(s < mask_size for s in images.shape[2:]):
        raise ValueError(f"mask_size {mask_size} exceeds the image size {tuple(images.shape[2:])}")
    device = _device_of(model, images.device)
    x = images.detach().to(device)
    out = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32)
    with _eval_mode(model):
        targets = _targets(model, x, target)
        occ = OcclusionSensitivity(
            model,
            mask_size=mask_size,
            n_batch=n_batch,
            verbose=False,
            mode=mode,
            overlap=overlap,
            activate=_activate,
        )
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI 1.6.1 indexes with lists of slices, which torch warns about on every patch
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            for i in range(x.shape[0]):
                k = int(targets[i])
                p = _activate(model(x[i : i + 1]))[0, k]
                sens, _ = occ(x[i : i + 1])
                sens = sens.as_tensor() if hasattr(sens, "as_tensor") else sens  # MetaTensor -> Tensor
                out[i, 0] = (p - sens[0, k]).float().cpu()
    return out.to(images.device)


def _plane(a: Any) -> np.ndarray:
    """A 2D array from ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``."""
    arr = np.asarray(a.detach().cpu().float() if isinstance(a, torch.Tensor) else a, dtype=np.float32)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected one single-channel 2D image, got shape {np.shape(a)}")
    return arr


def save_explanation_figure(
    path: str | os.PathLike,
    image: torch.Tensor | np.ndarray,
    maps: Mapping[str, torch.Tensor | np.ndarray],
    title: str = "",
    signed: Sequence[str] | None = None,
    ras: bool = True,
) -> Path:
    """Draw one row: the slice, then every map; write the PNG atomically (temporary file, then rename).

    Signed maps (SHAP) are drawn alone with a diverging colormap centred at 0 (red: towards the
    class, blue: against it), scaled to their 99.5th percentile of ``|value|``. The other maps
    (Grad-CAM, occlusion) are clipped at 0, scaled to their maximum and blended over the slice with
    ``monai.visualize.blend_images``, with an opacity that grows with the map.

    Args:
        path: the PNG to write (folders are created).
        image: the slice, ``(H, W)`` or ``(1, H, W)``.
        maps: panel title -> map of the slice's shape, drawn in the given order.
        title: the figure title.
        signed: the names of the signed maps; by default those whose name contains ``"shap"``.
        ras: slices of RAS volumes (the bundles' convention): drawn transposed with the origin at the
            bottom, as the other figures of the project; ``False`` draws the array as stored.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: for a map whose shape differs from the image's.
    """
    # A bare Figure (no pyplot) draws with Agg, leaves no global figure behind and needs no backend switch.
    from matplotlib.figure import Figure
    from monai.visualize import blend_images

    path = Path(path)
    img = _plane(image)
    planes = {name: _plane(m) for name, m in maps.items()}
    for name, m in planes.items():
        if m.shape != img.shape:
            raise ValueError(f"map {name!r} has shape {m.shape}, the image {img.shape}")
    signed_names = {n for n in planes if "shap" in n.lower()} if signed is None else set(signed)
    lo, hi = float(img.min()), float(img.max())
    img01 = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)

    def show(a: np.ndarray) -> np.ndarray:
        # swap the two spatial axes only (an RGB panel keeps its colour axis last)
        return np.swapaxes(a, 0, 1) if ras else a

    origin = "lower" if ras else "upper"
    n = 1 + len(planes)
    fig = Figure(figsize=(2.2 * n, 2.6))
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(show(img), cmap="gray", origin=origin)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, m) in zip(axes[1:], planes.items(), strict=True):
        if name in signed_names:
            lim = float(np.percentile(np.abs(m), 99.5)) or float(np.abs(m).max()) or 1.0
            ax.imshow(show(m), cmap="RdBu_r", vmin=-lim, vmax=lim, origin=origin)
            ax.set_title(f"{name} (±{lim:.2g})", fontsize=8)
        else:
            top = float(m.max())
            heat = np.clip(m, 0, None) / top if top > 0 else np.zeros_like(m)
            # opacity follows the map, so near-zero values (float noise of an occlusion drop) leave the
            # slice visible instead of tinting it with the colormap's low end
            blended = blend_images(
                img01[None], heat[None], alpha=0.7 * heat[None], cmap="jet", rescale_arrays=False
            )
            ax.imshow(show(np.moveaxis(np.asarray(blended), 0, -1)), origin=origin)
            ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(path, buf.getvalue())
    return path


def explain_fixed_slices(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    background: torch.Tensor,
    out_dir: str | os.PathLike,
    ids: Sequence[str],
    gradcam_layers: Mapping[str, str] | None = None,
    nsamples: int = 50,
    seed: int = 0,
    mask_size: int = 8,
    overlap: float = 0.5,
    explain: Literal["pred", "label"] = "pred",
    shap_models: Collection[str] | None = None,
) -> list[Path]:
    """Explanation figures of every model on the same fixed slices.

    A plain function rather than an Ignite handler: the slices are a fixed set the caller chooses (not
    the evaluator's stream of batches), and the figures are drawn once per trained model, so there is
    no engine state to follow; an evaluator's ``COMPLETED`` event can still call it.

    Every model gets SHAP (expected gradients) and occlusion maps, and a Grad-CAM map where
    ``gradcam_layers`` names a layer for it. Maps depend only on the slices, the background and
    ``seed``, so re-running on the same checkpoints gives the same figures.

    Args:
        models: name -> classifier (logits ``(B, K)``).
        images: ``(B, C, H, W)`` the slices to explain.
        labels: ``B`` true classes (shown in the titles; explained with ``explain="label"``).
        background: ``(N, C, H, W)`` SHAP reference slices.
        out_dir: the run's output folder; figures go to ``<out_dir>/explanations/``.
        ids: ``B`` unique names of the slices (e.g. ``"sub-01_z080"``), used in the file names.
        gradcam_layers: model name -> Grad-CAM target layer; models not named get no Grad-CAM.
        nsamples: SHAP draws per slice.
        seed: SHAP seed.
        mask_size: occlusion patch size.
        overlap: occlusion patch overlap.
        explain: ``"pred"``: explain each model's predicted class; ``"label"``: the true class.
        shap_models: the models that get SHAP maps (``None``: all). SHAP needs gradients with respect to the
            input; a model with a non-differentiable stage (the hybrid pipeline's DDIM clean-up runs under
            ``no_grad``) gets occlusion (and Grad-CAM) only.

    Returns:
        The written PNGs, ``<out_dir>/explanations/<model>_<id>.png``, model by model in ``ids`` order.

    Raises:
        ValueError: for mismatched lengths, duplicate ids, names with path separators, or unknown
            ``gradcam_layers`` keys.
    """
    _check_images(images)
    n = images.shape[0]
    y = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    ids = [str(i) for i in ids]
    if len(ids) != n or y.numel() != n:
        raise ValueError(f"{n} images need {n} labels and ids, got {y.numel()} and {len(ids)}")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique (they name the files)")
    names = [*models, *ids]
    if any(os.sep in s or "/" in s for s in names):
        raise ValueError("model names and ids must not contain path separators")
    layers = dict(gradcam_layers or {})
    if unknown := set(layers) - set(models):
        raise ValueError(f"gradcam_layers names unknown models: {sorted(unknown)}")
    if shap_models is not None and (unknown := set(shap_models) - set(models)):
        raise ValueError(f"shap_models names unknown models: {sorted(unknown)}")
    if explain not in ("pred", "label"):
        raise ValueError(f"explain must be 'pred' or 'label', got {explain!r}")
    folder = Path(out_dir) / "explanations"
    written: list[Path] = []
    for name, model in models.items():
        device = _device_of(model, images.device)
        x = images.to(device)
        with _eval_mode(model), torch.no_grad():
            pred = model(x).argmax(1).cpu()
        target = pred if explain == "pred" else y
        maps = {}
        if shap_models is None or name in shap_models:
            maps["SHAP"] = shap_maps(model, x, background, target=target, nsamples=nsamples, seed=seed).cpu()
        maps["occlusion"] = occlusion_maps(
            model, x, mask_size=mask_size, overlap=overlap, target=target
        ).cpu()
        if name in layers:
            maps["Grad-CAM"] = gradcam_maps(model, x, layers[name], target=target).cpu()
        for i, sid in enumerate(ids):
            title = f"{name} | {sid} | label {int(y[i])}, pred {int(pred[i])}, explained {int(target[i])}"
            written.append(
                save_explanation_figure(
                    folder / f"{name}_{sid}.png",
                    images[i, 0],
                    # SHAP of a multi-channel input: the channels' attributions add up per pixel
                    {k: v[i].sum(0) for k, v in maps.items()},
                    title=title,
                )
            )
    return written
