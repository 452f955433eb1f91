"""The MLflow model registry for the bundles: pick the best run of a task, register its checkpoint.

A registered version points at the ``model/`` artifact folder of the run that trained it
(``runs:/<run_id>/model``), so the registry holds no copy of its own and a version always leads back
to the run's params, tags and metrics. The version's tags repeat the metrics it was chosen by and
the run's provenance (task, method, git commit, datalist hash), so the registry page alone answers
"which model is this and how good was it". Facts about MLflow 3.17 this module relies on:

* ``runs:/<run_id>/<path>`` is accepted as a version source by the SQLite store and by a tracking
  server, which checks that the ``run_id`` sent with it is the run named in the URI.
* ``search_runs`` ordered by a metric lists runs without that metric last; where NaN values sort is
  not documented (the SQLite store puts them after the numbers), so the order alone is not trusted
  to skip them.
* A metric of a run is its *latest* logged value, not its best over the steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.tracking import EXPERIMENTS, MAX_TAG_VAL_LENGTH

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

__all__ = ["MODEL_ARTIFACT_PATH", "PROVENANCE_TAGS", "best_run", "download_model_version", "register_model"]

#: the artifact folder of a run that holds its registered checkpoint(s)
MODEL_ARTIFACT_PATH = "model"

#: run tags copied onto every model version (those the run has)
PROVENANCE_TAGS = ("task", "method", "dataset", "datalist_hash", "git_commit")

#: runs fetched per ``search_runs`` page while looking for the best finite value
_PAGE = 200


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    # a task key ("anomaly") is the natural thing to pass from a script; map it to its experiment
    name = EXPERIMENTS.get(experiment, experiment)
    exp = client.get_experiment_by_name(name)
    if exp is None and str(experiment).isdigit():
        from mlflow.exceptions import MlflowException

        try:
            exp = client.get_experiment(str(experiment))
        except MlflowException:
            exp = None
    if exp is None:
        raise ValueError(
            f"no MLflow experiment {name!r} at {client.tracking_uri} (tasks map to {dict(EXPERIMENTS)})."
        )
    return exp.experiment_id


def best_run(
    client: MlflowClient,
    experiment: str,
    metric: str,
    mode: str = "max",
    filter_string: str = "",
) -> Run | None:
    """The run of an experiment with the best value of a metric.

    Args:
        client: an ``MlflowClient`` of the store (SQLite URI or ``http://`` server).
        experiment: an experiment name (``"anomaly-detection"``), a task key of
            :data:`engines.tracking.EXPERIMENTS` (``"anomaly"``) or an experiment id.
        metric: the metric name, e.g. ``"val_mse"`` or ``"t200/pixel_auprc"``; the run's latest value
            of it is compared.
        mode: ``"max"`` (higher is better) or ``"min"``.
        filter_string: an MLflow search filter to narrow the candidates, e.g.
            ``"tags.method = 'anoddpm_simplex' and attributes.status = 'FINISHED'"``; empty: all
            active (not deleted) runs.

    Returns:
        The best run, or ``None`` when no run has a finite value of ``metric``. Runs without the
        metric and runs whose value is NaN or infinite (a diverged training) are ignored; ties go to
        the most recently started run.

    Raises:
        ValueError: ``mode`` is neither ``"max"`` nor ``"min"``, or the experiment does not exist.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
    exp_id = _experiment_id(client, experiment)
    # backticks: metric names of the evaluations contain "/" (e.g. "t200/pixel_auprc")
    order = [f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}", "attributes.start_time DESC"]
    token = None
    while True:
        page = client.search_runs(
            [exp_id], filter_string=filter_string, order_by=order, max_results=_PAGE, page_token=token
        )
        for run in page:
            value = run.data.metrics.get(metric)
            # missing values come last, NaN wherever the store sorts it: skip both here
            if value is not None and math.isfinite(value):
                return run
        token = page.token
        if not token:
            return None


def _logged_files(client: MlflowClient, run_id: str, artifact_path: str) -> dict[str, int | None]:
    return {
        Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, artifact_path) if not f.is_dir
    }


