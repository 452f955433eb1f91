"""Explanation maps (engines/explain.py): known answers of expected gradients on a linear model,
completeness on a CNN that reuses an in-place ReLU, occlusion of a model that only looks at one
quadrant, determinism, shapes and ranges, figures, and that the explained model is left as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from engines.explain import (
    explain_fixed_slices,
    gradcam_maps,
    occlusion_maps,
    save_explanation_figure,
    shap_maps,
)

H = W = 16
K = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(H * W, K))


class ReusedReLUNet(nn.Module):
    """One ``ReLU(inplace=True)`` module called after both convolutions, as MONAI's and torchvision's
    ResNets do: the layout on which DeepExplainer's per-module rules go wrong."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, K)
        with torch.no_grad():  # larger weights: outputs that vary with the input, ReLUs that switch
            for p in self.parameters():
                p.mul_(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.c1(x))
        x = self.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


class TopLeftNet(nn.Module):
    """Two logits ``±s * mean(top-left quadrant)``: nothing outside that quadrant matters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x[:, :, : x.shape[2] // 2, : x.shape[3] // 2].mean((1, 2, 3))
        return torch.stack([self.scale * q, -self.scale * q], 1)


def _bright_and_dark(n: int = 3, n_bg: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(1)
    return torch.rand(n, 1, H, W, generator=g) * 2, torch.rand(n_bg, 1, H, W, generator=g) * 0.2


# ---------------------------------------------------------------- SHAP (expected gradients)


@pytest.mark.parametrize("nsamples", [1, 7])
def test_shap_linear_single_reference_is_exact(nsamples: int) -> None:
    """f = w·x + b has a constant gradient w, so with one reference x' every draw gives w * (x - x')."""
    model = _linear()
    g = _gen(2)
    x, ref = torch.randn(4, 1, H, W, generator=g), torch.randn(1, 1, H, W, generator=g)
    target = [0, 1, 2, 1]
    phi = shap_maps(model, x, ref, target=target, nsamples=nsamples)
    assert phi.shape == x.shape
    w = model[1].weight.detach().view(K, 1, H, W)
    expected = torch.stack([w[t] * (x[i] - ref[0]) for i, t in enumerate(target)])
    torch.testing.assert_close(phi, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # completeness: the map adds up to f(x) - f(x') for the explained class
        gap = (model(x) - model(ref))[torch.arange(4), torch.tensor(target)]
    torch.testing.assert_close(phi.flatten(1).sum(1), gap, atol=1e-4, rtol=1e-4)


def test_shap_linear_background_mean_up_to_sampling() -> None:
    """With several references the map is w * (x - mean of the *drawn* references): it tends to
    w * (x - mean(background)), and sums to f(x) - mean f(background), as the draws grow."""
    model = _linear(1)
    g = _gen(3)
    x = torch.randn(2, 1, H, W, generator=g)
    bg = torch.randn(6, 1, H, W, generator=g) * 0.3 + 0.5
    phi = shap_maps(model, x, bg, target=2, nsamples=2000)
    w = model[1].weight.detach()[2].view(1, 1, H, W)
    expected = w * (x - bg.mean(0, keepdim=True))
    # reference-draw error of the mean: 0.3 / sqrt(2000) ≈ 0.007 per pixel, times |w| <= 1/16
    assert (phi - expected).abs().max() < 0.006
    with torch.no_grad():
        gap = model(x)[:, 2] - model(bg)[:, 2].mean()
    torch.testing.assert_close(phi.flatten(1).sum(1), gap, atol=0.05, rtol=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shap_completeness_with_reused_inplace_relu(seed: int) -> None:
    """Expected gradients needs only autograd, so a reused in-place ReLU does not break completeness
    (DeepExplainer raises on the in-place ReLU and is off by ~10% on this net with a non-in-place one)."""
    model = ReusedReLUNet()
    x, bg = _bright_and_dark()
    with torch.no_grad():
        gap = model(x)[:, 0] - model(bg)[:, 0].mean()
    assert gap.abs().min() > 1.0  # a gap large enough for a relative check
    phi = shap_maps(model, x, bg, target=0, nsamples=200, seed=seed)
    # Monte Carlo error at 200 draws measured at 0.2-3.5% over seeds; 10% is a wide margin
    rel = (phi.flatten(1).sum(1) - gap).abs() / gap.abs()
    assert rel.max() < 0.10, rel


def test_shap_same_seed_same_maps_and_batch_independent() -> None:
    model = ReusedReLUNet()
    x, bg = _bright_and_dark()
    a = shap_maps(model, x, bg, nsamples=20, seed=5)
    b = shap_maps(model, x, bg, nsamples=20, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, shap_maps(model, x, bg, nsamples=20, seed=6))
    # each slice is explained on its own: its map does not depend on the other slices of the batch
    assert torch.equal(a[1:2], shap_maps(model, x[1:2], bg, nsamples=20, seed=5))


def test_shap_default_target_is_predicted_class() -> None:
    model = ReusedReLUNet()
    x, bg = _bright_and_dark(n=2)
    with torch.no_grad():
        pred = model(x).argmax(1)
    other = (pred + 1) % K
    auto = shap_maps(model, x, bg, nsamples=10)
    assert torch.equal(auto, shap_maps(model, x, bg, target=pred, nsamples=10))
    assert not torch.equal(auto, shap_maps(model, x, bg, target=other, nsamples=10))


def test_shap_leaves_numpy_global_rng_alone() -> None:
    model = _linear()
    x, bg = torch.randn(1, 1, H, W), torch.randn(3, 1, H, W)
    np.random.seed(123)  # noqa: NPY002 (the global stream is what is under test)
    expected = np.random.rand(3)  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    shap_maps(model, x, bg, nsamples=5)
    assert np.array_equal(np.random.rand(3), expected)  # noqa: NPY002


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 3}, "target classes"),
        ({"target": [0, 1]}, "entries"),
        ({"background": torch.zeros(2, 1, 8, 8)}, "background"),
    ],
)
def test_shap_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"background": torch.zeros(2, 1, H, W), **kwargs}
    with pytest.raises(ValueError, match=match):
        shap_maps(_linear(), torch.zeros(3, 1, H, W), **args)


# ---------------------------------------------------------------- Grad-CAM and occlusion


def test_gradcam_shape_range_and_per_image_classes() -> None:
    model = ReusedReLUNet()
    x = torch.randn(4, 1, H, W, generator=_gen(4))
    target = torch.tensor([0, 1, 2, 0])
    cam = gradcam_maps(model, x, "c2", target=target)
    assert cam.shape == (4, 1, H, W)
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert torch.isclose(cam.flatten(1).amax(1), torch.ones(4)).all()  # each map min-max scaled
    # images with different classes in one batch: each gets its own class's map (MONAI's own
    # per-image class_idx would back-propagate the sum over all the batch's classes)
    for i in range(4):
        alone = gradcam_maps(model, x[i : i + 1], "c2", target=int(target[i]))
        torch.testing.assert_close(cam[i], alone[0], atol=1e-5, rtol=1e-4)


def test_gradcam_unknown_layer() -> None:
    with pytest.raises(ValueError, match="no layer"):
        gradcam_maps(ReusedReLUNet(), torch.zeros(1, 1, H, W), "layer4")


def test_occlusion_shape_and_range() -> None:
    model = ReusedReLUNet()
    x = torch.randn(3, 1, 32, 32, generator=_gen(5))
    occ = occlusion_maps(model, x)  # the defaults: mask 8, overlap 0.5
    assert occ.shape == (3, 1, 32, 32)
    assert occ.min() >= -1.0 and occ.max() <= 1.0
    assert occ.abs().max() > 0  # hiding patches changes the probabilities


@pytest.mark.parametrize("size", [16, 32])
def test_occlusion_mass_in_the_quadrant_the_model_looks_at(size: int) -> None:
    model = TopLeftNet()
    x = torch.rand(2, 1, size, size, generator=_gen(6)) + 0.5
    occ = occlusion_maps(model, x, mask_size=size // 4, target=0)
    pos = occ.clamp_min(0)
    half = size // 2
    frac = pos[..., :half, :half].flatten(1).sum(1) / pos.flatten(1).sum(1)
    assert (frac > 0.85).all(), frac  # the rest is patches straddling the quadrant's border
    # a patch that cannot reach the top-left quadrant changes nothing
    assert occ[..., half + size // 4 :, half + size // 4 :].abs().max() < 1e-5
    # and hiding part of what class 0 rests on lowers its probability
    assert occ[..., :half, :half].mean() > 0


def test_occlusion_rejects_mask_larger_than_image() -> None:
    with pytest.raises(ValueError, match="mask_size"):
        occlusion_maps(TopLeftNet(), torch.zeros(1, 1, 8, 8), mask_size=16)


# ---------------------------------------------------------------- the model is left as it was


def _snapshot_grads(model: nn.Module) -> list[torch.Tensor]:
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i + 1))  # a training step's accumulated gradients
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["shap", "gradcam", "occlusion"])
def test_model_mode_grads_and_hooks_untouched(method: str) -> None:
    model = ReusedReLUNet()
    model.train()
    model.c1.eval()  # a submodule the caller keeps in eval (a frozen layer): it must stay so
    grads = _snapshot_grads(model)
    params = [p.detach().clone() for p in model.parameters()]
    x, bg = _bright_and_dark(n=2)
    if method == "shap":
        shap_maps(model, x, bg, nsamples=8)
    elif method == "gradcam":
        gradcam_maps(model, x, "c2")
    else:
        occlusion_maps(model, x, mask_size=8)
    assert model.training and model.c2.training and model.fc.training
    assert not model.c1.training
    for p, g, v in zip(model.parameters(), grads, params, strict=True):
        assert p.grad is not None and torch.equal(p.grad, g)
        assert torch.equal(p.detach(), v)
    assert model.relu.inplace  # Grad-CAM's in-place switch-off happens on a copy
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks


def test_fresh_model_gets_no_grads() -> None:
    model = ReusedReLUNet()
    x, bg = _bright_and_dark(n=1)
    shap_maps(model, x, bg, nsamples=4)
    gradcam_maps(model, x, "c2")
    occlusion_maps(model, x, mask_size=8)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- figures


def test_figure_written_and_width_grows_with_maps(tmp_path: Path) -> None:
    g = _gen(7)
    image = torch.rand(1, H, W, generator=g)
    maps = {
        "SHAP": torch.randn(1, H, W, generator=g),
        "Grad-CAM": torch.rand(1, H, W, generator=g),
        "occlusion": torch.rand(1, H, W, generator=g) - 0.2,
    }
    widths = []
    for n in (1, 3):
        out = save_explanation_figure(
            tmp_path / f"fig{n}.png", image, dict(list(maps.items())[:n]), title="slice"
        )
        assert out == tmp_path / f"fig{n}.png"
        png = imread(out)
        assert png.ndim == 3 and png.shape[2] in (3, 4)
        assert png[..., :3].std() > 0  # something was drawn
        widths.append(png.shape[1])
    # 2 and 4 panels at 2.2 inches each, 80 dpi
    assert widths == [round(2 * 2.2 * 80), round(4 * 2.2 * 80)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig1.png", "fig3.png"]  # no temporary files


def test_figure_rejects_map_of_other_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        save_explanation_figure(tmp_path / "f.png", torch.zeros(H, W), {"SHAP": torch.zeros(8, 8)})
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- fixed slices, several models


def test_explain_fixed_slices_writes_every_model_and_slice(tmp_path: Path) -> None:
    models = {"cnn": ReusedReLUNet(), "quadrant": TopLeftNet()}
    x, bg = _bright_and_dark(n=2, n_bg=4)
    ids = ["sub-01_z010", "sub-02_z020"]
    kwargs = {"nsamples": 8, "mask_size": 8, "gradcam_layers": {"cnn": "c2"}}
    paths = explain_fixed_slices(models, x, [0, 1], bg, tmp_path, ids, **kwargs)
    folder = tmp_path / "explanations"
    assert paths == [folder / f"{m}_{i}.png" for m in models for i in ids]
    widths = {p.name.split("_")[0]: imread(p).shape[1] for p in paths}
    assert widths["cnn"] > widths["quadrant"]  # the Grad-CAM panel only where a layer is named
    # fixed slices, fixed seed: the same figures byte for byte
    first = [p.read_bytes() for p in paths]
    explain_fixed_slices(models, x, [0, 1], bg, tmp_path, ids, **kwargs)
    assert [p.read_bytes() for p in paths] == first


@pytest.mark.parametrize(
    ("ids", "layers", "match"),
    [
        (["a", "a"], None, "unique"),
        (["a"], None, "labels and ids"),
        (["a/b", "c"], None, "separators"),
        (["a", "b"], {"nope": "c2"}, "unknown models"),
    ],
)
def test_explain_fixed_slices_validates(
    tmp_path: Path, ids: list[str], layers: dict | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        explain_fixed_slices(
            {"cnn": ReusedReLUNet()},
            torch.zeros(2, 1, H, W),
            [0, 1],
            torch.zeros(2, 1, H, W),
            tmp_path,
            ids,
            layers,
        )
    assert not (tmp_path / "explanations").exists()


def test_import_engines_does_not_import_shap() -> None:
    import subprocess

    code = "import sys, engines; assert 'shap' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
