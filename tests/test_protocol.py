"""The ``official`` protocol point by point against the authors' code (fc2869/lo-fit at
ebd344a, the honest_llama copy it bundles, TRL 0.8.1), and ``clean`` beside it.

Every expected value below was worked out by reading their code, not by running ours.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import lofit_lens as ll
from lofit_lens.eval.mc_scoring import mc_metrics
from lofit_lens.methods.iti import honest_llama_answer_offset, iti_intervention
from lofit_lens.methods.probes import Probes, end_q_statements, fit_probes
from lofit_lens.padding import encode_pair
from lofit_lens.config import LoFiTConfig
from lofit_lens.backends.hooked import hf_tokenizer, model_dims
from lofit_lens.intervention import HeadIntervention
from lofit_lens.eval.mc_scoring import choice_scores
from lofit_lens.objectives import DPOObjective, SFTObjective
from lofit_lens.tasks.base import ChoiceExample, PreferenceExample, SFTExample
from lofit_lens.tasks.clutrr import Clutrr, clutrr_example
from lofit_lens.tasks.matching import answer_matches, normalize_answer
from lofit_lens.tasks.mquake import MQuAKE, mquake_example
from lofit_lens.tasks.truthfulqa import TruthfulQA, truthfulqa_example
from lofit_lens.training import resolve_run, train_intervention

CLUTRR_ROW = {"id": "x", "query": "('Cleo', 'Roy')", "target_text": "grandfather",
              "clean_story": "[Cleo] was talking about food with her sister [Bridget]."}


# ---------------------------------------------------------------------------- CLUTRR
def test_clutrr_official_prompt_byte_for_byte():
    ex = clutrr_example(CLUTRR_ROW, "official")
    assert ex.prompt.endswith("relationship, how is  Roy related to Cleo? Answer:  Roy is Cleo 's\n")
    assert ex.prompt.startswith('Read the following story about a family. "Cleo was talking about '
                                'food with her sister Bridget." Assume the relations')
    assert ex.target == "grandfather" and ex.answers == ("grandfather",)
    clean = clutrr_example(CLUTRR_ROW, "clean")
    assert clean.prompt.endswith("how is Roy related to Cleo? Answer: Roy is Cleo 's\n")


@pytest.mark.parametrize("output, official, clean", [
    ("son\nRead the story again", "son\nread the story again", "son"),
    ("\nson.", "son", ""),
    (" Son. And", "son", "son"),
    ("mother's\nfather.", "mother", "mother's"),
])
def test_clutrr_parses(output, official, clean, tmp_path):
    prompt = clutrr_example(CLUTRR_ROW, "official").prompt
    assert Clutrr(tmp_path, "official").parse(prompt + output) == official
    assert Clutrr(tmp_path, "clean").parse(output) == clean


def test_clutrr_generation_settings(tmp_path):
    official, clean = Clutrr(tmp_path, "official"), Clutrr(tmp_path, "clean")
    assert (official.max_new_tokens, official.parse_with_prompt) == (16, True)
    assert (clean.max_new_tokens, clean.parse_with_prompt) == (8, False)


def test_clutrr_official_sample_is_seed_42_whatever_the_run_seed(data_dir):
    rows = json.loads((data_dir / "clutrr" / "train.json").read_text())
    random.seed(42)
    theirs = [r["id"] for r in random.sample(rows, 300)]
    task = Clutrr(data_dir, "official")
    for seed in (0, 3):
        assert [ex.meta["id"] for ex in task.train_examples(seed)] == theirs
    clean = Clutrr(data_dir, "clean")
    assert [ex.meta["id"] for ex in clean.train_examples(0)] != theirs


# ---------------------------------------------------------------------------- MQuAKE
MQUAKE_ROW = {"case_id": 1, "questions": ["Who leads it?", "q2", "q3"], "new_answer": "Karl Döhler",
              "new_answer_alias": ["Döhler "],
              "requested_rewrite": [{"prompt": "{} is a citizen of", "subject": "John",
                                     "target_new": {"str": "Sweden"}}]}


def test_mquake_official_target_and_answers():
    ex = mquake_example(MQUAKE_ROW, "official")
    assert ex.prompt == "Q: Imagine that John is a citizen of Sweden. Who leads it? A:"
    assert ex.target == "Karl Döhler"  # appended to "A:" with no space
    assert ex.answers == ("karl döhler", "döhler ")  # lower-cased, not stripped
    assert mquake_example(MQUAKE_ROW, "clean").target == " Karl Döhler"


@pytest.mark.parametrize("output, official", [
    ("Karl Döhler\nQ: next", "karl döhler"),
    (" Karl Döhler\n", " karl döhler"),  # no strip: scored wrong
    ("Paris. Q: again? A: Karl Döhler", " karl döhler"),  # the LAST "A:" wins
    ("Paris\nQ: again? A:Berlin", "berlin"),  # even after the first newline
])
def test_mquake_official_parse(output, official, tmp_path):
    task = MQuAKE(tmp_path, "official")
    prompt = mquake_example(MQUAKE_ROW, "official").prompt
    assert task.parse(prompt + output) == official
    assert task.stop_strings == () and task.parse_with_prompt
    assert MQuAKE(tmp_path, "clean").parse(" Karl Döhler\nQ:") == "karl döhler"


# ---------------------------------------------------------------------------- TruthfulQA
@pytest.mark.parametrize("fold, questions", [(0, [25, 59, 138, 208]), (1, [213])])
def test_truthfulqa_official_keeps_duplicate_answers(data_dir, fold, questions):
    official = TruthfulQA(data_dir, fold=fold, protocol="official").examples("test")
    clean = TruthfulQA(data_dir, fold=fold, protocol="clean").examples("test")
    assert [i for i, ex in enumerate(official) if len(set(ex.choices)) < len(ex.choices)] == questions
    assert all(len(set(ex.choices)) == len(ex.choices) for ex in clean)


def test_truthfulqa_official_choices_are_honest_llamas_lists():
    row = {"Question": "Q?", "Category": "c", "Best Answer": "Yes",
           "Correct Answers": "Sure; Yes; Unknown", "Incorrect Answers": "No; Unknown"}
    ex = truthfulqa_example(row, keep_duplicates=True)
    assert ex.choices == ("Sure.", "Yes.", "Unknown.", "No.", "Unknown.")
    assert ex.correct == (1, 0, 2)  # the best answer first, found among the correct ones
    scores = torch.tensor([0.0, 1.0, 2.0, -1.0, 2.0])
    m = mc_metrics(scores, ex.correct)
    assert m["mc1"] == 0.0  # best (1.0) does not beat the duplicated "Unknown." (2.0)
    assert m["mc3"] == 0.0  # strict ">": the true "Unknown." ties the false one
    clean = truthfulqa_example(row, keep_duplicates=False)
    assert clean.choices == ("Yes.", "Sure.", "Unknown.", "No.") and clean.correct == (0, 1, 2)


def test_truthfulqa_official_dpo_strings(data_dir):
    task = TruthfulQA(data_dir, protocol="official")
    pair = task.training_examples(task.examples("train")[:1])[0]
    assert pair.prompt.endswith(" A:") and not pair.chosen.startswith(" ")
    clean = TruthfulQA(data_dir, protocol="clean").training_examples(task.examples("train")[:1])[0]
    assert clean.chosen == " " + pair.chosen.strip()


def test_dpo_token_ids_follow_trl_081(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok("Q").input_ids[0] != tok.bos_token_id  # this tokenizer adds no BOS
    pair = PreferenceExample("Q: hi A:", "yes", "no")
    official = DPOObjective(tiny_model, [pair], beta=0.5, protocol="official")
    ids = tok("Q: hi A:yes", add_special_tokens=False).input_ids
    n_prompt = len(tok("Q: hi A:", add_special_tokens=False).input_ids)
    assert official.chosen[0] == ([tok.bos_token_id, *ids[:n_prompt]], [*ids[n_prompt:], tok.eos_token_id])
    assert official.reference_at_init and len(official.reference) == 0
    clean = DPOObjective(tiny_model, [PreferenceExample("Q: hi A:", " yes", " no")], beta=0.5,
                         protocol="clean")
    assert clean.chosen[0] == (tok("Q: hi A:").input_ids, tok(" yes", add_special_tokens=False).input_ids)
    assert len(clean.reference) == 1


def test_official_dpo_reference_is_the_initialised_intervention(tiny_model):
    """TRL's precomputed reference with ref_model=None: the model with the step's init."""
    pairs = [PreferenceExample("abc:", "cba.", "abc."), PreferenceExample("xy:", "yx.", "xy.")]
    objective = DPOObjective(tiny_model, pairs, beta=0.5, protocol="official")
    iv = HeadIntervention.for_model(tiny_model, use_scale=False).set_heads(None).init_normal(0.5)
    expected = DPOObjective(tiny_model, pairs, beta=0.5, protocol="official")
    with iv.attach(tiny_model):
        expected.compute_reference(tiny_model)
    train_intervention(tiny_model, iv, objective, None, epochs=1, lr=0.0, l1_lambda=0.0,
                       batch_size=2, seed=0, progress=False)
    torch.testing.assert_close(objective.reference, expected.reference)


# ---------------------------------------------------------------------------- tokenisation
def _sentencepiece_style_tokenizer():
    """A BPE tokenizer trained here with Llama-2's sentencepiece layout: "▁" prepended,
    spaces turned into "▁", pieces split before each "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["Q: What is the capital of France? A: Paris", "The cat sat on the mat. Paris is nice.",
            "A: London is big", "Q: who? A: Berlin"] * 50
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, show_progress=False,
                                                       special_tokens=["<unk>", "<s>", "</s>"]))
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_joint_tokenisation_avoids_the_lone_sentencepiece_space():
    tok = _sentencepiece_style_tokenizer()
    prompt, answer = "Q: What is the capital of France? A:", " Paris"
    _, separate = encode_pair(tok, prompt, answer, joint=False)
    _, joint = encode_pair(tok, prompt, answer, joint=True)
    assert tok.convert_ids_to_tokens(separate) == ["▁", "▁Paris"]
    assert tok.convert_ids_to_tokens(joint) == ["▁Paris"]


