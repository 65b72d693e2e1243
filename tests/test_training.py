"""Training: the two steps, determinism, frozen weights, the SFT loss on answer tokens only."""

from __future__ import annotations

import json

import pytest
import torch

import lofit_lens as ll
from lofit_lens.padding import collate, encode_pair, pad_id
from lofit_lens.config import LoFiTConfig
from lofit_lens.backends.hooked import model_dims
from lofit_lens.losses import sft_loss

QUICK = dict(max_train_examples=16, max_val_examples=8, batch_size=4, progress=False)

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)


def test_sft_loss_reads_answer_tokens_only(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [encode_pair(tok, "abc:", "cba.", joint=False, add_eos=True),
             encode_pair(tok, "a longer prompt:", "x", joint=False, add_eos=True)]
    batch = collate(pairs, pad_id(tok))
    with torch.no_grad():
        logits = tiny_model(batch.tokens, attention_mask=batch.attention_mask)
        logprobs = torch.log_softmax(logits, -1)
    expected = []
    for row, (prompt, answer) in enumerate(pairs):
        for offset, token in enumerate(answer):
            expected.append(-logprobs[row, len(prompt) + offset - 1, token])
    with torch.no_grad():
        got = sft_loss(tiny_model, batch)
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=0, atol=1e-5)
    # padding goes to the right and is never a target
    assert not batch.target_mask[1, len(pairs[1][0]) + len(pairs[1][1]):].any()


def test_select_heads_ranks_every_head_and_is_seeded(tiny_model, tiny_task_file):
    dims = model_dims(tiny_model)
    a = ll.select_heads(tiny_model, str(tiny_task_file), epochs_select=1, seed=3, **QUICK)
    b = ll.select_heads(tiny_model, str(tiny_task_file), epochs_select=1, seed=3, **QUICK)
    c = ll.select_heads(tiny_model, str(tiny_task_file), epochs_select=1, seed=4, **QUICK)
    ranking = a.ranking()
    assert len(ranking) == dims.total_heads
    assert [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert torch.equal(a.scores, b.scores) and a.top(5) == b.top(5)
    assert not torch.equal(a.scores, c.scores)
    assert a.history.epoch_loss and a.history.val_loss


def test_tune_biases_trains_only_given_heads_and_is_seeded(tiny_model, tiny_task_file):
    heads = [(0, 1), (2, 3)]
    a = ll.tune_biases(tiny_model, str(tiny_task_file), heads, epochs_bias=1, seed=0, **QUICK)
    b = ll.tune_biases(tiny_model, str(tiny_task_file), heads, epochs_bias=1, seed=0, **QUICK)
    assert torch.equal(a.bias, b.bias)
    mask = torch.zeros(a.bias.shape[:2], dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    assert a.bias[~mask].abs().max() == 0 and a.bias[mask].abs().min() > 0
    assert a.history.trainable_parameters == 2 * model_dims(tiny_model).d_head


def test_training_lowers_the_loss(tiny_model, tiny_task_file):
    tuning = ll.tune_biases(tiny_model, str(tiny_task_file), None, epochs_bias=6, lr_bias=5e-2,
                            max_train_examples=24, batch_size=4, progress=False)
    losses = tuning.history.epoch_loss
    assert losses[-1] < losses[0] - 0.05, losses


def test_model_weights_are_bit_identical_after_lofit(tiny_model, tiny_task_file):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    ll.lofit(tiny_model, str(tiny_task_file), k=3, epochs=1, eval_splits=(), **QUICK)
    after = dict(tiny_model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n].detach()) for n in before)
    assert all(p.grad is None for p in after.values())


@pytest.mark.parametrize("k, expected", [(0.1, 27), (27, 27), (27.0, 27), (0.001, 1), (1, 1)])
def test_k_as_count_or_fraction(k, expected):
    assert LoFiTConfig(k=k).num_heads(270) == expected


@pytest.mark.parametrize("k", [0, 271, 1.5, -0.1, "3", True])
def test_bad_k_is_rejected(k):
    with pytest.raises((ValueError, TypeError)):
        LoFiTConfig(k=k).num_heads(270)


def test_unknown_option_is_rejected(tiny_model, tiny_task_file):
    with pytest.raises(TypeError, match="lr_bais"):
        ll.lofit(tiny_model, str(tiny_task_file), lr_bais=1.0)


def test_config_round_trip():
    cfg = LoFiTConfig(task="mquake", k=5, eval_splits=("val", "test"), extra={"fold": 1})
    assert LoFiTConfig.from_dict(cfg.to_dict()) == cfg


