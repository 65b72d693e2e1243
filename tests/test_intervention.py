"""The hook_z intervention: semantics, gradients, hook hygiene, frozen model weights."""

from __future__ import annotations

import pytest
import torch

from lofit_lens.backends.hooked import attached_hooks, hook_z_name, logits_at, model_dims
from lofit_lens.intervention import HeadIntervention, top_heads

from conftest import tiny_llama

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)


def _tokens(tokenizer, text="the cat sat on the mat"):
    return torch.tensor([tokenizer(text).input_ids])


def _o_proj_bias_hook(bias_lh: torch.Tensor):
    """A forward pre-hook adding v (``[head, d_head]``) to the HF ``o_proj`` input."""
    def hook(module, args):
        (x,) = args  # [batch, pos, n_heads * d_head]
        return (x + bias_lh.reshape(-1),)
    return hook


def test_bias_at_hook_z_equals_bias_at_hf_o_proj_input(tiny_model, tiny_tokenizer):
    dims = model_dims(tiny_model)
    iv = HeadIntervention(dims, use_scale=False).set_heads([(0, 1), (2, 3)]).init_normal(0.5)
    reference = tiny_llama(tiny_tokenizer)  # same seed: same weights, plain HF
    handles = [reference.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
        _o_proj_bias_hook(iv.bias[l].detach() * iv.head_mask[l, :, None])) for l in range(dims.n_layers)]
    ids = _tokens(tiny_tokenizer)
    try:
        with torch.no_grad():
            expected = reference(ids).logits
            with iv.attach(tiny_model):
                got = tiny_model(ids)
            plain = tiny_model(ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got, plain), "the bias had no effect"


def test_bias_matches_hf_o_proj_on_smollm2(smollm2):
    from lofit_lens.backends.hf import load_hf

    hf, tok = load_hf("smollm2-135m", device="cpu")
    iv = HeadIntervention.for_model(smollm2, use_scale=False).set_heads([(3, 2), (17, 8)]).init_normal(0.3)
    layers = [3, 17]
    handles = [hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(
        _o_proj_bias_hook(iv.bias[l].detach() * iv.head_mask[l, :, None])) for l in layers]
    ids = torch.tensor([tok("Families are complicated: my aunt's son is my").input_ids])
    try:
        with torch.no_grad(), iv.attach(smollm2):
            got = smollm2(ids)
        with torch.no_grad():
            expected = hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_scale_multiplies_head_output(tiny_model, tiny_tokenizer):
    """A = -1 on every head of a layer zeroes its attention output: same as o_proj input 0."""
    iv = HeadIntervention(model_dims(tiny_model), use_bias=False)
    iv.set_heads([(1, h) for h in range(4)])
    with torch.no_grad():
        iv.scale[1] = -1.0
    seen = {}
    ids = _tokens(tiny_tokenizer)
    with torch.no_grad(), iv.attach(tiny_model), attached_hooks(
            tiny_model, [(hook_z_name(1), lambda z, hook: seen.setdefault("z", z.clone()))]):
        tiny_model(ids)
    assert seen["z"].abs().max() == 0


def test_one_hook_per_active_layer_only(tiny_model):
    iv = HeadIntervention(model_dims(tiny_model)).set_heads([(0, 0), (0, 3), (2, 1)])
    assert [name for name, _ in iv.hooks()] == [hook_z_name(0), hook_z_name(2)]


def test_masked_heads_get_no_gradient_and_stay_zero(tiny_model, tiny_tokenizer):
    iv = HeadIntervention(model_dims(tiny_model)).set_heads([(1, 2)]).init_normal(1e-3)
    opt = torch.optim.AdamW(iv.trainable(), lr=1e-2, weight_decay=0.0)
    ids = _tokens(tiny_tokenizer)
    for _ in range(3):
        with iv.attach(tiny_model):
            loss = tiny_model(ids).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        inactive = ~iv.head_mask
        assert iv.scale.grad[inactive].abs().max() == 0
        assert iv.bias.grad[inactive].abs().max() == 0
        assert iv.bias.grad[1, 2].abs().max() > 0
        opt.step()
    assert iv.scale.detach()[~iv.head_mask].abs().max() == 0
    assert iv.bias.detach()[~iv.head_mask].abs().max() == 0
    assert iv.num_trainable_parameters() == 2 * model_dims(tiny_model).d_head


def test_exception_removes_only_our_hooks(tiny_model, tiny_tokenizer):
    fired = []
    user_hook = lambda z, hook: fired.append(hook.name)  # noqa: E731
    point = tiny_model.hook_dict[hook_z_name(0)]
    tiny_model.add_hook(hook_z_name(0), user_hook)
    n_before = len(point.fwd_hooks)
    iv = HeadIntervention(model_dims(tiny_model)).set_heads(None)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with iv.attach(tiny_model):
                assert len(point.fwd_hooks) == n_before + 1
                raise RuntimeError("boom")
        assert len(point.fwd_hooks) == n_before
        assert all(not tiny_model.hook_dict[hook_z_name(l)].fwd_hooks for l in (1, 2))
        with torch.no_grad():
            tiny_model(_tokens(tiny_tokenizer))
        assert len(fired) == 1  # the user's hook fired once (bridge names it attn.o.hook_in)
    finally:
        tiny_model.reset_hooks()


def test_wrong_hook_z_shape_is_a_clear_error(tiny_model):
    iv = HeadIntervention(model_dims(tiny_model)).set_heads(None)
    with pytest.raises(ValueError, match="hook_z has shape"):
        iv.edit(torch.zeros(1, 5, 32), layer=0)  # [batch, pos, d_model]: not split per head


def test_model_without_hook_z_is_a_clear_error(tiny_model):
    class NoHeads:
        cfg = tiny_model.cfg
        hook_dict = {"blocks.0.attn.hook_result": None}

    with pytest.raises(ValueError, match="no hook point 'blocks.0.attn.hook_z'"):
        with attached_hooks(NoHeads(), [(hook_z_name(0), lambda z, hook: z)]):
            pass


def test_heads_outside_the_model_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="outside"):
        HeadIntervention(model_dims(tiny_model)).set_heads([(9, 0)])


def test_logits_at_equals_full_logits(tiny_model, tiny_tokenizer):
    ids = _tokens(tiny_tokenizer).repeat(2, 1)
    mask = torch.ones_like(ids)
    rows, pos = torch.tensor([0, 1, 1]), torch.tensor([0, 3, 7])
    with torch.no_grad():
        full = tiny_model(ids)
        picked = logits_at(tiny_model, ids, mask, (rows, pos))
    torch.testing.assert_close(picked, full[rows, pos], rtol=0, atol=1e-5)


def test_top_heads_orders_best_first():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.7]])
    assert top_heads(scores, 3) == [(0, 1), (1, 1), (1, 0)]
