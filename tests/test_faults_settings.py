"""Faults get named errors: every bad setting is a ``ConfigError`` naming the field and the
value, raised when the config is built (Python API) or before a model loads (command line,
exit status 2); one test per fault row."""

from __future__ import annotations

import json
import math

import pytest

import lofit_lens as ll
from lofit_lens import cli
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import (
    ArtifactError, BrokenEnvironmentError, ConfigError, OutputLockedError, ResultExistsError,
    TrainingDivergedError,
)


class Untouchable:
    """A model stand-in that fails the test on any use: the error must come first."""

    def __getattr__(self, name):
        pytest.fail(f"the model was used ({name}) before the bad setting was reported")


@pytest.fixture
def no_model(monkeypatch):
    """``main`` must stop before loading a model (or reading the task)."""
    monkeypatch.setattr(cli, "_checked_model", lambda args: pytest.fail("model loaded"))
    monkeypatch.setattr(ll, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lofit-lens: error: ")
    return err


# ---------------------------------------------------------------------- epochs = 0, < 0
@pytest.mark.parametrize("field, value", [("epochs_select", 0), ("epochs_bias", 0),
                                          ("epochs_select", -2), ("epochs_bias", -1)])
def test_epochs_below_one_config(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value}: must be an integer >= 1"):
        LoFiTConfig(**{field: value})


@pytest.mark.parametrize("epochs", [0, -3, (2, 0), (0, 3)])
def test_epochs_below_one_api(epochs, tiny_task_file):
    with pytest.raises(ConfigError, match=r"epochs_(select|bias)=(0|-3)"):
        ll.lofit(Untouchable(), str(tiny_task_file), epochs=epochs)


@pytest.mark.parametrize("epochs, named", [(["0"], "epochs_select=0"),
                                           (["-1"], "epochs_select=-1"),
                                           (["2", "-1"], "epochs_bias=-1"),
                                           (["2", "0"], "epochs_bias=0")])
def test_epochs_below_one_cli(epochs, named, no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--epochs", *epochs], capsys)
    assert named in err and "must be an integer >= 1" in err


def test_epochs_must_be_whole_not_bool():
    with pytest.raises(ConfigError, match="epochs_select=True"):
        LoFiTConfig(epochs_select=True)
    with pytest.raises(ConfigError, match="epochs_bias=2.0"):
        LoFiTConfig(epochs_bias=2.0)


# ---------------------------------------------------------------------- learning rates
@pytest.mark.parametrize("field", ["lr_select", "lr_bias"])
@pytest.mark.parametrize("value", [-1e-2, 0.0, math.nan, math.inf])
def test_bad_learning_rate_config(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r}: must be a finite number > 0"):
        LoFiTConfig(**{field: value})


def test_negative_learning_rate_raises_at_config_time_not_at_its_step(tiny_task_file):
    """The step-2 rate is checked when the run is set up, not after step 1 has trained."""
    with pytest.raises(ConfigError, match="lr_bias=-0.01"):
        ll.lofit(Untouchable(), str(tiny_task_file), lr_bias=-0.01)
    with pytest.raises(ConfigError, match="lr_bias=-0.01"):
        ll.tune_biases(Untouchable(), str(tiny_task_file), [(0, 0)], lr_bias=-0.01)


def test_negative_learning_rate_cli(no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--lr-bias", "-0.01"], capsys)
    assert "lr_bias=-0.01" in err


# ---------------------------------------------------------------------- max_train_examples
def test_negative_max_train_examples_config():
    with pytest.raises(ConfigError, match=r"max_train_examples=-5: must be an integer >= 1"):
        LoFiTConfig(max_train_examples=-5)


def test_negative_max_train_examples_api(tiny_task_file):
    with pytest.raises(ConfigError, match="max_train_examples=-5") as err:
        ll.lofit(Untouchable(), str(tiny_task_file), max_train_examples=-5)
    assert "Sample larger than population" not in str(err.value)


def test_negative_max_train_examples_cli(no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--max-train-examples", "-5"], capsys)
    assert "max_train_examples=-5" in err and "Sample larger" not in err


# ---------------------------------------------------------------------- the other fields
@pytest.mark.parametrize("field, value", [
    ("l1_lambda", -1e-3), ("batch_size", 0), ("eval_batch_size", 0), ("init_std", -1.0),
    ("init_std", math.nan), ("weight_decay", -0.1), ("adam_eps", 0.0), ("dpo_beta", 0.0),
    ("max_grad_norm", -1.0), ("max_val_examples", -1), ("max_eval_examples", 0),
    ("max_eval_examples", -4), ("seed", -1), ("batch_size", True), ("seed", 1.5),
    ("k", 0), ("k", -3), ("k", 1.5), ("k", True), ("k", "ten"),
])
def test_every_numeric_setting_is_checked(field, value):
    with pytest.raises(ConfigError, match=f"^{field}="):
        LoFiTConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("l1_lambda", 0.0), ("max_grad_norm", 0.0), ("max_grad_norm", None), ("max_val_examples", 0),
    ("max_train_examples", None), ("max_train_examples", 1), ("init_std", 0.0), ("k", 27),
    ("k", 0.03), ("k", 5.0), ("lr_bias", 1), ("weight_decay", 0),
])
def test_valid_edge_values_pass(field, value):
    assert getattr(LoFiTConfig(**{field: value}), field) == value


def test_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="protocol='strict'"):
        LoFiTConfig(protocol="strict")


def test_replace_and_from_dict_check_too(tmp_path):
    import dataclasses

    cfg = LoFiTConfig()
    with pytest.raises(ConfigError, match="batch_size=0"):
        dataclasses.replace(cfg, batch_size=0)
    bad = dict(cfg.to_dict(), max_train_examples=-5)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="max_train_examples=-5"):
        LoFiTConfig.from_dict(json.loads(path.read_text()))
    with pytest.raises(ConfigError, match="Unknown LoFiTConfig fields"):
        LoFiTConfig.from_dict({"epochs": 3})
    assert LoFiTConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------- task path
