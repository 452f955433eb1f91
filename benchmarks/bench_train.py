"""Training samples/s of every bundle's trainable networks: one ``SupervisedTrainer`` iteration each.

A step is MONAI's own ``SupervisedTrainer`` iteration (prepare-batch, inferer forward, loss, backward, optimizer
step) with the network, optimizer, loss, inferer and prepare-batch parsed from the bundle's training config, at
the config's ``batch_size``. Inputs are random tensors of the configs' shapes (speed does not depend on the
content), except for ``diffusion_mae``, whose batches are real demo studies (a study's cost depends on its number
of views). Weights are random; the latent models' frozen encoder and latent DDPM are loaded by the configs' own
factories from random checkpoints.

On a GPU the same steps also run with the bundle's ``amp`` switch on (bf16 autocast), with channels-last
networks and inputs, and with ``SupervisedTrainer(compile=True)``, as ratios to fp32 eager; the model FLOP
utilisation is the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``, forward and backward) per second
over the GPU's dense bf16 peak.

Usage::

    python benchmarks/bench_train.py [--device cpu|cuda] [--repeats 5] [--batch N] [--cases anoddpm_simplex/unet ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bundles import build_cohort, bundle_parser, write_random_checkpoints  # noqa: E402
from benchmarks._timing import measure, sync  # noqa: E402

__all__ = [
    "CASES",
    "PEAK_BF16_TFLOPS",
    "TrainCase",
    "build_step",
    "count_flops",
    "gpu_variants",
    "measure_training",
    "peak_tflops",
]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched as substrings of
# torch.cuda.get_device_name(), first match wins (so "H100 PCIe" comes before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)

_LATENT_CKPTS = {
    "autoencoder.pt": "autoencoder_def",
    "latent_scale.json": "",
    "latent_ddpm.pt": "denoiser_def",
}


def peak_tflops(gpu_name: str | None, override: float | None = None) -> float | None:
    """The dense bf16 peak of a GPU, from ``override`` or :data:`PEAK_BF16_TFLOPS` (None when unknown).

    Args:
        gpu_name: ``torch.cuda.get_device_name()``.
        override: a peak given on the command line.

    Returns:
        TFLOP/s, or None.
    """
    if override is not None:
        return float(override)
    if not gpu_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return value
    return None


def _slices(parser: Any, batch_size: int, device: torch.device, lo: float, hi: float) -> dict[str, Any]:
    """A batch of random slices in the bundle's intensity range, with the class keys its prepare-batches read."""
    size = int(parser.get_parsed_content("image_size"))
    num_classes = int(parser.get_parsed_content("num_classes")) if "num_classes" in parser else 2
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch_size, 1, size, size, generator=g) * (hi - lo) + lo
    labels = torch.randint(0, num_classes, (batch_size,), generator=g)
    # CPU tensors, as a DataLoader gives them: the prepare-batch's move to the device is part of the step
    return {"image": image, "class_label": labels, "label": labels}


def _studies(parser: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """A batch of real demo studies (the training split, repeated when shorter than the batch), collated."""
    from transforms.study import collate_studies

    data = parser.get_parsed_content("train#data")
    dataset = parser.get_parsed_content("make_dataset")(data[: min(len(data), batch_size)])
    items = [dataset[i % len(dataset)] for i in range(batch_size)]
    return collate_studies(items)


@dataclass
class TrainCase:
    """One trainable network of a bundle.

    Args:
        key: short id, ``<bundle>/<network>``.
        label: what the table says.
        bundle: bundle folder.
        files: config files, merged in order.
        unit: ``slices`` or ``studies``.
        make_batch: ``(parser, batch_size, device) -> batch dict``.
        inferer: config id of the training inferer.
        overrides: further config overrides.
        checkpoints: random checkpoints the config's factories load (``{file: network definition id}``).
    """

    key: str
    label: str
    bundle: str
    files: tuple[str, ...]
    unit: str
    make_batch: Callable[[Any, int, torch.device], dict[str, Any]]
    inferer: str = "inferer"
    overrides: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)


def _anomaly_slices(p: Any, b: int, d: torch.device) -> dict[str, Any]:
    return _slices(p, b, d, -1.0, 1.0)


