"""The plain view (``lofit_lens.backends.plain``): the hot paths run HF's own modules over
the bridge's weights, and compute what the hook path computes.

Every hook point an intervention of lofit-lens uses is mirrored where the bridge fires it;
a hook that cannot be mirrored, or one someone else added, keeps the forward on the bridge,
where it fires. The comparisons force the bridge by attaching a no-op hook on
``hook_pattern``, a point only the bridge has.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lofit_lens as ll
from lofit_lens.backends.hooked import attached_hooks, hf_runner, logits_at, model_dims
from lofit_lens.backends.plain import plain_view
from lofit_lens.backends.tl3 import use_hooked_transformer
from lofit_lens.intervention import HeadIntervention

pytestmark = pytest.mark.skipif(use_hooked_transformer(), reason="a TL 3.x HookedTransformer has no plain view")

MIRRORED = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "hook_resid_pre",
            "hook_resid_post", "ln1.hook_out", "ln2.hook_out")
"""Hook points lofit-lens's interventions attach to (hook_z: LoFiT, JoLA, ITI; resid_post:
ReFT, RepE; ln1/q/v: LoRA), and their neighbours."""


@contextlib.contextmanager
def on_the_bridge(model):
    """A no-op hook at a point with no plain counterpart: the forward stays on the bridge."""
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
        assert hf_runner(model) is model.original_model
        yield


@pytest.fixture
def batch(tiny_model):
    torch.manual_seed(0)
    tokens = torch.randint(4, 70, (3, 11))
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0  # right padding, as training batches have
    real = mask.bool().nonzero(as_tuple=True)
    return tokens, mask, real


def _edit(scale: float, seed: int):
    """A hook adding fixed noise of the activation's shape (the same noise on both paths)."""
    noise = {}

    def fn(x, hook):
        key = tuple(x.shape)
        if key not in noise:
            noise[key] = scale * torch.randn(key, generator=torch.Generator().manual_seed(seed))
        return x + noise[key].to(x.dtype)

    return fn


@pytest.mark.parametrize("point", MIRRORED)
def test_each_mirrored_hook_edits_what_the_bridge_edits(tiny_model, batch, point):
    tokens, mask, real = batch
    layer = model_dims(tiny_model).n_layers - 2
    with torch.no_grad():
        untouched = logits_at(tiny_model, tokens, mask, real)
        with attached_hooks(tiny_model, [(f"blocks.{layer}.{point}", _edit(2.0, 1))]):
            assert hf_runner(tiny_model) is plain_view(tiny_model).hf
            plain = logits_at(tiny_model, tokens, mask, real)
            with on_the_bridge(tiny_model):
                bridge = logits_at(tiny_model, tokens, mask, real)
    assert (plain - untouched).abs().max() > 1e-3  # the edit acted (tolerance below: 1e-5)
    torch.testing.assert_close(plain, bridge, rtol=1e-5, atol=1e-5)


def test_the_view_shares_the_bridge_weights(tiny_model):
    view = plain_view(tiny_model)
    ours = {p.data_ptr() for p in tiny_model.parameters()}
    assert {p.data_ptr() for p in view.hf.parameters()} <= ours  # no copy
    assert not any(p.requires_grad for p in view.hf.parameters())
    assert not view.hf.training
    assert view.attn_implementation == "sdpa"
    assert tiny_model.original_model.config._attn_implementation == "eager"  # the bridge's own


def test_gradients_through_the_view_equal_the_hook_path(tiny_model, batch):
    """Training runs on the view: A and v get the gradients the hook path gives them."""
    tokens, mask, real = batch
    grads = []
    for bridge in (False, True):
        iv = HeadIntervention.for_model(tiny_model).set_heads([(0, 1), (1, 3), (2, 0)])
        iv.init_normal(0.1, torch.Generator().manual_seed(0))
        with iv.attach(tiny_model), (on_the_bridge(tiny_model) if bridge else contextlib.nullcontext()):
            logits = logits_at(tiny_model, tokens, mask, real)
            logits.log_softmax(-1)[:, 5].sum().backward()
        grads.append((iv.scale.grad.clone(), iv.bias.grad.clone()))
    for plain, hooked in zip(*grads):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(plain, hooked, rtol=1e-4, atol=1e-6)


