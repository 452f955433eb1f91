"""The benchmark suite in one command: data pipeline, training, inference, simplex noise and (on a GPU) mixed
precision, channels-last, ``torch.compile`` and model FLOP utilisation.

Every figure comes from the bundles' own pieces, parsed from their JSON configs with ``monai.bundle.ConfigParser``
(only sizes, the device, the data folder and the checkpoint folder overridden; random weights, since speed does
not depend on them), and is set against a naive or reference way measured in the same run where one exists:

1. data pipeline (:mod:`benchmarks.bench_data`): slices/s of anoddpm_simplex's training pipeline from a small
   demo cohort through ``CacheDataset`` and the bundle's ``SliceDataset``, against a plain ``Dataset`` that
   re-loads every volume every epoch;
2. training (:mod:`benchmarks.bench_train`): samples/s of one ``SupervisedTrainer`` iteration of each trainable
   network at the bundle's batch size, and its FLOPs;
3. inference: anoddpm_simplex one-shot / DDIM against the iterative DDPM chain at t = 100 and 250
   (:mod:`benchmarks.bench_anoddpm`); guided DDIM at L = 500, s in {0, 50}, k in {5, 10} against every step
   (:mod:`benchmarks.bench_guided`); latent_robust_classifier's models against the CNN baseline (and the hybrid
   against the plain latent head) and diffusion_mae's study embedding (:mod:`benchmarks.bench_infer`);
4. simplex noise against ``opensimplex`` + numba (:mod:`benchmarks.bench_simplex`);
5. on a CUDA device: the training steps with bf16 autocast (the trainers' ``amp`` switch), channels-last and
   ``SupervisedTrainer(compile=True)`` against fp32 eager, the MFU against the GPU's dense bf16 peak, inference
   under bf16 autocast, and simplex noise on the GPU. Without a GPU the section says so; nothing is estimated.

Timings: warm-up, then the median of ``--repeats`` (CUDA-synchronised); the load average is recorded before and
after every part. The report is one dated section of Markdown (``--write`` replaces the section of the same date
and device in that file, or appends it) and, with ``--json``, every number in a JSON file.

Usage::

    python benchmarks/run_all.py                                   # full run, prints the Markdown section
    python benchmarks/run_all.py --write docs/benchmarks.md --json benchmarks/results/run_all-cpu.json
    python benchmarks/run_all.py --quick                           # tiny sizes: a check that everything runs
    python benchmarks/run_all.py --only train infer --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bundles import build_cohort  # noqa: E402
from benchmarks._report import render_section, section_key, update_markdown  # noqa: E402
from benchmarks._timing import device_name, load_average, machine_info  # noqa: E402

__all__ = ["main", "parse_args", "run"]

PARTS = ("data", "train", "infer", "simplex", "gpu")
# compilation costs tens of seconds per network and variant: by default one UNet and one ViT (--compile-models)
DEFAULT_COMPILE = ("anoddpm_simplex/unet", "diffusion_mae/diffusion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; unset sizes are filled in by :func:`settings` from ``--quick`` and the device."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny batches, one timed run: a check that all runs")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5 CPU, 20 GPU)")
    ap.add_argument(
        "--train-batch", type=int, default=None, help="override every bundle's training batch size"
    )
    ap.add_argument(
        "--infer-batch", type=int, default=None, help="slices per inference call (default 16 CPU, 64 GPU)"
    )
    ap.add_argument(
        "--reference-batch",
        type=int,
        default=None,
        help="slices of guided DDIM's every-step reference (default 4 CPU, the inference batch on a GPU)",
    )
    ap.add_argument("--cohort", type=Path, default=None, help="demo cohort folder (built there if missing)")
    ap.add_argument("--subjects", type=int, default=8, help="subjects of the demo cohort")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=None, help="run only these parts")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU for the MFU")
    ap.add_argument(
        "--compile-models",
        nargs="*",
        default=list(DEFAULT_COMPILE),
        help="training cases measured with torch.compile on a GPU ('all', or none to skip)",
    )
    ap.add_argument("--write", type=Path, default=None, help="Markdown file to add or update the section in")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    return ap.parse_args(argv)


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """Resolve the sizes: explicit flags win, then ``--quick``, then the device's defaults.

    Args:
        a: the parsed command line.

    Returns:
        ``device``, ``repeats``, ``train_batch`` (None: the bundles'), ``infer_batch``, ``reference_batch``,
        ``simplex_repeats``, ``simplex_batch``, ``compile_models``.
    """
    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    gpu = device.type == "cuda"
    infer_batch = a.infer_batch or (2 if a.quick else 64 if gpu else 16)
    compile_models = a.compile_models
    if compile_models == ["all"]:
        from benchmarks.bench_train import CASES

        compile_models = [c.key for c in CASES]
    return {
        "device": device,
        "repeats": a.repeats or (1 if a.quick else 20 if gpu else 5),
        "train_batch": a.train_batch or (2 if a.quick else None),
        "infer_batch": infer_batch,
        "reference_batch": a.reference_batch or (1 if a.quick else infer_batch if gpu else 4),
        # the iterative references cost t (or 2 L) network calls per slice: --quick shortens the chains, which
        # runs the same code at a tenth of the length
        "t_values": (10, 25) if a.quick else (100, 250),
        "level": 50 if a.quick else 500,
        "simplex_repeats": a.repeats or (2 if a.quick else 15),
        "simplex_batch": 4 if a.quick else 16,
        "compile_models": list(compile_models or []),
    }


def _describe(s: dict[str, Any], a: argparse.Namespace) -> str:
    """The settings line of the report."""
    return (
        f"median of {s['repeats']} timed runs after a warm-up (iterative references: one run); training batch: "
        f"{s['train_batch'] or 'the bundles defaults'}; inference batch {s['infer_batch']} slices (guided "
        f"reference {s['reference_batch']}); anoddpm t in {list(s['t_values'])}, guided L = {s['level']}; demo "
        f"cohort of {a.subjects} subjects; random weights"
    )


def _part(results: dict[str, Any], name: str, threads: int, fn: Callable[[], Any]) -> Any:
    """Run one part with the thread count reset (numba's import resets it), its load average recorded, and its
    failure recorded instead of ending the suite."""
    torch.set_num_threads(threads)
    lb = load_average()
    t0 = time.perf_counter()
    print(f"[{name}]", flush=True)
    try:
        out = fn()
    except Exception as e:  # a broken part must not cost the figures of the others
        out = {"skipped": f"failed: {type(e).__name__}: {e}"}
        print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
    part = dict(out) if isinstance(out, dict) else {"rows": out}
    part.update(load_before=lb, load_after=load_average(), wall_s=time.perf_counter() - t0)
    results[name] = part
    return part


def run(a: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the selected parts and return the results (see the module docstring).

    Args:
        a: the parsed command line.
        command: the command line as it is to be recorded.

    Returns:
        ``{"meta": ..., "data", "train", "anoddpm", "guided", "classifiers", "study_embedding", "simplex",
        "gpu"}``; a part left out with ``--only`` is absent.
    """
    from benchmarks.bench_anoddpm import measure_reconstruction
    from benchmarks.bench_data import measure_pipeline
    from benchmarks.bench_guided import measure_guided
    from benchmarks.bench_infer import measure_classifiers, measure_study_embedding
    from benchmarks.bench_simplex import measure_simplex
    from benchmarks.bench_simplex import parse_args as simplex_args
    from benchmarks.bench_train import measure_training

    s = settings(a)
    dev, reps = s["device"], s["repeats"]
    parts = set(a.only or PARTS)
    torch.set_num_threads(a.threads)
    results: dict[str, Any] = {}
    load0, t_start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
        cohort = build_cohort(a.cohort or Path(tmp) / "cohort", a.subjects)
        print(f"cohort: {cohort}; device {dev}; {a.threads} threads; settings {s}", flush=True)

        if "data" in parts:
            _part(results, "data", a.threads, lambda: measure_pipeline(cohort, reps, None, a.threads))
        if "train" in parts:
            _part(
                results,
                "train",
                a.threads,
                lambda: measure_training(dev, cohort, tmp, reps, s["train_batch"]),
            )
        if "infer" in parts:
            ib = s["infer_batch"]
            _part(
                results,
                "anoddpm",
                a.threads,
                lambda: measure_reconstruction(dev, s["t_values"], ib, 10, reps, chain_batch=ib),
            )
            guided = _part(
                results,
                "guided",
                a.threads,
                lambda: measure_guided(dev, s["level"], (5, 10), (0.0, 50.0), ib, reps, s["reference_batch"]),
            )
            guided["level"] = s["level"]
            _part(results, "classifiers", a.threads, lambda: measure_classifiers(dev, cohort, tmp, ib, reps))
            _part(
                results,
                "study_embedding",
                a.threads,
                lambda: measure_study_embedding(dev, cohort, tmp, None, reps),
            )
        if "simplex" in parts:
            sargs = simplex_args(
                ["--repeats", str(s["simplex_repeats"]), "--batch", str(s["simplex_batch"])]
                + ["--threads", str(a.threads)]
                + (["--naive-fields", "1"] if a.quick else [])
            )

            def simplex() -> dict[str, Any]:
                out = measure_simplex(sargs)
                out["description"] = (
                    f"{sargs.batch} fields of {sargs.size}x{sargs.size}, {sargs.octaves} octaves, frequency "
                    f"{sargs.frequency:g}/px, decay {sargs.decay}, median of {sargs.repeats} alternating repeats "
                    "(`bench_simplex.py`'s method; its own entries above stay as they are)."
                )
                return out

            _part(results, "simplex", a.threads, simplex)
        if "gpu" in parts:
            if dev.type != "cuda":
                reason = (
                    "no GPU (torch.cuda.is_available() is False)"
                    if not torch.cuda.is_available()
                    else f"the suite ran on {dev} (--device)"
                )
                results["gpu"] = {"skipped": reason}
            else:
                _part(results, "gpu", a.threads, lambda: _gpu(a, s, cohort, tmp, results))
    meta = {
        "date": datetime.date.today().isoformat(),
        "device_kind": "gpu" if dev.type == "cuda" else "cpu",
        "device": str(dev),
        "command": command,
        "machine": machine_info(),
        "threads": a.threads,
        "quick": bool(a.quick),
        "load_before": load0,
        "load_after": load_average(),
        "wall_s": time.perf_counter() - t_start,
        "settings": _describe(s, a),
    }
    return {"meta": meta, **results}


def _gpu(
    a: argparse.Namespace, s: dict[str, Any], cohort: Path, workdir: str, results: dict[str, Any]
) -> Any:
    """Part 5 on a CUDA device: training variants and MFU, inference under bf16 autocast, simplex on the GPU."""
    from benchmarks.bench_anoddpm import measure_reconstruction
    from benchmarks.bench_guided import measure_guided
    from benchmarks.bench_infer import measure_classifiers, measure_study_embedding
    from benchmarks.bench_simplex import measure_simplex
    from benchmarks.bench_simplex import parse_args as simplex_args
    from benchmarks.bench_train import gpu_variants, measure_training, peak_tflops

    dev, reps, ib = s["device"], s["repeats"], s["infer_batch"]
    name = device_name(dev)
    peak = peak_tflops(name, a.peak_tflops)
    source = "--peak-tflops" if a.peak_tflops else "table in bench_train.py"
    eager = (results.get("train") or {}).get("rows")
    if not isinstance(eager, list) or not eager:
        eager = measure_training(dev, cohort, workdir, reps, s["train_batch"])
    variants = gpu_variants(dev, cohort, workdir, eager, reps, s["train_batch"], s["compile_models"], peak)

    infer: list[dict[str, Any]] = []

    def pair(what: str, fp32: float | None, bf16: float) -> None:
        if fp32:
            infer.append({"what": what, "fp32_ms": fp32, "bf16_ms": bf16, "speedup": fp32 / bf16})

    def rows_of(key: str) -> list[dict[str, Any]]:
        part = results.get(key) or {}
        return part.get("rows") if isinstance(part.get("rows"), list) else []

    t, level = s["t_values"][-1], s["level"]
    errors: list[str] = []

    def guarded(what: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        try:
            return fn()
        except Exception as e:  # one failing pass must not cost the others
            errors.append(f"{what}: {type(e).__name__}: {e}"[:300])
            return []

    fp = {(r["t"], r["method"]): r["ms_per_slice"] for r in rows_of("anoddpm")}
    for r in guarded(
        "anoddpm", lambda: measure_reconstruction(dev, (t,), ib, 10, reps, autocast=True, chain=False)
    ):
        pair(f"anoddpm t={t} {r['method']} (ms/slice)", fp.get((t, r["method"])), r["ms_per_slice"])
    fp = {(r["k"], r["s"]): r["ms_per_slice"] for r in rows_of("guided") if not r["reference"]}
    for r in guarded(
        "guided", lambda: measure_guided(dev, level, (5, 10), (0.0, 50.0), ib, reps, None, autocast=True)
    ):
        pair(
            f"guided L={level} k={r['k']} s={r['s']:g} (ms/slice)",
            fp.get((r["k"], r["s"])),
            r["ms_per_slice"],
        )
    fp = {r["model"]: r["ms_per_slice"] for r in rows_of("classifiers")}
    for r in guarded(
        "classifiers", lambda: measure_classifiers(dev, cohort, workdir, ib, reps, autocast=True)
    ):
        pair(f"classifier {r['model']} (ms/slice)", fp.get(r["model"]), r["ms_per_slice"])
    fp = {r["what"]: r["ms_per_study"] for r in rows_of("study_embedding")}
    for r in guarded(
        "study embedding", lambda: measure_study_embedding(dev, cohort, workdir, None, reps, autocast=True)
    ):
        pair(f"diffusion_mae {r['what']} (ms/study)", fp.get(r["what"]), r["ms_per_study"])

    out: dict[str, Any] = {
        "gpu": name,
        # PyTorch's defaults, which "fp32 eager" means here: convolutions may use TF32 tensor cores, matmuls not
        "fp32_math": f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, float32 matmul precision "
        f"'{torch.get_float32_matmul_precision()}', cudnn.benchmark={torch.backends.cudnn.benchmark}",
        "peak_tflops": peak,
        "peak_source": source,
        "train_variants": variants,
        "infer_bf16": infer,
        "errors": errors,
    }
    sim = (results.get("simplex") or {}).get("rows")
    if isinstance(sim, list):
        os_best = max((r["fields_per_s"] for r in sim if r["key"] != "ours"), default=None)
        gargs = simplex_args(
            [
                "--device",
                str(dev),
                "--no-opensimplex",
                "--repeats",
                str(s["simplex_repeats"]),
                "--batch",
                "64",
            ]
        )
        try:
            fps = measure_simplex(gargs)["rows"][0]["fields_per_s"]
            out["simplex_fields_per_s"] = fps
            out["simplex_ratio"] = fps / os_best if os_best else None
        except Exception as e:
            errors.append(f"simplex: {type(e).__name__}: {e}"[:300])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the Markdown section, and write it (``--write``) and the JSON (``--json``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    command = shlex.join(["python", "benchmarks/run_all.py", *argv])
    results = run(a, command)
    section = render_section(results)
    print(section)
    if a.write is not None:
        update_markdown(a.write, section, section_key(results["meta"]))
        print(f"section written to {a.write}")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
