"""Batched greedy generation: left padding + attention mask give the unbatched text."""

from __future__ import annotations

import pytest

import torch

from lofit_lens.eval.generation import cut_at_stop, greedy_generate
from lofit_lens.intervention import HeadIntervention

from conftest import tiny_llama

PROMPTS = ["abc:", "a much longer prompt here:", "xy", "the cat sat on the"]

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)


def test_batched_equals_one_at_a_time(tiny_model):
    batched = greedy_generate(tiny_model, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
    single = [greedy_generate(tiny_model, [p], max_new_tokens=6, progress=False)[0] for p in PROMPTS]
    assert batched == single


def test_batched_equals_one_at_a_time_with_intervention(tiny_model):
    iv = HeadIntervention.for_model(tiny_model).set_heads([(0, 0), (1, 3)]).init_normal(2.0)
    with iv.attach(tiny_model):
        batched = greedy_generate(tiny_model, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
        single = [greedy_generate(tiny_model, [p], max_new_tokens=6, progress=False)[0] for p in PROMPTS]
    plain = greedy_generate(tiny_model, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
    assert batched == single
    assert batched != plain, "the intervention did not change generation"


def test_generation_matches_hf_generate(tiny_model, tiny_tokenizer):
    reference = tiny_llama(tiny_tokenizer)  # same seed, plain HF
    prompt = "the cat sat on the"
    ids = torch.tensor([tiny_tokenizer(prompt).input_ids])
    with torch.no_grad():
        hf_out = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tiny_tokenizer.decode(hf_out[0, ids.shape[1]:], skip_special_tokens=True)
    assert greedy_generate(tiny_model, [prompt], max_new_tokens=6, progress=False) == [expected]


SHARED = ["Q: what is the cat?\nA:", "Q: what is a dog?\nA:", "Q: what is it, then?\nA:"]


def test_a_shared_start_runs_once_and_changes_nothing(tiny_model):
    """Prompts that start alike: their common tokens run once (one row), every row continues
    from that cache, and the texts equal those of each prompt alone, with an intervention too."""
    from lofit_lens.backends import hf_cache
    from lofit_lens.backends.hooked import uses_bridge

    if not uses_bridge(tiny_model):
        pytest.skip("TL 3.x generates one prompt at a time")
    calls = []
    forward = hf_cache.forward_with_cache
    iv = HeadIntervention.for_model(tiny_model).set_heads([(0, 0), (1, 3)]).init_normal(2.0)
    with iv.attach(tiny_model):
        hf_cache.forward_with_cache = lambda *a, **k: calls.append(a[1].shape) or forward(*a, **k)
        try:
            batched = greedy_generate(tiny_model, SHARED, max_new_tokens=6, batch_size=3, progress=False)
        finally:
            hf_cache.forward_with_cache = forward
        single = [greedy_generate(tiny_model, [p], max_new_tokens=6, progress=False)[0] for p in SHARED]
    assert calls == [torch.Size([1, len("Q: what is ")])]  # the common start, once, as one row
    assert batched == single


def test_batch_rows_shares_only_a_common_start_that_leaves_each_row_a_token():
    from lofit_lens.padding import SHARED_PREFIX_MIN, batch_rows

    tokens, mask, shared = batch_rows([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 2, 3]], pad=0)
    assert shared == 5
    assert tokens.tolist() == [[5, 6, 7, 8, 9, 0, 1], [5, 6, 7, 8, 9, 2, 3]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 1], [1] * 7]
    assert batch_rows([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 2]], pad=0)[2] == 4  # row 1 keeps 9
    assert batch_rows([[5, 6, 7, 1], [5, 6, 7, 2]], pad=0)[2] == 0 < SHARED_PREFIX_MIN
    assert batch_rows([[5, 6, 7, 8, 9, 1]], pad=0)[2] == 0  # one row: nothing to share


def test_cut_at_stop():
    assert cut_at_stop("son. and more", (".", "\n")) == "son."
    assert cut_at_stop("a\nb.c", (".", "\n")) == "a\n"
    assert cut_at_stop("nothing", ("\n",)) == "nothing"


def test_smollm2_batched_generation_with_kv_cache(smollm2):
    prompts = ["The capital of France is", "Q: What is two plus two? A:"]
    batched = greedy_generate(smollm2, prompts, max_new_tokens=5, progress=False)
    single = [greedy_generate(smollm2, [p], max_new_tokens=5, progress=False)[0] for p in prompts]
    assert batched == single
    assert batched[0].startswith(" Paris")


def test_token_batches_bound_rows_and_padded_tokens():
    from lofit_lens.batching import token_batches

    lengths = [30, 10, 400, 12, 11, 31, 29]
    batches = token_batches(lengths, max_rows=4, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[-1] == [2]  # the long row runs alone
    for batch in batches[:-1]:
        assert len(batch) <= 4 and len(batch) * max(lengths[i] for i in batch) <= 100
    assert token_batches(lengths, 16, 10**9) == [sorted(range(7), key=lambda i: lengths[i])]


def test_one_long_prompt_does_not_pad_the_whole_batch(tiny_model, monkeypatch):
    """Issue 21 row: one 20,000-token test row padded 15 short rows to its length (21.4 GB).
    Batches are bounded by tokens: the long prompt runs alone, the texts do not change."""
    import lofit_lens.eval.generation as generation

    prompts = PROMPTS + ["word " * 300]
    shapes = []
    run = generation._generate_rows

    def recording(model, rows, *args):
        shapes.append((len(rows), max(map(len, rows))))
        return run(model, rows, *args)

    monkeypatch.setattr(generation, "_generate_rows", recording)
    bounded = greedy_generate(tiny_model, prompts, max_new_tokens=4, batch_size=16,
                              progress=False, max_batch_tokens=200)
    assert shapes[-1][0] == 1 and shapes[-1][1] > 200
    assert all(rows * (longest + 4) <= 200 for rows, longest in shapes[:-1])
    assert bounded == greedy_generate(tiny_model, prompts, max_new_tokens=4, batch_size=1,
                                      progress=False)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_mc_scores_do_not_change_with_the_token_bound(tiny_model, share_prefix):
    from lofit_lens.backends.hooked import uses_bridge
    from lofit_lens.eval.mc_scoring import choice_scores
    from lofit_lens.tasks.base import ChoiceExample

    if share_prefix and not uses_bridge(tiny_model):
        pytest.skip("shared-prefix scoring needs a TransformerBridge")
    examples = [ChoiceExample("Q: pick red A:", ["red", "blue", "cat"], [0]),
                ChoiceExample("Q: " + "a long question " * 40 + "A:", ["sun", "moon"], [1]),
                ChoiceExample("Q: short A:", ["x", "y"], [0])]
    kwargs = dict(share_prefix=share_prefix, protocol="clean", progress=False)
    wide = choice_scores(tiny_model, examples, **kwargs)
    tight = choice_scores(tiny_model, examples, max_batch_tokens=40, **kwargs)
    for w, t in zip(wide, tight):
        torch.testing.assert_close(w, t, rtol=0, atol=1e-4)
