"""latent_robust_classifier's 4-class task end to end, tiny, from its real JSON configs.

A module-scoped fixture trains every model for the 4-class task (the binary task is in
test_latent_robust_classifier.py; one module each, so the two trainings can run on different test workers),
and the two-process (torchrun, gloo) training test lives here for the same balance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.bundles._helpers import mlflow_runs, run_bundle
from tests.bundles.test_latent_robust_classifier import (
    CFG,
    EXPERIMENT,
    _args,
    _parser,
    _train_all,
    check_every_model_trained,
)


@pytest.fixture(scope="module")
def multiclass(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("lrc_multiclass")
    _train_all(demo_cohort, work, "multiclass")
    return work


def test_every_model_trains_multiclass(multiclass: Path, demo_cohort: Path) -> None:
    check_every_model_trained(multiclass, "multiclass", 4, demo_cohort)


def test_evaluate_names_the_missing_checkpoint(multiclass: Path, demo_cohort: Path) -> None:
    with pytest.raises(
        AssertionError, match=r"hybrid_aug\.pt.*train_hybrid\.json and --diffusion_augmentation"
    ):
        run_bundle(
            CFG, ["train.json", "evaluate.json", "smoke.json"], multiclass,
            *_args(demo_cohort, multiclass, "multiclass"), "--models", "['cnn', 'hybrid_aug']",
        )  # fmt: skip


def test_diffusion_augmentation_draws_class_conditional_latents(multiclass: Path, demo_cohort: Path) -> None:
    parser = _parser(
        demo_cohort, multiclass, ["train.json", "train_latent_resnet.json", "smoke.json"], "multiclass"
    )
    parser["diffusion_augmentation"] = True
    bank = parser.get_parsed_content("synthetic_latents")()
    assert bank.latents.shape == (4 * 4, 4, 8, 8)  # smoke: 4 per class, 4 classes, 8x8 latents of 32² slices
    assert torch.equal(bank.labels, torch.arange(4).repeat_interleave(4))
    prep = parser.get_parsed_content("latent_prepare_batch")
    batch = {"image": torch.rand(3, 1, 32, 32), "label": torch.tensor([0, 1, 2])}
    z, y = prep(batch, torch.device("cpu"))
    assert z.shape == (3 + 2, 4, 8, 8) and y[:3].tolist() == [0, 1, 2]
    assert parser.get_parsed_content("model_name") == "latent_resnet_aug"


def test_torchrun_two_processes(demo_cohort: Path, tmp_path: Path) -> None:
    work = tmp_path
    for model in ("autoencoder", "latent_ddpm", "hybrid"):
        run_bundle(
            CFG, ["train.json", f"train_{model}.json", "smoke.json", "multi_gpu_train.json"], work,
            *_args(demo_cohort, work, "binary"), torchrun=2, port=29547,
        )  # fmt: skip
    for name in ("autoencoder.pt", "latent_scale.json", "hybrid.pt", "classes.json"):
        assert (work / "models" / name).is_file(), name
    # rank 0 alone logs: one run per training
    assert len(mlflow_runs(work, "latent_robust_classifier-binary-train_hybrid", EXPERIMENT)) == 1
