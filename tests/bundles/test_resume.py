"""Crash and resume: a real anoddpm_simplex training is killed with SIGKILL in the middle of an epoch and
started again with ``--resume true``; it must end where a run that was never killed ends.

Three ``python -m monai.bundle run`` processes on ``train.json`` + ``smoke.json`` (15 iterations per epoch),
epoch-based learning-rate schedule (``--time_budget_minutes 0``: with a budget the schedule follows the wall
clock, and two runs could not be compared), 2 epochs:

* the reference, never killed, and the run to kill are started together (one thread each, so both fit the
  two cores of a small machine, and all three runs compute alike);
* the run is killed once ``checkpoint_epoch=1.pt`` exists and an iteration of epoch 2 has been logged; every
  ``.pt`` file left must be a complete checkpoint;
* it is started again with ``--resume true`` in the same folder: it resumes from epoch 1 and repeats epoch 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.bundles._helpers import ROOT, common_args

CFG = ROOT / "bundles" / "anoddpm_simplex" / "configs"
EPOCHS = 2
ITERS_PER_EPOCH = 15  # smoke.json: the 2 training volumes give 120+ slices at batch size 8 (drop_last)


def _cmd(demo: Path, work: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    files = json.dumps([str(CFG / "train.json"), str(CFG / "smoke.json")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *common_args(demo, work)]
    cmd += ["--epochs", str(EPOCHS), "--time_budget_minutes", "0", *args]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns.db'}",
        "PYTHONPATH": str(ROOT),
        # the same thread count in every run: CPU kernels may sum in another order with another count
        "OMP_NUM_THREADS": "1",
    }
    return cmd, env


def _start(demo: Path, work: Path, *args: str, log_name: str = "log.txt") -> tuple[subprocess.Popen, Path]:
    work.mkdir(parents=True, exist_ok=True)
    cmd, env = _cmd(demo, work, *args)
    log = work / log_name
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, f"{proc.args} failed ({rc}):\n{text[-5000:]}"
    return text


def _load_all(folder: Path) -> dict[str, dict]:
    """Every checkpoint in ``folder``, loaded as a resume would load it (weights only); no temporary files."""
    from engines import load_checkpoint

    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp") or n.startswith("tmp")], names
    return {n: load_checkpoint(folder / n) for n in names if n.endswith(".pt")}


def _assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            _assert_state_equal(x, y, f"{what}.{k}")
        elif isinstance(x, list | tuple):
            assert len(x) == len(y), f"{what}.{k}"
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                _assert_state_equal({i: u}, {i: v}, f"{what}.{k}")
        elif isinstance(x, torch.Tensor):
            diff = (
                (x.double() - y.double()).abs().max()
                if x.is_floating_point() and x.shape == y.shape
                else None
            )
            assert torch.equal(x, y), f"{what}.{k} differs (max abs diff {diff})"
        else:
            assert x == y, f"{what}.{k}: {x!r} != {y!r}"


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(demo_cohort: Path, tmp_path: Path) -> None:
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref, ref_log = _start(demo_cohort, ref_dir)
    run, run_log = _start(demo_cohort, run_dir)
    try:
        first = run_dir / "models" / "checkpoint_epoch=1.pt"
        deadline = time.monotonic() + 300
        while not (first.exists() and f"Epoch: 2/{EPOCHS}, Iter: 1/" in run_log.read_text()):
            assert run.poll() is None, (
                f"the run ended before it could be killed:\n{run_log.read_text()[-5000:]}"
            )
            assert time.monotonic() < deadline, "epoch 2 not reached in time"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
    finally:
        if run.poll() is None:
            run.kill()
    killed_log = run_log.read_text()
    assert f"Epoch: 2/{EPOCHS}, Iter: {ITERS_PER_EPOCH}/" not in killed_log, (
        "killed too late: epoch 2 had ended"
    )

    # what the kill left: complete checkpoints only, the newest one of epoch 1
    left = _load_all(run_dir / "models")
    assert sorted(left) == ["checkpoint_epoch=1.pt"], sorted(left)
    assert set(left["checkpoint_epoch=1.pt"]) == {"model", "optimizer", "lr_scheduler", "trainer", "rng"}

    resumed_log = _wait(*_start(demo_cohort, run_dir, "--resume", "true", log_name="resumed.txt"))
    ref_text = _wait(ref, ref_log)
    assert "resume disabled" in ref_text
    m = re.search(r"Restored all variables from (\S+) \(epoch (\d+), iteration (\d+)\)", resumed_log)
    assert m, resumed_log[-5000:]
    assert Path(m.group(1)).name == "checkpoint_epoch=1.pt"
    assert (int(m.group(2)), int(m.group(3))) == (1, ITERS_PER_EPOCH)
    assert "has no 'rng' entry" not in resumed_log

    reference, resumed = _load_all(ref_dir / "models"), _load_all(run_dir / "models")
    assert (
        sorted(resumed) == sorted(reference) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"]
    )
    # the killed run's epoch 1 is the reference's (the runs are deterministic on the CPU) ...
    _assert_state_equal(resumed["checkpoint_epoch=1.pt"], reference["checkpoint_epoch=1.pt"], "epoch 1")
    # ... and so is everything after the resume, bit for bit (weights, optimiser moments, scheduler, RNG states),
    # the strongest check there is: every random draw (shuffle order, diffusion timesteps, simplex noise, the
    # augmentation's own generators, validation noise) comes from generators saved in the checkpoint's "rng"
    # entry, the learning rate follows the iteration count (no time budget), and all three runs compute on one
    # CPU thread with deterministic kernels, so no tolerance (and no "val_mse within noise") is needed. Without
    # the augmentation's generators in "rng" the weights differ by ~1e-3 after one epoch (measured).
    final_ref, final = reference["checkpoint_epoch=2.pt"], resumed["checkpoint_epoch=2.pt"]
    assert final["trainer"]["iteration"] == final_ref["trainer"]["iteration"] == EPOCHS * ITERS_PER_EPOCH
    assert final["trainer"]["iteration"] // final["trainer"]["epoch_length"] == EPOCHS
    _assert_state_equal(final, final_ref, "epoch 2")
    _assert_state_equal(resumed["model.pt"], reference["model.pt"], "model.pt")
    val = re.compile(rf"Epoch\[{EPOCHS}\] Metrics -- val_mse: (\S+)")
    assert val.findall(resumed_log) == val.findall(ref_text) != [], "the same validation metric"
