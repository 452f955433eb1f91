"""Per-slice latency of guided DDIM (ddim_classifier_guidance): DDIM encoding to L plus classifier-guided
decoding, against the number of DDIM steps k.

Each step of the decoding costs one UNet call plus one classifier forward and backward (when s != 0); the
encoding costs one UNet call per step. Latencies are compared in the same run against the reference setting of
the method's public code, every step of the chain (k = L, ``timestep_respacing="ddim1000"`` with L = 500) — the
reference is timed once on a smaller batch because it takes a minute per slice batch on a CPU. The networks are
the bundle's default ``unet_def`` and ``classifier_def`` and the inferer its ``inference.json``
``anomaly_inferer`` (``setting`` and ``ddim_steps`` overridden), with random weights (speed does not depend on
them).

Usage::

    python benchmarks/bench_guided.py [--device cpu|cuda] [--level 500] [--steps 5 10 25 50]
        [--batch 16] [--scale 10] [--repeats 3] [--reference-batch 4] [--no-reference]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bundles import bundle_parser  # noqa: E402
from benchmarks._timing import CallCounter, device_name, timeit  # noqa: E402

__all__ = ["measure_guided"]

BUNDLE = "ddim_classifier_guidance"
# the class count comes from the datalist; a literal one lets the networks build without any data
_NO_DATA = {"dataset_dir": "unused", "datalist": {"labels": ["healthy", "diseased"]}}


def _parser(device: torch.device, overrides: dict[str, Any] | None = None) -> Any:
    return bundle_parser(
        BUNDLE,
        ["train_diffusion.json", "inference.json"],
        device,
        overrides={**_NO_DATA, **(overrides or {})},
    )


def measure_guided(
    device: torch.device,
    level: int = 500,
    steps: Sequence[int] = (5, 10),
    scales: Sequence[float] = (0.0, 50.0),
    batch: int = 16,
    repeats: int = 3,
    reference_batch: int | None = 4,
    reference_scale: float | None = None,
    autocast: bool = False,
) -> list[dict[str, Any]]:
    """Per-slice latency of the guided reconstruction (anomaly map included) per ``(k, s)``, and the reference.

    Args:
        device: where to run.
        level: noise level ``L``.
        steps: DDIM steps ``k``.
        scales: guidance scales ``s``.
        batch: slices per call.
        repeats: timed calls per setting (after one warm-up call).
        reference_batch: slices of the reference call (``k = L``, timed once without warm-up); None: no reference.
        reference_scale: ``s`` of the reference (default: the largest of ``scales``).
        autocast: run under bf16 autocast on ``device``.

    Returns:
        Rows ``{"k", "s", "unet_calls", "classifier_grads", "batch", "ms_per_slice", "speedup", "reference"}``,
        speed-up over the reference when measured.
    """
    parser = _parser(device)
    unet = parser.get_parsed_content("network").eval()
    unet_calls = CallCounter(unet)
    size = int(parser.get_parsed_content("image_size"))
    g = torch.Generator().manual_seed(0)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def images(n: int) -> torch.Tensor:
        return (torch.rand(n, 1, size, size, generator=g) * 2 - 1).to(device)

    def one(k: int, s: float, n: int, reference: bool) -> dict[str, Any]:
        # the classifier is rebuilt (random) with each inferer; it is not what is compared
        inf = _parser(device, {"setting": f"L{level}_s{s:g}", "ddim_steps": k}).get_parsed_content(
            "anomaly_inferer"
        )
        x = images(n)

        def run() -> None:
            with ctx():
                inf(x, unet)

        reps = 1 if reference else repeats
        unet_calls.take()
        clf_calls = CallCounter(inf.classifier)
        sec = timeit(run, reps, device, warmup=0 if reference else 1)
        runs = reps + (0 if reference else 1)  # the warm-up call is counted too
        return {
            "k": k,
            "s": s,
            "unet_calls": unet_calls.take() // runs,
            "classifier_grads": clf_calls.take() // runs,
            "batch": n,
            "ms_per_slice": 1e3 * sec / n,
            "reference": reference,
        }

    rows = [one(k, s, batch, False) for k in steps for s in scales]
    if reference_batch:
        rs = max(scales) if reference_scale is None else reference_scale
        rows.append(one(level, rs, reference_batch, True))
    unet_calls.remove()
    if reference_batch:
        ref = rows[-1]["ms_per_slice"]
        for r in rows:
            r["speedup"] = ref / r["ms_per_slice"]
    print(f"  guided L={level}: {len(rows)} settings", flush=True)
    return rows


def main() -> None:
    """Run the benchmark and print a Markdown table (and the rows as JSON on the last line)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--level", type=int, default=500, help="noise level L (diffusion steps)")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25, 50])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-batch", type=int, default=4)
    ap.add_argument("--no-reference", action="store_true", help="skip the k = L reference")
    a = ap.parse_args()
    dev = torch.device(a.device)
    rows = measure_guided(
        dev,
        a.level,
        a.steps,
        (0.0, a.scale),
        a.batch,
        a.repeats,
        None if a.no_reference else a.reference_batch,
    )
    size = int(_parser(dev).get_parsed_content("image_size"))
    print(
        f"device: {dev} ({device_name(dev)}), threads {torch.get_num_threads()}, {size}x{size}, L={a.level}"
    )
    print("| DDIM steps k | s | UNet calls | classifier grads | batch | ms per slice | speed-up vs k = L |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        up = f"{r['speedup']:.1f}" if "speedup" in r else ""
        print(
            f"| {r['k']} | {r['s']:g} | {r['unet_calls']} | {r['classifier_grads']} | {r['batch']} "
            f"| {r['ms_per_slice']:.1f} | {up} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
