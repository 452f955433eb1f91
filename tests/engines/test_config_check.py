"""Command-line overrides of bundle configs are checked before anything runs: an unknown key, a value of
the wrong type or a missing input file fails with one line naming the key (engines.config_check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.config_check import ConfigOverrideError, check_overrides, cli_run_args, parse_run_args

ROOT = Path(__file__).resolve().parents[2]

TRAIN = {
    "dataset_dir": "/default/data",
    "datalist": "$os.path.join(@dataset_dir, 'datalist.json')",
    "output_dir": "$os.path.join(@bundle_root, 'eval')",
    "epochs": 400,
    "learning_rate": 0.001,
    "resume": False,
    "run_name": "toy-train",
    "t_values": [100, 250],
    "max_volumes": None,
    "net": {"_target_": "Toy", "channels": [16, 32]},
    "uses": "$@only_referenced + 1",
    "_comment": "a comment",
}
SMOKE = {"epochs": 2, "net#channels": [8, 8]}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A configs folder with train.json and smoke.json (merged in that order) and an existing datalist."""
    d = tmp_path / "configs"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(TRAIN))
    (d / "smoke.json").write_text(json.dumps(SMOKE))
    (tmp_path / "datalist.json").write_text("{}")
    return d


def _check(cfg: Path, *args: str) -> dict:
    files = json.dumps([str(cfg / "train.json"), str(cfg / "smoke.json")])
    return check_overrides(["--config_file", files, *args])


def test_unknown_key_names_the_files_and_a_close_match(cfg: Path) -> None:
    with pytest.raises(
        ConfigOverrideError,
        match=r"^unknown config key 'epocs' \(not in train\.json, smoke\.json\); did you mean 'epochs'\?$",
    ):
        _check(cfg, "--epocs", "3")


def test_nested_keys_must_exist_too(cfg: Path) -> None:
    assert _check(cfg, "--net#channels", "[4, 4]") == {"net#channels": [4, 4]}
    assert _check(cfg, "--net::channels", "[4, 4]") == {"net::channels": [4, 4]}
    with pytest.raises(ConfigOverrideError, match=r"'net#chanels'.*did you mean 'net#channels'\?"):
        _check(cfg, "--net#chanels", "[4, 4]")
    with pytest.raises(ConfigOverrideError, match=r"unknown config key 'nett#channels'"):
        _check(cfg, "--nett#channels", "[4, 4]")


def test_underscore_keys_only_if_they_exist_and_referenced_keys_are_known(cfg: Path) -> None:
    assert _check(cfg, "--_comment", "other")
    with pytest.raises(ConfigOverrideError, match="unknown config key '_note'"):
        _check(cfg, "--_note", "x")
    # only referenced (@only_referenced): a key the bundle expects from the caller
    assert _check(cfg, "--only_referenced", "3") == {"only_referenced": 3}


def test_wrong_type_names_key_expected_and_given(cfg: Path) -> None:
    with pytest.raises(
        ConfigOverrideError,
        match=r"^config key 'epochs' expects int \(default 2 in smoke\.json\), got str 'abc'$",
    ):
        _check(cfg, "--epochs", "abc")
    with pytest.raises(ConfigOverrideError, match=r"'epochs' expects int .*got float 2\.5"):
        _check(cfg, "--epochs", "2.5")
    with pytest.raises(ConfigOverrideError, match=r"'run_name' expects str .*got int 7 \(quote it"):
        _check(cfg, "--run_name", "7")
    with pytest.raises(ConfigOverrideError, match=r"'t_values' expects list .*got int 3"):
        _check(cfg, "--t_values", "3")
    with pytest.raises(ConfigOverrideError, match=r"'net' expects dict \(default \{'_target_'"):
        _check(cfg, "--net", "3")
    assert _check(cfg, "--epochs", "3", "--t_values", "[60]", "--run_name", "mine") == {
        "epochs": 3,
        "t_values": [60],
        "run_name": "mine",
    }