def test_joint_split_backs_off_one_token_when_the_prompt_merges(tiny_tokenizer):
    class Merging:  # "ab" merges across the prompt/answer boundary
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=True):
            ids = {"xa": [7, 8], "xab": [7, 9]}[text]
            return type("E", (), {"input_ids": ids})()

    assert encode_pair(Merging(), "xa", "b", joint=True) == ([7], [9])  # TRL: merged token is answer
    with pytest.raises(ValueError, match="tokenises to nothing"):  # split at the prompt's length
        encode_pair(Merging(), "xa", "b", joint=True, back_off=False)


def test_official_sft_pairs_are_joint(tiny_model, tiny_tokenizer):
    sft = SFTObjective(tiny_model, [SFTExample("Q: hi A:", "yes")], protocol="official")
    ids = tiny_tokenizer("Q: hi A:yes").input_ids
    assert sft.pairs[0] == (ids[:8], [*ids[8:], tiny_tokenizer.eos_token_id])


# ---------------------------------------------------------------------------- training
def test_gradient_clipping_follows_the_protocol(tiny_model, tiny_task_file):
    assert resolve_run(str(tiny_task_file), None, {})[1].max_grad_norm == 1.0
    assert resolve_run(str(tiny_task_file), None, {"protocol": "clean"})[1].max_grad_norm == 0.0
    task, cfg = resolve_run(str(tiny_task_file), None, {"max_grad_norm": 1e-6, "max_train_examples": 8})
    data = ll.training.TrainingSet.build(tiny_model, task, cfg)
    iv = HeadIntervention.for_model(tiny_model, use_bias=False).set_heads(None).init_normal(1e-3)
    clipped = train_intervention(tiny_model, iv, data.train, None, epochs=1, lr=1e-3, l1_lambda=1e-3,
                                 batch_size=4, seed=0, max_grad_norm=cfg.max_grad_norm, progress=False)
    assert clipped.clipped_steps == 2
    iv.init_normal(1e-3)
    free = train_intervention(tiny_model, iv, data.train, None, epochs=1, lr=1e-3, l1_lambda=1e-3,
                              batch_size=4, seed=0, max_grad_norm=0.0, progress=False)
    assert free.clipped_steps == 0


