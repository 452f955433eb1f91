"""MLflow tracking defaults shared by every bundle: one store, one experiment per task, named runs.

Every run records where its numbers came from: the method, the dataset, a hash of the datalist
file, the git commit of the code and the flattened hyper-parameters. Facts about the installed
MONAI/MLflow this module relies on (MONAI 1.6, MLflow 3):

* ``MLFlowHandler`` without ``run_name`` appends to the latest *unfinished* run of the experiment,
  so two bundles run one after the other could mix their metrics: a run name is required here.
* MLflow 3 refuses the file store (``file://`` or plain paths); a local SQLite file is used instead.
* ``MLFLOW_TRACKING_URI`` in the environment overrides the handler's ``tracking_uri`` argument.
* ``MLFlowHandler`` has no argument for run tags and logs all parameters in one ``log_batch`` call,
  which MLflow limits to 100 entries and which fails when a parameter is logged again with another
  value (a resumed run); :class:`TaggedMLFlowHandler` fixes these three.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri

from data_prep.datalist import datalist_hash
from engines.outputs import loss_from_output

if TYPE_CHECKING:
    from ignite.engine import Engine

try:  # MLflow's own limits, so truncation follows the installed version
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - the values of MLflow 2.x/3.x
    MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 6000, 8000, 100

__all__ = [
    "EXPERIMENTS",
    "MAX_PARAM_VAL_LENGTH",
    "TaggedMLFlowHandler",
    "default_tracking_uri",
    "experiment_name",
    "flatten_params",
    "git_commit",
    "log_comparison_runs",
    "make_mlflow_handler",
    "run_params",
    "run_tags",
]

logger = logging.getLogger(__name__)

#: task → MLflow experiment name; every bundle of a task logs into the same experiment
EXPERIMENTS: dict[str, str] = {
    "anomaly": "anomaly-detection",
    "classification": "tumour-classification",
    "representation": "representation-learning",
}

#: the folder holding this package: its git commit identifies the code that produced a run
_PROJECT_DIR = Path(__file__).resolve().parent.parent


def default_tracking_uri(workdir: str | os.PathLike = ".") -> str:
    """The MLflow tracking URI all bundles share.

    Args:
        workdir: folder of the local store; created if missing. Ignored when ``MLFLOW_TRACKING_URI`` is set.

    Returns:
        ``MLFLOW_TRACKING_URI`` when set (non-empty), else ``sqlite:///<abs workdir>/mlruns.db``.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    folder = Path(workdir).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(folder / "mlruns.db")


