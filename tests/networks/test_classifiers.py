"""The tumour-classification networks: shapes, attention maps, fine-tuning from a local file, training signal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from monai.networks.nets import resnet50
from torch import nn

from engines.checkpoint import UnsafeCheckpointError
from networks import AttentionCNN, LatentMLPHead, LatentResNetHead, SimpleCNN, resnet50_classifier

SMALL = {"channels": (4, 8, 8), "dropout": 0.0}


class _Payload:
    """A pickled object (not a tensor): loading it would run code, so the file must be refused."""


IMAGE_NETS: dict[str, Callable[[int], nn.Module]] = {
    "simple": lambda k: SimpleCNN(num_classes=k, **SMALL),
    "attention": lambda k: AttentionCNN(num_classes=k, **SMALL),
    "resnet50": lambda k: resnet50_classifier(num_classes=k),
}
LATENT_NETS: dict[str, Callable[[int], nn.Module]] = {
    "latent_mlp": lambda k: LatentMLPHead((4, 16, 16), num_classes=k, hidden=(32,), dropout=0.0),
    "latent_resnet": lambda k: LatentResNetHead(4, num_classes=k, channels=(8, 16), dropout=0.0),
}


def _inputs(name: str, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16) if name.startswith("latent") else torch.randn(batch, 1, 32, 32)


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("name", [*IMAGE_NETS, *LATENT_NETS])
def test_logit_shapes(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    net = {**IMAGE_NETS, **LATENT_NETS}[name](num_classes).eval()
    x = _inputs(name, batch=3)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]), "logits depend on the input"


def test_simple_cnn_pools_globally_and_rejects_bad_strides() -> None:
    torch.manual_seed(0)
    net = SimpleCNN(**SMALL).eval()
    with torch.no_grad():
        # global average pooling: any input size works and the default strides (1, 2, 2) give a 1/4 map
        assert net.features(torch.randn(1, 1, 64, 64)).shape == (1, 8, 16, 16)
        assert net(torch.randn(2, 1, 40, 56)).shape == (2, 2)
    with pytest.raises(ValueError, match="strides"):
        SimpleCNN(channels=(4, 8), strides=(2, 2, 2))


def test_attention_maps_are_distributions_at_the_input_size() -> None:
    torch.manual_seed(0)
    net = AttentionCNN(num_classes=4, **SMALL).eval()
    with torch.no_grad():
        # a non-uniform map (the 1x1 convolution starts at zero, i.e. uniform)
        net.attention.weight.normal_(0.0, 1.0)
        for size in [(32, 32), (30, 22)]:
            x = torch.randn(3, 1, *size)
            logits, maps = net(x, return_attention=True)
            assert logits.shape == (3, 4)
            assert maps.shape == (3, 1, *size)
            assert (maps >= 0).all()
            torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), torch.ones(3))
            assert maps.flatten(1).std(-1).min() > 0, "not uniform once the attention has weights"
            torch.testing.assert_close(net.attention_map(x), maps)
            # the stored map is at feature resolution, detached, a distribution per image
            stored = net.last_attention
            assert stored is not None and not stored.requires_grad
            assert stored.shape == (3, 1, *net.features(x).shape[2:])
            torch.testing.assert_close(stored.sum(dim=(1, 2, 3)), torch.ones(3))


def test_attention_weights_the_pooled_features() -> None:
    torch.manual_seed(0)
    # train mode (no dropout here): batch statistics give features of order 1, so the weighting matters
    net = AttentionCNN(num_classes=4, **SMALL).train()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        net.attention.weight.normal_(0.0, 1.0)
        feats = net.features(x)
        att = torch.softmax(net.attention(feats).flatten(2), dim=-1)  # (B, 1, N)
        pooled = (feats.flatten(2) * att).sum(-1)
        torch.testing.assert_close(net(x), net.head(pooled))
        assert (pooled - feats.flatten(2).mean(-1)).abs().max() > 0.1, "not the plain average"


def test_untrained_attention_is_the_simple_cnn() -> None:
    torch.manual_seed(0)
    simple = SimpleCNN(num_classes=3, **SMALL).eval()
    att = AttentionCNN(num_classes=3, **SMALL).eval()
    missing, unexpected = att.load_state_dict(simple.state_dict(), strict=False)
    assert sorted(missing) == ["attention.bias", "attention.weight"] and not unexpected
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(att(x), simple(x))
        torch.testing.assert_close(att.attention_map(x), torch.full((2, 1, 32, 32), 1 / 32**2))


def test_attention_concentrates_on_a_bright_square() -> None:
    # a hand-set network whose features are the (subsampled) image itself and whose attention scores are
    # 10 x feature: the map must put its mass on the bright square, at the right place after upsampling
    net = AttentionCNN(channels=(2, 2), strides=(1, 2), norm=None, act=None, dropout=0.0).eval()
    with torch.no_grad():
        for conv in (m for m in net.features.modules() if isinstance(m, nn.Conv2d)):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # identity on channel 0 (centre tap)
            conv.bias.zero_()
        net.attention.weight.zero_()
        net.attention.weight[0, 0] = 10.0
        x = torch.zeros(2, 1, 64, 64)
        x[0, 0, 8:24, 30:46] = 1.0
        x[1, 0, 40:56, 4:20] = 1.0
        maps = net.attention_map(x)
    # 6 % of the area; the rest of the mass is the upsampling's half-pixel blur at the square's border
    assert maps[0, 0, 8:24, 30:46].sum() > 0.9
    assert maps[1, 0, 40:56, 4:20].sum() > 0.9


@pytest.fixture(scope="module")
def rgb_imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 3-channel, 1000-class MONAI resnet50's state dict, saved as a plain state dict."""
    torch.manual_seed(123)
    state = resnet50(spatial_dims=2, n_input_channels=3, num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / "imagenet_rgb.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("layout", ["plain", "state_dict_ddp", "model"])
def test_resnet50_fine_tunes_from_rgb_weights(
    rgb_imagenet_file: tuple[Path, dict[str, torch.Tensor]],
    layout: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, state = rgb_imagenet_file
    if layout == "state_dict_ddp":
        path = tmp_path / "ddp.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, path)
    elif layout == "model":
        path = tmp_path / "wrapped.pt"
        torch.save({"model": state, "optimizer": {}}, path)
    torch.manual_seed(7)
    fresh = resnet50_classifier(num_classes=4)
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="networks.classifiers"):
        net = resnet50_classifier(num_classes=4, in_channels=1, weights_path=path)
    ours = net.state_dict()
    assert ours["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(ours["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    for name in ("fc.weight", "fc.bias"):
        assert ours[name].shape[0] == 4
        torch.testing.assert_close(ours[name], fresh.state_dict()[name], rtol=0, atol=0)
    others = [k for k in ours if k != "conv1.weight" and not k.startswith("fc.")]
    assert len(others) == len(state) - 3
    for name in others:
        torch.testing.assert_close(ours[name], state[name], rtol=0, atol=0)
    assert not torch.equal(fresh.state_dict()["layer1.0.conv1.weight"], ours["layer1.0.conv1.weight"])
    assert (
        f"{len(others)} tensors loaded, 1 adapted" in caplog.text and "2 head tensors skipped" in caplog.text
    )
    # a grey image fed as (x, x, x) to the RGB network gives the same stem response as x to ours
    rgb = nn.Conv2d(3, 64, 7, padding=3, bias=False)
    rgb.weight.data.copy_(state["conv1.weight"])
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.conv1(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_resnet50_refuses_a_pickled_object(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}, "meta": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"unsafe\.pt"):
        resnet50_classifier(num_classes=2, weights_path=path)


def test_resnet50_file_matching_nothing_or_conflicting(tmp_path: Path) -> None:
    nothing = tmp_path / "other_net.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, nothing)
    with pytest.raises(ValueError, match=r"other_net\.pt.*no tensor"):
        resnet50_classifier(num_classes=2, weights_path=nothing)
    conflict = tmp_path / "resnet18ish.pt"
    torch.save(
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)},
        conflict,
    )
    with pytest.raises(ValueError, match=r"resnet18ish\.pt.*layer1\.0\.conv1\.weight"):
        resnet50_classifier(num_classes=2, weights_path=conflict)


def test_latent_mlp_checks_the_latent_shape() -> None:
    net = LatentMLPHead((4, 16, 16), num_classes=2)
    assert net.hidden_0[0].in_features == 4 * 16 * 16
    with pytest.raises(ValueError, match=r"\(4, 16, 16\)"):
        net(torch.randn(2, 8, 8, 16))  # same number of values, other shape


@pytest.mark.parametrize("name", [*IMAGE_NETS, *LATENT_NETS])
def test_one_step_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    net = {**IMAGE_NETS, **LATENT_NETS}[name](4).train()
    x, y = _inputs(name, batch=4), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    first = next(iter(net.parameters()))
    assert first.grad.abs().sum() > 0, "the gradient reaches the first layer"
    # gradient norms differ by 10^4 between these networks (an untrained resnet50 on 4 tiny images is very
    # sharp), so one fixed learning rate overshoots some; size the step for a first-order decrease of 5 %
    sq_norm = sum(float((p.grad**2).sum()) for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.05 * loss.item() / sq_norm)
    opt.step()
    with torch.no_grad():
        # train mode again: the same batch statistics, so only the step differs
        after = nn.functional.cross_entropy(net(x), y)
    assert after < 0.98 * loss.detach(), "about the predicted 5 % decrease"
