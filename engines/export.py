"""Export a bundle's trained diffusion network to TorchScript by tracing.

``python -m monai.bundle ckpt_export`` scripts the network (or traces it with one input), but a
diffusion UNet takes two inputs, ``(x, timesteps)``, and ``torch.jit.script`` fails on MONAI's
``DiffusionModelUNet``; tracing with an example of both inputs works and gives the same outputs.

Usage::

    python -m engines.export --config_file "['bundles/anoddpm_simplex/configs/train.json']" \\
        --ckpt bundles/anoddpm_simplex/models/model.pt --out bundles/anoddpm_simplex/models/model.ts
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from data_prep.atomic import atomic_path

__all__ = ["export_torchscript", "main"]


def export_torchscript(
    config_files: Sequence[str] | str,
    ckpt: str | Path,
    out: str | Path,
    network_id: str = "network_def",
    image_size_id: str = "image_size",
    in_channels: int | None = None,
    atol: float = 1e-4,
) -> Path:
    """Trace the network of a bundle config with its trained weights and save it as TorchScript.

    Args:
        config_files: the bundle config file(s) that define ``network_id`` (merged in order).
        ckpt: the weights (a state dict, or a checkpoint dict with ``"model"``).
        out: the ``.ts`` file to write.
        network_id: config id of the network definition.
        image_size_id: config id of the square input size.
        in_channels: input channels (default: the network's ``in_channels`` config value, else 1).
        atol: tolerance of the check that the traced module reproduces the network.

    Returns:
        The written path.

    Raises:
        RuntimeError: if the traced module's output differs from the network's on a fresh input.
    """
    from monai.bundle import ConfigParser

    from engines.checkpoint import load_checkpoint

    parser = ConfigParser()
    parser.read_config(list(config_files) if not isinstance(config_files, str) else config_files)
    net = parser.get_parsed_content(network_id)
    sd = load_checkpoint(ckpt)
    net.load_state_dict(sd["model"] if "model" in sd and isinstance(sd["model"], dict) else sd)
    net.eval()
    size = int(parser.get_parsed_content(image_size_id))
    ch = in_channels or int(parser.get(f"{network_id}#in_channels", 1))
    x = torch.randn(2, ch, size, size)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        traced = torch.jit.trace(net, (x, t))
        x2, t2 = torch.randn(3, ch, size, size), torch.tensor([0, 250, 999])
        if not torch.allclose(traced(x2, t2), net(x2, t2), atol=atol):
            raise RuntimeError("the traced network does not reproduce the checkpoint's outputs")
    out = Path(out)
    with atomic_path(out) as tmp:
        traced.save(str(tmp))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line of :func:`export_torchscript`.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    ap = argparse.ArgumentParser(prog="python -m engines.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config_file", required=True, help="config file or JSON list of files")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--network_id", default="network_def")
    a = ap.parse_args(argv)
    files = json.loads(a.config_file.replace("'", '"')) if a.config_file.startswith("[") else a.config_file
    print(export_torchscript(files, a.ckpt, a.out, a.network_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
