"""The main job's plan: every bundle's demo steps exist, and the budget is split by their shares."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts.run_demo import ROOT, plan, read_steps

BUNDLES = ["anoddpm_simplex", "ddim_classifier_guidance", "diffusion_mae", "latent_robust_classifier"]


def test_every_bundle_has_a_demo_and_the_budget_is_split_by_share() -> None:
    steps = plan(12.0)
    assert sorted({s.bundle.name for s, _ in steps}) == BUNDLES
    trained = [m for _, m in steps if m is not None]
    assert math.isclose(sum(trained), 12.0, abs_tol=0.01)  # the whole budget, rounded per step
    shares = {s.label: s.share for s, _ in steps}
    minutes = {s.label: m for s, m in steps}
    total = sum(shares.values())
    for label, m in minutes.items():
        if shares[label] > 0:
            assert m == pytest.approx(12.0 * shares[label] / total, abs=1e-3)
        else:
            assert m is None  # evaluation and inference steps run to completion
    # every bundle ends with an evaluation step that does not train
    for name in BUNDLES:
        mine = [(s, m) for s, m in steps if s.bundle.name == name]
        assert any("evaluate.json" in s.configs and m is None for s, m in mine), name


def test_a_bundle_alone_gets_the_same_minutes() -> None:
    together = {s.label: m for s, m in plan(20.0) if s.bundle.name == "diffusion_mae"}
    alone = {s.label: m for s, m in plan(20.0, ["diffusion_mae"])}
    assert alone == together
    assert {s.bundle.name for s, _ in plan(20.0, ["diffusion_mae"])} == {"diffusion_mae"}


def test_unknown_bundle_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown bundles \['nope'\]"):
        plan(10.0, ["nope"])


def test_read_steps_names_the_file_and_fault(tmp_path: Path) -> None:
    cfg = tmp_path / "b" / "configs"
    cfg.mkdir(parents=True)
    (cfg / "train.json").write_text("{}")
    demo = cfg / "demo.json"
    demo.write_text(json.dumps({"steps": [{"configs": ["train.json", "missing.json"]}]}))
    with pytest.raises(
        ValueError, match=r"demo\.json: step 0 names missing config files \['missing\.json'\]"
    ):
        read_steps(demo)
    demo.write_text(json.dumps({"steps": [["train.json"]]}))
    with pytest.raises(ValueError, match="step 0 needs a non-empty 'configs' list"):
        read_steps(demo)
    demo.write_text(json.dumps({"steps": [{"configs": ["train.json"], "budget_share": -1}]}))
    with pytest.raises(ValueError, match="negative budget_share"):
        read_steps(demo)
    demo.write_text(
        json.dumps({"steps": [{"configs": ["train.json"], "args": ["--scheme", "mae"], "budget_share": 2}]})
    )
    (step,) = read_steps(demo)
    assert (step.configs, step.args, step.share, step.label) == (
        ["train.json"],
        ["--scheme", "mae"],
        2.0,
        "train.json --scheme mae",
    )


def test_demo_configs_are_real_config_files() -> None:
    for demo in sorted((ROOT / "bundles").glob("*/configs/demo.json")):
        for step in read_steps(demo):  # raises on a missing file
            for c in step.configs:
                json.loads((demo.parent / c).read_text())


def test_runtime_requirements_run_bundles() -> None:
    """The main job launches every step as ``python -m monai.bundle run``, which imports fire: a plain
    ``pip install -e .`` (what scripts/demo.sh installs) must bring it, not only the dev extra."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    names = {
        line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].lower()
        for line in cfg["options"]["install_requires"].splitlines()
    }
    assert {"fire", "monai", "mlflow", "matplotlib"} <= names
