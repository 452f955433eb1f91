"""The noise-aware classifier: MONAI's DiffusionModelEncoder body with a pooled head."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

from networks import NoiseAwareClassifier

KW = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 3,
    "input_shape": (32, 32),
    "num_res_blocks": 1,
    "channels": (8, 16, 16),
    "attention_levels": (False, False, False),
    "norm_num_groups": 4,
    "num_head_channels": 8,
}


def test_flatten_is_monais_encoder() -> None:
    torch.manual_seed(0)
    ref = DiffusionModelEncoder(**KW).eval()
    ours = NoiseAwareClassifier(pooling="flatten", **KW).eval()
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 700])
    torch.testing.assert_close(ours(x, t), ref(x, t))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooled_head_is_small_uses_t_and_the_image(pooling: str) -> None:
    torch.manual_seed(0)
    ours = NoiseAwareClassifier(pooling=pooling, **KW).eval()
    flat = NoiseAwareClassifier(pooling="flatten", **KW)
    head = sum(p.numel() for p in ours.out.parameters())
    assert head == 2 * 16 + 16 * 3 + 3, "GroupNorm (scale, shift) + one Linear(C, classes)"
    assert sum(p.numel() for p in flat.out.parameters()) > 50 * head
    # MONAI zero-initialises the last convolution of every residual block (the timestep enters there), so an
    # untrained network ignores t: give every weight a random value first
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(2, 1, 32, 32)
    out = ours(x, torch.tensor([0, 0]))
    assert out.shape == (2, 3)
    assert not torch.allclose(out, ours(x, torch.tensor([900, 900])), atol=1e-5), "conditioned on t"
    assert not torch.allclose(out[0], out[1], atol=1e-5), "depends on the image"
    with pytest.raises(ValueError, match="pooling"):
        NoiseAwareClassifier(pooling="attention", **KW)


def test_three_dimensional_inputs() -> None:
    kw = {**KW, "spatial_dims": 3, "input_shape": (16, 16, 8)}
    out = NoiseAwareClassifier(**kw)(torch.randn(1, 1, 16, 16, 8), torch.tensor([5]))
    assert out.shape == (1, 3)