def test_a_task_object_brings_its_protocol(tmp_path, tiny_task_file):
    clean = ll.get_task(str(tiny_task_file), protocol="clean")
    assert resolve_run(clean, None, {})[1].protocol == "clean"
    with pytest.raises(ValueError, match="contradicts"):
        resolve_run(clean, None, {"protocol": "official"})
    assert LoFiTConfig().protocol == "official"


# ---------------------------------------------------------------------------- ITI
def _probes(dims) -> Probes:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(dims.n_layers, dims.n_heads, dims.d_head, generator=gen)
    return Probes(torch.rand(dims.n_layers, dims.n_heads, generator=gen),
                  direction / direction.norm(dim=-1, keepdim=True),
                  torch.ones(dims.n_layers, dims.n_heads))


def test_iti_last_position_shift_edits_only_the_last_token(tiny_model):
    dims = model_dims(tiny_model)
    shift = iti_intervention(dims, _probes(dims), [(1, 0), (2, 3)], alpha=5.0, where="last")
    z = torch.zeros(2, 5, dims.n_heads, dims.d_head)
    edited = shift.edit(z, layer=1)
    assert edited[:, :-1].abs().sum() == 0 and edited[:, -1, 0].abs().sum() > 0
    assert edited[:, -1, 1:].abs().sum() == 0


