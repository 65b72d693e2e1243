"""LoFiT's core on a TransformerLens 3.x ``HookedTransformer`` (TL 4.x removed the class).

Run in the TL 3.9 env: ``bash scripts/setup_tl3_env.sh && .venv-tl3/bin/python -m pytest
tests/test_tl3.py``. Under TL 4.x the whole module skips. The fast tests use a tiny random
GQA model built from a ``HookedTransformerConfig`` (no tokenizer, no download).
"""

from __future__ import annotations

import pytest
import torch

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError as err:  # TL >= 4: "'HookedTransformer' was removed in TransformerLens 4.0"
    pytest.skip(f"needs TransformerLens 3.x HookedTransformer ({err})", allow_module_level=True)

from lofit_lens.backends.hooked import attached_hooks, final_residual, hook_z_name, logits_at, model_dims
from lofit_lens.intervention import HeadIntervention

pytestmark = pytest.mark.tl3

N_LAYERS, N_HEADS, D_HEAD, N_KV, D_VOCAB = 2, 4, 8, 2, 101


def tiny_config(**overrides) -> HookedTransformerConfig:
    kwargs = dict(
        n_layers=N_LAYERS, d_model=N_HEADS * D_HEAD, n_heads=N_HEADS, d_head=D_HEAD,
        n_key_value_heads=N_KV, d_mlp=64, d_vocab=D_VOCAB, n_ctx=32, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=D_HEAD,
        gated_mlp=True, final_rms=True, seed=0, device="cpu", dtype=torch.float32,
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = frozen(HookedTransformer(tiny_config()))
    # Random init leaves RMS gains at 1: perturb them so a wrong norm would show.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".w"):
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, D_VOCAB, (3, 7), generator=g)


@pytest.fixture
def mask():
    m = torch.ones(3, 7, dtype=torch.long)
    m[1, 5:] = 0  # right padding
    m[2, 4:] = 0
    return m


def our_hooks(model) -> int:
    """Hook handles on every hook point (TL's list and PyTorch's dict)."""
    return sum(len(hp.fwd_hooks) + len(hp._forward_hooks) for hp in model.hook_dict.values())


def random_intervention(model, heads, use_scale=True, seed=0) -> HeadIntervention:
    iv = HeadIntervention.for_model(model, use_scale=use_scale, use_bias=True).set_heads(heads)
    return iv.init_normal(0.5, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- the model itself
def test_tiny_model_is_gqa_with_per_head_hook_z(model, tokens):
    assert model_dims(model) == (N_LAYERS, N_HEADS, D_HEAD)
    assert model.cfg.n_key_value_heads == N_KV
    assert model.blocks[0].attn.W_O.shape == (N_HEADS, D_HEAD, N_HEADS * D_HEAD)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    assert cache[hook_z_name(0)].shape == (3, 7, N_HEADS, D_HEAD)


# ---------------------------------------------------------------------- hooks
def test_attached_hooks_handles_none_returning_add_hook(model, tokens):
    point = model.hook_dict[hook_z_name(1)]
    assert point.add_hook.__annotations__.get("return") in (None, "None")  # TL 3.x returns nothing
    seen = []
    with attached_hooks(model, [(hook_z_name(1), lambda z, hook: seen.append(hook.name))]):
        assert len(point.fwd_hooks) == 1 and len(point._forward_hooks) == 1
        model(tokens, return_type=None)
    assert seen == [hook_z_name(1)]
    assert our_hooks(model) == 0


def test_exception_inside_attach_removes_only_our_hooks(model, tokens):
    fired = []
    model.add_hook(hook_z_name(0), lambda z, hook: fired.append(hook.name))
    try:
        plain = model(tokens)
        assert fired == [hook_z_name(0)]
        iv = random_intervention(model, [(0, 1), (1, 2)])
        with pytest.raises(RuntimeError, match="boom"):
            with iv.attach(model):
                assert our_hooks(model) == 2 * 1 + 2 * 2  # user hook + one per active layer
                model(tokens)
                raise RuntimeError("boom")
        # Only the user's hook is left, and it still fires; the output is the plain one again.
        assert our_hooks(model) == 2
        assert len(model.hook_dict[hook_z_name(1)].fwd_hooks) == 0
        fired.clear()
        torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)
        assert fired == [hook_z_name(0)]
    finally:
        model.reset_hooks(including_permanent=True)
    assert our_hooks(model) == 0