def _unit_slices(p: Any, b: int, d: torch.device) -> dict[str, Any]:
    return _slices(p, b, d, 0.0, 1.0)


CASES: tuple[TrainCase, ...] = (
    TrainCase(
        "anoddpm_simplex/unet",
        "anoddpm_simplex: DiffusionModelUNet, simplex-noise prepare-batch",
        "anoddpm_simplex",
        ("train.json",),
        "slices",
        _anomaly_slices,
        inferer="diffusion_inferer",
    ),
    TrainCase(
        "ddim_classifier_guidance/unet",
        "ddim_classifier_guidance: DiffusionModelUNet, Gaussian noise",
        "ddim_classifier_guidance",
        ("train_diffusion.json",),
        "slices",
        _anomaly_slices,
        inferer="diffusion_inferer",
    ),
    TrainCase(
        "ddim_classifier_guidance/classifier",
        "ddim_classifier_guidance: NoiseAwareClassifier on x_t",
        "ddim_classifier_guidance",
        ("train_diffusion.json", "train_classifier.json"),
        "slices",
        _anomaly_slices,
        inferer="classifier_inferer",
        # the class weights are counted over the training volumes; their values do not change the speed
        overrides={"loss#weight": "$torch.ones(@num_classes).to(@device)"},
    ),
    TrainCase(
        "latent_robust_classifier/autoencoder",
        "latent_robust_classifier: AutoencoderKL (L1 + KL)",
        "latent_robust_classifier",
        ("train.json", "train_autoencoder.json"),
        "slices",
        _unit_slices,
    ),
    TrainCase(
        "latent_robust_classifier/latent_ddpm",
        "latent_robust_classifier: latent DDPM (frozen encoder in the prepare-batch)",
        "latent_robust_classifier",
        ("train.json", "train_latent_ddpm.json"),
        "slices",
        _unit_slices,
        checkpoints=_LATENT_CKPTS,
    ),
    TrainCase(
        "latent_robust_classifier/latent_resnet",
        "latent_robust_classifier: latent ResNet head (frozen encoder)",
        "latent_robust_classifier",
        ("train.json", "train_latent_resnet.json"),
        "slices",
        _unit_slices,
        checkpoints=_LATENT_CKPTS,
    ),
    TrainCase(
        "latent_robust_classifier/hybrid",
        "latent_robust_classifier: hybrid head (encoder + corrupt-and-clean, 5 DDIM steps)",
        "latent_robust_classifier",
        ("train.json", "train_hybrid.json"),
        "slices",
        _unit_slices,
        checkpoints=_LATENT_CKPTS,
    ),
    TrainCase(
        "latent_robust_classifier/cnn",
        "latent_robust_classifier: CNN baseline",
        "latent_robust_classifier",
        ("train.json", "train_cnn.json"),
        "slices",
        _unit_slices,
    ),
    TrainCase(
        "latent_robust_classifier/resnet50",
        "latent_robust_classifier: ResNet50",
        "latent_robust_classifier",
        ("train.json", "train_resnet50.json"),
        "slices",
        _unit_slices,
    ),
    TrainCase(
        "diffusion_mae/mae",
        "diffusion_mae: pretraining, scheme mae",
        "diffusion_mae",
        ("pretrain.json",),
        "studies",
        _studies,
        overrides={"scheme": "mae"},
    ),
    TrainCase(
        "diffusion_mae/diffusion",
        "diffusion_mae: pretraining, scheme diffusion",
        "diffusion_mae",
        ("pretrain.json",),
        "studies",
        _studies,
        overrides={"scheme": "diffusion"},
    ),
)


