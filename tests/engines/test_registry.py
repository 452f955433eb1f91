"""The model registry helpers: best run by a metric, registering checkpoints as versions, on a SQLite
store and on a live tracking server."""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from engines.registry import MODEL_ARTIFACT_PATH, best_run, download_model_version, register_model

#: run name → latest value of "val/auc" (None: the run never logged it); best max "b", best min "e"
VALUES = {"a": 0.5, "b": 0.9, "c": math.nan, "d": None, "e": 0.1, "f": 0.7}
METRIC = "val/auc"  # a "/" as in the evaluations' names, which needs quoting in search order_by
PROVENANCE = {"task": "anomaly", "method": "toy", "git_commit": "abc1234", "datalist_hash": "0123456789ab"}


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    # one store for the module: creating the SQLite schema costs seconds; tests use their own names
    root = tmp_path_factory.mktemp("registry_store")
    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    client.create_experiment("anomaly-detection", artifact_location=(root / "artifacts").as_uri())
    return client


def _make_runs(client: MlflowClient, experiment: str, values: dict[str, float | None]) -> dict[str, str]:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    ids = {}
    for name, value in values.items():
        run = client.create_run(exp_id, run_name=name, tags={**PROVENANCE, "group": experiment})
        if value is not None:
            client.log_metric(run.info.run_id, METRIC, 0.0, step=0)  # an earlier, worse value
            client.log_metric(run.info.run_id, METRIC, value, step=1)
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[name] = run.info.run_id
    return ids


def _checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return path


def test_best_run_max_min_skips_nan_and_missing(sqlite_client: MlflowClient) -> None:
    ids = _make_runs(sqlite_client, "anomaly-detection", VALUES)
    group = "tags.group = 'anomaly-detection'"
    best = best_run(sqlite_client, "anomaly-detection", METRIC, "max", group)
    assert best is not None and best.info.run_id == ids["b"]
    best = best_run(sqlite_client, "anomaly-detection", METRIC, "min", group)
    assert best is not None and best.info.run_id == ids["e"]
    # a task key and an experiment id name the same experiment
    assert best_run(sqlite_client, "anomaly", METRIC, filter_string=group).info.run_id == ids["b"]
    exp_id = sqlite_client.get_experiment_by_name("anomaly-detection").experiment_id
    assert best_run(sqlite_client, exp_id, METRIC, filter_string=group).info.run_id == ids["b"]
    # the filter narrows the candidates
    narrowed = f"{group} and tags.mlflow.runName != 'b'"
    assert best_run(sqlite_client, "anomaly", METRIC, filter_string=narrowed).info.run_id == ids["f"]


def test_best_run_none_and_errors(sqlite_client: MlflowClient) -> None:
    _make_runs(sqlite_client, "only-nan", {"x": math.nan, "y": None})
    assert best_run(sqlite_client, "only-nan", METRIC) is None
    assert best_run(sqlite_client, "only-nan", "never_logged") is None
    with pytest.raises(ValueError, match="mode must be"):
        best_run(sqlite_client, "only-nan", METRIC, mode="best")
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'"):
        best_run(sqlite_client, "nope", METRIC)


def test_register_model_versions_tags_and_artifact(sqlite_client: MlflowClient, tmp_path: Path) -> None:
    ids = _make_runs(sqlite_client, "register-sqlite", {"best": 0.93})
    ckpt = _checkpoint(tmp_path / "model.pt")
    metrics = {METRIC: 0.93, "pixel_auprc": 0.41}
    name = f"toy-{uuid.uuid4().hex[:8]}"

    v1 = register_model(sqlite_client, ids["best"], name, [ckpt], metrics, tags={"stage": "test"})
    v2 = register_model(sqlite_client, ids["best"], name, [ckpt], metrics)  # again: a new version
    assert (int(v1.version), int(v2.version)) == (1, 2)
    for v in (v1, v2):
        assert v.source == f"runs:/{ids['best']}/{MODEL_ARTIFACT_PATH}" and v.run_id == ids["best"]
        assert {k: float(v.tags[k]) for k in metrics} == metrics
        assert {k: v.tags[k] for k in PROVENANCE} == PROVENANCE
        assert v.tags["run_name"] == "best"
    assert v1.tags["stage"] == "test" and "stage" not in v2.tags
    stored = sqlite_client.get_model_version(name, "2")
    assert {k: float(stored.tags[k]) for k in metrics} == metrics  # read back, not just returned

    # logged once, not duplicated by the second registration
    files = sqlite_client.list_artifacts(ids["best"], MODEL_ARTIFACT_PATH)
    assert [f.path for f in files] == [f"{MODEL_ARTIFACT_PATH}/model.pt"]
    out = tmp_path / "download"
    out.mkdir()
    folder = download_model_version(sqlite_client, name, 1, out)
    assert (folder / "model.pt").read_bytes() == ckpt.read_bytes()
    sd = torch.load(folder / "model.pt", weights_only=True)
    assert torch.equal(sd["weight"], torch.load(ckpt, weights_only=True)["weight"])


def test_register_model_errors(sqlite_client: MlflowClient, tmp_path: Path) -> None:
    ids = _make_runs(sqlite_client, "register-errors", {"r": 0.5})
    name = f"toy-{uuid.uuid4().hex[:8]}"
    ckpt = _checkpoint(tmp_path / "model.pt")
    missing = tmp_path / "models" / "missing.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        register_model(sqlite_client, ids["r"], name, [ckpt, missing], {"m": 1.0})
    # checked before anything happened: no artifact, no registered model
    assert sqlite_client.list_artifacts(ids["r"], MODEL_ARTIFACT_PATH) == []
    assert sqlite_client.search_registered_models(f"name = '{name}'") == []
    with pytest.raises(ValueError, match="no checkpoint files"):
        register_model(sqlite_client, ids["r"], name, [], {})

    register_model(sqlite_client, ids["r"], name, [ckpt], {"m": 1.0})
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    torch.save({"weight": torch.zeros(5, 5)}, other)  # same name, other content and size
    with pytest.raises(ValueError, match=r"already has model/model\.pt"):
        register_model(sqlite_client, ids["r"], name, [other], {"m": 1.0})
    assert len(sqlite_client.search_model_versions(f"name = '{name}'")) == 1


def test_registry_on_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server)
    experiment = f"registry-{uuid.uuid4().hex[:8]}"
    ids = _make_runs(client, experiment, VALUES)
    best = best_run(client, experiment, METRIC, "max")
    assert best is not None and best.info.run_id == ids["b"]
    assert best_run(client, experiment, METRIC, "min").info.run_id == ids["e"]

    ckpt = _checkpoint(tmp_path / "model.pt", seed=1)
    name = f"toy-{uuid.uuid4().hex[:8]}"
    metrics = {METRIC: best.data.metrics[METRIC]}
    v1 = register_model(client, best.info.run_id, name, [ckpt], metrics)
    v2 = register_model(client, best.info.run_id, name, [ckpt], metrics)
    assert (int(v1.version), int(v2.version)) == (1, 2)
    assert float(client.get_model_version(name, "2").tags[METRIC]) == 0.9
    assert client.get_registered_model(name).name == name
    out = tmp_path / "download"
    out.mkdir()
    folder = download_model_version(client, name, 2, out)
    assert (folder / "model.pt").read_bytes() == ckpt.read_bytes()
