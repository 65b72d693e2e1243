"""LoFiTResult: save/load round trip, shape checks, apply() as a context manager."""

from __future__ import annotations

import json

import pytest
import torch

import lofit_lens as ll
from lofit_lens.backends.hooked import model_dims
from lofit_lens.result import LoFiTResult

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)



@pytest.fixture(scope="module")
def result(tiny_model, tiny_task_file):
    return ll.lofit(tiny_model, str(tiny_task_file), k=0.25, seed=1, epochs=1, max_train_examples=8,
                    max_val_examples=4, batch_size=4, eval_splits=("val",), progress=False)


def test_result_contents(result, tiny_model):
    dims = model_dims(tiny_model)
    assert result.head_scores.shape == (dims.n_layers, dims.n_heads)
    assert result.bias.shape == result.scale.shape == dims
    assert result.k == 3 and len(set(result.selected_heads)) == 3
    assert [h for h, _ in result.ranking()[:3]] == result.selected_heads
    assert set(result.metrics) == {"zero_shot", "lofit"}
    assert 0 <= result.metrics["lofit"]["val"]["exact_match"] <= 1
    assert len(result.predictions["lofit/val"]) == result.metrics["lofit"]["val"]["n"]
    assert result.data_hash and result.versions["torch"]


def test_save_load_round_trip(result, tmp_path, tiny_model):
    result.save(tmp_path / "run")
    card = json.loads((tmp_path / "run" / "result.json").read_text())
    assert card["versions"]["transformer-lens"] and card["seed"] == 1
    loaded = LoFiTResult.load(tmp_path / "run", model=tiny_model)
    for name in ("head_scores", "scale", "bias"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))
    assert loaded.selected_heads == result.selected_heads
    assert loaded.config == result.config
    assert loaded.metrics == result.metrics
    assert loaded.predictions == result.predictions
    assert loaded.data_hash == result.data_hash


def test_load_onto_other_shape_is_a_clear_error(result, tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    bridge = pytest.importorskip("transformer_lens.model_bridge")

    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    hf = LlamaForCausalLM(cfg).eval()
    hf.config.architectures = ["LlamaForCausalLM"]
    other = bridge.TransformerBridge.boot_transformers("tiny-2-layers", hf_model=hf,
                                                       tokenizer=tiny_tokenizer, device="cpu")
    result.save(tmp_path / "run")
    with pytest.raises(ValueError, match="same shape"):
        LoFiTResult.load(tmp_path / "run", model=other)


def test_load_onto_other_model_id_needs_consent(result, tmp_path, tiny_model):
    result.save(tmp_path / "run")
    loaded = LoFiTResult.load(tmp_path / "run")
    loaded.model_id = "someone-else"
    with pytest.raises(ValueError, match="allow_other_model"):
        loaded.check_compatible(tiny_model)
    loaded.check_compatible(tiny_model, allow_other_model=True)


def test_load_from_a_folder_without_result_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved LoFiTResult"):
        LoFiTResult.load(tmp_path)


def test_apply_is_a_context_manager(result, tiny_model, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer("abc:").input_ids])
    with torch.no_grad():
        plain = tiny_model(ids)
        with result.apply(tiny_model):
            edited = tiny_model(ids)
        again = tiny_model(ids)
    assert not torch.equal(plain, edited)
    assert torch.equal(plain, again)
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())
