"""The benchmark suite's report: the Markdown section from a result dict, its in-place update, the settings and
the GPU peak table. No timing is asserted anywhere (the numbers below are made up)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import run_all
from benchmarks._report import render_section, section_key, update_markdown
from benchmarks._timing import CallCounter
from benchmarks.bench_train import peak_tflops


def _results(date: str = "2026-01-02", value: float = 12.5, gpu: dict | None = None) -> dict:
    load = {"load_before": 0.5, "load_after": 0.7}
    return {
        "meta": {
            "date": date,
            "device_kind": "cpu",
            "command": "python benchmarks/run_all.py",
            "machine": {
                "cpu": "Test CPU, 2 cores",
                "python": "3.11",
                "torch": "2.x",
                "monai": "1.x",
                "gpu": None,
            },
            "threads": 2,
            "quick": False,
            "load_before": 0.5,
            "load_after": 0.7,
            "wall_s": 60.0,
            "settings": "median of 5",
        },
        "data": {
            "volumes": 8,
            "slices": 494,
            "batch": 32,
            "num_workers": 0,
            "rows": [
                {
                    "way": "Dataset (re-load every epoch)",
                    "slices_per_s": 50.0,
                    "epoch_s": 9.0,
                    "cache_s": None,
                    "ratio": 1.0,
                },
                {
                    "way": "CacheDataset (cached volumes)",
                    "slices_per_s": 80.0,
                    "epoch_s": 6.0,
                    "cache_s": 1.5,
                    "ratio": 1.6,
                },
            ],
            **load,
        },
        "train": {
            "rows": [
                {
                    "label": "anoddpm_simplex: UNet",
                    "unit": "slices",
                    "batch": 32,
                    "per_s": value,
                    "per_s_min": 11.0,
                    "per_s_max": 13.0,
                    "gflop_per_step": 160.0,
                    "achieved_tflops": 0.06,
                }
            ],
            **load,
        },
        "anoddpm": {
            "rows": [
                {
                    "method": "one_shot",
                    "t": 100,
                    "calls": 1,
                    "batch": 16,
                    "ms_per_slice": 9.0,
                    "speedup": 100.0,
                },
                {
                    "method": "ddpm",
                    "t": 100,
                    "calls": 100,
                    "batch": 16,
                    "ms_per_slice": 900.0,
                    "speedup": 1.0,
                },
            ],
            **load,
        },
        "guided": {
            "level": 500,
            "rows": [
                {
                    "k": 5,
                    "s": 50.0,
                    "unet_calls": 10,
                    "classifier_grads": 5,
                    "batch": 16,
                    "ms_per_slice": 100.0,
                    "reference": False,
                    "speedup": 90.0,
                },
                {
                    "k": 500,
                    "s": 50.0,
                    "unet_calls": 998,
                    "classifier_grads": 499,
                    "batch": 4,
                    "ms_per_slice": 9000.0,
                    "reference": True,
                    "speedup": 1.0,
                },
            ],
            **load,
        },
        "classifiers": {
            "rows": [
                {"model": "cnn", "batch": 16, "ms_per_slice": 1.0, "x_cnn": 1.0},
                {"model": "latent_resnet", "batch": 16, "ms_per_slice": 2.0, "x_cnn": 2.0},
                {"model": "hybrid", "batch": 16, "ms_per_slice": 8.0, "x_cnn": 8.0},
            ],
            **load,
        },
        "study_embedding": {"skipped": "failed: RuntimeError: boom", **load},
        "simplex": None,
        "gpu": gpu or {"skipped": "no GPU (torch.cuda.is_available() is False)"},
    }


def test_section_has_every_table_and_says_what_was_not_measured() -> None:
    text = render_section(_results())
    for header in (
        "| way | slices/s | epoch (s) | one-off cache fill (s) | x plain Dataset |",
        "| network | batch | samples/s | range | GFLOP/step | TFLOP/s achieved |",
        "| t | method | network calls per slice | batch | ms/slice | speed-up vs iterative DDPM chain |",
        "| setting | DDIM steps k | UNet calls | classifier grads | batch | ms/slice | speed-up vs k = L |",
        "| model | batch | ms/slice | time x CNN baseline |",
    ):
        assert header in text
    assert "- command: `python benchmarks/run_all.py`" in text
    assert "load average 0.50 before, 0.70 after" in text
    assert "**4.0x** the time" in text  # hybrid 8 ms over the plain latent head's 2 ms
    assert "not measured: failed: RuntimeError: boom" in text
    assert "not run (left out with `--only`)" in text  # simplex None
    assert "not measured: no GPU" in text
    # every table row has as many cells as its header
    for block in text.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in rows}) <= 1, block


def test_gpu_part_renders_mfu_and_speedups() -> None:
    gpu = {
        "gpu": "NVIDIA H200",
        "peak_tflops": 989.0,
        "peak_source": "table",
        "fp32_math": "cudnn.allow_tf32=True",
        "train_variants": [
            {
                "key": "anoddpm_simplex/unet",
                "variant": "fp32 eager",
                "per_s": 1000.0,
                "speedup": 1.0,
                "mfu": 0.0123,
            },
            {
                "key": "anoddpm_simplex/unet",
                "variant": "bf16",
                "per_s": 1500.0,
                "speedup": 1.5,
                "mfu": 0.0186,
                "compile_s": None,
            },
        ],
        "infer_bf16": [{"what": "classifier cnn (ms/slice)", "fp32_ms": 0.2, "bf16_ms": 0.1, "speedup": 2.0}],
    }
    text = render_section(_results(gpu=gpu))
    assert "| network | variant | samples/s | speed-up vs fp32 eager | MFU | compile (s) |" in text
    assert "| anoddpm_simplex/unet | bf16 | 1500 | 1.50 | 1.9 % |  |" in text
    assert "dense bf16 peak 989 TFLOP/s" in text


def test_update_replaces_its_own_section_and_keeps_the_rest(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nolder entry\n")
    first = _results(value=12.5)
    update_markdown(doc, render_section(first), section_key(first["meta"]))
    other_day = _results(date="2026-01-03", value=20.0)
    update_markdown(doc, render_section(other_day), section_key(other_day["meta"]))
    rerun = _results(value=14.25)
    update_markdown(doc, render_section(rerun), section_key(rerun["meta"]))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nolder entry\n")
    assert text.count("<!-- run_all 2026-01-02 cpu -->") == 1
    assert text.count("<!-- run_all 2026-01-03 cpu -->") == 1
    assert "14.2 slices" in text and "12.5 slices" not in text and "20.0 slices" in text
    assert text.index("2026-01-02 cpu -->") < text.index("2026-01-03 cpu -->")  # replaced in place


def test_quick_settings_are_tiny_and_full_defaults_follow_the_device() -> None:
    quick = run_all.settings(run_all.parse_args(["--quick", "--device", "cpu"]))
    assert quick["repeats"] == 1 and quick["train_batch"] == 2 and quick["infer_batch"] == 2
    full = run_all.settings(run_all.parse_args(["--device", "cpu"]))
    assert full["repeats"] == 5 and full["train_batch"] is None and full["infer_batch"] == 16
    assert full["t_values"] == (100, 250) and full["level"] == 500
    explicit = run_all.settings(run_all.parse_args(["--quick", "--device", "cpu", "--repeats", "3"]))
    assert explicit["repeats"] == 3


@pytest.mark.parametrize(
    ("name", "override", "expected"),
    [
        ("NVIDIA H200", None, 989.0),
        ("NVIDIA H100 PCIe", None, 756.0),
        ("NVIDIA H100 80GB HBM3", None, 989.0),
        ("NVIDIA A100-SXM4-80GB", None, 312.0),
        ("Some Future GPU", None, None),
        ("Some Future GPU", 123.0, 123.0),
        (None, None, None),
    ],
)
def test_peak_table(name: str | None, override: float | None, expected: float | None) -> None:
    assert peak_tflops(name, override) == expected


def test_call_counter_counts_module_calls() -> None:
    net = torch.nn.Linear(2, 2)
    counter = CallCounter(net)
    for _ in range(3):
        net(torch.zeros(1, 2))
    assert counter.take() == 3 and counter.take() == 0
    counter.remove()
    net(torch.zeros(1, 2))
    assert counter.take() == 0