def register_model(
    client: MlflowClient,
    run_id: str,
    name: str,
    files: Sequence[str | os.PathLike],
    metrics: Mapping[str, float],
    tags: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register checkpoint file(s) of a run as a new version of a registered model.

    The files are logged as artifacts of the run under ``model/`` unless a file of the same name and
    size is already there, the registered model is created if missing, and a version with source
    ``runs:/<run_id>/model`` is created. Calling it again registers a new version (2, 3...) of the
    same files; it does not fail because the model or the files already exist.

    Args:
        client: an ``MlflowClient`` of the store (SQLite URI or ``http://`` server); its registry
            is used.
        run_id: the run that produced the checkpoint (e.g. ``best_run(...).info.run_id``).
        name: the registered model's name, e.g. ``"anoddpm_simplex"``.
        files: the checkpoint file(s), e.g. ``["models/model.pt"]``; their base names must differ.
        metrics: metric name → value, set as tags of the version (values as strings, NaN as ``"nan"``).
        tags: further version tags; they override metrics and the provenance tags copied from the
            run (:data:`PROVENANCE_TAGS`, plus ``run_name``).

    Returns:
        The new ``ModelVersion`` (``.version`` is its number, ``.source`` ``runs:/<run_id>/model``).

    Raises:
        FileNotFoundError: a file does not exist; the message names it. Nothing is logged then.
        ValueError: ``files`` is empty or has two files of the same base name, or the run's
            ``model/`` folder already holds a *different* file of that name (overwriting it would
            silently change the versions registered before).
        mlflow.exceptions.MlflowException: the run does not exist or the store refuses a request.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("register_model: no checkpoint files given.")
    # checked before anything is logged, so a typo leaves neither artifacts nor a version behind
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"register_model: checkpoint file not found: {p}")
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"register_model: files share a base name (artifacts are flat): {names}")

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    run = client.get_run(run_id)  # raises for an unknown run before the registry is touched
    logged = _logged_files(client, run_id, MODEL_ARTIFACT_PATH)
    for p in paths:
        size = p.stat().st_size
        if p.name not in logged:
            client.log_artifact(run_id, str(p), MODEL_ARTIFACT_PATH)
        elif logged[p.name] is not None and logged[p.name] != size:
            raise ValueError(
                f"register_model: run {run_id} already has {MODEL_ARTIFACT_PATH}/{p.name} "
                f"({logged[p.name]} bytes) and {p} ({size} bytes) differs; log a new run for a new checkpoint."
            )

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        # another process (or an earlier call) created it: that is the normal re-registering case
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise

    version_tags = {k: run.data.tags[k] for k in PROVENANCE_TAGS if k in run.data.tags}
    if run.info.run_name:
        version_tags["run_name"] = run.info.run_name
    version_tags.update({str(k): str(float(v)) for k, v in metrics.items()})
    version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    version_tags = {k: v[:MAX_TAG_VAL_LENGTH] for k, v in version_tags.items()}
    return client.create_model_version(
        name=name,
        source=f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}",
        run_id=run_id,
        tags=version_tags,
    )


def download_model_version(
    client: MlflowClient, name: str, version: int | str, dst_dir: str | os.PathLike
) -> Path:
    """Download the files of a registered model version.

    Args:
        client: an ``MlflowClient`` of the store holding the registry.
        name: the registered model's name.
        version: the version number.
        dst_dir: an existing folder to download into.

    Returns:
        The local ``model`` folder; load a checkpoint from it with
        ``torch.load(path, weights_only=True)`` or :func:`engines.checkpoint.load_checkpoint`.
    """
    from mlflow.artifacts import download_artifacts

    mv = client.get_model_version(name, str(version))
    # the source (runs:/<id>/model) is resolved against this client's store, not the global one
    return Path(
        download_artifacts(artifact_uri=mv.source, dst_path=str(dst_dir), tracking_uri=client.tracking_uri)
    )
