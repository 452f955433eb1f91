"""Fixtures of the Explorer tests: random-weight checkpoints built from the bundles' real configs, and a small
synthetic volume with a known, non-RAS affine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.explore import ANODDPM, GUIDED, bundle_parser, checkpoint_paths

#: LPS-like axis flips, anisotropic voxels, a translation: reorientation to RAS and back is exercised
AFFINE = np.array(
    [
        [-1.5, 0.0, 0.0, 40.0],
        [0.0, -1.25, 0.0, 30.0],
        [0.0, 0.0, 3.0, -12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _perturb(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    # MONAI zero-initialises the UNet's output convolution; without noise on every weight the untrained model would
    # predict eps = 0 everywhere and the tests would not see the network at all
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def make_checkpoints(
    name: str, ckpt_dir: Path, seed: int = 0, overrides: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write random-weight checkpoints where the bundle's inference config expects them.

    The networks are built by the same ConfigParser path the Explorer uses (``network``, and for guided DDIM the
    ``classifier`` of ``inference.json``), so their state dicts fit exactly.

    Args:
        name: the bundle.
        ckpt_dir: the folder to fill.
        seed: weight seed.
        overrides: config overrides the networks are built with (e.g. ``{"image_size": 32}``).

    Returns:
        ``{config id: path}`` of the files written.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    paths = checkpoint_paths(name, ckpt_dir)
    parser = bundle_parser(name, ckpt_dir, device="cpu", overrides=overrides)
    net = _perturb(parser.get_parsed_content("network"), seed)
    if name == ANODDPM:
        torch.save({"model": net.state_dict()}, paths["checkpoint"])
    elif name == GUIDED:
        torch.save({"model": net.state_dict()}, paths["diffusion_checkpoint"])
        clf = _perturb(parser.get_parsed_content("classifier"), seed + 1)
        # a bare state dict, as Ignite saves a one-object checkpoint: load_weights accepts both forms
        torch.save(clf.state_dict(), paths["classifier_checkpoint"])
        paths["classifier_labels"].write_text(
            json.dumps({"labels": ["healthy", "diseased"], "healthy_index": 0})
        )
    else:
        raise ValueError(name)
    return paths


def volume(shape: tuple[int, int, int] = (40, 36, 10), seed: int = 0) -> np.ndarray:
    """A bright ellipsoid "head" with texture and one brighter blob, on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = sum(g**2 for g in grid[:2]) < 0.7
    vol = np.where(head, 100.0 + 10.0 * rng.standard_normal(shape), 0.0)
    blob = ((grid[0] - 0.3) ** 2 + (grid[1] + 0.2) ** 2) < 0.03
    return np.where(head & blob, 220.0, vol).astype(np.float32)


def write_volume(path: Path, shape: tuple[int, int, int] = (40, 36, 10), affine: np.ndarray = AFFINE) -> Path:
    """Save :func:`volume` as NIfTI with ``affine``."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume(shape), affine), str(path))
    return path
