"""One source of settings: the command-line flags come from ``LoFiTConfig``'s fields, one
epochs parser, one budgets registry (no model is loaded here)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from types import SimpleNamespace

import pytest

from lofit_lens.budgets import BUDGETS, budget_settings, get_budget
from lofit_lens.config import LoFiTConfig, config_flag_names, parse_epochs
from lofit_lens.errors import ConfigError
from lofit_lens.tasks import get_task
from lofit_lens.training import resolve_run

OLD_RUN_OVERRIDES = dict(k=0.1, seed=0, protocol="official", max_val_examples=64,
                         max_eval_examples=200, extra={})
"""What ``lofit-lens run --task clutrr`` passed to ``lofit`` before the flags came from
``LoFiTConfig`` (epochs: None, i.e. the config's 2 and 3)."""


class Stop(Exception):
    pass


def _cli_args(*argv):
    from lofit_lens.cli import build_parser

    return build_parser().parse_args(list(argv))


# ---------------------------------------------------------------------- the main job
def test_run_clutrr_gives_the_same_config_as_before():
    from lofit_lens.cli import run_config

    cfg = run_config(_cli_args("run", "--task", "clutrr"))
    assert cfg == LoFiTConfig(task="clutrr", **OLD_RUN_OVERRIDES)
    assert (cfg.k, cfg.seed, cfg.epochs_select, cfg.epochs_bias, cfg.max_val_examples,
            cfg.max_eval_examples, cfg.protocol) == (0.1, 0, 2, 3, 64, 200, "official")
    task = get_task("clutrr", protocol="official")
    assert resolve_run(task, cfg, {})[1] == resolve_run(task, None, OLD_RUN_OVERRIDES)[1]


def test_cmd_run_hands_lofit_that_config(monkeypatch, tmp_path):
    """Through ``main``: the config ``lofit`` receives, before any model or data work."""
    import lofit_lens
    from lofit_lens import cli

    seen = {}

    def fake_lofit(model, task, **kwargs):
        seen.update(kwargs, task=task)
        raise Stop

    monkeypatch.setattr(cli, "_checked_task", lambda args, cfg: "the-task")
    monkeypatch.setattr(cli, "_checked_model", lambda args: "the-model")
    monkeypatch.setattr(lofit_lens, "lofit", fake_lofit)  # first: it loads lofit_lens.api
    monkeypatch.setattr("lofit_lens.backends.hooked.model_dims",
                        lambda model: SimpleNamespace(total_heads=270))
    monkeypatch.setattr("lofit_lens.training.resolve_run", lambda task, cfg, overrides: (task, cfg))
    with pytest.raises(Stop):
        cli.main(["run", "--task", "clutrr", "--quiet", "--out", str(tmp_path)])
    assert seen["config"] == LoFiTConfig(task="clutrr", **OLD_RUN_OVERRIDES)
    assert seen["task"] == "the-task" and seen["progress"] is False


def test_cmd_compare_passes_the_old_settings(monkeypatch):
    from lofit_lens import cli

    seen = {}

    def fake_compare(model, task, **kwargs):
        seen.update(kwargs, task=task)
        raise Stop

    monkeypatch.setattr(cli, "_checked_task", lambda args, cfg: None)
    monkeypatch.setattr(cli, "_checked_model", lambda args: "the-model")
    monkeypatch.setattr("lofit_lens.backends.hooked.model_dims",
                        lambda model: SimpleNamespace(total_heads=270))
    monkeypatch.setattr(importlib.import_module("lofit_lens.methods.compare"), "compare",
                        fake_compare)
    with pytest.raises(Stop):
        cli.main(["compare", "--task", "clutrr", "--quiet"])
    settings = {k: v for k, v in seen.items()
                if k not in ("methods", "seeds", "out", "progress", "task")}
    assert settings == {"k": 0.1, "max_eval_examples": 200, "extra": {}}
    assert LoFiTConfig(task="clutrr", **settings) == LoFiTConfig(task="clutrr", **OLD_RUN_OVERRIDES)
    assert seen["seeds"] == [0]


def test_cli_defaults_are_the_configs_but_cli_defaults():
    """Every flag's default is its field's, except the ones ``CLI_DEFAULTS`` names."""
    from lofit_lens.cli import CLI_DEFAULTS, run_config

    cfg = run_config(_cli_args("run", "--task", "clutrr"))
    for f in dataclasses.fields(LoFiTConfig):
        if f.name in ("task",):
            continue
        expected = CLI_DEFAULTS.get(f.name, getattr(LoFiTConfig(), f.name))
        assert getattr(cfg, f.name) == expected, f.name
    assert set(CLI_DEFAULTS) == {"max_eval_examples"}


def test_flags_and_help_come_from_the_fields():
    from lofit_lens.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    actions = {a.dest: a for a in run._actions}
    fields = {f.name: f for f in dataclasses.fields(LoFiTConfig)}
    for name in config_flag_names():
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        if name != "epochs":
            assert fields[name].metadata["help"] in action.help
    assert "(default: 200)" in actions["max_eval_examples"].help  # the CLI's own default
    assert "(default: 64)" in actions["max_val_examples"].help
    assert "(default: 2 3)" in actions["epochs"].help
    assert actions["protocol"].choices == ("official", "clean")
    assert "seed" not in {a.dest for a in sub.choices["compare"]._actions}  # it has --seeds


def test_new_flags_reach_the_config():
    from lofit_lens.cli import run_config

    cfg = run_config(_cli_args("run", "--task", "clutrr", "--lr-bias", "0.05", "--k", "27",
                               "--batch-size", "4", "--max-train-examples", "0",
                               "--max-eval-examples", "0", "--protocol", "clean"))
    assert (cfg.lr_bias, cfg.k, cfg.batch_size, cfg.protocol) == (0.05, 27, 4, "clean")
    assert cfg.max_train_examples is None and cfg.max_eval_examples is None  # 0 = all


# ---------------------------------------------------------------------- epochs
@pytest.mark.parametrize("value, expected", [
    (3, (3, 3)), ("3", (3, 3)), ([3], (3, 3)), ((2, 5), (2, 5)), (["2", "5"], (2, 5)),
    ("2 5", (2, 5)),
])
def test_parse_epochs(value, expected):
    assert parse_epochs(value) == expected


@pytest.mark.parametrize("value", [(1, 2, 3), ["1", "2", "3"], "1 2 3", [], (1, 2, 3, 4)])
def test_parse_epochs_rejects_other_counts(value):
    with pytest.raises(ConfigError, match="one number .* or two"):
        parse_epochs(value)


@pytest.mark.parametrize("value", [2.5, True, "two", [1, 1.5]])
def test_parse_epochs_rejects_non_whole_numbers(value):
    with pytest.raises(ConfigError, match="epochs=.*whole number"):
        parse_epochs(value)


@pytest.mark.parametrize("epochs", [["1"], ["3"], ["2", "5"], ["1", "3"]])
def test_cli_and_analysis_read_epochs_alike(epochs):
    from analysis.common import parser, run_options
    from lofit_lens.cli import run_config

    cfg = run_config(_cli_args("run", "--task", "clutrr", "--epochs", *epochs))
    args = parser("x", "", k=0.1).parse_args(["--tasks", "clutrr", "--epochs", *epochs])
    overrides, _ = run_options(args, args.k)
    expected = parse_epochs(epochs)
    assert (cfg.epochs_select, cfg.epochs_bias) == expected
    assert (overrides["epochs_select"], overrides["epochs_bias"]) == expected


def test_three_epochs_are_rejected_everywhere(monkeypatch, capsys):
    from analysis.common import parser
    from lofit_lens import cli

    monkeypatch.setattr(cli, "_checked_model", lambda args: pytest.fail("model loaded"))
    assert cli.main(["run", "--task", "clutrr", "--epochs", "1", "2", "3"]) == 2
    cli_err = capsys.readouterr().err
    assert "lofit-lens: error: epochs:" in cli_err and "got 3: 1 2 3" in cli_err
    with pytest.raises(SystemExit) as exit_:
        parser("x", "", k=0.1).parse_args(["--epochs", "1", "2", "3"])
    assert exit_.value.code == 2
    assert "epochs: give one number (both steps) or two (step 1, step 2), got 3: 1 2 3" in \
        capsys.readouterr().err
    assert cli_err.strip().endswith("got 3: 1 2 3")


# ---------------------------------------------------------------------- budgets
SCRIPTS = ["analysis.fig2_task_specificity", "analysis.fig3_granularity",
           "analysis.fig4_fig5_budget", "analysis.fig6_head_similarity",
           "analysis.tables1_2_baselines", "analysis.protocol_effect"]


def _parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds (caught at ``parse_args``)."""
    seen = []

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Stop):
        importlib.import_module(module).main([])
    monkeypatch.undo()
    return seen[0]


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_script_takes_the_registrys_budgets(module, monkeypatch):
    budget = next(a for a in _parser_of(module, monkeypatch)._actions if a.dest == "budget")
    assert list(budget.choices) == list(BUDGETS)
    assert budget.default in BUDGETS


def test_cli_takes_the_registrys_budgets():
    from lofit_lens.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("run", "compare"):
        budget = next(a for a in sub.choices[command]._actions if a.dest == "budget")
        assert list(budget.choices) == list(BUDGETS) and budget.default is None


def test_cli_budget_then_flags():
    from lofit_lens.cli import run_config

    cfg = run_config(_cli_args("run", "--task", "clutrr", "--budget", "smoke",
                               "--max-eval-examples", "3"))
    assert (cfg.max_train_examples, cfg.epochs_select, cfg.epochs_bias) == (8, 1, 1)
    assert cfg.max_eval_examples == 3 and cfg.max_val_examples == 0
    # the paper budget's step-2 rate follows the share of heads K selects
    args = _cli_args("run", "--task", "clutrr", "--budget", "paper", "--k", "27")
    assert run_config(args, total_heads=270).lr_bias == 5e-3
    assert run_config(args, total_heads=900).lr_bias == 1e-2


def test_small_and_protocol_budgets_keep_their_scripts_numbers():
    """``small`` is what tables1_2_baselines used, ``protocol`` what protocol_effect used."""
    small_eval = {"truthfulqa": 50, "mquake": 100, "clutrr": 100}
    protocol_eval = {"clutrr": 200, "mquake": 200, "truthfulqa": 50}
    for task in ("truthfulqa", "mquake", "clutrr"):
        assert budget_settings("small", task, 0.03, 270) == dict(
            epochs_select=1, epochs_bias=2, max_train_examples=100,
            max_eval_examples=small_eval[task])
        assert budget_settings("protocol", task, 0.1, 270) == dict(
            epochs_select=1, epochs_bias=3, lr_bias=5e-2, max_train_examples=80,
            max_val_examples=0, max_eval_examples=protocol_eval[task])


def test_every_budget_builds_a_valid_config():
    for name in BUDGETS:
        for task in ("truthfulqa", "mquake", "clutrr", "mine.jsonl"):
            LoFiTConfig(task=task, **budget_settings(name, task, 0.1, 270))
    with pytest.raises(ConfigError, match="Unknown budget 'huge'.*quick"):
        get_budget("huge")


def test_notebooks_use_the_registry():
    import json
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                         if c["cell_type"] == "code")
        if "LOFIT_NOTEBOOK_BUDGET" in code:
            assert "budget_settings(BUDGET" in code, path.name
            assert "epochs=(" not in code, path.name  # no budget of its own


# Fields outside both steps' keys, and where the key covers them instead.
COVERED_ELSEWHERE = {
    "task": "the task's settings (run_settings.task_settings)",
    "extra": "the task's settings (a fold, a match mode)",
    "k": "the heads themselves, in step 2's key",
    "max_train_examples": "the training rows' hash",
    "max_val_examples": "the validation rows' hash",
    "max_eval_examples": "the evaluated rows' hash",
    "eval_splits": "the evaluated rows' hash, per split",
}


def test_every_config_field_is_in_a_key_or_changes_no_result():
    """A new LoFiTConfig field must say which step it changes (``steps=``), be covered by
    another part of the key, or change no result (``NON_RESULT_FIELDS``): a field in none of
    these would let a cache hand back a result computed with another value."""
    from lofit_lens.config import NON_RESULT_FIELDS, step_fields

    in_steps = set(step_fields("select")) | set(step_fields("tune"))
    for f in dataclasses.fields(LoFiTConfig):
        places = [f.name in in_steps, f.name in COVERED_ELSEWHERE, f.name in NON_RESULT_FIELDS]
        assert sum(places) == 1, f"{f.name}: in a step's key, covered elsewhere, or no result"
    assert "lr_select" in step_fields("select") and "lr_select" not in step_fields("tune")