class _ChannelsLastPrepare:
    """Wrap a prepare-batch so 4D network inputs are channels-last (NHWC) like the channels-last network: a
    contiguous NCHW input would otherwise be converted inside the first convolution, every step."""

    def __init__(self, prepare: Callable[..., Any]) -> None:
        self.prepare = prepare

    def __call__(self, batchdata: Any, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        out = self.prepare(batchdata, device, non_blocking, **kwargs)
        first = out[0]
        if isinstance(first, torch.Tensor) and first.ndim == 4:
            first = first.contiguous(memory_format=torch.channels_last)
        return (first, *out[1:])


@dataclass
class TrainStep:
    """A built training step: ``step()`` runs one trainer iteration."""

    step: Callable[[], Any]
    batch_size: int
    network: torch.nn.Module
    parameters: int


def build_step(
    case: TrainCase,
    device: torch.device,
    cohort: str | Path,
    workdir: str | Path,
    batch_size: int | None = None,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
) -> TrainStep:
    """Build one training step of a case from its bundle configs.

    Args:
        case: the network.
        device: where it trains.
        cohort: the demo cohort (datalists for class counts, findings and studies).
        workdir: scratch folder (random checkpoints).
        batch_size: override of the config's ``batch_size``.
        amp: the trainer's ``amp`` switch with bf16 autocast (``amp_kwargs={"dtype": torch.bfloat16}``).
        channels_last: channels-last network weights and 4D inputs.
        compile: ``SupervisedTrainer(compile=True)`` (``torch.compile`` of the network).

    Returns:
        The step.
    """
    from monai.engines import SupervisedTrainer

    ckpt_dir = Path(workdir) / "ckpt" / case.bundle
    parser = bundle_parser(
        case.bundle, case.files, device, cohort, {**case.overrides, "ckpt_dir": str(ckpt_dir)}
    )
    if case.checkpoints:
        write_random_checkpoints(parser, ckpt_dir, case.checkpoints)
    bs = int(batch_size or parser.get_parsed_content("batch_size"))
    network = parser.get_parsed_content("network")
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    # parsed after the memory-format change, which replaces the parameters' data in place: the optimizer holds
    # the same Parameter objects either way
    optimizer = parser.get_parsed_content("optimizer")
    prepare = parser.get_parsed_content("prepare_batch")
    if channels_last:
        prepare = _ChannelsLastPrepare(prepare)
    batch = case.make_batch(parser, bs, device)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[batch],
        network=network,
        optimizer=optimizer,
        loss_function=parser.get_parsed_content("loss"),
        inferer=parser.get_parsed_content(case.inferer),
        prepare_batch=prepare,
        amp=amp,
        amp_kwargs={"dtype": torch.bfloat16} if amp else None,
        compile=compile,
    )
    params = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return TrainStep(lambda: trainer._iteration(trainer, batch), bs, network, params)


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; forward and backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (elementwise ops and the optimizer are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _free(device: torch.device) -> None:
    """Release a finished case's network, optimizer state and trainer (Ignite engines hold reference cycles, so
    ``del`` alone leaves them to the next collection) before the next case allocates."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _stats(times: Sequence[float], batch: int) -> dict[str, float]:
    med = statistics.median(times)
    return {
        "seconds": med,
        "per_s": batch / med,
        "per_s_min": batch / max(times),
        "per_s_max": batch / min(times),
    }


def measure_training(
    device: torch.device,
    cohort: str | Path,
    workdir: str | Path,
    repeats: int = 5,
    batch_size: int | None = None,
    cases: Sequence[str] | None = None,
    flops: bool = True,
) -> list[dict[str, Any]]:
    """fp32 eager training samples/s of each case (and its FLOPs per step).

    Args:
        device: where to train.
        cohort: demo cohort folder.
        workdir: scratch folder.
        repeats: timed steps after one warm-up step.
        batch_size: override of every config's batch size (None: the bundles' defaults).
        cases: keys of :data:`CASES` to run (None: all).
        flops: count each step's FLOPs (one extra step).

    Returns:
        One row per case: ``key``, ``label``, ``unit``, ``batch``, ``per_s`` (median), ``per_s_min``,
        ``per_s_max``, ``seconds``, ``gflop_per_step``, ``achieved_tflops``, ``parameters``.
    """
    rows = []
    for case in CASES:
        if cases and case.key not in cases:
            continue
        ts = build_step(case, device, cohort, workdir, batch_size)
        times = measure(ts.step, repeats, device, warmup=1)
        row: dict[str, Any] = {
            "key": case.key,
            "label": case.label,
            "unit": case.unit,
            "batch": ts.batch_size,
            "parameters": ts.parameters,
            **_stats(times, ts.batch_size),
        }
        if flops:
            total = count_flops(ts.step)
            row["gflop_per_step"] = total / 1e9
            row["achieved_tflops"] = total / row["seconds"] / 1e12
        rows.append(row)
        print(f"  train {case.key}: {row['per_s']:.1f} {case.unit}/s (batch {ts.batch_size})", flush=True)
        del ts
        _free(device)
    return rows


GPU_VARIANTS: dict[str, dict[str, bool]] = {
    "bf16": {"amp": True},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"amp": True, "channels_last": True},
    "compile": {"compile": True},
    "bf16+channels_last+compile": {"amp": True, "channels_last": True, "compile": True},
}


def gpu_variants(
    device: torch.device,
    cohort: str | Path,
    workdir: str | Path,
    eager_rows: Sequence[dict[str, Any]],
    repeats: int = 20,
    batch_size: int | None = None,
    compile_cases: Sequence[str] = (),
    peak: float | None = None,
) -> list[dict[str, Any]]:
    """Speed-ups of bf16 autocast, channels-last and ``torch.compile`` over fp32 eager, and the MFU.

    Args:
        device: a CUDA device.
        cohort: demo cohort folder.
        workdir: scratch folder.
        eager_rows: :func:`measure_training` rows on the same device (the fp32 eager reference and FLOPs).
        repeats: timed steps per variant.
        batch_size: as in :func:`measure_training`.
        compile_cases: keys whose compiled variants are measured (compilation takes tens of seconds each).
        peak: dense bf16 peak in TFLOP/s (None: no MFU).

    Returns:
        One row per (case, variant): ``key``, ``variant``, ``per_s``, ``speedup`` (over fp32 eager),
        ``mfu`` (fraction of ``peak``, or None), ``compile_s`` (first-step time of compiled variants); a variant
        that raised has ``error`` instead of the figures.
    """
    rows = []
    for ref in eager_rows:
        case = next(c for c in CASES if c.key == ref["key"])
        flop = ref.get("gflop_per_step", float("nan")) * 1e9
        mfu = (flop / ref["seconds"] / (peak * 1e12)) if peak else None
        rows.append(
            {"key": case.key, "variant": "fp32 eager", "per_s": ref["per_s"], "speedup": 1.0, "mfu": mfu}
        )
        for name, kw in GPU_VARIANTS.items():
            if kw.get("compile") and case.key not in compile_cases:
                continue
            if kw.get("compile"):
                torch._dynamo.reset()  # a fresh compile cache per network: no recompilation-limit carry-over
            try:
                ts = build_step(case, device, cohort, workdir, batch_size, **kw)
                sync(device)
                t0 = time.perf_counter()
                ts.step()  # the first step compiles (or picks cuDNN algorithms): timed apart, then excluded
                sync(device)
                first = time.perf_counter() - t0
                st = _stats(measure(ts.step, repeats, device, warmup=1), ts.batch_size)
                del ts
            except Exception as e:  # e.g. a compiler failure: recorded, the other variants still run
                rows.append({"key": case.key, "variant": name, "error": f"{type(e).__name__}: {e}"[:200]})
                print(f"  gpu {case.key} {name}: failed ({rows[-1]['error']})", flush=True)
                _free(device)
                continue
            rows.append(
                {
                    "key": case.key,
                    "variant": name,
                    "per_s": st["per_s"],
                    "speedup": st["per_s"] / ref["per_s"],
                    "mfu": (flop / st["seconds"] / (peak * 1e12)) if peak and math.isfinite(flop) else None,
                    "compile_s": first if kw.get("compile") else None,
                }
            )
            print(f"  gpu {case.key} {name}: x{rows[-1]['speedup']:.2f}", flush=True)
            _free(device)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure and print the training rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="override every bundle's batch size")
    ap.add_argument("--cases", nargs="*", default=None, help=f"subset of {[c.key for c in CASES]}")
    ap.add_argument("--cohort", type=Path, default=None, help="demo cohort folder (built if missing)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cohort = build_cohort(a.cohort or Path(tmp) / "cohort")
        rows = measure_training(torch.device(a.device), cohort, tmp, a.repeats, a.batch, a.cases)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
