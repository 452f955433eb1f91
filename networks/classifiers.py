"""Classifiers of the brain-MRI tumour-classification bundle (healthy/tumour, or healthy/glioma/meningioma/
pituitary) on single-channel 2D slices (64² by default) or on autoencoder latents (e.g. ``(4, 16, 16)``).

Every network returns logits ``(B, num_classes)``.

- :class:`SimpleCNN`: the baseline: MONAI ``Convolution`` blocks (conv, norm, activation; stride-2 downsampling),
  global average pooling, dropout and one linear layer. MONAI's own ``Classifier`` is not used because its head
  flattens the last feature map into a linear layer keyed to absolute positions and to one input size; the
  noise-aware classifier of this package (``networks.classifier``) found that head memorising a small training
  set where a pooled head did not.
- :class:`AttentionCNN`: the same backbone with a spatial-attention pooling, whose maps are kept for
  interpretation.
- :func:`resnet50_classifier`: MONAI's ``resnet50``, optionally fine-tuned from a local file of (ImageNet-style,
  3-channel) weights, adapted to grey images.
- :class:`LatentMLPHead` and :class:`LatentResNetHead`: small classifiers of latents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Conv
from monai.networks.nets import FullyConnectedNet, ResNet, resnet50
from torch import nn

from engines.checkpoint import load_checkpoint
from transforms.errors import InputDataError

__all__ = [
    "AttentionCNN",
    "LatentMLPHead",
    "LatentResNetHead",
    "SimpleCNN",
    "resnet50_classifier",
]

logger = logging.getLogger(__name__)


def _level_strides(strides: Sequence[int] | None, n_levels: int) -> list[int]:
    # default: keep the first level at full resolution (its features are cheap at 16 channels) and halve at
    # every later one, so a 64² slice ends at 8², a map fine enough to locate a lesion for the attention map
    if strides is None:
        return [1] + [2] * (n_levels - 1)
    strides = [int(s) for s in strides]
    if len(strides) != n_levels:
        raise ValueError(f"strides must have one entry per level ({n_levels}), got {strides}")
    return strides


class SimpleCNN(nn.Module):
    """Baseline CNN: per level two MONAI ``Convolution`` blocks (the first one strided), global average pooling,
    dropout and a linear layer.

    Args:
        in_channels: image channels.
        num_classes: number of classes (logits returned).
        channels: output channels of each level.
        dropout: dropout probability before the linear layer (the only dropout: the convolutional blocks are
            regularised by their batch norm).
        spatial_dims: 2 or 3.
        strides: stride of each level's first convolution; default ``(1, 2, 2, ...)``.
        norm: MONAI norm of every block. Batch norm by default: instance norm would make every channel's spatial
            mean zero before the activation, i.e. nearly cancel the global average pooling that follows.
        act: MONAI activation of every block.

    Raises:
        ValueError: for empty ``channels`` or ``strides`` of the wrong length.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        dropout: float = 0.2,
        spatial_dims: int = 2,
        strides: Sequence[int] | None = None,
        norm: str | tuple = "BATCH",
        act: str | tuple = "PRELU",
    ) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels must name at least one level")
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.out_features = int(channels[-1])
        # a bias before a norm layer is cancelled by the norm's mean subtraction
        bias = norm is None
        layers: list[nn.Module] = []
        prev = in_channels
        for c, s in zip(channels, _level_strides(strides, len(channels)), strict=True):
            for conv_in, conv_stride in ((prev, s), (c, 1)):
                layers.append(
                    Convolution(
                        spatial_dims,
                        conv_in,
                        c,
                        strides=conv_stride,
                        kernel_size=3,
                        norm=norm,
                        act=act,
                        bias=bias,
                    )
                )
            prev = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.out_features, num_classes))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling.

        Args:
            features: ``(B, C, *spatial)``.

        Returns:
            ``(B, C)``.
        """
        return features.flatten(2).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch.

        Args:
            x: ``(B, in_channels, *spatial)``.

        Returns:
            Logits ``(B, num_classes)``.
        """
        return self.head(self.pool(self.features(x)))


