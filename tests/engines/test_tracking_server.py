"""A real bundle logging to a real MLflow tracking server over HTTP, read back through the REST API.

``anoddpm_simplex`` trains with ``smoke.json`` (2 volumes, 32² slices, 2 epochs) and is evaluated once
with ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>`` pointing at the session's ``mlflow server``
(SQLite store, artifacts served by the server). What a team server must show is then read back
with ``MlflowClient(http://...)``: the named runs, their status, provenance tags and params, the
metric histories, the evaluation's artifacts (byte-identical to the local files) and the trained
checkpoint registered in the server's model registry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_prep.datalist import datalist_hash
from engines.registry import best_run, download_model_version, register_model
from tests.bundles._helpers import ROOT, common_args

CFG = ROOT / "bundles" / "anoddpm_simplex" / "configs"
EPOCHS = 2
EXPERIMENT = "anomaly-detection"
#: a short hash, optionally "-dirty", or "unknown" outside a checkout
COMMIT_RE = r"[0-9a-f]{4,40}(-dirty)?|unknown"


def _run(configs: list[str], work: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    # like tests.bundles._helpers.run_bundle, but logging to the given server instead of SQLite
    files = json.dumps([str(CFG / c) for c in configs])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-10000:]}")
    return proc


@pytest.fixture(scope="module")
def served(
    mlflow_server: str, demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """Train and evaluate once against the server; returns the work folder and the server URI."""
    work = tmp_path_factory.mktemp("anoddpm_server")
    args = common_args(demo_cohort, work)
    _run(["train.json", "smoke.json"], work, mlflow_server, *args, "--epochs", str(EPOCHS))
    _run(
        ["train.json", "evaluate.json", "smoke.json"],
        work,
        mlflow_server,
        *args,
        "--t_values", "[60]",
        "--headline_t", "60",
    )  # fmt: skip
    # nothing may have gone to a local store: the server is the only one
    assert not list(work.rglob("mlruns.db"))
    return work, mlflow_server


def _run_named(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"the {EXPERIMENT} experiment is not on the server"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_training_run_on_server(served: tuple[Path, str], demo_cohort: Path) -> None:
    work, uri = served
    client = MlflowClient(uri)
    run = _run_named(client, "anoddpm_simplex-train")
    assert run.info.status == "FINISHED"

    datalist = demo_cohort / "datalists" / "anomaly_t1w.json"
    tags, params = run.data.tags, run.data.params
    assert tags["method"] == "anoddpm_simplex" and tags["task"] == "anomaly"
    assert tags["datalist_hash"] == datalist_hash(datalist) == params["datalist_hash"]
    assert re.fullmatch(COMMIT_RE, tags["git_commit"]) and tags["git_commit"] == params["git_commit"]
    assert params["method"] == "anoddpm_simplex" and params["dataset"] == "demo-t1w"
    assert params["epochs"] == str(EPOCHS) and params["image_size"] == "32"  # the overrides reached MLflow
    assert params["noise_type"] == "simplex"

    # the trainer logs the loss every iteration; the checkpoint tells how many there were
    state = torch.load(work / "models" / f"checkpoint_epoch={EPOCHS}.pt", weights_only=True)["trainer"]
    n_iter = EPOCHS * state["epoch_length"]
    assert state["iteration"] == n_iter
    loss = sorted(client.get_metric_history(run.info.run_id, "Loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, n_iter + 1))
    assert all(m.value == m.value and m.value > 0 for m in loss)  # finite MSE, no NaN
    # the validator logs into the same run once per epoch (smoke.json: val_interval 1)
    val = sorted(client.get_metric_history(run.info.run_id, "val_mse"), key=lambda m: m.step)
    assert [m.step for m in val] == list(range(1, EPOCHS + 1))
    assert run.data.metrics["val_mse"] == val[-1].value


def test_evaluation_artifacts_on_server(served: tuple[Path, str], tmp_path: Path) -> None:
    work, uri = served
    client = MlflowClient(uri)
    run = _run_named(client, "anoddpm_simplex-evaluate")
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "anoddpm_simplex" and run.data.params["headline_t"] == "60"
    res = json.loads((work / "eval" / "metrics.json").read_text())
    assert run.data.metrics["t60/pixel_auprc"] == pytest.approx(res["t60"]["pixel_auprc"])

    # MONAI's handler logs every file of the output folder at the artifact root
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    local = {p.name for p in (work / "eval").rglob("*") if p.is_file()}
    assert {"metrics.json", "per_subject_t60.csv", "curves.json"} <= names
    assert names == local
    assert any(n.endswith(".png") for n in names)
    for name in ("metrics.json", "per_subject_t60.csv"):
        got = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path)))
        assert got.read_bytes() == (work / "eval" / name).read_bytes(), name
    # stored by the server under its own artifact folder, not next to the client
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")


def test_trained_checkpoint_registered_on_server(served: tuple[Path, str], tmp_path: Path) -> None:
    work, uri = served
    client = MlflowClient(uri)
    run = best_run(client, "anomaly", "val_mse", mode="min", filter_string="tags.method = 'anoddpm_simplex'")
    assert run is not None and run.info.run_name == "anoddpm_simplex-train"

    ckpt = work / "models" / "model.pt"
    metrics = {"val_mse": run.data.metrics["val_mse"]}
    mv = register_model(client, run.info.run_id, "anoddpm_simplex-server-test", [ckpt], metrics)
    assert mv.source == f"runs:/{run.info.run_id}/model" and mv.run_id == run.info.run_id
    assert float(mv.tags["val_mse"]) == metrics["val_mse"]
    assert mv.tags["method"] == "anoddpm_simplex" and mv.tags["task"] == "anomaly"
    assert mv.tags["datalist_hash"] == run.data.tags["datalist_hash"]

    folder = download_model_version(client, mv.name, mv.version, tmp_path)
    assert (folder / "model.pt").read_bytes() == ckpt.read_bytes()
    sd = torch.load(folder / "model.pt", weights_only=True)
    ref = torch.load(ckpt, weights_only=True)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