def test_checkpoint_resumes_finished_phases(tiny_model, tiny_task_file, tmp_path, monkeypatch):
    kwargs = dict(k=2, epochs=1, eval_splits=("val",), checkpoint=tmp_path, **QUICK)
    first = ll.lofit(tiny_model, str(tiny_task_file), **kwargs)
    # zero-shot evaluation, step 1, step 2, LoFiT's evaluation
    assert len(list(tmp_path.glob("*.json"))) == len(list(tmp_path.glob("*.safetensors"))) == 4

    def fail(*args, **kw):
        raise AssertionError("a finished phase was recomputed")

    monkeypatch.setattr("lofit_lens.engine.select_heads", fail)
    monkeypatch.setattr("lofit_lens.engine.tune_biases", fail)
    monkeypatch.setattr("lofit_lens.engine.evaluate", fail)
    again = ll.lofit(tiny_model, str(tiny_task_file), **kwargs)
    assert torch.equal(again.bias, first.bias) and again.selected_heads == first.selected_heads
    assert again.metrics == first.metrics
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: not reused
        ll.lofit(tiny_model, str(tiny_task_file), **{**kwargs, "seed": 5})
    monkeypatch.setattr(tiny_model.cfg, "dtype", torch.float16)
    with pytest.raises(AssertionError, match="recomputed"):  # another dtype: not reused
        ll.lofit(tiny_model, str(tiny_task_file), **kwargs)


def test_checkpoint_recomputes_what_an_edit_changed(tiny_model, tiny_task_file, tmp_path,
                                                    monkeypatch):
    """Editing the evaluation answers recomputes the evaluations only; other weights under the
    same model name recompute everything."""
    task = tmp_path / "task.jsonl"
    task.write_text(tiny_task_file.read_text())
    kwargs = dict(k=2, epochs=1, eval_splits=("test",), checkpoint=tmp_path / "ckpt", **QUICK)
    first = ll.lofit(tiny_model, str(task), **kwargs)
    rows = [json.loads(line) for line in task.read_text().splitlines()]
    for row in rows:
        if row["split"] == "test":
            row["answer"] = " edited"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def fail(*args, **kw):
        raise AssertionError("a training step was recomputed")

    monkeypatch.setattr("lofit_lens.engine.select_heads", fail)
    monkeypatch.setattr("lofit_lens.engine.tune_biases", fail)
    again = ll.lofit(tiny_model, str(task), **kwargs)
    assert torch.equal(again.bias, first.bias)  # training reused
    answers = {a for row in again.predictions["zero_shot/test"] for a in row["answers"]}
    assert answers == {" edited"}, answers  # zero-shot scored against the new answers
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1e-3)  # same name, other weights
    try:
        with pytest.raises(AssertionError, match="recomputed"):
            ll.lofit(tiny_model, str(task), **kwargs)
    finally:
        with torch.no_grad():
            next(tiny_model.parameters()).sub_(1e-3)


def test_a_step_1_without_spread_is_not_kept(tiny_model, tiny_task_file, tmp_path):
    """Issue 21 row: --lr-select 1e3 (for 1e-3) saved a ranking of pure noise as valid."""
    from lofit_lens.errors import DegenerateSelectionError

    with pytest.raises(DegenerateSelectionError, match="saturated.*far too high"):
        ll.lofit(tiny_model, str(tiny_task_file), k=2, epochs=1, lr_select=1e3, zero_shot=False,
                 eval_splits=(), checkpoint=tmp_path, **{k: v for k, v in QUICK.items()
                                                         if k != "lr_select"})
    assert not list(tmp_path.glob("select-*"))


def test_check_selection_accepts_spread_and_refuses_flat_scores():
    from lofit_lens.errors import DegenerateSelectionError
    from lofit_lens.selection_check import check_selection

    check_selection(torch.tensor([[0.1, 0.5], [0.2, 0.3]]), lr=5e-3, d_head=64)
    with pytest.raises(DegenerateSelectionError, match="L1"):
        check_selection(torch.zeros(2, 2), lr=5e-3, d_head=64)
    with pytest.raises(DegenerateSelectionError, match="no spread"):
        check_selection(torch.full((2, 2), 0.3), lr=5e-3, d_head=64)
    with pytest.raises(DegenerateSelectionError, match="saturated"):  # the numbers
        check_selection(torch.linspace(7985, 8000, 270).reshape(30, 9), lr=1e3, d_head=64)
