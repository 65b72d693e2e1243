"""Hooks the user added stay on the model when lofit-lens's hooks come off.

``attached_hooks`` relies on TransformerLens's ``model.hooks()`` context manager. Observed on
TL 4.3.0 (``TransformerBridge``) and TL 3.9.0 (``HookedTransformer``): on exit, also when the
body raises, it removes only the hooks it added; hooks added with ``model.add_hook`` (before
or inside the body) and hooks of an enclosing ``model.hooks()`` keep firing. These tests fail
if a TransformerLens release (or a change here) starts removing the user's hooks.
"""

from __future__ import annotations

import pytest
import torch

from lofit_lens.backends.hooked import attached_hooks, hook_z_name, model_dims
from lofit_lens.intervention import HeadIntervention

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)

RESID = "blocks.1.hook_resid_post"


@pytest.fixture
def model(tiny_model):
    tiny_model.reset_hooks(including_permanent=True)
    yield tiny_model
    tiny_model.reset_hooks(including_permanent=True)


@pytest.fixture
def tokens(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer.encode("abc d", add_special_tokens=False)])


class Log:
    """Hook functions that record which of them fired."""

    def __init__(self):
        self.fired: list[str] = []

    def hook(self, label: str):
        def fn(x, hook):
            self.fired.append(label)
        return fn

    def run(self, model, tokens) -> list[str]:
        self.fired.clear()
        with torch.no_grad():
            model(tokens, return_type=None)
        return sorted(self.fired)


def handle_count(model) -> int:
    """Hook handles on every hook point: TransformerLens's list and PyTorch's dict (a bridge's
    ``hook_dict`` lists some points under two names: count each point once)."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(len(hp.fwd_hooks) + len(hp._forward_hooks) for hp in points)


@pytest.mark.parametrize("how", ["attached_hooks", "model.hooks"])
@pytest.mark.parametrize("fail", [None, "body", "forward"])
def test_user_hooks_survive_exit(model, tokens, how, fail):
    log = Log()
    model.add_hook(hook_z_name(0), log.hook("user_z"))
    model.add_hook(RESID, log.hook("user_resid"))
    n_user = handle_count(model)
    ours = log.hook("ours") if fail != "forward" else _raise_in_forward
    hooks = [(hook_z_name(0), ours), (hook_z_name(2), ours)]
    cm = attached_hooks(model, hooks) if how == "attached_hooks" else model.hooks(fwd_hooks=hooks)
    try:
        with cm:
            if fail is None:
                assert log.run(model, tokens) == ["ours", "ours", "user_resid", "user_z"]
            elif fail == "body":
                raise RuntimeError("in the body")
            else:
                log.run(model, tokens)
    except (RuntimeError, ValueError):
        assert fail is not None
    assert handle_count(model) == n_user
    assert log.run(model, tokens) == ["user_resid", "user_z"]


def _raise_in_forward(x, hook):
    raise ValueError("in the forward")


def test_user_hook_added_inside_the_body_survives(model, tokens):
    log = Log()
    with attached_hooks(model, [(hook_z_name(1), log.hook("ours"))]):
        model.add_hook(RESID, log.hook("user"))
    assert log.run(model, tokens) == ["user"]


def test_enclosing_hooks_context_survives_our_exit(model, tokens):
    log = Log()
    with model.hooks(fwd_hooks=[(RESID, log.hook("outer"))]):
        with attached_hooks(model, [(hook_z_name(1), log.hook("ours"))]):
            assert log.run(model, tokens) == ["ours", "outer"]
        assert log.run(model, tokens) == ["outer"]
    assert log.run(model, tokens) == [] and handle_count(model) == 0


def test_missing_hook_point_adds_nothing(model):
    model.add_hook(RESID, lambda x, hook: None)
    with pytest.raises(ValueError, match="no hook point"):
        with attached_hooks(model, [(hook_z_name(0), lambda x, hook: None),
                                    ("blocks.0.attn.hook_nothing", lambda x, hook: None)]):
            pass
    assert handle_count(model) == 2  # the user's hook: one TL handle, one PyTorch handle


def test_intervention_leaves_user_hooks_and_output(model, tokens):
    log = Log()
    iv = HeadIntervention.for_model(model, use_scale=True, use_bias=True).set_heads([(0, 1), (2, 3)])
    iv.init_normal(0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens)
        model.add_hook(hook_z_name(0), log.hook("user"))
        with iv.attach(model):
            edited = model(tokens)
        again = model(tokens)
    assert (edited - plain).abs().max() > 1e-4
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert log.fired == ["user"] * 2  # the edited and the plain-again forward
    assert model_dims(model).n_layers == 3