def test_int_is_accepted_for_float_and_null_defaults_take_anything(cfg: Path) -> None:
    assert _check(cfg, "--learning_rate", "1") == {"learning_rate": 1}
    assert _check(cfg, "--learning_rate", "1e-4") == {"learning_rate": 1e-4}
    assert _check(cfg, "--max_volumes", "5") == {"max_volumes": 5}
    # expressions and references are not literals: not type-checked
    assert _check(cfg, "--epochs", "$2 * 3", "--run_name", "@dataset_dir")


def test_null_is_text_for_fire(cfg: Path) -> None:
    with pytest.raises(ConfigOverrideError, match=r"got str 'null' \(for null write --epochs '\$None'\)"):
        _check(cfg, "--epochs", "null")


def test_bools_as_fire_passes_them(cfg: Path) -> None:
    assert _check(cfg, "--resume", "True") == {"resume": True}
    assert _check(cfg, "--resume", "--epochs", "3") == {"resume": True, "epochs": 3}
    assert _check(cfg, "--noresume") == {"resume": False}
    assert _check(cfg, "--resume=False") == {"resume": False}
    # fire keeps lower-case true as text, which acts as true; lower-case false would act as true too
    assert _check(cfg, "--resume", "true") == {"resume": "true"}
    with pytest.raises(ConfigOverrideError, match=r"'resume' expects bool .*got str 'false'.*--noresume"):
        _check(cfg, "--resume", "false")
    with pytest.raises(
        ConfigOverrideError, match=r"'resume' expects bool .*got int 1 \(write True or False\)"
    ):
        _check(cfg, "--resume", "1")
    with pytest.raises(ConfigOverrideError, match=r"unknown config key 'thing' .* from '--nothing'"):
        _check(cfg, "--nothing")


def test_input_paths_must_exist(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigOverrideError, match=r"^config key 'datalist': no such file or folder '/no/such\.json'$"
    ):
        _check(cfg, "--datalist", "/no/such.json")
    existing = str(cfg.parent / "datalist.json")
    assert _check(cfg, "--datalist", existing, "--dataset_dir", str(cfg.parent)) == {
        "datalist": existing,
        "dataset_dir": str(cfg.parent),
    }
    with pytest.raises(ConfigOverrideError, match=r"'datalist' expects a path \(str\), got int 3"):
        _check(cfg, "--datalist", "3")
    # relative to the working folder, as the run opens it
    monkeypatch.chdir(cfg.parent)
    assert _check(cfg, "--datalist", "datalist.json")
    with pytest.raises(ConfigOverrideError, match="'dataset_dir': no such file or folder 'nowhere'"):
        _check(cfg, "--dataset_dir", "nowhere")
    # outputs are created by the run: not checked
    assert _check(cfg, "--output_dir", "/not/yet/there")


def test_several_problems_in_one_line(cfg: Path) -> None:
    with pytest.raises(ConfigOverrideError) as err:
        _check(cfg, "--epocs", "3", "--epochs", "x", "--datalist", "/no/such.json")
    msg = str(err.value)
    assert "\n" not in msg and msg.count("; ") >= 2
    assert all(k in msg for k in ("'epocs'", "'epochs'", "'datalist'"))


def test_monai_run_arguments_are_not_overrides(cfg: Path) -> None:
    args = ["--run_id", "run", "--init_id", "initialize", "--final_id", "finalize", "--logging_file", "False"]
    args += ["--meta_file", str(cfg / "metadata.json"), "--workflow_type", "train", "--workflow_name", "X"]
    args += ["--properties_path", "p.json"]
    assert _check(cfg, *args) == {}
    assert _check(cfg, *args, "--epochs", "3") == {"epochs": 3}
    # --tracking mlflow adds its settings' keys to the config
    assert _check(cfg, "--tracking", "mlflow", "--experiment_name", "e") == {"experiment_name": "e"}
    with pytest.raises(ConfigOverrideError, match="unknown config key 'experiment_name'"):
        _check(cfg, "--experiment_name", "e")


