"""What the bundle tests share: running real configs through ``python -m monai.bundle run``, reading the MLflow
store they wrote, and verifying a bundle's metadata offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


def run_bundle(
    cfg_dir: Path,
    configs: list[str],
    work: Path,
    *args: str,
    torchrun: int = 0,
    port: int = 29533,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` on config files of ``cfg_dir`` in ``work`` (MLflow: SQLite there).

    Args:
        cfg_dir: the bundle's ``configs`` folder.
        configs: config file names, merged in order.
        work: working folder (also holds ``mlruns.db``).
        args: further command-line overrides.
        torchrun: number of processes to launch with ``torch.distributed.run`` (0: plain run).
        port: the rendezvous port of torchrun.
        env: environment variables set on top of the defaults, e.g. another ``MLFLOW_TRACKING_URI``.
        check: raise when the run fails; ``False`` returns the failed process for the caller to inspect.

    Returns:
        The finished process.

    Raises:
        AssertionError: with the tail of the output when the run fails and ``check`` is set.
    """
    files = json.dumps([str(cfg_dir / c) for c in configs])
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns.db'}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"),
        **dict(env or {}),
    }
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={torchrun}",
            f"--master_port={port}",
        ]
        if torchrun
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", files, *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-20000:]}")
    return proc


def common_args(demo: Path, work: Path) -> list[str]:
    """The dataset, checkpoint and output overrides every bundle test passes."""
    return [
        "--dataset_dir", str(demo),
        "--ckpt_dir", str(work / "models"),
        "--output_dir", str(work / "eval"),
    ]  # fmt: skip


def mlflow_runs(work: Path, name: str, experiment: str = "anomaly-detection") -> list:
    """The MLflow runs called ``name`` in ``experiment`` of the store under ``work``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"the {experiment} experiment was not created"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")


def verify_metadata(meta_file: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle verify_metadata`` against the schema in ``../shared`` (nothing downloaded)."""
    schema = tmp_path / SHARED_SCHEMA.name
    shutil.copy(SHARED_SCHEMA, schema)
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
         "--filepath", str(schema)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