def test_a_hook_someone_else_added_fires_in_every_hot_path(tiny_model, tiny_task_file):
    """``model.add_hook`` by a user: generation and training run on the bridge, so that the
    hook fires, and on the plain view again once it is gone."""
    calls = []
    tiny_model.add_hook("blocks.1.attn.hook_z", lambda z, hook: calls.append(z.shape) or None)
    try:
        assert hf_runner(tiny_model) is tiny_model.original_model
        ll.generate(tiny_model, ["abc:"], 3, progress=False)
        n_generate = len(calls)
        task = ll.get_task(str(tiny_task_file))
        ll.tune_biases(tiny_model, task, [(0, 1)], epochs_bias=1, max_train_examples=4,
                       max_val_examples=0, progress=False)
    finally:
        tiny_model.reset_hooks(including_permanent=True)
    assert n_generate >= 3 and len(calls) > n_generate
    assert hf_runner(tiny_model) is plain_view(tiny_model).hf


def test_a_torch_hook_on_a_bridge_module_keeps_the_bridge(tiny_model):
    handle = tiny_model.blocks[0].mlp.register_forward_hook(lambda m, a, o: None)
    try:
        assert hf_runner(tiny_model) is tiny_model.original_model
    finally:
        handle.remove()
    assert hf_runner(tiny_model) is plain_view(tiny_model).hf


def test_an_unmirrorable_point_runs_the_bridge_and_fires(tiny_model, batch):
    tokens, mask, real = batch
    seen = []
    with attached_hooks(tiny_model, [("blocks.1.attn.hook_pattern", lambda p, hook: seen.append(1))]):
        assert hf_runner(tiny_model) is tiny_model.original_model
        with torch.no_grad():
            logits_at(tiny_model, tokens, mask, real)
    assert seen
    assert plain_view(tiny_model).foreign_hooks() == 0 and plain_view(tiny_model).live == 0


def test_tl_analysis_on_the_bridge_sees_the_intervention_once(tiny_model, batch):
    """``run_with_cache`` / ``hook_pattern`` / patching keep running on the bridge, where an
    attached intervention acts exactly once, as it does on the plain view."""
    tokens, mask, real = batch
    iv = HeadIntervention.for_model(tiny_model, use_scale=False).set_heads([(1, 2)])
    iv.init_normal(0.5, torch.Generator().manual_seed(0))
    names = ("blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern")
    with torch.no_grad():
        _, clean = tiny_model.run_with_cache(tokens, attention_mask=mask, names_filter=names.__contains__)
        with iv.attach(tiny_model):
            logits, cache = tiny_model.run_with_cache(tokens, attention_mask=mask,
                                                      names_filter=names.__contains__)
            plain = logits_at(tiny_model, tokens, mask, real)
            ablated = tiny_model.run_with_hooks(
                tokens, attention_mask=mask,
                fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: torch.zeros_like(z))])
    assert cache["blocks.1.attn.hook_pattern"].shape[-2:] == (tokens.shape[1], tokens.shape[1])
    shift = cache["blocks.1.attn.hook_z"] - clean["blocks.1.attn.hook_z"]  # [batch, pos, head, d_head]
    torch.testing.assert_close(shift[:, :, 2], iv.bias[1, 2].expand_as(shift[:, :, 2]))
    assert shift[:, :, [0, 1, 3]].abs().max() == 0
    torch.testing.assert_close(plain, logits[real], rtol=1e-5, atol=1e-5)
    assert (ablated - logits).abs().max() > 1e-3


def test_the_view_survives_reset_hooks(tiny_model, batch):
    """``reset_hooks`` removes the bridge's own capture hooks too, but not their handles: the
    hot paths must still take the view afterwards."""
    tokens, mask, real = batch
    with torch.no_grad():
        tiny_model(tokens, attention_mask=mask)  # the blocks wire their capture hooks
    tiny_model.reset_hooks(including_permanent=True)
    assert plain_view(tiny_model).foreign_hooks() == 0
    assert hf_runner(tiny_model) is plain_view(tiny_model).hf
    with torch.no_grad():
        tiny_model(tokens, attention_mask=mask)
    assert hf_runner(tiny_model) is plain_view(tiny_model).hf