@pytest.mark.parametrize("form", ["json", "python", "comma", "equals"])
def test_config_file_forms(cfg: Path, form: str) -> None:
    train, smoke = str(cfg / "train.json"), str(cfg / "smoke.json")
    value = {
        "json": json.dumps([train, smoke]),
        "python": str([train, smoke]),
        "comma": f"{train},{smoke}",
        "equals": f"{train},{smoke}",
    }[form]
    head = [f"--config_file={value}"] if form == "equals" else ["--config_file", value]
    with pytest.raises(ConfigOverrideError, match=r"\(not in train\.json, smoke\.json\)"):
        check_overrides([*head, "--epocs", "3"])
    # smoke.json's default decides the type, so both files were read
    with pytest.raises(ConfigOverrideError, match=r"default 2 in smoke\.json"):
        check_overrides([*head, "--epochs", "x"])


def test_single_config_file_and_positional_arguments(cfg: Path) -> None:
    train = str(cfg / "train.json")
    with pytest.raises(ConfigOverrideError, match=r"\(not in train\.json\)"):
        check_overrides(["--config_file", train, "--epocs", "3"])
    # fire fills run's parameters from positional arguments: run_id here
    values, _ = parse_run_args(["training", "--config_file", train, "--epochs", "3", "--", "--help"])
    assert values == {"run_id": "training", "config_file": train, "epochs": 3}


def test_args_file_defaults_are_checked_and_the_command_line_wins(cfg: Path, tmp_path: Path) -> None:
    args_file = tmp_path / "args.json"
    files = [str(cfg / "train.json"), str(cfg / "smoke.json")]
    args_file.write_text(json.dumps({"config_file": files, "epocs": 3}))
    with pytest.raises(ConfigOverrideError, match="unknown config key 'epocs'"):
        check_overrides(["--args_file", str(args_file)])
    args_file.write_text(json.dumps({"config_file": files, "epochs": "abc"}))
    assert check_overrides(["--args_file", str(args_file), "--epochs", "5"]) == {"epochs": 5}


def test_only_a_monai_bundle_run_process_is_checked(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = str(Path("site-packages") / "monai" / "bundle" / "__main__.py")
    files = json.dumps([str(cfg / "train.json")])
    assert cli_run_args(["pytest", "run", "--epocs", "3"]) is None
    assert cli_run_args([main, "verify_metadata"]) is None
    assert cli_run_args([main, "run", "--config_file", files]) == ("run", ["--config_file", files])
    # a workflow built in Python (here: under pytest) has no command line of its own
    assert check_overrides() == {}
    monkeypatch.setattr(sys, "argv", [main, "run", "--config_file", files, "--epocs", "3"])
    with pytest.raises(ConfigOverrideError, match="'epocs'"):
        check_overrides()
    monkeypatch.setattr(sys, "argv", [main, "run_workflow", "--config_file", files, "--epocs", "3"])
    with pytest.raises(ConfigOverrideError, match="'epocs'"):
        check_overrides()


def test_bundle_run_with_a_typo_fails_in_initialize_before_any_data(tmp_path: Path) -> None:
    """End to end: ``python -m monai.bundle run`` on the real anoddpm configs stops at the check."""
    cfg = ROOT / "bundles" / "anoddpm_simplex" / "configs"
    data = tmp_path / "data"
    data.mkdir()
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", json.dumps([str(cfg / "train.json"), str(cfg / "smoke.json")]),
        "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "eval"), "--epocs", "3",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
    }
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown config key 'epocs' (not in train.json, smoke.json); did you mean 'epochs'?" in proc.stderr
    # nothing was built or read: no data touched, no model, no output folder, no MLflow run
    assert list(data.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
