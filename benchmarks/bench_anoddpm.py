"""Speed of the anoddpm_simplex pieces: training samples/s and reconstruction slices/s per method.

Reconstruction modes are compared in the same run against the reference AnoDDPM way (the
iterative DDPM chain from t, t network calls per slice): one-shot x0 prediction (1 call) and DDIM
with k steps (k calls). The network is the bundle's default ``network_def`` with random weights
(speed does not depend on the weights).

Usage::

    python benchmarks/bench_anoddpm.py [--device cpu|cuda] [--t 250] [--batch 32] [--repeats 3]
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

CFG = ROOT / "bundles" / "anoddpm_simplex" / "configs" / "train.json"


def main() -> None:
    """Run the benchmark and print a Markdown table (also as JSON on the last line)."""
    from monai.bundle import ConfigParser
    from monai.inferers import DiffusionInferer

    from engines.diffusion import AnomalyInferer, SimplexDiffusionPrepareBatch

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--t", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ddpm-t", type=int, default=None, help="t of the iterative chain (default: --t)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    parser = ConfigParser()
    parser.read_config(str(CFG))
    net = parser.get_parsed_content("network_def").to(dev)
    sched = parser.get_parsed_content("noise_scheduler")
    size = int(parser.get_parsed_content("image_size"))
    x = torch.rand(a.batch, 1, size, size, device=dev) * 2 - 1

    # training step: the bundle's prepare-batch + DiffusionInferer + AdamW
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    prep = SimplexDiffusionPrepareBatch(num_train_timesteps=1000)
    inferer = DiffusionInferer(sched)

    def train_step() -> None:
        images, target, args, kwargs = prep({"image": x}, dev)
        pred = inferer(images, net, *args, **kwargs)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    net.train()
    t_train = timeit(train_step, a.repeats, dev)
    net.eval()
    rows = [("training step (simplex noise)", 1, a.batch / t_train)]
    ddpm_t = a.ddpm_t or a.t
    for recon, calls, t in (
        ("one_shot", 1, a.t),
        ("ddim", a.ddim_steps, a.t),
        ("ddpm", ddpm_t, ddpm_t),
    ):
        inf = AnomalyInferer(sched, t_start=t, recon=recon, ddim_steps=a.ddim_steps, seed=0)
        sec = timeit(lambda inf=inf: inf(x, net), 1 if recon == "ddpm" else a.repeats, dev)
        rows.append((f"reconstruction {recon} (t={t})", calls, a.batch / sec))
    ref = rows[-1][2]
    print(
        f"device: {dev} ({device_name(dev)}), "
        f"threads {torch.get_num_threads()}, batch {a.batch}, {size}x{size}"
    )
    print("| what | network calls per slice | slices/s | x iterative DDPM |")
    print("|---|---|---|---|")
    for name, calls, sps in rows:
        rel = f"{sps / ref:.1f}" if name.startswith("reconstruction") else ""
        print(f"| {name} | {calls} | {sps:.1f} | {rel} |")
    print(json.dumps({name: sps for name, _, sps in rows}))


if __name__ == "__main__":
    main()
