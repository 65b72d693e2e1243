"""Frozen-prefix caching: the cached path gives the full path's losses and gradients."""

from __future__ import annotations

import logging

import pytest
import torch

from lofit_lens.backends.hooked import model_dims
from lofit_lens.intervention import HeadIntervention
from lofit_lens.objectives import build_objective
from lofit_lens.prefix import PrefixStore, frozen_prefix
from lofit_lens.tasks.base import PreferenceExample, SFTExample

pytestmark = pytest.mark.tl3

SFT = [SFTExample(f"q{i}: {'abc' * (i % 3 + 1)}?", f" {'xy' * (i % 2 + 1)}.") for i in range(6)]
DPO = [PreferenceExample(f"say {i}:", f" yes{i}", f" no {i} no") for i in range(6)]


def _loss_and_grads(model, objective, intervention, rows):
    intervention.zero_grad()
    loss = objective.loss(model, rows)
    loss.backward()
    return loss.detach(), intervention.bias.grad.clone()


def _heads_from(model, layer: int) -> HeadIntervention:
    dims = model_dims(model)
    module = HeadIntervention(dims, use_scale=True).set_heads(
        [(layer, 0), (dims.n_layers - 1, dims.n_heads - 1)])
    return module.init_normal(0.1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind, protocol", [("sft", "official"), ("sft", "clean"),
                                            ("dpo", "official"), ("dpo", "clean")])
@pytest.mark.parametrize("budget_mb", [1024.0, 1e-6])  # in memory; on disk
def test_cached_loss_and_gradients_equal_the_full_path(tiny_model, kind, protocol, budget_mb):
    examples = SFT if kind == "sft" else DPO
    objective = build_objective(tiny_model, examples, dpo_beta=0.5, protocol=protocol)
    module = _heads_from(tiny_model, 1)
    rows = [4, 1, 3]
    with module.attach(tiny_model):
        if kind == "dpo":
            objective.compute_reference(tiny_model)
        full = _loss_and_grads(tiny_model, objective, module, rows)
        with frozen_prefix(tiny_model, [objective], 1, 4, budget_mb) as cached:
            assert cached and objective.prefix_store.on_disk == (budget_mb < 1)
            fast = _loss_and_grads(tiny_model, objective, module, rows)
        assert objective.prefix_store is None  # detached after the body
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], full[1], atol=1e-5, rtol=0)
    assert full[1].abs().sum() > 0


def test_bias_tuning_learns_the_same_offsets_with_and_without_the_prefix(tiny_model, tiny_task_file):
    from lofit_lens.training import tune_biases

    heads = [(1, 0), (2, 3), (2, 1)]
    kwargs = dict(max_train_examples=12, max_val_examples=4, epochs_bias=2, batch_size=4,
                  progress=False, lr_bias=1e-2)
    plain = tune_biases(tiny_model, str(tiny_task_file), heads, prefix_cache_mb=0, **kwargs)
    cached = tune_biases(tiny_model, str(tiny_task_file), heads, **kwargs)
    assert plain.history.frozen_prefix_layer == 0 and cached.history.frozen_prefix_layer == 1
    torch.testing.assert_close(cached.bias, plain.bias, atol=1e-5, rtol=0)
    assert cached.history.val_loss == pytest.approx(plain.history.val_loss, abs=1e-5)


def test_no_prefix_when_an_edit_reaches_layer_0(tiny_model, tiny_task_file):
    from lofit_lens.training import tune_biases

    run = tune_biases(tiny_model, str(tiny_task_file), [(0, 1), (2, 0)], max_train_examples=4,
                      max_val_examples=0, epochs_bias=1, progress=False)
    assert run.history.frozen_prefix_layer == 0


def test_an_architecture_that_edits_its_embeddings_keeps_the_full_path(tiny_tokenizer, caplog):
    """GPT-2 adds position embeddings to ``inputs_embeds`` inside its forward: the check
    batch differs, so the cache is dropped, with a logged reason."""
    tl = pytest.importorskip("transformer_lens.model_bridge")
    from transformers import GPT2Config, GPT2LMHeadModel

    from lofit_lens.backends.hf import finish

    tok = tiny_tokenizer
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=3,
                                    n_head=4, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)).eval()
    hf.config.architectures = ["GPT2LMHeadModel"]
    model = finish(tl.TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok,
                                                          device="cpu", dtype=torch.float32),
                   "gpt2", tok)
    objective = build_objective(model, SFT, dpo_beta=0.5)
    module = _heads_from(model, 1)
    with caplog.at_level(logging.WARNING, logger="lofit_lens.prefix"), module.attach(model):
        with frozen_prefix(model, [objective], 1, 4, 1024.0) as cached:
            assert not cached and objective.prefix_store is None
    assert "training runs every layer" in caplog.text


def test_store_pads_rows_with_zeros(tiny_model):
    objective = build_objective(tiny_model, SFT, dpo_beta=0.5)
    store = PrefixStore.build(tiny_model, objective.prefix_pairs(), objective.pad, 2, 4, 1024.0)
    batch = store.gather([0, 2], width=40, device=torch.device("cpu"))
    n0 = store.lengths[0]
    assert batch.shape == (2, 40, tiny_model.cfg.d_model) and not batch[0, n0:].any()
    assert batch[0, :n0].abs().sum() > 0
    store.close()


@pytest.mark.slow
def test_smollm2_cached_path_is_exact(smollm2, data_dir):
    import lofit_lens as ll

    task = ll.get_task("clutrr")
    examples = task.training_examples(task.train_examples(seed=0, max_examples=4))
    objective = build_objective(smollm2, examples, dpo_beta=0.5)
    module = _heads_from(smollm2, 21)
    with module.attach(smollm2):
        full = _loss_and_grads(smollm2, objective, module, [0, 1, 2, 3])
        with frozen_prefix(smollm2, [objective], 21, 4, 1024.0) as cached:
            assert cached
            fast = _loss_and_grads(smollm2, objective, module, [0, 1, 2, 3])
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], full[1], atol=1e-5, rtol=0)
