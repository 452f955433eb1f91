"""Inference latency of latent_robust_classifier's classifiers and diffusion_mae's study embedding.

* latent_robust_classifier: every model of ``evaluate.json``'s ``models`` list, built by the config's own
  ``eval_factories`` (``engines.build_models``) from random checkpoints: the CNN baseline, the attention CNN,
  ResNet50, and the latent pipelines (frozen ``AutoencoderKL`` encoder + head; the hybrid adds the
  corrupt-and-clean DDIM steps of the latent DDPM). Milliseconds per slice at a batch of slices, relative to the
  CNN baseline; the hybrid is also compared with the plain latent ResNet head (the same head without
  corrupt-and-clean).
* diffusion_mae: the study embedding of ``inference.json``'s ``classifier`` (the fine-tuned ``StudyClassifier``,
  random weights): the encoder alone on a collated batch of real demo studies, and the whole inference from the
  view files (``LoadStudyd``, ``collate_studies``, encoder and findings head; writing the outputs excluded).

Usage::

    python benchmarks/bench_infer.py [--device cpu|cuda] [--batch 16] [--repeats 5] [--cohort DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bundles import build_cohort, bundle_parser, write_random_checkpoints  # noqa: E402
from benchmarks._timing import timeit  # noqa: E402

__all__ = ["measure_classifiers", "measure_study_embedding"]

# the checkpoint files of evaluate.json's factories and the network definitions they are built from
LATENT_EVAL_CKPTS = {
    "autoencoder.pt": "autoencoder_def",
    "latent_scale.json": "",
    "latent_ddpm.pt": "denoiser_def",
    "cnn.pt": "cnn_def",
    "attention_cnn.pt": "attention_cnn_def",
    "resnet50.pt": "resnet50_def",
    "latent_mlp.pt": "latent_mlp_def",
    "latent_resnet.pt": "latent_resnet_def",
    "noise_aware.pt": "noise_aware_def",
    "hybrid.pt": "latent_resnet_def",
}


def _autocast(device: torch.device, on: bool) -> Callable[[], Any]:
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if on else contextlib.nullcontext


def measure_classifiers(
    device: torch.device,
    cohort: str | Path,
    workdir: str | Path,
    batch: int = 16,
    repeats: int = 5,
    autocast: bool = False,
) -> list[dict[str, Any]]:
    """Milliseconds per slice of each latent_robust_classifier model (logits of a batch of slices).

    Args:
        device: where to run.
        cohort: demo cohort (the class count).
        workdir: scratch folder (random checkpoints).
        batch: slices per call.
        repeats: timed calls after one warm-up call.
        autocast: run under bf16 autocast on ``device``.

    Returns:
        Rows ``{"model", "batch", "ms_per_slice", "x_cnn"}`` (time relative to the CNN baseline), in the order
        of ``evaluate.json``'s ``models``.
    """
    ckpt = Path(workdir) / "ckpt" / "latent_robust_classifier_eval"
    parser = bundle_parser(
        "latent_robust_classifier",
        ["train.json", "evaluate.json"],
        device,
        cohort,
        {"ckpt_dir": str(ckpt)},
    )
    write_random_checkpoints(parser, ckpt, LATENT_EVAL_CKPTS)
    models = parser.get_parsed_content("networks")  # engines.build_models: eval mode, on the device
    size = int(parser.get_parsed_content("image_size"))
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    ctx = _autocast(device, autocast)
    rows = []
    for name, model in models.items():

        def run(model: torch.nn.Module = model) -> None:
            with torch.no_grad(), ctx():
                model(x)

        sec = timeit(run, repeats, device)
        rows.append({"model": name, "batch": batch, "ms_per_slice": 1e3 * sec / batch})
        print(f"  classifier {name}: {rows[-1]['ms_per_slice']:.2f} ms/slice", flush=True)
    ref = next((r["ms_per_slice"] for r in rows if r["model"] == "cnn"), None)
    for r in rows:
        r["x_cnn"] = r["ms_per_slice"] / ref if ref else None
    return rows


def measure_study_embedding(
    device: torch.device,
    cohort: str | Path,
    workdir: str | Path,
    batch: int | None = None,
    repeats: int = 5,
    autocast: bool = False,
) -> list[dict[str, Any]]:
    """Milliseconds per study of diffusion_mae's embedding: model only, and from the view files.

    Args:
        device: where to run.
        cohort: demo cohort (studies and findings).
        workdir: scratch folder (random checkpoint).
        batch: studies per batch (default: the config's ``batch_size``).
        repeats: timed calls (model only) or passes over the studies (from files), after one warm-up.
        autocast: run under bf16 autocast on ``device``.

    Returns:
        Rows ``{"what", "batch", "studies", "views_per_study", "ms_per_study", "x_model"}`` (time relative to the
        model-only row).
    """
    import networks
    from transforms.study import collate_studies

    ckpt = Path(workdir) / "ckpt" / "diffusion_mae"
    overrides = {"ckpt_dir": str(ckpt), "scheme": "diffusion", "input_section": "training"}
    parser = bundle_parser("diffusion_mae", ["pretrain.json", "inference.json"], device, cohort, overrides)
    bs = int(batch or parser.get_parsed_content("batch_size"))
    net = networks.StudyClassifier(
        copy.deepcopy(parser.get_parsed_content("encoder_def")), int(parser.get_parsed_content("num_labels"))
    )
    write_random_checkpoints(parser, ckpt, {"finetune_diffusion.pt": net})
    classifier = parser.get_parsed_content("classifier").eval()
    ctx = _autocast(device, autocast)

    data = parser.get_parsed_content("inference_data")
    cached = parser.get_parsed_content("make_dataset")(data)
    studies = collate_studies([cached[i % len(cached)] for i in range(bs)])
    views, mask = studies["views"].to(device), studies["view_mask"].to(device)

    def model_only() -> None:
        with torch.no_grad(), ctx():
            classifier.encoder(views, mask)

    sec = timeit(model_only, repeats, device)
    rows = [
        {
            "what": "study embedding (StudyViTEncoder on a collated batch)",
            "batch": bs,
            "studies": bs,
            "views_per_study": float(mask.sum()) / bs,
            "ms_per_study": 1e3 * sec / bs,
        }
    ]
    # the inference config's loader (plain Dataset: the views are read from their files on every pass)
    loader = parser.get_parsed_content("make_loader")(
        parser.get_parsed_content("inference_dataset"), batch_size=bs
    )
    counted = {"studies": 0, "views": 0}

    def from_files() -> None:
        counted["studies"] = counted["views"] = 0
        with torch.no_grad(), ctx():
            for b in loader:
                v, m = b["views"].to(device), b["view_mask"].to(device)
                torch.sigmoid(classifier.head(classifier.encoder(v, m)))
                counted["studies"] += int(v.shape[0])
                counted["views"] += int(m.sum())

    sec = timeit(from_files, repeats, device)
    rows.append(
        {
            "what": "from view files (LoadStudyd + collate + encoder + findings head)",
            "batch": bs,
            "studies": counted["studies"],
            "views_per_study": counted["views"] / max(1, counted["studies"]),
            "ms_per_study": 1e3 * sec / max(1, counted["studies"]),
        }
    )
    for r in rows:
        r["x_model"] = r["ms_per_study"] / rows[0]["ms_per_study"]
    print(f"  study embedding: {rows[0]['ms_per_study']:.2f} ms/study", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure and print the rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16, help="slices per classifier call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cohort", type=Path, default=None, help="demo cohort folder (built if missing)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        cohort = build_cohort(a.cohort or Path(tmp) / "cohort")
        out = {
            "classifiers": measure_classifiers(dev, cohort, tmp, a.batch, a.repeats),
            "study_embedding": measure_study_embedding(dev, cohort, tmp, None, a.repeats),
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
