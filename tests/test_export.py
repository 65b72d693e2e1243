"""Export: a LoFiT intervention folded into plain HF weights computes what the hooks compute."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lofit_lens.backends.hooked import model_dims
from lofit_lens.errors import UnsupportedModelError
from lofit_lens.export import check_exportable, export_intervention
from lofit_lens.intervention import HeadIntervention

PROMPTS = ["abc: cba.", "hello there, friend"]


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The tiny model's weights as an HF folder (a fresh copy: the bridge wraps ``tiny_hf``'s
    modules in place, so that object no longer saves as a plain HF model)."""
    from conftest import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_hf")
    tiny_llama(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def trained_like(dims, use_scale: bool) -> HeadIntervention:
    module = HeadIntervention(dims, use_scale=use_scale).set_heads([(0, 1), (2, 3), (2, 0)])
    return module.init_normal(0.5, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("use_scale", [False, True])
def test_exported_logits_equal_the_hooked_model(tiny_model, tiny_tokenizer, tiny_folder, tmp_path,
                                                use_scale):
    from transformers import AutoModelForCausalLM

    module = trained_like(model_dims(tiny_model), use_scale)
    out = export_intervention(module, tiny_folder, tmp_path / "export", {"task": "demo"})
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.attention_bias is True
    assert "L0H1" in (out / "README.md").read_text()
    for text in PROMPTS:
        ids = tiny_tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad(), module.attach(tiny_model):
            hooked = tiny_model(ids)
        with torch.no_grad():
            plain = exported(ids).logits
            base = tiny_model(ids)
        torch.testing.assert_close(plain, hooked, atol=1e-4, rtol=0)
        assert (plain - base).abs().max() > 1e-3  # the edit is not a no-op


def test_export_loads_without_lofit_lens(tiny_model, tiny_folder, tmp_path):
    out = export_intervention(trained_like(model_dims(tiny_model), False), tiny_folder, tmp_path / "e")
    code = ("import sys; sys.modules['lofit_lens'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); print(m.config.attention_bias)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("True")


def test_architectures_without_an_output_bias_are_named():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*cannot take a bias"):
        check_exportable(MistralForCausalLM(cfg))


def _check_real_export(model, tmp_path):
    from transformers import AutoModelForCausalLM

    import lofit_lens as ll
    from lofit_lens.backends.hooked import hf_tokenizer

    dims = model_dims(model)
    module = HeadIntervention(dims, use_scale=False)
    module.set_heads([(dims.n_layers - 1, 0), (dims.n_layers // 2, 1), (1, 0)])
    module.init_normal(0.5, torch.Generator().manual_seed(0))
    exported = AutoModelForCausalLM.from_pretrained(export_intervention(module, model, tmp_path)).eval()
    prompt = "The capital of France is"
    ids = hf_tokenizer(model)(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), module.attach(model):
        hooked = model(ids)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, hooked, atol=1e-4, rtol=0)
        plain = exported.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    with module.attach(model):
        via_hooks = ll.generate(model, [prompt], max_new_tokens=8, progress=False)[0]
    assert hf_tokenizer(model).decode(plain) == via_hooks


@pytest.mark.slow
def test_smollm2_export_matches_the_hooks(smollm2, tmp_path):
    _check_real_export(smollm2, tmp_path)


@pytest.mark.slow
def test_gemma3_export_matches_the_hooks(tmp_path):
    import lofit_lens as ll

    _check_real_export(ll.load_model("gemma3-270m", device="cpu"), tmp_path)
