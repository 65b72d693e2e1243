"""Model loading: embedded offline models, HF-equal logits and generations, BOS handling."""

from __future__ import annotations

import pytest
import torch

import lofit_lens as ll
from lofit_lens.backends.hooked import hf_tokenizer, model_dims
from lofit_lens.backends.hf import EMBEDDED_MODELS, load_hf

PROMPTS = ["The capital of France is", "Q: Who wrote Hamlet? A:", "My aunt's son is my"]

pytestmark = pytest.mark.slow


def _check_against_hf(model, name):
    hf, tok = load_hf(name, device="cpu")
    # The bridge runs HF's eager attention; HF's default sdpa kernel differs by ~5e-5.
    hf.set_attn_implementation("eager")
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt).input_ids])
        assert model.to_tokens(prompt).tolist() == ids.tolist(), "BOS handling differs from HF"
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=0)
    prompt = PROMPTS[0]
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        expected = tok.decode(hf.generate(ids, max_new_tokens=8, do_sample=False,
                                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:],
                              skip_special_tokens=True)
    # lofit-lens's generation (HF generate on the wrapped model), not the bridge's own
    # generate, which transformers 5.24 breaks (docs/gotchas.md)
    assert ll.generate(model, [prompt], max_new_tokens=8, progress=False) == [expected]


def test_smollm2_equals_hf(smollm2):
    assert model_dims(smollm2) == (30, 9, 64)
    assert smollm2.lofit_model_id == "smollm2-135m"
    assert hf_tokenizer(smollm2)("hi").input_ids == [6004]  # no BOS, as HF
    assert smollm2.cfg.default_prepend_bos is False
    _check_against_hf(smollm2, "smollm2-135m")
    assert ll.generate(smollm2, ["The capital of France is"], max_new_tokens=3,
                       progress=False)[0].startswith(" Paris")


def test_model_weights_are_frozen(smollm2):
    assert not any(p.requires_grad for p in smollm2.parameters())


def test_gemma3_equals_hf():
    model = ll.load_model("gemma3-270m", device="cpu")
    assert model_dims(model) == (18, 4, 256)
    assert model.cfg.default_prepend_bos is True
    assert hf_tokenizer(model)("a").input_ids[0] == hf_tokenizer(model).bos_token_id
    _check_against_hf(model, "gemma3-270m")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="not an embedded model"):
        ll.load_model(str(tmp_path / "no-such-model"))


def test_registry_lists_both_embedded_models():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m"}
