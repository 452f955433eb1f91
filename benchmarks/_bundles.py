"""The shipped pieces of the bundles, built from their JSON configs for the benchmarks.

Every benchmark parses the real config files with ``monai.bundle.ConfigParser`` and overrides only what a
measurement must change: the device, the dataset folder (a small demo cohort), sizes such as the batch, and the
checkpoint folder. Trained weights are not needed for speed, so :func:`write_random_checkpoints` saves freshly
initialised weights under the file names the configs load: the configs' own factories (``load_encoder``,
``eval_factories``, ``classifier``...) then build exactly the networks that ship.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"

__all__ = [
    "BUNDLES",
    "ROOT",
    "build_cohort",
    "bundle_parser",
    "write_random_checkpoints",
]


def bundle_parser(
    bundle: str,
    files: Sequence[str],
    device: torch.device | str | None = None,
    dataset_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
):
    """A ``ConfigParser`` holding a bundle's config files merged as ``monai.bundle run`` merges them.

    Args:
        bundle: the bundle folder name under ``bundles/``.
        files: config file names in ``configs/``, later ones overriding earlier ones.
        device: the ``device`` entry (default: the config's own choice).
        dataset_dir: the ``dataset_dir`` entry (a demo cohort), so datalist-derived values (class and finding
            counts, class weights) resolve without building the default cohort.
        overrides: further ``{id: value}`` entries (``#`` ids reach into nested entries).

    Returns:
        The parser (nothing is instantiated yet).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / f) for f in files])
    if device is not None:
        # an expression, so the config's own "$import torch" provides the type
        parser["device"] = f"$torch.device('{torch.device(device)}')"
    if dataset_dir is not None:
        parser["dataset_dir"] = str(dataset_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def write_random_checkpoints(
    parser: Any, ckpt_dir: str | os.PathLike, entries: Mapping[str, str | torch.nn.Module]
) -> Path:
    """Save freshly initialised weights under the names a config loads from its ``ckpt_dir``.

    Args:
        parser: a parser of the bundle (its network definitions are instantiated).
        ckpt_dir: the folder (created); point the parser's ``ckpt_dir`` at it before building loaders.
        entries: ``{file name: config id of a network definition, or a network}``; a ``*.json`` name writes
            ``{"scale": 1.0}`` (the latent scale file) instead.

    Returns:
        ``ckpt_dir``.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for name, source in entries.items():
        if name.endswith(".json"):
            (ckpt_dir / name).write_text(json.dumps({"scale": 1.0}) + "\n")
            continue
        net = parser.get_parsed_content(source) if isinstance(source, str) else source
        # the layout of the bundles' final checkpoints ({"model": state_dict}), read by engines.load_weights
        torch.save({"model": net.state_dict()}, ckpt_dir / name)
    return ckpt_dir


def build_cohort(path: str | os.PathLike, subjects: int = 8) -> Path:
    """Build (or reuse, when complete and of the same parameters) a small demo cohort.

    Args:
        path: the cohort folder.
        subjects: number of synthetic subjects (at least 6).

    Returns:
        The cohort folder.
    """
    from data_prep.demo import DemoConfig, build_demo_cohort

    return build_demo_cohort(path, DemoConfig(subjects=subjects), verbose=False)