def test_exception_inside_forward_removes_our_hooks(model, tokens):
    iv = random_intervention(model, [(1, 0)])

    def bad(z, hook):
        raise ValueError("inside the forward")

    with pytest.raises(ValueError, match="inside the forward"):
        with iv.attach(model), attached_hooks(model, [(hook_z_name(1), bad)]):
            model(tokens)
    assert our_hooks(model) == 0


# ---------------------------------------------------------------------- the intervention
def test_bias_at_hook_z_equals_attention_output_shift_through_W_O(model, tokens, mask):
    heads = [(0, 1), (0, 3), (1, 2)]
    iv = random_intervention(model, heads, use_scale=False, seed=3)

    def shift(layer):
        W_O = model.blocks[layer].attn.W_O  # [head, d_head, d_model]
        active = iv.head_mask[layer, :, None].float()
        return torch.einsum("hd,hdm->m", iv.bias[layer].detach() * active, W_O)

    def add_shift(out, hook):  # hook_attn_out: [batch, pos, d_model]
        return out + shift(int(hook.name.split(".")[1]))

    with torch.no_grad():
        plain = model(tokens, attention_mask=mask)
        with iv.attach(model):
            edited = model(tokens, attention_mask=mask)
        via_w_o = model.run_with_hooks(
            tokens, attention_mask=mask,
            fwd_hooks=[(f"blocks.{l}.hook_attn_out", add_shift) for l in range(N_LAYERS)],
        )
    assert (edited - plain).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(edited, via_w_o, rtol=1e-5, atol=1e-5)


def test_scale_and_bias_edit_hook_z_as_specified(model, tokens):
    iv = random_intervention(model, [(1, 0), (1, 3)], seed=4)
    names = {hook_z_name(1)}
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, names_filter=names.__contains__)
        with iv.attach(model):
            _, edited = model.run_with_cache(tokens, names_filter=names.__contains__)
    z, z_new = plain[hook_z_name(1)], edited[hook_z_name(1)]
    for h in range(N_HEADS):
        if h in (0, 3):
            want = z[:, :, h] * (1 + iv.scale[1, h].detach()) + iv.bias[1, h].detach()
        else:
            want = z[:, :, h]
        torch.testing.assert_close(z_new[:, :, h], want, rtol=0, atol=1e-6)


def test_masked_heads_get_zero_gradient(model, tokens, mask):
    heads = [(0, 2), (1, 0)]
    iv = random_intervention(model, heads, seed=5)
    with iv.attach(model):
        logits = model(tokens, attention_mask=mask)
    logits.logsumexp(-1).sum().backward()
    for grad in (iv.scale.grad, iv.bias.grad):
        assert grad is not None
        active = iv.head_mask
        assert torch.all(grad[~active] == 0)
        assert torch.all(grad[active].abs().sum(-1) > 0)


