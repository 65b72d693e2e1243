"""``doctor``: passes on a healthy model in fp32 and bf16, and fails by name, in both dtypes,
on each fault it exists to catch: a KV cache that never reaches attention (transformers
5.24 on TransformerLens 4.3), attention to left padding, and a hook left behind."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import lofit_lens as ll
from lofit_lens.backends import hf_cache
from lofit_lens.backends.hooked import hf_tokenizer, hook_z_name, uses_bridge
from lofit_lens.backends.plain import PlainView, plain_view
from lofit_lens.doctor import full_forward_logits
from lofit_lens.errors import BrokenEnvironmentError

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)

GENERATION = "cached generation == full forward per token"
BATCHED = "batched generation == one prompt at a time"
MC = "shared-prefix MC == one answer at a time"
LEFT_BEHIND = "no hook left behind"


def _hooks(model) -> int:
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in model.hook_dict.values())


def _failed(model) -> set[str]:
    return {c.name for c in ll.doctor(model, fast=True).failures}


def test_doctor_passes_on_a_healthy_model(tiny_model_each_dtype):
    model = tiny_model_each_dtype
    before = _hooks(model)
    report = ll.doctor(model, fast=True)
    assert report.ok, str(report)
    assert {c.name for c in report.checks} >= {"versions", LEFT_BEHIND, BATCHED, GENERATION,
                                               "plain view == hook path"}
    assert _hooks(model) == before and hf_cache.live_cache_aliases() == 0
    assert "all checks passed" in str(report)
    precision = "float32" if next(model.parameters()).dtype == torch.float32 else "bfloat16"
    assert f"{precision} on cpu" in str(report)  # each tolerance says which precision set it


def greedy_no_cache(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by one full forward per token, no KV cache."""
    eos = hf_tokenizer(model).eos_token_id
    seq = list(ids)
    for _ in range(max_new_tokens):
        token = int(full_forward_logits(model, seq)[-1].argmax())
        if token == eos:
            break
        seq.append(token)
    return seq[len(ids):]


def test_generation_equals_greedy_without_cache(tiny_model):
    tok = hf_tokenizer(tiny_model)
    prompt = "the cat sat on the"
    expected = tok.decode(greedy_no_cache(tiny_model, tok(prompt).input_ids, 10))
    assert ll.generate(tiny_model, [prompt], max_new_tokens=10, progress=False) == [expected]


def _drop_cache(module, args, kwargs):
    """What transformers 5.24 does to TransformerLens 4.3's attention: no cache arrives."""
    return args, {**kwargs, "past_key_values": None, "cache": None}


@contextlib.contextmanager
def _cache_lost_on_plain_view(model):
    """The same fault where the hot paths decode: the plain view's attention gets no cache."""
    hf = plain_view(model).hf
    handles = [m.register_forward_pre_hook(_drop_cache, with_kwargs=True)
               for name, m in hf.named_modules() if name.endswith("self_attn")]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def test_doctor_fails_by_name_when_the_cache_is_lost(tiny_model_each_dtype):
    if not uses_bridge(tiny_model_each_dtype):
        pytest.skip("TL 3.x decodes with its own cache, not HF's")
    with _cache_lost_on_plain_view(tiny_model_each_dtype):
        report = ll.doctor(tiny_model_each_dtype, fast=True)
    failed = {c.name for c in report.failures}
    assert {GENERATION, MC} <= failed, str(report)
    with pytest.raises(BrokenEnvironmentError, match="docs/gotchas.md"):
        report.raise_if_failed()


def test_doctor_fails_when_the_bridge_path_loses_the_cache(tiny_model_each_dtype, monkeypatch):
    """A hook lofit-lens did not add keeps decoding on the bridge: the fault there is caught too."""
    model = tiny_model_each_dtype
    if not uses_bridge(model):
        pytest.skip("TL 3.x decodes with its own cache, not HF's")
    monkeypatch.setattr(hf_cache, "_alias_cache", _drop_cache)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        report = ll.doctor(model, fast=True)
    failed = {c.name for c in report.failures}
    assert {GENERATION, MC} <= failed, str(report)
    assert next(c for c in report.checks if c.name == "plain view == hook path").status == "warn"
    assert hf_cache.live_cache_aliases() == 0


