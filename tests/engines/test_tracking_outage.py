"""Tracking outages never stop training or evaluation: a server down at start, one that dies
mid-run, and an evaluation's comparison runs against a dead server.

Each case checks what a lab would look for afterwards: the checkpoints are written, one warning
names the server and the local fallback store, and the fallback store holds the run with its
params, tags (``fallback_of``) and every metric value, the ones sent before the server died
included.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from mlflow.tracking import MlflowClient
from monai.engines import SupervisedTrainer
from monai.handlers import MeanSquaredError, from_engine
from monai.utils import path_to_sqlite_uri
from torch import nn

import engines.tracking as tracking
from engines import AtomicCheckpointSaver, load_checkpoint
from engines.tracking import (
    HTTP_RETRY_DEFAULTS,
    TaggedMLFlowHandler,
    fallback_store_path,
    log_comparison_runs,
    make_mlflow_handler,
)
from tests.bundles._helpers import ROOT, common_args, run_bundle
from tests.engines._mlflow_server import free_port, mlflow_server_process
from tests.engines._toy import ITERS_PER_EPOCH, make_loader, make_parts, record_losses

CFG = ROOT / "bundles" / "anoddpm_simplex" / "configs"
ANOMALY = "anomaly-detection"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts as a new process would: no URI known to be down, MLflow's retry settings
    unset (so the module's bounds apply; restored afterwards), no tracking URI."""
    for name in HTTP_RETRY_DEFAULTS:
        # setenv first so that monkeypatch records the original state and undoes what the code sets
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking._UNREACHABLE.clear()
    tracking._ANNOUNCED.clear()
    yield
    tracking._UNREACHABLE.clear()
    tracking._ANNOUNCED.clear()


def dead_uri() -> str:
    """An http URI on loopback where nothing listens (connections are refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def runs_named(uri: str, name: str, experiment: str = ANOMALY) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no {experiment} experiment in {uri}"
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "engines.tracking"
        and r.levelno == logging.WARNING
        and "is unavailable" in r.getMessage()
    ]


def test_retry_bounds_respect_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    tracking.bound_http_retries("sqlite:////tmp/x.db")
    assert not set(HTTP_RETRY_DEFAULTS) & set(os.environ), "a local store needs no HTTP settings"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's choice wins
    tracking.bound_http_retries("https://mlflow.lab.example")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )


def test_bundle_trains_with_server_down_at_start(demo_cohort: Path, tmp_path: Path) -> None:
    """anoddpm_simplex smoke training (2 epochs) with MLFLOW_TRACKING_URI at a dead server: the trainer's
    and the validator's handlers both fall back at their start, into one run."""
    uri = dead_uri()
    proc = run_bundle(
        CFG,
        ["train.json", "smoke.json"],
        tmp_path,
        *common_args(demo_cohort, tmp_path),
        "--bundle_root", str(tmp_path),  # the fallback store goes to the bundle folder: keep it here
        # one volume per split (8 iterations an epoch); no time budget, so a busy machine cannot cut
        # the second epoch short
        "--max_volumes", "1",
        "--time_budget_minutes", "0",
        env={"MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    store = fallback_store_path(tmp_path)
    assert f"MLflow tracking store {uri} is unavailable" in out and str(store) in out, out[-3000:]

    models = tmp_path / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
        "model.pt",
    ]
    state = load_checkpoint(models / "checkpoint_epoch=2.pt")["trainer"]
    n_iter = 2 * state["epoch_length"]
    assert state["iteration"] == n_iter

    # trainer and validator handlers both logged into the one run of the fallback store
    (run,) = runs_named(path_to_sqlite_uri(store), "anoddpm_simplex-train")
    assert run.info.status == "FINISHED"
    assert run.data.tags["fallback_of"] == uri and "fallback_of_run_id" not in run.data.tags
    assert run.data.tags["method"] == "anoddpm_simplex" and run.data.tags["task"] == "anomaly"
    assert run.data.params["method"] == "anoddpm_simplex" and run.data.params["noise_type"] == "simplex"
    assert run.data.params["epochs"] == "2" and run.data.params["max_epochs"] == "2"
    client = MlflowClient(path_to_sqlite_uri(store))
    assert steps(client, run.info.run_id, "val_mse") == [1, 2]
    assert steps(client, run.info.run_id, "Loss") == list(range(1, n_iter + 1))
    assert not (tmp_path / "mlruns.db").exists()


def test_server_dies_mid_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A real server killed (SIGKILL) after iteration ``kill_at``: training completes with its
    checkpoints, the server kept what it got, the fallback run holds every value."""
    epochs, kill_at = 3, ITERS_PER_EPOCH + 2  # in the middle of epoch 2
    n_iter = epochs * ITERS_PER_EPOCH
    work = tmp_path / "work"
    with mlflow_server_process(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        handler = make_mlflow_handler("anomaly", "toy-train", "toy", workdir=work, hparams={"lr": 0.05})
        net, opt, _ = make_parts()
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=epochs,
            train_data_loader=make_loader(),
            network=net,
            optimizer=opt,
            loss_function=nn.MSELoss(),
            key_train_metric={"train_mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
            train_handlers=[handler],  # attached first: runs before the checkpoint saver
        )
        saver = AtomicCheckpointSaver(
            save_dir=str(work / "models"),
            save_dict={"model": net, "optimizer": opt, "trainer": trainer},
            save_interval=1,
            save_final=True,
            final_filename="model.pt",
        )
        saver.attach(trainer)
        losses = record_losses(trainer)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=kill_at), lambda _: server.kill())
        with caplog.at_level(logging.INFO, logger="engines.tracking"):
            trainer.run()

    assert trainer.state.iteration == n_iter
    models = work / "models"
    assert {f"checkpoint_epoch={e}.pt" for e in range(1, epochs + 1)} | {"model.pt"} == {
        p.name for p in models.glob("*.pt")
    }
    assert load_checkpoint(models / f"checkpoint_epoch={epochs}.pt")["trainer"]["iteration"] == n_iter

    (warning,) = outage_warnings(caplog)
    assert server.url in warning and str(fallback_store_path(work)) in warning

    # what reached the server before it died: its own store, read from disk
    (dead,) = runs_named(server.store_uri, "toy-train")
    assert dead.info.status == "RUNNING"  # nobody could tell the dead server the run ended
    server_client = MlflowClient(server.store_uri)
    assert steps(server_client, dead.info.run_id, "Loss") == list(range(1, kill_at + 1))
    assert steps(server_client, dead.info.run_id, "train_mse") == [1]

    # the fallback run: replayed values + the later ones, each step exactly once
    fb_uri = path_to_sqlite_uri(fallback_store_path(work))
    (run,) = runs_named(fb_uri, "toy-train")
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["fallback_of"] == server.url and tags["fallback_of_run_id"] == dead.info.run_id
    assert tags["method"] == "toy" and params["lr"] == "0.05" and params["max_epochs"] == str(epochs)
    client = MlflowClient(fb_uri)
    loss = sorted(client.get_metric_history(run.info.run_id, "Loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, n_iter + 1))
    assert [m.value for m in loss] == pytest.approx(losses)
    assert steps(client, run.info.run_id, "train_mse") == list(range(1, epochs + 1))
    assert steps(client, run.info.run_id, "lr_group_0") == list(range(1, n_iter + 1))


def test_fallback_store_failing_too_never_stops_training(tmp_path: Path, caplog) -> None:
    """Server down and the fallback store unusable (its folder is a file): warnings, no exception."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    handler = TaggedMLFlowHandler(
        tracking_uri=dead_uri(),
        experiment_name=ANOMALY,
        run_name="toy-nowhere",
        fallback_store=blocker / "mlruns-fallback.db",
        close_on_complete=True,
        output_transform=lambda out: out[0]["loss"],
    )
    net, opt, _ = make_parts()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=make_loader(),
        network=net,
        optimizer=opt,
        loss_function=nn.MSELoss(),
        train_handlers=[handler],
    )
    with caplog.at_level(logging.WARNING, logger="engines.tracking"):
        trainer.run()
    assert trainer.state.iteration == 2 * ITERS_PER_EPOCH
    assert len(outage_warnings(caplog)) == 1
    assert any("not logged, the engine goes on" in r.getMessage() for r in caplog.records)