class AttentionCNN(SimpleCNN):
    """:class:`SimpleCNN` whose global average pooling is replaced by spatial-attention pooling.

    A 1x1 convolution turns the last feature map into one score per position; a softmax over space makes the
    scores a distribution ``a`` (non-negative, summing to 1 per image) and the pooled features are
    ``sum_p a_p f_p``. A softmax rather than a sigmoid because the pooled vector is then a convex combination of
    feature vectors, on the scale of average pooling whatever the lesion size, and the map is directly a
    distribution to save and compare across images. The 1x1 convolution is zero-initialised: the map starts
    uniform, i.e. the untrained network is exactly :class:`SimpleCNN` (same parameter names otherwise), and the
    attention only departs from the average where training finds it useful.

    ``forward`` keeps the last map (feature resolution, detached) in ``last_attention``; :meth:`attention_map`
    (or ``forward(x, return_attention=True)``) gives it at the input's resolution, bilinearly (trilinearly)
    upsampled and renormalised to sum to 1 per image.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        channels: output channels of each level.
        dropout: dropout probability before the linear layer.
        spatial_dims: 2 or 3.
        strides: stride of each level's first convolution; default ``(1, 2, 2, ...)`` (an 8² map for 64² inputs).
        norm: MONAI norm of every block.
        act: MONAI activation of every block.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        dropout: float = 0.2,
        spatial_dims: int = 2,
        strides: Sequence[int] | None = None,
        norm: str | tuple = "BATCH",
        act: str | tuple = "PRELU",
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            num_classes=num_classes,
            channels=channels,
            dropout=dropout,
            spatial_dims=spatial_dims,
            strides=strides,
            norm=norm,
            act=act,
        )
        self.attention = Conv[Conv.CONV, spatial_dims](self.out_features, 1, kernel_size=1)
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)
        self.last_attention: torch.Tensor | None = None

    def spatial_attention(self, features: torch.Tensor) -> torch.Tensor:
        """The attention map of a feature map: softmax over space of the 1x1 convolution's scores.

        Args:
            features: ``(B, C, *spatial)``.

        Returns:
            ``(B, 1, *spatial)``, non-negative, summing to 1 per image.
        """
        scores = self.attention(features)
        return torch.softmax(scores.flatten(2), dim=-1).view_as(scores)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Attention-weighted pooling ``sum_p a_p f_p``; keeps the map in ``last_attention``.

        Args:
            features: ``(B, C, *spatial)``.

        Returns:
            ``(B, C)``.
        """
        att = self.spatial_attention(features)
        # detached: a stored map must not keep the batch's autograd graph alive
        self.last_attention = att.detach()
        return self._weighted_sum(features, att)

    @staticmethod
    def _weighted_sum(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return (features * attention).flatten(2).sum(-1)

    def upsample_attention(self, attention: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """A feature-resolution map at an input resolution, renormalised to sum to 1 per image.

        Args:
            attention: ``(B, 1, *spatial)`` from :meth:`spatial_attention`.
            size: the target spatial size.

        Returns:
            ``(B, 1, *size)``: non-negative (interpolation of non-negative values), summing to 1 per image.
        """
        mode = "bilinear" if attention.ndim == 4 else "trilinear"
        up = F.interpolate(attention, size=tuple(size), mode=mode, align_corners=False)
        # interpolation spreads each cell's mass unevenly at the borders; renormalise so maps stay distributions
        return up / up.flatten(1).sum(-1).clamp_min(torch.finfo(up.dtype).tiny).view(-1, *[1] * (up.ndim - 1))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, and optionally the attention map at the input's resolution.

        Args:
            x: ``(B, in_channels, *spatial)``.
            return_attention: also return the map (see :meth:`attention_map`).

        Returns:
            Logits ``(B, num_classes)``, or ``(logits, map)`` with the map ``(B, 1, *spatial)``.
        """
        features = self.features(x)
        att = self.spatial_attention(features)
        self.last_attention = att.detach()
        # the returned map keeps its graph (usable in a loss); only the stored copy is detached
        logits = self.head(self._weighted_sum(features, att))
        if return_attention:
            return logits, self.upsample_attention(att, x.shape[2:])
        return logits

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map of a batch at the input's resolution (run in the caller's grad mode).

        Args:
            x: ``(B, in_channels, *spatial)``.

        Returns:
            ``(B, 1, *spatial)``, non-negative, summing to 1 per image.
        """
        return self.forward(x, return_attention=True)[1]


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    # RGB first-layer weights for other channel counts, as timm's adapt_input_conv: a grey image x fed as
    # (x, x, x) gives sum_c w_c * x, so summing over RGB keeps the pretrained responses exactly; for k > 1 channels
    # the RGB filters are tiled and scaled by 3 / k so that k copies of one image still give those responses
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = int(np.ceil(in_channels / weight.shape[1]))
    return weight.repeat(1, reps, *[1] * (weight.ndim - 2))[:, :in_channels] * (weight.shape[1] / in_channels)


def _state_dict_of(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    out = {}
    for name, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            continue
        # DataParallel / DistributedDataParallel save their wrapped module's weights under "module."
        while name.startswith("module."):
            name = name[len("module.") :]
        out[name] = value
    return out


def _load_finetune_weights(
    model: nn.Module, weights_path: str | os.PathLike, first_conv: str = "conv1.weight", head: str = "fc."
) -> None:
    ckpt = load_checkpoint(weights_path)
    source = _state_dict_of(ckpt)
    own = model.state_dict()
    merged = dict(own)
    loaded, adapted, head_skipped, conflicts = [], [], [], []
    for name, target in own.items():
        if name not in source:
            continue
        value = source[name]
        if value.shape == target.shape:
            merged[name] = value
            loaded.append(name)
        elif (
            name == first_conv
            and value.ndim == target.ndim
            and value.shape[0] == target.shape[0]
            and value.shape[2:] == target.shape[2:]
        ):
            merged[name] = _adapt_input_conv(value, target.shape[1])
            adapted.append(name)
        elif name.startswith(head):
            # another class count (e.g. ImageNet's 1000): the head stays at its initialisation
            head_skipped.append(name)
        else:
            conflicts.append(f"{name} {tuple(value.shape)} vs {tuple(target.shape)}")
    if conflicts:
        raise InputDataError(
            f"{len(conflicts)} tensor(s) do not fit the network (file vs network shape): "
            + "; ".join(conflicts[:5])
            + (" ..." if len(conflicts) > 5 else ""),
            weights_path,
        )
    if not loaded and not adapted:
        raise InputDataError(
            f"no tensor of the file matches the network's parameters (file has {len(source)} tensors, e.g. "
            f"{sorted(source)[:3]}; the network expects e.g. {list(own)[:3]})",
            weights_path,
        )
    model.load_state_dict(merged)
    missing = [n for n in own if n not in source]
    unused = [n for n in source if n not in own]
    logger.info(
        "fine-tuning from %s: %d tensors loaded, %d adapted to the input channels %s, %d head tensors skipped "
        "(shape differs), %d network tensors not in the file (left at init), %d file tensors unused",
        os.fspath(weights_path),
        len(loaded),
        len(adapted),
        adapted,
        len(head_skipped),
        len(missing),
        len(unused),
    )
    if missing:
        logger.warning(
            "%s lacks %d network tensors, e.g. %s", os.fspath(weights_path), len(missing), missing[:3]
        )


def resnet50_classifier(
    num_classes: int,
    in_channels: int = 1,
    weights_path: str | os.PathLike | None = None,
    spatial_dims: int = 2,
    **kwargs: Any,
) -> ResNet:
    """MONAI's ``resnet50``, optionally initialised from a local weights file for fine-tuning.

    Nothing is ever downloaded: MONAI's ``pretrained=True`` fetches MedicalNet's 3D weights only, so 2D weights
    (e.g. ImageNet's, converted to MONAI's parameter names, which are torchvision's: ``conv1``, ``bn1``,
    ``layer1.0.conv1``..., ``fc``) come from a file. The file is read with ``engines.load_checkpoint``
    (``weights_only=True``) and may be a plain state dict or a dict with ``"state_dict"`` or ``"model"``;
    ``"module."`` prefixes are stripped. A 3-channel first convolution is summed over its RGB axis for one input
    channel (tiled and scaled by ``3 / in_channels`` for other counts); ``fc`` tensors of another shape (another
    class count) are skipped, leaving the head at its initialisation; network tensors missing from the file stay
    at their initialisation (with a warning; e.g. torchvision has no downsample bias, so pass
    ``bias_downsample=False`` for its weights). Counts are logged.

    Args:
        num_classes: number of classes.
        in_channels: image channels.
        weights_path: local weights file, or ``None`` for a randomly initialised network.
        spatial_dims: 2 or 3.
        kwargs: further ``monai.networks.nets.ResNet`` arguments (e.g. ``conv1_t_stride=2``, ImageNet's stem
            stride; MONAI's default 1 keeps more resolution on 64² slices).

    Returns:
        The network (``conv1`` ... ``fc``), returning logits ``(B, num_classes)``.

    Raises:
        UnsafeCheckpointError: the file pickles code (refused by ``load_checkpoint``).
        InputDataError: (a ``ValueError``, naming the file) the file is missing or unreadable, no tensor of it
            matches the network, or tensors other than the first convolution and ``fc`` have other shapes.
    """
    model = resnet50(
        spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kwargs
    )
    if weights_path is not None:
        _load_finetune_weights(model, weights_path)
    return model


class LatentMLPHead(FullyConnectedNet):
    """MONAI ``FullyConnectedNet`` on flattened latents: ``Flatten``, hidden ``Linear`` + dropout + activation
    layers, and a linear output layer.

    Args:
        latent_shape: ``(C, *spatial)`` of one latent.
        num_classes: number of classes.
        hidden: widths of the hidden layers.
        dropout: dropout probability of the hidden layers.
        act: MONAI activation of the hidden layers.
    """

    def __init__(
        self,
        latent_shape: Sequence[int] = (4, 16, 16),
        num_classes: int = 2,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.2,
        act: str | tuple = "PRELU",
    ) -> None:
        super().__init__(
            in_channels=int(np.prod(latent_shape)),
            out_channels=num_classes,
            hidden_channels=list(hidden),
            dropout=dropout,
            act=act,
        )
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of latents.

        Args:
            x: ``(B, *latent_shape)``.

        Returns:
            Logits ``(B, num_classes)``.

        Raises:
            ValueError: when a latent's shape is not ``latent_shape`` (flattening would hide a mismatch of equal
                size, or fail with an unhelpful matrix-shape error).
        """
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents of shape {self.latent_shape}, got {tuple(x.shape[1:])}")
        return super().forward(x)


class LatentResNetHead(nn.Module):
    """Small residual network on latents: MONAI ``ResidualUnit`` levels, global average pooling, dropout and a
    linear layer.

    MONAI's ``ResNet`` is not used: it always builds a 7x7 stem, a max pooling and four stages, made for images;
    on a 16² latent (already 8x downsampled) that leaves a 1² map, and two stages such as ``(32, 64)`` cannot be
    expressed. ``ResidualUnit`` (two conv-norm-activation subunits plus a residual path, strided where a level
    downsamples) gives the same basic block at any number of levels.

    Args:
        latent_channels: channels of the latents.
        num_classes: number of classes.
        channels: output channels of each level.
        strides: stride of each level's first unit; default ``(1, 2, 2, ...)`` (16² latents end at 8²).
        units_per_level: residual units per level.
        dropout: dropout probability before the linear layer.
        spatial_dims: 2 or 3.
        norm: MONAI norm of every subunit (batch, for the reason given in :class:`SimpleCNN`).
        act: MONAI activation of every subunit.

    Raises:
        ValueError: for empty ``channels``, ``strides`` of the wrong length or ``units_per_level < 1``.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64),
        strides: Sequence[int] | None = None,
        units_per_level: int = 1,
        dropout: float = 0.2,
        spatial_dims: int = 2,
        norm: str | tuple = "BATCH",
        act: str | tuple = "PRELU",
    ) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels must name at least one level")
        if units_per_level < 1:
            raise ValueError(f"units_per_level must be >= 1, got {units_per_level}")
        self.num_classes = num_classes
        self.out_features = int(channels[-1])
        units: list[nn.Module] = []
        prev = latent_channels
        for c, s in zip(channels, _level_strides(strides, len(channels)), strict=True):
            for u in range(units_per_level):
                units.append(
                    ResidualUnit(
                        spatial_dims,
                        prev if u == 0 else c,
                        c,
                        strides=s if u == 0 else 1,
                        kernel_size=3,
                        subunits=2,
                        norm=norm,
                        act=act,
                    )
                )
            prev = c
        self.features = nn.Sequential(*units)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.out_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of latents.

        Args:
            x: ``(B, latent_channels, *spatial)``.

        Returns:
            Logits ``(B, num_classes)``.
        """
        return self.head(self.features(x).flatten(2).mean(-1))
