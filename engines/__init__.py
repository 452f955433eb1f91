"""What Ignite engines need beyond MONAI: tracking, checkpoints, progress, datasets of slices, diffusion
prepare-batch and anomaly inferers, the shared anomaly evaluation, and helpers for bundle configs."""

from engines.anomaly import (
    AnomalyEvaluationHandler,
    AnomalyFigureHandler,
    AnomalyMapWriter,
    HealthyThresholdHandler,
    VolumeAnomalyInferer,
    from_model_size,
    to_model_size,
)
from engines.anomaly_eval import AnomalyEvaluator, PostProcess, healthy_thresholds, intensity_baseline_map
from engines.bundle import TimeBudget, bundle_root, demo_dataset_dir
from engines.checkpoint import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    ResumeCheckpointLoader,
    UnsafeCheckpointError,
    atomic_torch_save,
    find_latest_checkpoint,
    load_checkpoint,
)
from engines.data import SliceDataset, healthy_slices_only
from engines.diffusion import AnomalyInferer, SimplexDiffusionPrepareBatch
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
    "AnomalyEvaluationHandler",
    "AnomalyEvaluator",
    "AnomalyFigureHandler",
    "AnomalyInferer",
    "AnomalyMapWriter",
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "HealthyThresholdHandler",
    "PostProcess",
    "ProgressBarHandler",
    "ResumeCheckpointLoader",
    "SimplexDiffusionPrepareBatch",
    "SliceDataset",
    "TaggedMLFlowHandler",
    "TimeBudget",
    "UnsafeCheckpointError",
    "VolumeAnomalyInferer",
    "atomic_torch_save",
    "attach_progress_bar",
    "bundle_root",
    "default_tracking_uri",
    "demo_dataset_dir",
    "experiment_name",
    "find_latest_checkpoint",
    "flatten_params",
    "from_model_size",
    "git_commit",
    "healthy_slices_only",
    "healthy_thresholds",
    "intensity_baseline_map",
    "load_checkpoint",
    "loss_dict_from_output",
    "loss_from_output",
    "make_mlflow_handler",
    "run_params",
    "run_tags",
    "to_model_size",
]
