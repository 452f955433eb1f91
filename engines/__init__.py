"""Training-engine basics shared by all bundles: MLflow tracking, checkpoints, progress display."""

from engines.checkpoint import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    ResumeCheckpointLoader,
    UnsafeCheckpointError,
    atomic_torch_save,
    find_latest_checkpoint,
    load_checkpoint,
)
from engines.outputs import loss_dict_from_output, loss_from_output
from engines.progress import ProgressBarHandler, attach_progress_bar
from engines.tracking import (
    EXPERIMENTS,
    TaggedMLFlowHandler,
    default_tracking_uri,
    experiment_name,
    flatten_params,
    git_commit,
    make_mlflow_handler,
    run_params,
    run_tags,
)

__all__ = [
    "EXPERIMENTS",
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "ProgressBarHandler",
    "ResumeCheckpointLoader",
    "TaggedMLFlowHandler",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "attach_progress_bar",
    "default_tracking_uri",
    "experiment_name",
    "find_latest_checkpoint",
    "flatten_params",
    "git_commit",
    "load_checkpoint",
    "loss_dict_from_output",
    "loss_from_output",
    "make_mlflow_handler",
    "run_params",
    "run_tags",
]