def test_comparison_runs_fall_back_when_server_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """An evaluation's parent + child runs against a dead server (with credentials in its URI)."""
    uri = dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("http://", "http://lab:s3cret@"))
    out = tmp_path / "eval"
    (out / "model_a").mkdir(parents=True)
    (out / "metrics.json").write_text('{"a": 0.5}\n')
    (out / "model_a" / "per_subject.csv").write_text("subject,score\ns1,0.5\n")
    work = tmp_path / "work"
    with caplog.at_level(logging.WARNING, logger="engines.tracking"):
        pid = log_comparison_runs(
            task="anomaly",
            run_name="toy-evaluate",
            method="toy",
            children={
                "a": {"metrics": {"auprc": 0.5}, "params": {"model": "a"}, "artifact_dir": out / "model_a"},
                "b": {"metrics": {"auprc": 0.25}, "params": {"model": "b"}, "tags": {"model": "b"}},
            },
            workdir=work,
            hparams={"t": 60},
            parent_params={"models": "a,b"},
            parent_artifacts=[(out / "metrics.json", None)],
        )
    (warning,) = outage_warnings(caplog)
    assert uri in warning and "s3cret" not in caplog.text
    assert pid is not None

    client = MlflowClient(path_to_sqlite_uri(fallback_store_path(work)))
    parent = client.get_run(pid)
    assert parent.info.run_name == "toy-evaluate" and parent.info.status == "FINISHED"
    assert parent.data.tags["fallback_of"] == uri and parent.data.tags["role"] == "comparison"
    assert parent.data.params["models"] == "a,b" and parent.data.params["t"] == "60"
    assert [f.path for f in client.list_artifacts(pid)] == ["metrics.json"]
    exp = client.get_experiment_by_name(ANOMALY)
    children = {
        r.info.run_name: r
        for r in client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    }
    assert set(children) == {"toy-evaluate-a", "toy-evaluate-b"}
    assert children["toy-evaluate-a"].data.metrics == {"auprc": 0.5}
    assert children["toy-evaluate-b"].data.tags["fallback_of"] == uri
    assert [f.path for f in client.list_artifacts(children["toy-evaluate-a"].info.run_id)] == [
        "per_subject.csv"
    ]