def test_model_parameters_bit_identical_after_training_steps(model, tokens, mask):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iv = random_intervention(model, [(0, 0), (1, 1), (1, 3)], seed=6)
    opt = torch.optim.AdamW(iv.trainable(), lr=1e-2, weight_decay=0.1)
    rows = torch.tensor([0, 1, 2, 0])
    pos = torch.tensor([2, 3, 1, 5])
    with iv.attach(model):
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(
                logits_at(model, tokens, mask, (rows, pos)), tokens[rows, pos + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert iv.bias.detach()[~iv.head_mask].abs().sum() == 0
    assert our_hooks(model) == 0


# ---------------------------------------------------------------------- logits at positions
@pytest.mark.parametrize("soft_cap", [None, 2.0])
def test_logits_at_equals_full_logits(tokens, mask, soft_cap):
    torch.manual_seed(0)
    extra = {} if soft_cap is None else {"output_logits_soft_cap": soft_cap}
    m = frozen(HookedTransformer(tiny_config(**extra)))
    rows = torch.tensor([0, 0, 1, 2, 2])
    pos = torch.tensor([0, 6, 4, 1, 3])
    iv = random_intervention(m, [(0, 1), (1, 2)], seed=7)
    with torch.no_grad():
        full = m(tokens, attention_mask=mask)
        torch.testing.assert_close(logits_at(m, tokens, mask, (rows, pos)), full[rows, pos],
                                   rtol=1e-5, atol=1e-5)
        with iv.attach(m):
            full_edit = m(tokens, attention_mask=mask)
            picked = logits_at(m, tokens, mask, (rows, pos))
    torch.testing.assert_close(picked, full_edit[rows, pos], rtol=1e-5, atol=1e-5)
    if soft_cap is not None:
        assert full.abs().max() < soft_cap
    assert our_hooks(m) == 0


def test_final_residual_is_resid_post_of_last_block(model, tokens, mask):
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[last])
        torch.testing.assert_close(final_residual(model, tokens, mask), cache[last],
                                   rtol=0, atol=0)


# ---------------------------------------------------------------------- the training loop
class _TokenSFT:
    """An ``Objective`` over fixed token rows (the tiny model has no tokenizer)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def loss(self, model, indices):
        from lofit_lens.padding import collate
        from lofit_lens.losses import sft_loss

        return sft_loss(model, collate([self.pairs[i] for i in indices], pad=0))


def test_train_intervention_on_hooked_transformer(model):
    from lofit_lens.training import train_intervention

    g = torch.Generator().manual_seed(8)
    pairs = [(torch.randint(1, D_VOCAB, (n,), generator=g).tolist(), [7, 9])
             for n in (3, 5, 4, 6, 2, 5)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iv = HeadIntervention.for_model(model, use_scale=False, use_bias=True)
    iv.set_heads([(0, 1), (1, 3)]).init_normal(1e-3, torch.Generator().manual_seed(0))
    objective = _TokenSFT(pairs)
    history = train_intervention(model, iv, objective, objective, epochs=4, lr=0.1,
                                 l1_lambda=0.0, batch_size=3, seed=0, progress=False)
    assert len(history.step_loss) == 4 * 2
    assert history.val_loss[-1] < history.val_loss[0]
    assert iv.bias.detach()[~iv.head_mask].abs().sum() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert our_hooks(model) == 0


# ---------------------------------------------------------------------- a real model
@pytest.mark.slow
def test_smollm2_hooked_transformer_matches_hf():
    from lofit_lens.backends.tl3 import load_hooked_transformer
    from lofit_lens.backends.hf import load_hf

    torch.set_num_threads(2)
    model = load_hooked_transformer("smollm2-135m", device="cpu")
    hf_model, tokenizer = load_hf("smollm2-135m", device="cpu")
    assert isinstance(model, HookedTransformer)
    assert model.lofit_model_id == "smollm2-135m"
    assert model_dims(model) == (30, 9, 64) and model.cfg.n_key_value_heads == 3
    assert not any(p.requires_grad for p in model.parameters())
    # SmolLM2's tokenizer adds no BOS: the model's own to_tokens must not either.
    assert model.cfg.default_prepend_bos is False
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(model.to_tokens(prompt), ids)
    with torch.no_grad():
        ours = model(ids)
        ref = hf_model(ids).logits
        rows, pos = torch.zeros(2, dtype=torch.long), torch.tensor([0, ids.shape[1] - 1])
        picked = logits_at(model, ids, torch.ones_like(ids), (rows, pos))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(picked, ref[0, pos], rtol=0, atol=1e-4)
    assert tokenizer.decode(ours[0, -1].argmax()) == tokenizer.decode(ref[0, -1].argmax())
