"""Speed of the anoddpm_simplex pieces: training samples/s and reconstruction slices/s per method.

Reconstruction modes are compared in the same run against the reference AnoDDPM way (the iterative DDPM chain
from t, t network calls per slice): one-shot x0 prediction (1 call) and DDIM with k steps (k calls). The network
is the bundle's default ``network_def`` and the inferer its ``inference.json`` ``anomaly_inferer`` (with ``t``,
``recon`` and ``ddim_steps`` overridden), with random weights (speed does not depend on the weights). The
training step is :mod:`benchmarks.bench_train`'s (the bundle's ``SupervisedTrainer`` iteration).

Usage::

    python benchmarks/bench_anoddpm.py [--device cpu|cuda] [--t 250] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bundles import bundle_parser  # noqa: E402
from benchmarks._timing import CallCounter, device_name, timeit  # noqa: E402

__all__ = ["measure_reconstruction"]

BUNDLE = "anoddpm_simplex"


def _inferer(device: torch.device, t: int, recon: str, ddim_steps: int) -> Any:
    parser = bundle_parser(
        BUNDLE,
        ["train.json", "inference.json"],
        device,
        overrides={"dataset_dir": "unused", "t": t, "recon": recon, "ddim_steps": ddim_steps},
    )
    return parser.get_parsed_content("anomaly_inferer")


def measure_reconstruction(
    device: torch.device,
    t_values: Sequence[int] = (100, 250),
    batch: int = 16,
    ddim_steps: int = 10,
    repeats: int = 3,
    chain_batch: int | None = None,
    autocast: bool = False,
    chain: bool = True,
) -> list[dict[str, Any]]:
    """Per-slice latency of one-shot, DDIM and iterative-DDPM reconstruction (anomaly map included) per ``t``.

    Args:
        device: where to run.
        t_values: noise levels ``t`` (forward diffusion steps).
        batch: slices per call.
        ddim_steps: ``k`` of the DDIM mode.
        repeats: timed calls of the one-shot and DDIM modes (after one warm-up call); the iterative chain
            is timed once, without warm-up (the network already ran on this batch shape).
        chain_batch: slices per call of the iterative chain (default ``batch``).
        autocast: run under bf16 autocast on ``device``.
        chain: also time the iterative chain (the reference).

    Returns:
        Rows ``{"method", "t", "calls", "batch", "ms_per_slice", "speedup"}``, speed-up over the iterative
        chain at the same ``t`` (None without the chain).
    """
    parser = bundle_parser(BUNDLE, ["train.json"], device, overrides={"dataset_dir": "unused"})
    net = parser.get_parsed_content("network").eval()
    counter = CallCounter(net)
    size = int(parser.get_parsed_content("image_size"))
    g = torch.Generator().manual_seed(0)
    chain_batch = chain_batch or batch
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def images(n: int) -> torch.Tensor:
        return (torch.rand(n, 1, size, size, generator=g) * 2 - 1).to(device)

    rows: list[dict[str, Any]] = []
    for t in t_values:
        block = []
        methods = [("one_shot", batch), ("ddim", batch)] + ([("ddpm", chain_batch)] if chain else [])
        for method, n in methods:
            inf = _inferer(device, t, method, ddim_steps)
            x = images(n)

            def run(inf: Any = inf, x: torch.Tensor = x) -> None:
                with ctx():
                    inf(x, net)

            is_chain = method == "ddpm"
            reps = 1 if is_chain else repeats
            counter.take()
            sec = timeit(run, reps, device, warmup=0 if is_chain else 1)
            calls = counter.take() // (reps + (0 if is_chain else 1))  # the warm-up call is counted too
            block.append(
                {"method": method, "t": t, "calls": calls, "batch": n, "ms_per_slice": 1e3 * sec / n}
            )
        ref = block[-1]["ms_per_slice"] if chain else None
        for r in block:
            r["speedup"] = ref / r["ms_per_slice"] if ref else None
        rows += block
        print(f"  anoddpm t={t}: one-shot {block[0]['ms_per_slice']:.1f} ms/slice", flush=True)
    counter.remove()
    return rows


def main() -> None:
    """Run the benchmark and print a Markdown table (also as JSON on the last line)."""
    from benchmarks.bench_train import CASES, build_step

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--t", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ddpm-t", type=int, default=None, help="t of the iterative chain (default: --t)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    case = next(c for c in CASES if c.key == "anoddpm_simplex/unet")
    with tempfile.TemporaryDirectory(prefix="bench_anoddpm_") as tmp:
        step = build_step(case, dev, "unused", tmp, a.batch)
        t_train = timeit(step.step, a.repeats, dev)
    rows = [("training step (simplex noise)", 1, a.batch / t_train)]
    recon = measure_reconstruction(dev, [a.t], a.batch, a.ddim_steps, a.repeats)
    if a.ddpm_t and a.ddpm_t != a.t:
        recon = recon[:-1] + measure_reconstruction(dev, [a.ddpm_t], a.batch, a.ddim_steps, a.repeats)[-1:]
    for r in recon:
        rows.append((f"reconstruction {r['method']} (t={r['t']})", r["calls"], 1e3 / r["ms_per_slice"]))
    ref = rows[-1][2]
    print(f"device: {dev} ({device_name(dev)}), threads {torch.get_num_threads()}, batch {a.batch}")
    print("| what | network calls per slice | slices/s | x iterative DDPM |")
    print("|---|---|---|---|")
    for name, calls, sps in rows:
        rel = f"{sps / ref:.1f}" if name.startswith("reconstruction") else ""
        print(f"| {name} | {calls} | {sps:.1f} | {rel} |")
    print(json.dumps({name: sps for name, _, sps in rows}))


if __name__ == "__main__":
    main()