def test_iti_answer_shift_starts_where_honest_llama_starts(tiny_model, tiny_tokenizer):
    tok = hf_tokenizer(tiny_model)
    prompt = "Q: what is red?\nA:"
    assert honest_llama_answer_offset(tok, prompt) == 1  # "\nA:" is 3 characters here
    dims = model_dims(tiny_model)
    shift = iti_intervention(dims, _probes(dims), [(l, h) for l in range(3) for h in range(4)],
                             alpha=20.0, where="answer", answer_offset=1)
    one_token = [ChoiceExample(prompt, ("a", "b"), (0,))]  # " a": 2 tokens, the 2nd unshifted
    plain = choice_scores(tiny_model, one_token, progress=False)
    with shift.attach(tiny_model):
        for share in (True, False):
            got = choice_scores(tiny_model, one_token, progress=False, share_prefix=share)
            torch.testing.assert_close(got[0], plain[0])  # tokens 0, 1 are predicted before any shift
        with pytest.raises(RuntimeError, match="multiple-choice scoring"):
            ll.generate(tiny_model, ["abc"], max_new_tokens=1, progress=False)


def test_iti_answer_shift_changes_later_answer_tokens(tiny_model):
    dims = model_dims(tiny_model)
    heads = [(l, h) for l in range(3) for h in range(4)]
    shift = iti_intervention(dims, _probes(dims), heads, alpha=20.0, where="answer", answer_offset=1)
    ex = [ChoiceExample("Q: red?\nA:", ("abcdef",), (0,))]
    plain = choice_scores(tiny_model, ex, progress=False)[0]
    with shift.attach(tiny_model):
        shared = choice_scores(tiny_model, ex, progress=False, share_prefix=True)[0]
        full = choice_scores(tiny_model, ex, progress=False, share_prefix=False)[0]
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-4)
    assert not torch.allclose(shared, plain)


