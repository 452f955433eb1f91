"""The Markdown section ``run_all.py`` writes into ``docs/benchmarks.md``, and its in-place update.

A section is delimited by HTML comments carrying its key (date and device kind), so a second run on the same
day and device replaces its own section and leaves every other entry of the file as it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_section", "section_key", "update_markdown"]


def _f(x: Any, digits: int = 1) -> str:
    """A number for a table cell: fixed digits, thousands kept readable; blank for missing or non-finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def _sig(x: float | None, digits: int = 2) -> str:
    """A number with ``digits`` significant digits (achieved TFLOP/s spans 0.001 on a loaded CPU to hundreds)."""
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    """A fraction as a percentage with two significant digits (MFU can be far below 1 %)."""
    if x is None or not math.isfinite(x):
        return ""
    return f"{100 * x:.2g} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align`` is one letter per column (``l`` left, ``r`` right; default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
    ]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def section_key(meta: Mapping[str, Any]) -> str:
    """``"<date> <device kind>"``: what identifies a section for replacement."""
    return f"{meta['date']} {meta['device_kind']}"


def _load(part: Mapping[str, Any]) -> str:
    lb, la = part.get("load_before"), part.get("load_after")
    return f" (load average {lb:.2f} → {la:.2f})" if lb is not None and la is not None else ""


def _skipped(part: Any) -> str | None:
    if part is None:
        return "not run (left out with `--only`)"
    if isinstance(part, Mapping) and part.get("skipped"):
        return f"not measured: {part['skipped']}"
    return None