def test_directory_as_task_path(tmp_path):
    for folder in (tmp_path / "tasks", tmp_path / "mine.jsonl"):
        folder.mkdir()
        with pytest.raises(ConfigError, match="is a directory, expected a .*jsonl.* task file"):
            ll.get_task(str(folder))
        with pytest.raises(ConfigError, match="is a directory"):
            ll.get_task({"train": folder})


def test_directory_as_task_path_cli(tmp_path, no_model, capsys):
    err = _cli_error(["run", "--task", str(tmp_path)], capsys)
    assert f"{str(tmp_path)!r} is a directory, expected a" in err and "not found" not in err


def test_registered_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "clutrr").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ll.get_task("clutrr").name == "clutrr"


# ---------------------------------------------------------------------- exit statuses
@pytest.mark.parametrize("error, code, label", [
    (ConfigError("k=0: bad"), 2, "error"),
    (ArtifactError("damaged"), 2, "error"),
    (ResultExistsError("holds another result"), 2, "error"),
    (OutputLockedError("in use"), 2, "error"),
    (FileNotFoundError("Task file not found: x.jsonl"), 2, "error"),
    (BrokenEnvironmentError("doctor failed"), 3, "BrokenEnvironmentError"),
    (TrainingDivergedError("loss is nan"), 4, "TrainingDivergedError"),
])
def test_named_errors_exit_codes(error, code, label, monkeypatch, capsys):
    def fail(args, cfg):
        raise error

    monkeypatch.setattr(cli, "_checked_task", fail)
    assert cli.main(["run", "--task", "clutrr"]) == code
    assert capsys.readouterr().err == f"lofit-lens: {label}: {error}\n"


def test_analysis_scripts_reject_bad_settings_before_a_model_loads(capsys):
    from analysis.common import parser

    for argv, named in ((["--epochs", "0"], "epochs_select=0"),
                        (["--max-train-examples", "-5"], "max_train_examples=-5"),
                        (["--k", "0"], "k=0")):
        with pytest.raises(SystemExit) as exit_:
            parser("x", "", k=0.1).parse_args(argv)
        assert exit_.value.code == 2 and named in capsys.readouterr().err