def test_doctor_fails_when_padding_is_attended(tiny_model_each_dtype, monkeypatch):
    """Left padding that the attention mask does not hide changes the batched rows."""
    if not uses_bridge(tiny_model_each_dtype):
        pytest.skip("TL 3.x generates one unpadded prompt at a time")
    from lofit_lens import padding

    left_pad = padding.left_pad

    def unmasked(rows, pad):
        tokens, mask = left_pad(rows, pad)
        return tokens, torch.ones_like(mask)

    monkeypatch.setattr(padding, "left_pad", unmasked)  # what padding.batch_rows calls
    assert BATCHED in _failed(tiny_model_each_dtype)


def test_doctor_fails_when_the_shared_prefix_is_not_attended(tiny_model_each_dtype, monkeypatch):
    """A batch whose prompts start alike runs their common tokens once; rows that cannot see
    them generate from the wrong context."""
    if not uses_bridge(tiny_model_each_dtype):
        pytest.skip("TL 3.x generates one prompt at a time")
    from lofit_lens.eval import generation

    batch_rows = generation.batch_rows

    def prefix_masked(rows, pad):
        tokens, mask, shared = batch_rows(rows, pad)
        return tokens, torch.cat([torch.zeros_like(mask[:, :shared]), mask[:, shared:]], 1), shared

    monkeypatch.setattr(generation, "batch_rows", prefix_masked)
    assert "shared-prefix generation == one prompt at a time" in _failed(tiny_model_each_dtype)


def test_doctor_fails_when_left_padded_positions_are_wrong(tiny_model, monkeypatch):
    """MC's shared-prefix pass counts positions from each row's first real token. fp32 only:
    counting from the pads shifts RoPE distances a little (0.06-0.13 nats on SmolLM2),
    less than bf16 rounds (0.24 on the same check), so no bf16 tolerance can see it."""
    if not uses_bridge(tiny_model):
        pytest.skip("TL 3.x scores full sequences")
    from lofit_lens.eval import mc_scoring

    monkeypatch.setattr(mc_scoring, "left_pad_positions",
                        lambda mask: torch.arange(mask.shape[1]).expand_as(mask))
    assert MC in _failed(tiny_model)


def test_doctor_fails_when_a_hook_is_left_behind(tiny_model_each_dtype, monkeypatch):
    doctor_module = sys.modules["lofit_lens.doctor"]  # lofit_lens.doctor is also the function
    model = tiny_model_each_dtype
    strong = doctor_module._strong_intervention

    @contextlib.contextmanager
    def leaky(self, m):
        m.add_hook(hook_z_name(0), lambda z, hook: None)  # never removed
        yield self

    def leaking_intervention(m):
        iv = strong(m)
        monkeypatch.setattr(type(iv), "attach", leaky)
        return iv

    monkeypatch.setattr(doctor_module, "_strong_intervention", leaking_intervention)
    try:
        assert LEFT_BEHIND in _failed(model)
    finally:
        model.reset_hooks(including_permanent=True)


def test_doctor_fails_when_a_mirrored_hook_is_left_behind(tiny_model_each_dtype, monkeypatch):
    model = tiny_model_each_dtype
    if not uses_bridge(model):
        pytest.skip("TL 3.x has no plain view")
    view = plain_view(model)
    mirror = PlainView.mirror

    @contextlib.contextmanager
    def leaky_mirror(self, points, added):
        for point, fn in points:  # registered, never removed
            self.live += 1
            self._register(point, fn)
        with mirror(self, [], 0):
            yield

    monkeypatch.setattr(PlainView, "mirror", leaky_mirror)
    try:
        assert LEFT_BEHIND in _failed(model)
    finally:
        view.live = 0
        for module in view.hf.modules():
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()


@pytest.mark.slow
def test_doctor_full_on_smollm2(smollm2):
    report = ll.doctor(smollm2)
    assert report.ok, str(report)
    # "versions" may warn (a scratch venv of scripts/check_latest.sh differs from the lock)
    assert all(c.status == "pass" for c in report.checks if c.name != "versions"), str(report)
