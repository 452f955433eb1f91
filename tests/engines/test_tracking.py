"""MLflow tracking defaults: store URI, experiments, provenance params/tags, a real logged run."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from monai.utils import path_to_sqlite_uri

import engines.tracking as tracking
from data_prep.datalist import atomic_write_text, datalist_hash
from engines import (
    EXPERIMENTS,
    default_tracking_uri,
    experiment_name,
    git_commit,
    make_mlflow_handler,
    run_params,
    run_tags,
)
from engines.tracking import MAX_PARAM_VAL_LENGTH
from tests.engines._toy import ITERS_PER_EPOCH, make_parts, make_trainer, record_losses

#: a short hash, optionally "-dirty", or "unknown" outside a checkout
COMMIT_RE = r"[0-9a-f]{4,40}(-dirty)?|unknown"


@pytest.fixture
def no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def datalist(tmp_path: Path) -> Path:
    doc = {"name": "toy", "training": [{"image": "a.nii.gz", "subject": "s1"}]}
    return atomic_write_text(tmp_path / "datalist.json", json.dumps(doc))


def test_default_uri_is_sqlite_in_workdir(tmp_path: Path, no_env_uri: None) -> None:
    work = tmp_path / "new" / "dir"
    uri = default_tracking_uri(work)
    assert uri == path_to_sqlite_uri(work / "mlruns.db")
    assert uri.startswith("sqlite:///") and uri.endswith(f"{work.as_posix()}/mlruns.db")
    assert work.is_dir()  # created, so SQLite can create the file in it


def test_env_uri_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri(tmp_path) == "http://tracking.example:5000"


def test_experiment_names() -> None:
    assert experiment_name("anomaly") == "anomaly-detection"
    assert experiment_name("classification") == "tumour-classification"
    assert experiment_name("representation") == "representation-learning"
    with pytest.raises(ValueError, match="unknown task 'segmentation'") as e:
        experiment_name("segmentation")
    assert all(t in str(e.value) for t in EXPERIMENTS)


def test_git_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("git") and (tracking._PROJECT_DIR / ".git").exists():
        assert re.fullmatch(COMMIT_RE, git_commit()), git_commit()
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    assert git_commit(tmp_path / "missing") == "unknown"
    monkeypatch.setattr(tracking.shutil, "which", lambda name: None)
    assert git_commit() == "unknown"  # no git binary


def test_run_params_flatten_and_truncate(datalist: Path) -> None:
    p = run_params(
        "toy", datalist, "toyset", optim={"lr": 0.1, "betas": {"b1": 0.9}}, note="x" * 10_000, seed=3
    )
    assert p["method"] == "toy" and p["dataset"] == "toyset"
    assert p["datalist_hash"] == datalist_hash(datalist)
    assert re.fullmatch(COMMIT_RE, p["git_commit"])
    assert p["optim.lr"] == "0.1" and p["optim.betas.b1"] == "0.9" and p["seed"] == "3"
    assert "optim" not in p
    assert len(p["note"]) == MAX_PARAM_VAL_LENGTH and p["note"].endswith("...")
    assert all(isinstance(v, str) for v in p.values())
    assert run_params("toy", None)["datalist_hash"] == "none"
    with pytest.raises(ValueError, match="git_commit"):
        run_params("toy", None, git_commit="abc")


def test_run_tags(datalist: Path) -> None:
    t = run_tags("toy", datalist, "toyset", task="anomaly", stage="dev")
    assert t["method"] == "toy" and t["task"] == "anomaly" and t["stage"] == "dev"
    assert t["datalist_hash"] == datalist_hash(datalist) and t["datalist"] == str(datalist.absolute())


def test_handler_requires_run_name(tmp_path: Path, no_env_uri: None) -> None:
    with pytest.raises(ValueError, match="run_name is required"):
        make_mlflow_handler("anomaly", "", "toy", workdir=tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        make_mlflow_handler("nope", "r", "toy", workdir=tmp_path)


def test_real_run_logged_to_sqlite(tmp_path: Path, datalist: Path, no_env_uri: None) -> None:
    epochs = 2
    grid = {f"p{i:03d}": i for i in range(120)}  # more than MLflow's 100 params per log_batch call
    handler = make_mlflow_handler(
        task="classification",
        run_name="toy-run-1",
        method="toy",
        datalist=datalist,
        workdir=tmp_path,
        dataset_name="toyset",
        hparams={"optim": {"lr": 0.05}, "grid": grid},
        tags={"stage": "test"},
    )
    net, opt, _ = make_parts()
    trainer = make_trainer(net, opt, epochs, [handler])
    losses = record_losses(trainer)
    trainer.run()

    client = MlflowClient(default_tracking_uri(tmp_path))
    assert (tmp_path / "mlruns.db").is_file()
    exp = client.get_experiment_by_name("tumour-classification")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "toy-run-1"
    assert run.info.status == "FINISHED"  # close_on_complete
    params = run.data.params
    assert params["method"] == "toy" and params["dataset"] == "toyset"
    assert params["datalist_hash"] == datalist_hash(datalist)
    # (not compared with git_commit() now: a parallel edit may flip "-dirty" meanwhile)
    assert re.fullmatch(COMMIT_RE, params["git_commit"])
    assert params["optim.lr"] == "0.05"
    assert all(params[f"grid.{k}"] == str(v) for k, v in grid.items())
    assert params["max_epochs"] == str(epochs)  # MONAI's own engine params still logged
    assert run.data.tags["task"] == "classification" and run.data.tags["stage"] == "test"
    assert run.data.tags["datalist_hash"] == datalist_hash(datalist)

    hist = sorted(client.get_metric_history(run.info.run_id, "Loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, epochs * ITERS_PER_EPOCH + 1))  # one per iteration
    assert [m.value for m in hist] == pytest.approx(losses)


def test_unfinished_run_is_resumed_without_param_clash(
    tmp_path: Path, no_env_uri: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Same run_name, run not finished (a crash): the second run continues it; a changed param
    value (the git commit after a fix, say) is kept from the first run instead of raising."""
    common = {"task": "anomaly", "run_name": "resumable", "method": "toy", "workdir": tmp_path}
    first = make_mlflow_handler(**common, hparams={"lr": 0.1}, close_on_complete=False)
    net, opt, _ = make_parts()
    make_trainer(net, opt, 1, [first]).run()

    second = make_mlflow_handler(**common, hparams={"lr": 0.2}, epoch_log=False)
    net, opt, _ = make_parts()
    with caplog.at_level(logging.WARNING, logger="engines.tracking"):
        make_trainer(net, opt, 1, [second]).run()  # plain MONAI MLFlowHandler raises MlflowException here
    assert "already has param 'lr'='0.1'" in caplog.text

    client = MlflowClient(default_tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("anomaly-detection").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["lr"] == "0.1"
    # both trainers logged iterations 1..4 into the same run, same steps
    assert len(client.get_metric_history(runs[0].info.run_id, "Loss")) == 2 * ITERS_PER_EPOCH
