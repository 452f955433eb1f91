"""Per-slice latency of guided DDIM (ddim_classifier_guidance): DDIM encoding to L plus classifier-guided
decoding, against the number of DDIM steps k.

Each step of the decoding costs one UNet call plus one classifier forward and backward (when s != 0); the
encoding costs one UNet call per step. Latencies are compared in the same run against the reference setting of
the method's public code, every step of the chain (k = L, ``timestep_respacing="ddim1000"`` with L = 500) — the
reference is timed once on a smaller batch because it takes a minute per slice batch on a CPU. The networks are
the bundle's default ``unet_def`` and ``classifier_def`` with random weights (speed does not depend on them).

Usage::

    python benchmarks/bench_guided.py [--device cpu|cuda] [--level 500] [--steps 5 10 25 50]
        [--batch 16] [--scale 10] [--repeats 3] [--reference-batch 4] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._timing import device_name, timeit  # noqa: E402

CFG = ROOT / "bundles" / "ddim_classifier_guidance" / "configs" / "train_diffusion.json"


def main() -> None:
    """Run the benchmark and print a Markdown table (and the rows as JSON on the last line)."""
    from monai.bundle import ConfigParser

    from engines.guided import GuidedDDIMInferer

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
    parser = ConfigParser()
    parser.read_config(str(CFG))
    parser["dataset_dir"] = "unused"
    parser["datalist"] = {"labels": ["healthy", "diseased"]}  # class count only: no data is read
    unet = parser.get_parsed_content("unet_def").to(dev).eval()
    clf = parser.get_parsed_content("classifier_def").to(dev).eval()
    sched = parser.get_parsed_content("noise_scheduler")
    size = int(parser.get_parsed_content("image_size"))
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return (torch.rand(n, 1, size, size, generator=g) * 2 - 1).to(dev)

    rows = []
    for k in a.steps:
        for s in (0.0, a.scale):
            inf = GuidedDDIMInferer(sched, clf, a.level, s, ddim_steps=k)
            x = images(a.batch)
            sec = timeit(lambda inf=inf, x=x: inf.reconstruct(x, unet), a.repeats, dev)
            rows.append({"k": k, "s": s, "batch": a.batch, "ms_per_slice": 1000 * sec / a.batch})
    if not a.no_reference:
        inf = GuidedDDIMInferer(sched, clf, a.level, a.scale, ddim_steps=a.level)
        x = images(a.reference_batch)
        sec = timeit(lambda: inf.reconstruct(x, unet), 1, dev)
        rows.append(
            {
                "k": a.level,
                "s": a.scale,
                "batch": a.reference_batch,
                "ms_per_slice": 1000 * sec / a.reference_batch,
            }
        )
    ref = rows[-1]["ms_per_slice"] if not a.no_reference else None
    name = device_name(dev)
    print(f"device: {dev} ({name}), threads {torch.get_num_threads()}, {size}x{size}, L={a.level}")
    print("| DDIM steps k | s | UNet calls | classifier grads | batch | ms per slice | speed-up vs k = L |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        grads = r["k"] if r["s"] else 0
        up = f"{ref / r['ms_per_slice']:.1f}" if ref else ""
        print(
            f"| {r['k']} | {r['s']:g} | {2 * r['k']} | {grads} | {r['batch']} | {r['ms_per_slice']:.1f} | {up} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
