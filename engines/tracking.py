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
* With its defaults, the MLflow client retries a failed HTTP request 7 times with exponential
  backoff and a 120 s timeout (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR``,
  ``..._TIMEOUT``, read at every request), so each call to a dead server stalls for minutes and then
  raises ``MlflowException``; MONAI's handler lets that exception stop the engine.

Tracking outages therefore never stop a training or an evaluation here: an http(s) server is probed
(``GET <uri>/health``) when a run starts, every MLflow call of :class:`TaggedMLFlowHandler` and
:func:`log_comparison_runs` is guarded, and when the tracking store is unreachable or a call fails
the run is logged to a local fallback SQLite store instead (:func:`fallback_store_path`, tagged
``fallback_of=<uri>``), with the metrics logged so far replayed into it. See "When the server is
down" in ``docs/tracking.md``.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict, path_to_sqlite_uri, path_to_uri

from data_prep.datalist import datalist_hash
from engines.outputs import loss_from_output

if TYPE_CHECKING:
    from ignite.engine import Engine

try:  # MLflow's own limits, so truncation follows the installed version
    from mlflow.utils.validation import (
        MAX_METRICS_PER_BATCH,
        MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH,
        MAX_TAG_VAL_LENGTH,
    )
except ImportError:  # pragma: no cover - the values of MLflow 2.x/3.x
    MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 6000, 8000, 100
    MAX_METRICS_PER_BATCH = 1000

__all__ = [
    "EXPERIMENTS",
    "FALLBACK_STORE_NAME",
    "HTTP_RETRY_DEFAULTS",
    "MAX_PARAM_VAL_LENGTH",
    "PROBE_TIMEOUT",
    "TaggedMLFlowHandler",
    "bound_http_retries",
    "default_tracking_uri",
    "experiment_name",
    "fallback_store_path",
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

#: file name of the local SQLite store a run falls back to when its tracking store is unavailable;
#: its artifacts go to the folder of the same name without ``.db``
FALLBACK_STORE_NAME = "mlruns-fallback.db"

#: seconds the start-of-run reachability probe of an http(s) tracking server waits
PROBE_TIMEOUT = 3.0

#: MLflow HTTP client settings used when the tracking URI is http(s) and the user has not set them.
#: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) make every call to a dead server
#: stall for minutes; these bound one failed call to about 3 s when the connection is refused and to
#: about a minute when the host does not answer at all, while leaving 20 s for a slow response (the
#: timeout is per socket operation, not per upload, so larger artifacts are not cut off).
HTTP_RETRY_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}

#: tracking URI (credentials removed) → why it was found unreachable, for this process: the other
#: handlers and evaluations of the process then go straight to their fallback store instead of each
#: stalling on MLflow's retries first
_UNREACHABLE: dict[str, str] = {}
#: URIs whose switch to the fallback store has been announced as a WARNING (later ones: INFO)
_ANNOUNCED: set[str] = set()

_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def _redact(text: str) -> str:
    """``text`` without ``user:password@`` of the URIs it contains (tags and logs are shared)."""
    return _CREDENTIALS.sub("", text)


