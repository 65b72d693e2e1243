"""``doctor``: passes on a healthy model, fails loudly (and by name) on a broken KV cache."""

from __future__ import annotations

import pytest

import lofit_lens as ll
from lofit_lens.backends import hf_cache
from lofit_lens.doctor import greedy_no_cache
from lofit_lens.errors import BrokenEnvironmentError
from lofit_lens.backends.hooked import hf_tokenizer, uses_bridge

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)


def _hooks(model) -> int:
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in model.hook_dict.values())


def test_doctor_passes_on_a_healthy_model(tiny_model):
    before = _hooks(tiny_model)
    report = ll.doctor(tiny_model, fast=True)
    assert report.ok, str(report)
    assert {c.name for c in report.checks} >= {"versions", "no hook left behind",
                                               "batched generation == one prompt at a time"}
    assert _hooks(tiny_model) == before and hf_cache.live_cache_aliases() == 0
    assert "all checks passed" in str(report)


def test_generation_equals_greedy_without_cache(tiny_model):
    tok = hf_tokenizer(tiny_model)
    prompt = "the cat sat on the"
    expected = tok.decode(greedy_no_cache(tiny_model, tok(prompt).input_ids, 10))
    assert ll.generate(tiny_model, [prompt], max_new_tokens=10, progress=False) == [expected]


def _drop_cache(module, args, kwargs):
    """What transformers 5.24 does to TransformerLens 4.3's attention: no cache arrives."""
    return args, {**kwargs, "past_key_values": None, "cache": None}


def test_doctor_fails_by_name_when_the_cache_is_lost(tiny_model, monkeypatch):
    if not uses_bridge(tiny_model):
        pytest.skip("TL 3.x decodes with its own cache, not HF's")
    monkeypatch.setattr(hf_cache, "_alias_cache", _drop_cache)
    report = ll.doctor(tiny_model, fast=True)
    failed = {c.name for c in report.failures}
    assert "cached generation == full forward per token" in failed
    assert "shared-prefix MC == one answer at a time" in failed
    with pytest.raises(BrokenEnvironmentError, match="docs/gotchas.md"):
        report.raise_if_failed()
    assert hf_cache.live_cache_aliases() == 0


@pytest.mark.slow
def test_doctor_full_on_smollm2(smollm2):
    report = ll.doctor(smollm2)
    assert report.ok, str(report)
    # "versions" may warn (a scratch venv of scripts/check_latest.sh differs from the lock)
    assert all(c.status == "pass" for c in report.checks if c.name != "versions"), str(report)
