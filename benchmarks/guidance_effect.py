"""What the guidance does with trained networks: the classifier's p(diseased) of guided reconstructions of
diseased validation slices, and how far they move from the input, for several noise levels L and scales s.

Usage::

    python benchmarks/guidance_effect.py --ckpt_dir bundles/ddim_classifier_guidance/models \
        [--levels 250 500] [--scales 0 10 50 200] [--ddim-steps 5] [--volumes 6] [--slices 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CFG = ROOT / "bundles" / "ddim_classifier_guidance" / "configs"


def main() -> None:
    """Print a Markdown table of p(diseased) and mean |x - x_hat| per (L, s) (and the rows as JSON)."""
    from monai.bundle import ConfigParser

    from engines import GuidedDDIMInferer, load_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--dataset_dir", default=None, help="default: the demo cohort")
    ap.add_argument("--levels", type=int, nargs="+", default=[250, 500])
    ap.add_argument("--scales", type=float, nargs="+", default=[0, 10, 50, 200])
    ap.add_argument("--ddim-steps", type=int, default=5)
    ap.add_argument("--volumes", type=int, default=6, help="validation volumes read (mixed kinds)")
    ap.add_argument("--slices", type=int, default=16, help="diseased slices used")
    a = ap.parse_args()
    p = ConfigParser()
    p.read_config([str(CFG / "train_diffusion.json"), str(CFG / "train_classifier.json")])
    p["bundle_root"] = str(CFG.parent)
    p["device"] = torch.device("cpu")
    p["max_volumes"] = a.volumes
    if a.dataset_dir:
        p["dataset_dir"] = a.dataset_dir
    ckpt = Path(a.ckpt_dir)
    unet = p.get_parsed_content("unet_def")
    unet.load_state_dict(load_checkpoint(ckpt / "diffusion_model.pt"))
    clf = p.get_parsed_content("classifier_def")
    clf.load_state_dict(load_checkpoint(ckpt / "classifier.pt"))
    unet.eval()
    clf.eval()
    healthy = int(p.get_parsed_content("healthy_index"))
    sched = p.get_parsed_content("noise_scheduler")
    ds = p.get_parsed_content("validate#dataset")
    diseased = [s["image"] for s in ds.slices if int(s["class_label"]) != healthy][: a.slices]
    x = torch.stack([torch.as_tensor(d) for d in diseased]).float()

    def p_diseased(img: torch.Tensor) -> float:
        with torch.no_grad():
            logits = clf(img, torch.zeros(img.shape[0], dtype=torch.long))
        return float(1 - torch.softmax(logits, 1)[:, healthy].mean())

    rows = [{"L": 0, "s": 0.0, "p_diseased": p_diseased(x), "mean_abs_change": 0.0}]
    for level in a.levels:
        for s in a.scales:
            inf = GuidedDDIMInferer(sched, clf, level, s, ddim_steps=a.ddim_steps, healthy_index=healthy)
            r = inf.reconstruct(x, unet)["recon"]
            rows.append(
                {
                    "L": level,
                    "s": s,
                    "p_diseased": p_diseased(r),
                    "mean_abs_change": float((r - x).abs().mean()),
                }
            )
    print(f"{len(x)} diseased validation slices, k = {a.ddim_steps} DDIM steps")
    print("| L | s | mean p(diseased) | mean abs(x - x_hat) |")
    print("|---|---|---|---|")
    for r in rows:
        name = "input" if r["L"] == 0 else str(r["L"])
        print(f"| {name} | {r['s']:g} | {r['p_diseased']:.3f} | {r['mean_abs_change']:.4f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
