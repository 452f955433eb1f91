"""How much the realised split-conformal coverage of a trained classifier varies with *which* subjects calibrate.

Pools the calibration (validation) and test subjects of a classification datalist, then repeatedly splits them
at random by subject (stratified by kind: half of each kind's subjects calibrate, the rest test) and records the
test coverage of each score and alpha. On a small cohort, slices of one subject are correlated, so one split's
coverage can fall well below 1 - alpha although its mean over splits is on target.

Usage::

    python benchmarks/conformal_resplit.py --ckpt_dir bundles/latent_robust_classifier/models/multiclass \
        --task multiclass [--models cnn hybrid] [--splits 500] [--dataset_dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CFG = ROOT / "bundles" / "latent_robust_classifier" / "configs"


def main() -> None:
    """Print a Markdown table: per model, score and alpha, the mean, 5th percentile and shortfall rate."""
    from monai.bundle import ConfigParser

    import engines
    from engines.conformal import conformal_sets, set_metrics

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--task", default="multiclass")
    ap.add_argument("--models", nargs="+", default=["cnn", "latent_resnet", "noise_aware", "hybrid"])
    ap.add_argument("--splits", type=int, default=500)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.05])
    ap.add_argument("--scores", nargs="+", default=["lac", "aps"])
    ap.add_argument("--dataset_dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    p = ConfigParser()
    p.read_config([str(CFG / "train.json"), str(CFG / "evaluate.json")])
    p["bundle_root"] = str(CFG.parent)
    p["task"], p["ckpt_dir"], p["device"] = a.task, a.ckpt_dir, torch.device("cpu")
    if a.dataset_dir:
        p["dataset_dir"] = a.dataset_dir
    factories = p.get_parsed_content("eval_factories")
    items = p.get_parsed_content("validate#data") + p.get_parsed_content("test_data")
    raw, norm = p.get_parsed_content("raw_slice_transform"), p.get_parsed_content("normalise")
    x, y = engines.load_slices(items, raw)
    x = torch.stack([torch.as_tensor(norm(i)) for i in x])
    subject = np.array([it["subject"] for it in items])
    kind = {it["subject"]: it.get("class_name", str(it["label"])) for it in items}
    subjects = np.unique(subject)
    rng = np.random.default_rng(a.seed)
    splits = []
    for _ in range(a.splits):
        cal: set[str] = set()
        for k in sorted(set(kind.values())):
            members = [s for s in subjects if kind[s] == k]
            rng.shuffle(members)
            cal |= set(members[: len(members) // 2])
        splits.append(np.isin(subject, sorted(cal)))

    rows = []
    for m in a.models:
        probs = engines.predict_probabilities(factories[m](), x)
        for score in a.scores:
            for alpha in a.alphas:
                cov = np.array(
                    [
                        set_metrics(
                            conformal_sets(probs[c], y[c], probs[~c], alpha=alpha, score=score), y[~c]
                        )["coverage"]
                        for c in splits
                    ]
                )
                rows.append(
                    {
                        "model": m, "score": score, "alpha": alpha, "mean": float(cov.mean()),
                        "p5": float(np.quantile(cov, 0.05)), "below": float(np.mean(cov < 1 - alpha - 0.03)),
                    }
                )  # fmt: skip
    print(f"{len(subjects)} subjects, {len(y)} slices, {a.splits} random subject-level splits\n")
    print("| model | score | alpha | mean coverage | 5th percentile | share below 1 - alpha - 0.03 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['score']} | {r['alpha']} | {r['mean']:.3f} | {r['p5']:.3f} | {r['below']:.2f} |"
        )
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