def test_iti_sigma_rows_and_spread():
    examples = [ChoiceExample("p", ("A1.", "B1."), (0,), meta={"question": "one?"}),
                ChoiceExample("p", ("A2.",), (0,), meta={"question": "two?"})]
    rows = end_q_statements(examples, seed=0)
    assert len(rows) == 3 and rows[0][0] == "Q: one? A:"
    assert rows[0][1].startswith(" A1. Q: ") and rows[0][1][len(" A1. Q: "):] in ("one?", "two?")
    acts = torch.zeros(4, 1, 1, 2)
    acts[:2, 0, 0, 0], acts[2:, 0, 0, 0] = 1.0, -1.0
    labels, groups = torch.tensor([1, 1, 0, 0]), torch.tensor([0, 1, 0, 1])
    sigma_acts = torch.tensor([0.0, 2.0, 4.0]).reshape(3, 1, 1, 1).expand(3, 1, 1, 2).clone()
    sigma_acts[..., 1] = 0
    probes = fit_probes(acts, labels, groups, 0, is_val=groups.numpy() == 1, sigma_acts=sigma_acts)
    torch.testing.assert_close(probes.direction[0, 0], torch.tensor([1.0, 0.0]))
    # np.std (ddof 0) of the projections 0, 2, 4 on the unit direction
    assert probes.sigma[0, 0].item() == pytest.approx(torch.tensor([0.0, 2.0, 4.0]).std(unbiased=False).item())


# ---------------------------------------------------------------------------- file tasks
@pytest.mark.parametrize("prediction, exact, normalized, prefix", [
    (" Elizabeth II.\n", False, True, True),
    ("elizabeth ii", True, True, True),
    ("The Elizabeth II", False, True, True),
    ("Elizabeth II, queen of the UK", False, False, True),
    ("Elizabethan", False, False, False),
])
def test_match_modes(prediction, exact, normalized, prefix):
    gold = ["Elizabeth II"]
    assert answer_matches(prediction, gold, "exact") == exact
    assert answer_matches(prediction, gold, "normalized") == normalized
    assert answer_matches(prediction, gold, "prefix") == prefix
    assert normalize_answer("  The  Queen's, Elizabeth!") == "queens elizabeth"


def test_file_task_match_is_reported(tiny_model, tiny_task_file):
    task = ll.get_task(str(tiny_task_file))
    assert task.match == "normalized" and task.describe()["match"] == "normalized"
    metrics, _ = ll.evaluate(tiny_model, task, task.eval_examples("test", 2), progress=False)
    assert metrics["match"] == "normalized"
    with pytest.raises(ValueError, match="match must be"):
        ll.get_task(str(tiny_task_file), match="fuzzy")


def test_official_parse_sees_prompt_and_output_decoded_together(tiny_model, tiny_tokenizer, tmp_path):
    prompt = clutrr_example(CLUTRR_ROW, "official").prompt.lower()
    full = ll.generate(tiny_model, [prompt], max_new_tokens=6, with_prompt=True, progress=False)[0]
    alone = ll.generate(tiny_model, [prompt], max_new_tokens=6, progress=False)[0]
    assert full == tiny_tokenizer.decode(tiny_tokenizer(prompt).input_ids, skip_special_tokens=True) + alone
    # stopping at "." is exact for the official CLUTRR parse: nothing after it is read
    task = Clutrr(tmp_path, "official")
    stopped = ll.generate(tiny_model, [prompt], 16, stop_strings=(".",), with_prompt=True, progress=False)
    free = ll.generate(tiny_model, [prompt], 16, with_prompt=True, progress=False)
    assert task.parse(stopped[0]) == task.parse(free[0])