def _short(exc: BaseException, limit: int = 300) -> str:
    """One line describing ``exc``, credentials removed (MLflow's messages repeat the request URL)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return _truncate(_redact(f"{type(exc).__name__}: {first}" if first else type(exc).__name__), limit)


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def bound_http_retries(uri: str) -> None:
    """Bound MLflow's HTTP retries for this process when ``uri`` is an http(s) server.

    Each of :data:`HTTP_RETRY_DEFAULTS` is set in ``os.environ`` unless the user has set it
    (``os.environ.setdefault``); MLflow reads them at every request, so this takes effect at once.

    Args:
        uri: the tracking URI; anything but http(s) leaves the environment unchanged.
    """
    if _is_http(uri):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)


def _probe(uri: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the tracking server at ``uri`` cannot be reached, or ``None`` if it answered.

    ``GET <uri>/health`` (the MLflow server's health endpoint). Any HTTP answer, even an error
    status (a reverse proxy without that path, a login), counts as reachable: only the absence of a
    server is decided here, everything else is left to MLflow's own calls. So is a TLS failure,
    since the probe does not know the CA settings MLflow would use.
    """
    url = _redact(uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            return None
        return _redact(f"GET {url}: {exc.reason}")
    except (OSError, http.client.HTTPException) as exc:  # timeout, reset, a closed connection
        return _redact(f"GET {url}: {_short(exc)}")
    except ValueError:  # a URL urllib cannot parse: MLflow will say what is wrong with it
        return None


def _unreachable_reason(uri: str) -> str | None:
    """Why ``uri`` is unusable right now: found earlier in this process, or by a probe (http(s) only)."""
    key = _redact(uri)
    if key in _UNREACHABLE:
        return _UNREACHABLE[key]
    if not _is_http(uri):
        return None
    reason = _probe(uri)
    if reason is not None:
        _UNREACHABLE[key] = reason
    return reason


def _announce(uri: str, message: str, *args: Any) -> None:
    """Log a switch to the fallback store: a WARNING the first time for ``uri``, INFO afterwards."""
    key = _redact(uri)
    level = logging.INFO if key in _ANNOUNCED else logging.WARNING
    _ANNOUNCED.add(key)
    logger.log(level, message, *args)


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


def fallback_store_path(workdir: str | os.PathLike = ".") -> Path:
    """The local SQLite store runs fall back to when the tracking store is unavailable.

    Args:
        workdir: the folder :func:`default_tracking_uri` would put the local store in (the bundle
            folder in the configs); not created here, only when a run actually falls back.

    Returns:
        ``<abs workdir>/mlruns-fallback.db``; its runs' artifacts go to ``<abs workdir>/mlruns-fallback/``.
    """
    return Path(workdir).expanduser().absolute() / FALLBACK_STORE_NAME


def _fallback_artifacts(store: Path) -> str:
    # beside the database, as MONAI does for its default SQLite store
    return path_to_uri(store.with_suffix(""))


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


class _MetricHistory:
    """Every metric value a handler logged, kept compactly (24 bytes a value) for a replay."""

    def __init__(self) -> None:
        self._series: dict[str, tuple[array, array, array]] = {}

    def add(self, metrics: Iterable[Any]) -> None:
        """Record ``mlflow.entities.Metric`` objects; a value that is not a number is skipped (MLflow
        would refuse it too)."""
        for m in metrics:
            try:
                value = float(m.value)
            except (TypeError, ValueError):
                continue
            values, stamps, steps = self._series.setdefault(m.key, (array("d"), array("q"), array("q")))
            values.append(value)
            stamps.append(int(m.timestamp))
            steps.append(int(m.step))

    def __len__(self) -> int:
        return sum(len(v[0]) for v in self._series.values())

    def batches(self, size: int = MAX_METRICS_PER_BATCH) -> Iterable[list[Any]]:
        """The recorded values as ``Metric`` lists of at most ``size`` (MLflow's per-call limit)."""
        from mlflow.entities import Metric

        batch: list[Any] = []
        for key, (values, stamps, steps) in self._series.items():
            for value, ts, step in zip(values, stamps, steps, strict=True):
                batch.append(Metric(key, value, ts, step))
                if len(batch) == size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def clear(self) -> None:
        self._series.clear()


class TaggedMLFlowHandler(MLFlowHandler):
    """``monai.handlers.MLFlowHandler`` plus run tags, safe parameter logging and a local fallback store.

    Differences from the MONAI handler:

    * ``run_tags`` are set on the run when the engine starts (MONAI's handler has no tags argument).
    * parameters already on the run are not logged again: a resumed run (same ``run_name``, not
      finished) keeps its first values, and a changed value is reported as a warning instead of the
      ``MlflowException`` MLflow raises for changed params.
    * parameters are sent in batches of MLflow's per-call limit (100), so a large flattened
      hyper-parameter dict does not fail.
    * a tracking outage never reaches the engine. An http(s) server is probed when the engine starts
      (``GET <uri>/health``, :data:`PROBE_TIMEOUT` seconds). If it is unreachable, or when any MLflow
      call of the handler fails later (opening the run, metrics, params, tags, artifacts, ending the
      run), the handler logs one WARNING and moves to ``fallback_store``: it opens the run there
      (same name, params and tags, plus ``fallback_of=<uri>``, ``fallback_reason`` and, when the run
      had been created on the server, ``fallback_of_run_id``), replays every metric value and
      artifact it had logged so far, and goes on there. Failures of the fallback store itself are
      warned about once and dropped. MLflow's HTTP retries are bounded by
      :func:`bound_http_retries`, so a failing call stalls for seconds, not minutes.

    Metric values are kept in memory (24 bytes each) until the run falls back or ends, for the replay.
    A handler in a process where another handler or evaluation already found the URI unreachable
    goes to its fallback store at once.

    Args:
        run_tags: tag name → value, set on the run at start.
        fallback_store: the local SQLite file to fall back to (:func:`fallback_store_path`); default
            ``<cwd>/mlruns-fallback.db``. No fallback when it is the tracking store itself: failures
            are then warned about and dropped.
        kwargs: every argument of ``monai.handlers.MLFlowHandler``.
    """

    def __init__(
        self,
        run_tags: Mapping[str, Any] | None = None,
        fallback_store: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_tags = {str(k): str(v) for k, v in (run_tags or {}).items()}
        #: the store the run is meant for (``MLFLOW_TRACKING_URI`` or the argument, as MONAI resolves it)
        self.tracking_uri: str = str(self.client.tracking_uri)
        self.fallback_store = Path(fallback_store or fallback_store_path(".")).expanduser().absolute()
        fallback_uri = path_to_sqlite_uri(self.fallback_store)
        self.fallback_uri: str | None = None if fallback_uri == self.tracking_uri else fallback_uri
        #: True once the handler logs to the fallback store
        self.on_fallback = False
        bound_http_retries(self.tracking_uri)
        self._engine: Engine | None = None
        self._history = _MetricHistory()
        self._artifacts: list[tuple[str, str | None]] = []
        self._fallback_tags: dict[str, str] = {}
        self._replay_pending = False
        self._dropped = 0

    # ------------------------------------------------------------------ events

    def start(self, engine: Engine) -> None:
        """Open or resume the run, log parameters once and set the tags; fall back if the store is down.

        Args:
            engine: the Ignite engine the handler is attached to.
        """
        self._engine = engine
        if not self.on_fallback and self.fallback_uri is not None:
            _unreachable_reason(self.tracking_uri)  # an unreachable server: switched in _guarded
        self._guarded("opening the run", self._open, after_switch=False)

    def complete(self) -> None:
        """Log the ``artifacts`` files when the engine completes."""
        if self.artifacts and self.cur_run:
            for path in self._parse_artifacts():
                self.log_artifact(path)

    def close(self) -> None:
        """End the run as ``FINISHED`` (in whichever store it is now) and release a SQLite store."""
        if self.cur_run is not None:
            self._guarded(
                "ending the run",
                lambda: self.client.set_terminated(self._run_id(), self.run_finish_status),
                after_switch=True,
            )
        if self._dropped:
            logger.warning(
                "MLflow run %r: %d logging call(s) failed and were dropped; see the first warning.",
                self.run_name,
                self._dropped,
            )
            self._dropped = 0
        self.cur_run = None
        self._history.clear()
        self._artifacts.clear()
        with contextlib.suppress(Exception):  # releasing a file handle must not fail a finished run
            self._dispose_sqlite_store()

    # ------------------------------------------------------------------ logging API

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log metrics into the handler's run, with the handler's outage protection.

        For other handlers that add metrics to this run (e.g. a linear probe during pretraining).

        Args:
            metrics: name → number; nested mappings become ``a/b``-style keys as in MONAI.
            step: the step (iteration or epoch) of the values.
        """
        self._log_metrics(dict(metrics), step=step)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file into the handler's run, with the handler's outage protection.

        Args:
            path: the local file.
            artifact_path: folder inside the run's artifacts; ``None``: the root.
        """
        path = os.fspath(path)
        if self._recording:
            self._artifacts.append((path, artifact_path))
        if self.cur_run is None:
            return
        self._guarded(
            "logging an artifact",
            lambda: self.client.log_artifact(self._run_id(), path, artifact_path),
            after_switch=False,  # the switch replays the recorded artifacts, this one included
        )

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [Metric(k, v, timestamp, step or 0) for k, v in flatten_dict(metrics).items()]
        if self._recording:
            self._history.add(batch)
        if self.cur_run is None or not batch:
            return
        self._guarded(
            "logging metrics",
            lambda: self.client.log_batch(run_id=self._run_id(), metrics=batch),
            after_switch=False,  # the switch replays the recorded history, this batch included
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

    # ------------------------------------------------------------------ outage handling

    @property
    def _recording(self) -> bool:
        # only what could still be replayed somewhere is worth the memory
        return not self.on_fallback and self.fallback_uri is not None

    def _run_id(self) -> str:
        # read at call time: after a switch the run is the fallback store's
        assert self.cur_run is not None
        return self.cur_run.info.run_id

    def _open(self) -> None:
        """Open (or resume) the named run in the current store, log params and tags, replay if due.

        Raises:
            Exception: whatever the store raises; the caller guards.
        """
        if self._engine is None:  # not started yet: start() will open it
            return
        super().start(self._engine)  # experiment, the named unfinished run or a new one, params
        if self.cur_run is None:
            return
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in {**self.run_tags, **self._fallback_tags}.items()]
        for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id=self._run_id(), tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        if self._replay_pending:
            self._replay()

    def _replay(self) -> None:
        """Send the recorded metric history and artifacts to the (fallback) run, then forget them."""
        self._replay_pending = False
        n_values, n_files = len(self._history), 0
        try:
            for batch in self._history.batches():
                self.client.log_batch(run_id=self._run_id(), metrics=batch)
            for path, sub in self._artifacts:
                if os.path.exists(path):
                    self.client.log_artifact(self._run_id(), path, sub)
                    n_files += 1
        finally:
            self._history.clear()
            self._artifacts.clear()
        logger.info(
            "MLflow run %r: replayed %d metric value(s) and %d artifact(s) into the fallback store.",
            self.run_name,
            n_values,
            n_files,
        )

    def _switch(self, reason: str) -> bool:
        """Move to the fallback store: open the run there and replay what was logged so far.

        Args:
            reason: why (for the warning and the ``fallback_reason`` tag), credentials removed.

        Returns:
            ``False`` when there is nothing to switch to (already there, or no distinct fallback);
            ``True`` once switched, even if opening the run in the fallback store failed (that is
            warned about and counted, and the handler stays on the fallback store).
        """
        if self.on_fallback or self.fallback_uri is None:
            return False
        from mlflow import MlflowClient

        primary_run = self.cur_run.info.run_id if self.cur_run is not None else None
        _announce(
            self.tracking_uri,
            "MLflow tracking store %s is unavailable (%s): run %r goes on in the local fallback store %s "
            "(tagged fallback_of); %d metric value(s) logged so far are replayed there. Training and "
            "evaluation go on; see 'When the server is down' in docs/tracking.md.",
            _redact(self.tracking_uri),
            reason,
            self.run_name,
            self.fallback_uri,
            len(self._history),
        )
        self.on_fallback = True
        self._fallback_tags = {
            "fallback_of": _truncate(_redact(self.tracking_uri), MAX_TAG_VAL_LENGTH),
            "fallback_reason": _truncate(reason, MAX_TAG_VAL_LENGTH),
        }
        if primary_run is not None:
            self._fallback_tags["fallback_of_run_id"] = primary_run
        self._replay_pending = True
        self.experiment = None
        self.cur_run = None
        self.artifact_location = _fallback_artifacts(self.fallback_store)
        try:
            self.fallback_store.parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.fallback_uri)
            self._open()
        except Exception as exc:
            self._drop("opening the run in the fallback store", exc, store=self.fallback_uri)
        return True

    def _guarded(self, what: str, call: Callable[[], Any], after_switch: bool) -> None:
        """Run one MLflow call; on failure switch to the fallback store instead of raising.

        Args:
            what: the operation, for the warnings.
            call: the MLflow call, using ``self.client`` and the current run at call time.
            after_switch: also run ``call`` in the fallback store after a switch (``False`` when the
                switch itself covers it: opening the run, replayed metrics and artifacts).
        """
        if not self.on_fallback:
            known = _UNREACHABLE.get(_redact(self.tracking_uri))
            if known is not None and self._switch(known):
                if after_switch:
                    self._try(what, call)
                return
        try:
            call()
            return
        except Exception as exc:
            failure = exc
        # an unreachable server is remembered for the process (its other handlers switch at once);
        # a server that answered with an error is not: the others keep using it
        reason = _unreachable_reason(self.tracking_uri) if _is_http(self.tracking_uri) else None
        if self._switch(f"{what} failed: {_short(failure)}" if reason is None else reason):
            if after_switch:
                self._try(what, call)
        else:
            self._drop(what, failure)

    def _try(self, what: str, call: Callable[[], Any]) -> None:
        if self.cur_run is None:
            return
        try:
            call()
        except Exception as exc:
            self._drop(what, exc)

    def _drop(self, what: str, exc: BaseException, store: str | None = None) -> None:
        """A call that failed with nowhere left to go: warn the first time, count the others.

        Args:
            what: the operation.
            exc: its exception.
            store: the store it failed in; default: the current client's.
        """
        if self._dropped == 0:
            logger.warning(
                "MLflow %s failed for run %r in %s (%s); not logged, the engine goes on. Further "
                "failures of this run are counted.",
                what,
                self.run_name,
                _redact(store or str(self.client.tracking_uri)),
                _short(exc),
            )
        self._dropped += 1


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
        workdir: folder of the local SQLite store when ``MLFLOW_TRACKING_URI`` is unset, and of the
            fallback store (:func:`fallback_store_path`) used when the tracking store is unavailable.
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
        The handler (a :class:`TaggedMLFlowHandler`: tracking outages are warned about and logged to
        the fallback store, never raised into the engine); call ``attach(engine)`` or list it in the
        engine's handlers.

    Raises:
        ValueError: empty ``run_name``, unknown ``task``, or reserved names in ``hparams``/``kwargs``.
    """
    if not run_name or not str(run_name).strip():
        raise ValueError(
            "make_mlflow_handler: run_name is required (without it MONAI's MLFlowHandler logs into the "
            "latest unfinished run of the experiment)."
        )
    reserved = {"tracking_uri", "experiment_name", "run_name", "experiment_param", "fallback_store"} & set(
        kwargs
    )
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
        fallback_store=fallback_store_path(workdir),
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
) -> str | None:
    """Log an evaluation as one parent run (tables, plots) and one child run per compared model.

    Every child gets the same metric names, so MLflow's run comparison lines the models up; the parent
    carries ``role=comparison`` and the combined artifacts, each child ``role=<child_role>`` and the
    ``mlflow.parentRunId`` tag.

    A tracking outage never fails the evaluation (whose own files are written before this is called).
    An unreachable http(s) server (probed first, or already found down in this process) or any
    failure while logging sends the whole comparison (parent, children, metrics, params, tags,
    artifacts) to the local fallback store (:func:`fallback_store_path`), tagged
    ``fallback_of=<uri>`` and ``fallback_reason``, after a WARNING; runs already created in the
    tracking store are marked ``FAILED`` when it still answers. If the fallback store fails too, that
    is a WARNING and ``None`` is returned.

    Args:
        task: a key of :data:`EXPERIMENTS`.
        run_name: parent run name; children are ``<run_name>-<child>``.
        method: the bundle name.
        children: child name → ``{"metrics": {name: value}, "params": {...}, "tags": {...},
            "artifact_dir": folder logged as the child's artifacts (optional)}``.
        datalist: hashed into the params.
        dataset_name: readable dataset name.
        workdir: folder of the local store when ``MLFLOW_TRACKING_URI`` is unset, and of the
            fallback store.
        hparams: params of every run.
        tags: extra tags of every run.
        parent_params: params of the parent only.
        parent_artifacts: ``(file, artifact sub-folder or None)`` pairs for the parent.
        child_role: the children's ``role`` tag.
        parent_metrics: metrics of the parent (a single-run evaluation passes these and no children).
        parent_role: the parent's ``role`` tag.

    Returns:
        The parent run id (in the tracking store, or in the fallback store after a fallback);
        ``None`` when nothing could be logged.

    Raises:
        ValueError: an unknown ``task`` or reserved names in ``hparams`` (mistakes, not outages).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    uri = default_tracking_uri(workdir)
    bound_http_retries(uri)
    store = fallback_store_path(workdir)
    fallback_uri = path_to_sqlite_uri(store)
    exp_name = experiment_name(task)
    base_tags = run_tags(
        method, datalist, dataset_name, task=task, **{k: str(v) for k, v in (tags or {}).items()}
    )
    params = run_params(method, datalist, dataset_name, **dict(hparams or {}))

    def write(
        client: MlflowClient, extra_tags: Mapping[str, str], artifact_location: str | None, created: list[str]
    ) -> str:
        exp = client.get_experiment_by_name(exp_name)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else client.create_experiment(exp_name, artifact_location=artifact_location)
        )
        all_tags = {**base_tags, **extra_tags}

        def log(
            run_id: str,
            metrics: Mapping[str, float],
            extra_params: Mapping[str, Any],
            run_tags_: Mapping[str, Any],
        ) -> None:
            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
            ps = [Param(k, str(v)) for k, v in {**params, **extra_params}.items()]
            tg = [RunTag(k, str(v)) for k, v in run_tags_.items()]
            for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=ms[i : i + MAX_METRICS_PER_BATCH])
            for i in range(0, len(ps), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, params=ps[i : i + MAX_PARAMS_TAGS_PER_BATCH])
            client.log_batch(run_id, tags=tg)

        parent = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        pid = parent.info.run_id
        created.append(pid)
        log(pid, dict(parent_metrics or {}), dict(parent_params or {}), {"role": parent_role})
        for path, sub in parent_artifacts:
            client.log_artifact(pid, str(path), sub)
        for name, child in children.items():
            run = client.create_run(
                exp_id,
                run_name=f"{run_name}-{name}",
                tags={
                    **all_tags,
                    **dict(child.get("tags", {})),
                    "mlflow.parentRunId": pid,
                    "role": child_role,
                },
            )
            cid = run.info.run_id
            created.append(cid)
            log(cid, child.get("metrics", {}), child.get("params", {}), {})
            if child.get("artifact_dir") is not None:
                client.log_artifacts(cid, str(child["artifact_dir"]))
            client.set_terminated(cid, "FINISHED")
            created.remove(cid)
        client.set_terminated(pid, "FINISHED")
        return pid

    reason = _unreachable_reason(uri)
    if reason is None:
        created: list[str] = []
        client = MlflowClient(tracking_uri=uri)
        try:
            return write(client, {}, None, created)
        except Exception as exc:
            reason = _unreachable_reason(uri) or f"logging failed: {_short(exc)}"
            if _redact(uri) not in _UNREACHABLE:  # it still answers: do not leave the runs RUNNING
                for run_id in reversed(created):
                    with contextlib.suppress(Exception):
                        client.set_terminated(run_id, "FAILED")
    if fallback_uri == uri:
        logger.warning("MLflow run %r not logged to %s (%s).", run_name, _redact(uri), reason)
        return None
    _announce(
        uri,
        "MLflow tracking store %s is unavailable (%s): the evaluation run %r and its %d child run(s) go "
        "to the local fallback store %s (tagged fallback_of). The evaluation's output files are complete; "
        "see 'When the server is down' in docs/tracking.md.",
        _redact(uri),
        reason,
        run_name,
        len(children),
        fallback_uri,
    )
    extra = {
        "fallback_of": _truncate(_redact(uri), MAX_TAG_VAL_LENGTH),
        "fallback_reason": _truncate(reason, MAX_TAG_VAL_LENGTH),
    }
    created = []
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fallback = MlflowClient(tracking_uri=fallback_uri)
        return write(fallback, extra, _fallback_artifacts(store), created)
    except Exception as exc:
        logger.warning(
            "MLflow run %r could not be logged to the fallback store %s either (%s); the evaluation's "
            "output files are complete, only their MLflow copy is missing.",
            run_name,
            fallback_uri,
            _short(exc),
        )
        for run_id in reversed(created):
            with contextlib.suppress(Exception):
                fallback.set_terminated(run_id, "FAILED")
        return None
