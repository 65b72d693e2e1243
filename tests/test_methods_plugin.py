"""A method added the way a user adds one (docs/architecture.md, "Adding a method"): one file
with its options and its function, one registry line. It is then a ``compare`` method, its
option a ``compare`` keyword and a ``--constant-shift-size`` flag of ``lofit-lens compare``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lofit_lens.errors import ConfigError
from lofit_lens.methods import (
    METHODS, Method, MethodOptions, compare, get_method, known_methods, load_intervention,
    register_method, unregister_method,
)
from lofit_lens.methods.base import RunContext, option_keywords
from lofit_lens.training import resolve_run

CONSTANT_SHIFT = textwrap.dedent('''
    """constant_shift: a fixed offset on the output of head (0, 0), nothing trained."""

    from __future__ import annotations

    from dataclasses import dataclass, field

    import torch

    from lofit_lens.intervention import HeadIntervention
    from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method


    @dataclass(frozen=True)
    class ConstantShiftOptions(MethodOptions):
        size: float = field(default=1.0, metadata={"help": "the offset added to every coordinate of head (0, 0)"})


    def constant_shift(ctx: RunContext, options: ConstantShiftOptions) -> MethodRun:
        """A fixed offset on head (0, 0) (0 trained params)."""
        shift = HeadIntervention(ctx.dims, use_scale=False).set_heads([(0, 0)])
        with torch.no_grad():
            shift.bias[0, 0] = options.size
        shift.bias.requires_grad_(False)
        return MethodRun(shift, shift.num_trainable_parameters(), [(0, 0)], {"size": options.size})


    register_method(Method("constant_shift", constant_shift, ConstantShiftOptions))
''')
RUN = dict(seeds=[0], k=2, epochs=1, max_train_examples=4, max_eval_examples=2,
           max_val_examples=0, extra={"max_new_tokens": 3}, progress=False)


@pytest.fixture
def constant_shift(tmp_path, monkeypatch):
    """The user's file, imported (which registers it); unregistered afterwards."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "constant_shift.py").write_text(CONSTANT_SHIFT)
    monkeypatch.syspath_prepend(str(folder))
    yield importlib.import_module("constant_shift")
    unregister_method("constant_shift")
    sys.modules.pop("constant_shift")


def test_the_method_is_registered_with_its_options(constant_shift):
    method = get_method("constant_shift")
    assert "constant_shift" in known_methods() and METHODS["constant_shift"] is method
    assert method.options is constant_shift.ConstantShiftOptions and not method.seed_independent
    assert method.doc == "A fixed offset on head (0, 0) (0 trained params)."
    assert option_keywords()["constant_shift_size"] == ("constant_shift", "size")
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("constant_shift", constant_shift.constant_shift))


def test_compare_runs_it_with_its_option(constant_shift, tiny_model, tiny_task_file, tmp_path):
    frame = compare(tiny_model, str(tiny_task_file), methods=["zero_shot", "constant_shift"],
                    out=tmp_path / "out", constant_shift_size=3.0, **RUN)
    assert list(frame["method"]) == ["zero_shot", "constant_shift"]
    assert list(frame["params"]) == [0, 0]  # the offset is fixed: nothing trains
    card = tmp_path / "out" / "runs" / "constant_shift-seed0.json"
    run = json.loads(card.read_text())
    assert run["settings"]["options"] == {"constant_shift_size": 3.0}
    assert run["info"] == {"size": 3.0} and run["heads"] == [[0, 0]]
    shift = load_intervention(card)
    assert torch.all(shift.bias[0, 0] == 3.0) and float(shift.bias[1:].abs().sum()) == 0

    task, cfg = resolve_run(str(tiny_task_file), None, {"k": 2})
    default = get_method("constant_shift")(RunContext(tiny_model, task, cfg))
    assert torch.all(default.intervention.bias[0, 0] == 1.0)  # the field's default
    tokens = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad(), default.intervention.attach(tiny_model):
        shifted = tiny_model(tokens, return_type="logits")
    assert not torch.allclose(shifted, tiny_model(tokens, return_type="logits"))

    with pytest.raises(ConfigError, match="constant_shift_sise"):
        compare(tiny_model, str(tiny_task_file), methods=["constant_shift"],
                constant_shift_sise=3.0, **RUN)


def test_its_option_is_a_cli_flag_with_its_help(constant_shift):
    from lofit_lens.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices["compare"]
    group = next(g for g in parser._action_groups if g.title.startswith("constant_shift options"))
    flag = next(a for a in group._group_actions if a.dest == "constant_shift_size")
    assert flag.option_strings == ["--constant-shift-size"]
    assert flag.help == "the offset added to every coordinate of head (0, 0) (default: 1.0)"
    assert parser.parse_args(["--task", "t", "--constant-shift-size", "2.5"]).constant_shift_size == 2.5


def test_docs_walk_through_this_file():
    """docs/architecture.md, "Adding a method", shows the file this test writes."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Adding a method"):]
    assert f"```python\n{CONSTANT_SHIFT.strip()}\n```" in section


def test_options_without_help_are_refused():
    @dataclass(frozen=True)
    class Undocumented(MethodOptions):
        size: float = field(default=1.0)

    with pytest.raises(ValueError, match="no help text on size"):
        register_method(Method("undocumented", lambda ctx, options: None, Undocumented))
    assert "undocumented" not in METHODS


def test_an_edit_changed_after_tuning_is_evaluated_again(tiny_model, tiny_task_file, tmp_path,
                                                         monkeypatch):
    """Evaluations are keyed by the edit itself: a method that tunes v through ctx.tune (the
    same step-2 phase as the "random" row) and then doubles it is not given the random
    row's cached evaluation."""
    from lofit_lens import engine
    from lofit_lens.methods.selectors import random_heads

    def doubled(ctx, options):
        """v tuned on random heads, then doubled."""
        run = ctx.tune(random_heads(ctx.dims, ctx.k, ctx.cfg.seed))
        with torch.no_grad():
            run.intervention.bias.mul_(2.0)
        return run

    register_method(Method("doubled_random", doubled))
    try:
        task = str(tiny_task_file)
        kwargs = dict(k=2, epochs=1, max_train_examples=4, max_eval_examples=2, out=tmp_path / "o",
                      progress=False, max_val_examples=0)
        compare(tiny_model, task, methods=["random"], **kwargs)
        evaluated = []
        real = engine.evaluate
        monkeypatch.setattr(engine, "evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
        compare(tiny_model, task, methods=["random", "doubled_random"], **kwargs)
        assert evaluated == [1]  # random's read back; the doubled edit evaluated anew
    finally:
        unregister_method("doubled_random")