def render_section(results: Mapping[str, Any]) -> str:
    """The Markdown section of one ``run_all.py`` run.

    Args:
        results: the run's result dict (``meta`` plus one entry per benchmark; see ``run_all.py``).

    Returns:
        The section, delimited by ``<!-- run_all ... -->`` markers.
    """
    meta = results["meta"]
    m = meta["machine"]
    key = section_key(meta)
    gpu = m.get("gpu") or "no GPU"
    lines = [
        f"<!-- run_all {key} -->",
        f"## Benchmark suite, {meta['device_kind'].upper()} ({meta['date']})",
        "",
        f"- machine: {m['cpu']}; {gpu}; Python {m['python']}, torch {m['torch']} ({meta['threads']} threads), "
        f"MONAI {m.get('monai')}",
        f"- command: `{meta['command']}`",
        f"- load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after; wall time "
        f"{meta['wall_s'] / 60:.1f} min",
        f"- {meta['settings']}",
    ]
    if meta.get("quick"):
        lines.append(
            "- **`--quick`: tiny batches and one timed run per figure; a check that it runs, not a result**"
        )

    # 1. data pipeline
    lines += [
        "",
        "### Data pipeline: anoddpm_simplex training slices/s" + _load(results.get("data") or {}),
        "",
    ]
    data = results.get("data")
    if (msg := _skipped(data)) is not None:
        lines.append(msg)
    else:
        lines.append(
            f"{data['volumes']} demo T1w volumes, {data['slices']} slices after the brain-fraction filter; batches "
            f"of {data['batch']}, `num_workers` {data['num_workers']} (the config's); the bundle's `slice_pipeline` "
            "and `train#augmentation`."
        )
        lines.append("")
        lines += _table(
            ["way", "slices/s", "epoch (s)", "one-off cache fill (s)", "x plain Dataset"],
            [
                [r["way"], _f(r["slices_per_s"]), _f(r["epoch_s"], 2), _f(r["cache_s"], 2), _f(r["ratio"], 2)]
                for r in data["rows"]
            ],
        )

    # 2. training
    train = results.get("train")
    lines += ["", "### Training samples/s: one `SupervisedTrainer` iteration" + _load(train or {}), ""]
    if (msg := _skipped(train)) is not None:
        lines.append(msg)
    else:
        lines.append(
            "Forward, loss, backward and optimizer step with the configs' network, prepare-batch, inferer, loss "
            "and optimizer, fp32 eager; FLOPs by `FlopCounterMode` (matmul/conv/attention, forward + backward)."
        )
        lines.append("")
        lines += _table(
            ["network", "batch", "samples/s", "range", "GFLOP/step", "TFLOP/s achieved"],
            [
                [
                    r["label"],
                    r["batch"],
                    f"{_f(r['per_s'])} {r['unit']}",
                    f"{_f(r['per_s_min'])} - {_f(r['per_s_max'])}",
                    _f(r.get("gflop_per_step"), 2),
                    _sig(r.get("achieved_tflops")),
                ]
                for r in train["rows"]
            ],
        )

    # 3. inference
    lines += ["", "### Inference latency per slice (per study for diffusion_mae)"]
    recon = results.get("anoddpm")
    lines += ["", "anoddpm_simplex reconstruction (`inference.json` `anomaly_inferer`, anomaly map included)"]
    lines[-1] += _load(recon or {}) + ":"
    lines.append("")
    if (msg := _skipped(recon)) is not None:
        lines.append(msg)
    else:
        lines += _table(
            [
                "t",
                "method",
                "network calls per slice",
                "batch",
                "ms/slice",
                "speed-up vs iterative DDPM chain",
            ],
            [
                [
                    r["t"],
                    {"ddpm": "iterative DDPM chain (AnoDDPM, reference)", "ddim": "DDIM"}.get(
                        r["method"], "one-shot x0"
                    ),
                    r["calls"],
                    r["batch"],
                    _f(r["ms_per_slice"]),
                    _f(r["speedup"]),
                ]
                for r in recon["rows"]
            ],
        )
    guided = results.get("guided")
    lines += [
        "",
        "ddim_classifier_guidance guided DDIM (`inference.json` `anomaly_inferer`)" + _load(guided or {}),
    ]
    lines[-1] += ":"
    lines.append("")
    if (msg := _skipped(guided)) is not None:
        lines.append(msg)
    else:
        lines += _table(
            [
                "setting",
                "DDIM steps k",
                "UNet calls",
                "classifier grads",
                "batch",
                "ms/slice",
                "speed-up vs k = L",
            ],
            [
                [
                    f"L={guided['level']}, s={r['s']:g}"
                    + (" (reference: every step)" if r["reference"] else ""),
                    r["k"],
                    r["unet_calls"],
                    r["classifier_grads"],
                    r["batch"],
                    _f(r["ms_per_slice"]),
                    _f(r.get("speedup")),
                ]
                for r in guided["rows"]
            ],
        )
    clf = results.get("classifiers")
    lines += [
        "",
        "latent_robust_classifier models (`evaluate.json` `eval_factories`)" + _load(clf or {}) + ":",
        "",
    ]
    if (msg := _skipped(clf)) is not None:
        lines.append(msg)
    else:
        lines += _table(
            ["model", "batch", "ms/slice", "time x CNN baseline"],
            [[r["model"], r["batch"], _f(r["ms_per_slice"], 2), _f(r["x_cnn"], 2)] for r in clf["rows"]],
        )
        by = {r["model"]: r["ms_per_slice"] for r in clf["rows"]}
        if "hybrid" in by and "latent_resnet" in by:
            lines += [
                "",
                "hybrid (encoder, corrupt-and-clean, ResNet head) / plain latent ResNet head (same encoder and "
                f"head): **{by['hybrid'] / by['latent_resnet']:.1f}x** the time",
            ]
    study = results.get("study_embedding")
    lines += [
        "",
        "diffusion_mae study embedding (`inference.json` `classifier`)" + _load(study or {}) + ":",
        "",
    ]
    if (msg := _skipped(study)) is not None:
        lines.append(msg)
    else:
        lines += _table(
            ["what", "studies", "views per study", "ms/study", "time x model only"],
            [
                [
                    r["what"],
                    r["studies"],
                    _f(r["views_per_study"], 2),
                    _f(r["ms_per_study"], 2),
                    _f(r["x_model"], 2),
                ]
                for r in study["rows"]
            ],
        )

    # 4. simplex
    simplex = results.get("simplex")
    lines += ["", "### Simplex noise vs opensimplex" + _load(simplex or {}), ""]
    if (msg := _skipped(simplex)) is not None:
        lines.append(msg)
    else:
        lines.append(simplex["description"])
        lines.append("")
        lines += _table(
            ["implementation", "fields/s (median)", "ms/field", "fields/s range"],
            [
                [
                    r["label"],
                    _f(r["fields_per_s"]),
                    _f(r["ms_per_field"], 2),
                    f"{_f(r['fields_per_s_min'])} - {_f(r['fields_per_s_max'])}",
                ]
                for r in simplex["rows"]
            ]
            + [
                [
                    simplex["naive"]["label"] + " (scale only)",
                    _f(simplex["naive"]["fields_per_s"], 2),
                    _f(simplex["naive"]["ms_per_field"]),
                    "",
                ]
            ],
        )
        if simplex.get("ratio") is not None:
            lines += ["", f"ratio ours / opensimplex (faster variant): **{simplex['ratio']:.2f}**"]

    # 5. GPU
    gpu_part = results.get("gpu")
    lines += ["", "### GPU: bf16 autocast, channels-last, `torch.compile`, model FLOP utilisation", ""]
    if (msg := _skipped(gpu_part)) is not None:
        lines.append(msg)
    else:
        peak = gpu_part.get("peak_tflops")
        lines.append(
            f"{gpu_part['gpu']}; ratios over fp32 eager on the same GPU; MFU = counted FLOPs per step / step time / "
            + (
                f"dense bf16 peak {peak:g} TFLOP/s ({gpu_part['peak_source']})."
                if peak
                else "(peak unknown: MFU left out; give --peak-tflops)."
            )
            + (f" fp32 eager math: {gpu_part['fp32_math']}." if gpu_part.get("fp32_math") else "")
        )
        lines.append("")
        lines += _table(
            ["network", "variant", "samples/s", "speed-up vs fp32 eager", "MFU", "compile (s)"],
            [
                [
                    r["key"],
                    r["variant"] + (f" (failed: {r['error']})" if r.get("error") else ""),
                    _f(r.get("per_s")),
                    _f(r.get("speedup"), 2),
                    _pct(r.get("mfu")),
                    _f(r.get("compile_s")),
                ]
                for r in gpu_part["train_variants"]
            ],
        )
        if gpu_part.get("infer_bf16"):
            lines += ["", "Inference under bf16 autocast:", ""]
            lines += _table(
                ["what", "fp32 ms", "bf16 ms", "speed-up"],
                [
                    [r["what"], _f(r["fp32_ms"], 2), _f(r["bf16_ms"], 2), _f(r["speedup"], 2)]
                    for r in gpu_part["infer_bf16"]
                ],
            )
        for err in gpu_part.get("errors") or []:
            lines += ["", f"not measured: {err}"]
        if gpu_part.get("simplex_fields_per_s"):
            lines += [
                "",
                f"simplex noise on the GPU (ours, same fields): {gpu_part['simplex_fields_per_s']:.0f} fields/s, "
                f"**{gpu_part['simplex_ratio']:.1f}x** opensimplex on the CPU in this run",
            ]
    lines += [f"<!-- /run_all {key} -->"]
    return "\n".join(lines) + "\n"


def update_markdown(path: str | Path, section: str, key: str) -> Path:
    """Replace the section of ``key`` in a Markdown file, or append it when the file has none.

    Args:
        path: the file (created if missing).
        section: the rendered section (with its markers).
        key: its key (:func:`section_key`).

    Returns:
        The path.
    """
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(
        rf"<!-- run_all {re.escape(key)} -->.*?<!-- /run_all {re.escape(key)} -->\n?", flags=re.DOTALL
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section if text else section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
