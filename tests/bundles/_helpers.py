"""What the bundle tests share: running real configs through ``python -m monai.bundle run`` (or the same
``monai.bundle.scripts.run`` in this process), reading the MLflow store they wrote, and verifying a bundle's
metadata offline."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
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
    in_process: bool | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` on config files of ``cfg_dir`` in ``work`` (MLflow: SQLite there).

    A run that is not about the process (no torchrun, no extra environment, expected to succeed) goes through
    :func:`run_in_process` by default: the same ``monai.bundle.scripts.run`` and override check, without the
    interpreter start-up and imports (about 5 s a run on the 2-core CI machine).

    Args:
        cfg_dir: the bundle's ``configs`` folder.
        configs: config file names, merged in order.
        work: working folder (also holds ``mlruns.db``).
        args: further command-line overrides.
        torchrun: number of processes to launch with ``torch.distributed.run`` (0: plain run).
        port: the rendezvous port of torchrun.
        env: environment variables set on top of the defaults, e.g. another ``MLFLOW_TRACKING_URI``.
        check: raise when the run fails; ``False`` returns the failed process for the caller to inspect.
        in_process: run in this process; default: when ``torchrun``, ``env`` and ``check=False`` are not given.

    Returns:
        The finished process (for an in-process run: return code 0 and the captured output).

    Raises:
        AssertionError: with the tail of the output when the run fails and ``check`` is set.
    """
    if in_process is None:
        in_process = not torchrun and env is None and check
    if in_process:
        return run_in_process(cfg_dir, configs, work, *args)
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


@contextlib.contextmanager
def _run_context(work: Path, tracking_uri: str) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What a ``monai.bundle run`` process would have: ``work`` as the working folder, the store in
    ``MLFLOW_TRACKING_URI``, INFO logs on stdout (the bundles' logging.conf); all restored afterwards."""
    cwd, old_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    root = logging.getLogger()
    old_level = root.level
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        os.chdir(cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def run_in_process(cfg_dir: Path, configs: list[str], work: Path, *args: str) -> subprocess.CompletedProcess:
    """:func:`run_bundle` in this process: the command line is parsed as ``fire`` parses it for
    ``python -m monai.bundle run`` (``engines.config_check.parse_run_args``), checked by the same
    ``engines.check_overrides`` that the configs' ``initialize`` runs first in a real process (in this process it
    finds no ``monai.bundle`` command line, so it is called here), then given to ``monai.bundle.scripts.run``.
    Only the bundle's logging.conf is not applied (``fileConfig`` would disable the test process's loggers);
    INFO logs go to the captured stdout as it would print them.

    Returns:
        A finished process with return code 0, the captured stdout (logs and prints) and stderr.

    Raises:
        AssertionError: when the run fails, as :func:`run_bundle` raises it for a process: the tail of the
            output and the whole traceback with its causes (the message a user would read), chained to the error.
    """
    from monai.bundle.scripts import run

    from engines.config_check import check_overrides, parse_run_args

    files = json.dumps([str(cfg_dir / c) for c in configs])
    argv = ["--config_file", files, *args]
    with _run_context(work, f"sqlite:///{work / 'mlruns.db'}") as (out, err):
        check_overrides(argv)
        values, _ = parse_run_args(argv)
        try:
            run(logging_file=False, **values)
        except Exception as e:
            trace = "".join(traceback.format_exception(e))
            raise AssertionError(
                f"monai.bundle run {' '.join(argv)} failed:\n{out.getvalue()[-3000:]}\n{trace}"
            ) from e
        finally:
            import mlflow

            while (
                mlflow.active_run() is not None
            ):  # a run a failed workflow left open must not catch the next
                mlflow.end_run("FAILED")
    return subprocess.CompletedProcess(["monai.bundle", "run", *argv], 0, out.getvalue(), err.getvalue())


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