def experiment_name(task: str) -> str:
    """The MLflow experiment of a task.

    Args:
        task: one of the keys of :data:`EXPERIMENTS`.

    Returns:
        The experiment name.

    Raises:
        ValueError: for an unknown task; the message lists the valid ones.
    """
    try:
        return EXPERIMENTS[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; valid tasks are {sorted(EXPERIMENTS)}.") from None


def _git(args: list[str], cwd: Path) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        res = subprocess.run([git, *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
    """The git commit of the code, for provenance; never raises.

    Args:
        repo_dir: a folder inside the repository; default: this project's source folder (not the
            working directory, which for a bundle run is usually an output folder outside git).

    Returns:
        The short commit hash, with ``-dirty`` appended when tracked files have uncommitted changes
        (untracked files such as outputs do not count); ``"unknown"`` outside a git checkout or
        without a ``git`` binary.
    """
    cwd = Path(repo_dir) if repo_dir is not None else _PROJECT_DIR
    if not cwd.is_dir():
        return "unknown"
    commit = _git(["rev-parse", "--short", "HEAD"], cwd)
    if not commit:
        return "unknown"
    # --no-optional-locks: status must not take .git/index.lock (it may refresh the index), which
    # would make a concurrent `git add`/`commit` in the same checkout fail
    status = _git(["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd)
    # status None (git failed) is reported as clean rather than guessed dirty
    return f"{commit}-dirty" if status else commit


def _truncate(value: str, limit: int) -> str:
    # the "..." marks the cut, so a truncated value is never taken for the whole one
    return value if len(value) <= limit else value[: limit - 3] + "..."


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``a.b`` keys with string values fitting MLflow's length limit.

    Args:
        params: possibly nested mapping of hyper-parameters.
        prefix: key prefix (used by the recursion).

    Returns:
        Flat ``key → str(value)``, each value at most ``MAX_PARAM_VAL_LENGTH`` characters.
    """
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, prefix=f"{key}."))
        else:
            out[key] = _truncate(str(v), MAX_PARAM_VAL_LENGTH)
    return out


def run_params(
    method: str,
    datalist: str | os.PathLike | None,
    dataset_name: str | None = None,
    **hparams: Any,
) -> dict[str, str]:
    """The parameters logged with every run.

    Args:
        method: the method (bundle) name, e.g. ``"anoddpm"``.
        datalist: the datalist file the run trains on; ``None`` when there is none.
        dataset_name: a human-readable dataset name.
        hparams: hyper-parameters; nested dicts become ``a.b`` keys.

    Returns:
        ``method``, ``dataset``, ``datalist_hash`` (:func:`data_prep.datalist.datalist_hash`, ``"none"``
        without a datalist), ``git_commit`` and the flattened hyper-parameters, all as strings.

    Raises:
        ValueError: a hyper-parameter would overwrite one of the provenance keys.
    """
    base = {
        "method": method,
        "dataset": dataset_name or "unknown",
        "datalist_hash": datalist_hash(datalist) if datalist is not None else "none",
        "git_commit": git_commit(),
    }
    flat = flatten_params(hparams)
    clash = sorted(set(base) & set(flat))
    if clash:
        raise ValueError(f"hyper-parameter name(s) {clash} are reserved for run provenance; rename them.")
    return {**{k: _truncate(str(v), MAX_PARAM_VAL_LENGTH) for k, v in base.items()}, **flat}


def run_tags(
    method: str,
    datalist: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    task: str | None = None,
    **extra: Any,
) -> dict[str, str]:
    """Searchable tags of a run (tags, unlike params, may be updated when a run is resumed).

    Args:
        method: the method (bundle) name.
        datalist: the datalist file; its absolute path and hash are recorded.
        dataset_name: a human-readable dataset name.
        task: the task (a key of :data:`EXPERIMENTS`).
        extra: more tags, stringified.

    Returns:
        Tag name → string value.
    """
    commit = git_commit()
    tags: dict[str, Any] = {"method": method, "git_commit": commit}
    if commit != "unknown":
        # the tag MLflow's UI shows as the source version
        tags["mlflow.source.git.commit"] = commit
    if task is not None:
        tags["task"] = task
    if dataset_name:
        tags["dataset"] = dataset_name
    if datalist is not None:
        tags["datalist"] = os.fspath(Path(datalist).absolute())
        tags["datalist_hash"] = datalist_hash(datalist)
    tags.update(extra)
    return {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


class TaggedMLFlowHandler(MLFlowHandler):
    """``monai.handlers.MLFlowHandler`` plus run tags and safe parameter logging.

    Differences from the MONAI handler:

    * ``run_tags`` are set on the run when the engine starts (MONAI's handler has no tags argument).
    * parameters already on the run are not logged again: a resumed run (same ``run_name``, not
      finished) keeps its first values, and a changed value is reported as a warning instead of the
      ``MlflowException`` MLflow raises for changed params.
    * parameters are sent in batches of MLflow's per-call limit (100), so a large flattened
      hyper-parameter dict does not fail.

    Args:
        run_tags: tag name → value, set on the run at start.
        kwargs: every argument of ``monai.handlers.MLFlowHandler``.
    """

    def __init__(self, run_tags: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_tags = {str(k): str(v) for k, v in (run_tags or {}).items()}

    def start(self, engine: Engine) -> None:
        """Open or resume the run, log parameters once and set the tags.

        Args:
            engine: the Ignite engine the handler is attached to.
        """
        super().start(engine)
        if self.run_tags and self.cur_run is not None:
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in self.run_tags.items()]
            for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(
                    run_id=self.cur_run.info.run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH]
                )

    def _log_params(self, params: dict[str, Any]) -> None:
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        from mlflow.entities import Param

        logged = self.client.get_run(self.cur_run.info.run_id).data.params
        new = []
        for key, value in params.items():
            value = _truncate(str(value), MAX_PARAM_VAL_LENGTH)
            if key not in logged:
                new.append(Param(key, value))
            elif logged[key] != value:
                logger.warning(
                    "MLflow run %s already has param %r=%r; keeping it, not logging %r.",
                    self.cur_run.info.run_id,
                    key,
                    logged[key],
                    value,
                )
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                run_id=self.cur_run.info.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            )


def make_mlflow_handler(
    task: str,
    run_name: str,
    method: str,
    datalist: str | os.PathLike | None = None,
    workdir: str | os.PathLike = ".",
    output_transform: Callable[[Any], Any] = loss_from_output,
    dataset_name: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    close_on_complete: bool = True,
    **kwargs: Any,
) -> TaggedMLFlowHandler:
    """An ``MLFlowHandler`` preconfigured with the project's store, experiment, params and tags.

    Usable from a bundle config as ``{"_target_": "engines.make_mlflow_handler", ...}``.

    Args:
        task: a key of :data:`EXPERIMENTS`; selects the experiment.
        run_name: the run's name, required: MONAI's handler would otherwise append to whatever
            unfinished run the experiment has. A run with this name that is not finished (e.g. a
            crashed run being resumed) is continued.
        method: the method (bundle) name.
        datalist: the datalist file (hashed into the params).
        workdir: folder of the local SQLite store when ``MLFLOW_TRACKING_URI`` is unset.
        output_transform: ``engine.state.output`` → scalar loss (``None`` skips the iteration);
            the default reads MONAI's decollated ``"loss"``.
        dataset_name: a human-readable dataset name.
        hparams: hyper-parameters logged as params (nested dicts flattened to ``a.b``).
        tags: more run tags, added to :func:`run_tags`.
        close_on_complete: end the run when the engine completes. Keep ``True`` for the trainer;
            pass ``False`` for an evaluator logging into the trainer's run (closing it after each
            validation would make the next validation open a new run with the same name).
        kwargs: further ``monai.handlers.MLFlowHandler`` arguments (``iteration_log``,
            ``epoch_log``, ``tag_name``, ``global_epoch_transform``, ``artifacts``...).

    Returns:
        The handler; call ``attach(engine)`` or list it in the engine's handlers.

    Raises:
        ValueError: empty ``run_name``, unknown ``task``, or reserved names in ``hparams``/``kwargs``.
    """
    if not run_name or not str(run_name).strip():
        raise ValueError(
            "make_mlflow_handler: run_name is required (without it MONAI's MLFlowHandler logs into the "
            "latest unfinished run of the experiment)."
        )
    reserved = {"tracking_uri", "experiment_name", "run_name", "experiment_param"} & set(kwargs)
    if reserved:
        raise ValueError(f"make_mlflow_handler sets {sorted(reserved)} itself; do not pass them.")
    exp = experiment_name(task)
    return TaggedMLFlowHandler(
        tracking_uri=default_tracking_uri(workdir),
        experiment_name=exp,
        run_name=str(run_name),
        experiment_param=run_params(method, datalist, dataset_name, **dict(hparams or {})),
        run_tags={**run_tags(method, datalist, dataset_name, task=task), **dict(tags or {})},
        output_transform=output_transform,
        close_on_complete=close_on_complete,
        **kwargs,
    )


def log_comparison_runs(
    task: str,
    run_name: str,
    method: str,
    children: Mapping[str, Mapping[str, Any]],
    datalist: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    workdir: str | os.PathLike = ".",
    hparams: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_params: Mapping[str, Any] | None = None,
    parent_artifacts: Sequence[tuple[str | os.PathLike, str | None]] = (),
    child_role: str = "model",
    parent_metrics: Mapping[str, float] | None = None,
    parent_role: str = "comparison",
) -> str:
    """Log an evaluation as one parent run (tables, plots) and one child run per compared model.

    Every child gets the same metric names, so MLflow's run comparison lines the models up; the parent
    carries ``role=comparison`` and the combined artifacts, each child ``role=<child_role>`` and the
    ``mlflow.parentRunId`` tag. A failure marks the runs ``FAILED`` and is re-raised.

    Args:
        task: a key of :data:`EXPERIMENTS`.
        run_name: parent run name; children are ``<run_name>-<child>``.
        method: the bundle name.
        children: child name → ``{"metrics": {name: value}, "params": {...}, "tags": {...},
            "artifact_dir": folder logged as the child's artifacts (optional)}``.
        datalist: hashed into the params.
        dataset_name: readable dataset name.
        workdir: folder of the local store when ``MLFLOW_TRACKING_URI`` is unset.
        hparams: params of every run.
        tags: extra tags of every run.
        parent_params: params of the parent only.
        parent_artifacts: ``(file, artifact sub-folder or None)`` pairs for the parent.
        child_role: the children's ``role`` tag.
        parent_metrics: metrics of the parent (a single-run evaluation passes these and no children).
        parent_role: the parent's ``role`` tag.

    Returns:
        The parent run id.
    """
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=default_tracking_uri(workdir))
    exp_name = experiment_name(task)
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    base_tags = run_tags(
        method, datalist, dataset_name, task=task, **{k: str(v) for k, v in (tags or {}).items()}
    )
    params = run_params(method, datalist, dataset_name, **dict(hparams or {}))

    def log(
        run_id: str,
        metrics: Mapping[str, float],
        extra_params: Mapping[str, Any],
        run_tags_: Mapping[str, Any],
    ):
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
        ps = [Param(k, str(v)) for k, v in {**params, **extra_params}.items()]
        tg = [RunTag(k, str(v)) for k, v in run_tags_.items()]
        for i in range(0, len(ms), 1000):
            client.log_batch(run_id, metrics=ms[i : i + 1000])
        for i in range(0, len(ps), 100):
            client.log_batch(run_id, params=ps[i : i + 100])
        client.log_batch(run_id, tags=tg)

    parent = client.create_run(exp_id, run_name=run_name, tags=base_tags)
    pid = parent.info.run_id
    try:
        log(pid, dict(parent_metrics or {}), dict(parent_params or {}), {"role": parent_role})
        for path, sub in parent_artifacts:
            client.log_artifact(pid, str(path), sub)
        for name, child in children.items():
            run = client.create_run(
                exp_id,
                run_name=f"{run_name}-{name}",
                tags={
                    **base_tags,
                    **dict(child.get("tags", {})),
                    "mlflow.parentRunId": pid,
                    "role": child_role,
                },
            )
            cid = run.info.run_id
            try:
                log(cid, child.get("metrics", {}), child.get("params", {}), {})
                if child.get("artifact_dir") is not None:
                    client.log_artifacts(cid, str(child["artifact_dir"]))
                client.set_terminated(cid, "FINISHED")
            except Exception:
                client.set_terminated(cid, "FAILED")
                raise
        client.set_terminated(pid, "FINISHED")
    except Exception:
        client.set_terminated(pid, "FAILED")
        raise
    return pid
