"""TruthfulQA's protocol: MC scoring (shared-prefix KV cache vs one answer at a time),
MC1/MC2/MC3, the DPO loss and reference, and the two-fold table of ``compare``."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lofit_lens.backends.hooked import hf_tokenizer
from lofit_lens.intervention import HeadIntervention
from lofit_lens.losses import dpo_loss
from lofit_lens.eval.mc_scoring import choice_scores, mc_metrics
from lofit_lens.objectives import DPOObjective
from lofit_lens.tasks.base import ChoiceExample, PreferenceExample

EXAMPLES = [
    ChoiceExample("Q: what is red? A:", ("blood.", "grass is green.", "the sky."), (0,)),
    ChoiceExample("Q: two plus two? A:", ("four.", "five.", "22.", "a fish in a tree."), (0, 2)),
    ChoiceExample("Q: hi A:", ("hello there.", "no."), (0,)),
]


@torch.no_grad()
def one_at_a_time(model, examples) -> list[torch.Tensor]:
    """Reference: one full forward per answer; sum of log-softmax over the answer tokens."""
    tok = hf_tokenizer(model)
    out = []
    for ex in examples:
        prompt = tok(ex.prompt).input_ids
        scores = []
        for choice in ex.choices:
            answer = tok(" " + choice, add_special_tokens=False).input_ids
            logits = model(torch.tensor([prompt + answer]), return_type="logits")[0]
            logprobs = logits.float().log_softmax(-1)
            scores.append(sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(answer)))
        out.append(torch.tensor(scores))
    return out


def assert_scores_close(got, expected, atol=1e-4):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_shared_prefix_scores_equal_one_answer_at_a_time(tiny_model, batch_size):
    expected = one_at_a_time(tiny_model, EXAMPLES)
    shared = choice_scores(tiny_model, EXAMPLES, batch_size=batch_size, progress=False)
    plain = choice_scores(tiny_model, EXAMPLES, batch_size=batch_size, progress=False,
                          share_prefix=False)
    assert_scores_close(shared, expected)
    assert_scores_close(plain, expected)


def test_shared_prefix_keeps_interventions_active(tiny_model):
    iv = HeadIntervention.for_model(tiny_model).set_heads(None).init_normal(0.5)
    with iv.attach(tiny_model):
        expected = one_at_a_time(tiny_model, EXAMPLES)
        shared = choice_scores(tiny_model, EXAMPLES, batch_size=3, progress=False)
    assert_scores_close(shared, expected)
    untouched = one_at_a_time(tiny_model, EXAMPLES)
    assert not torch.allclose(shared[1], untouched[1], atol=1e-3), "the intervention had no effect"


@pytest.mark.slow
def test_smollm2_truthfulqa_scores_equal_one_answer_at_a_time(smollm2, data_dir):
    from lofit_lens.tasks import TruthfulQA

    test = TruthfulQA(data_dir, fold=0).eval_examples("test")
    examples = sorted(test, key=lambda ex: len(ex.choices))[:3]  # the 3 with fewest answers
    expected = one_at_a_time(smollm2, examples)
    shared = choice_scores(smollm2, examples, batch_size=8, progress=False)
    assert_scores_close(shared, expected)


def test_mc_metrics_hand_computed():
    scores = torch.tensor([-1.0, -3.0, -2.0, -2.5])  # true: 0 (best), 1; false: 2, 3
    m = mc_metrics(scores, [0, 1])
    assert m["mc1"] == 1.0  # -1 > max(-2, -2.5)
    assert m["mc3"] == 0.5  # -1 beats -2, -3 does not
    e = [math.exp(s) for s in (-1.0, -3.0, -2.0, -2.5)]
    assert m["mc2"] == pytest.approx((e[0] + e[1]) / sum(e), abs=1e-6)  # 0.6103...

    m = mc_metrics(torch.tensor([-3.0, -1.0, -2.0]), [0, 1])  # best answer loses to a false one
    assert (m["mc1"], m["mc3"]) == (0.0, 0.5)
    with pytest.raises(ValueError):
        mc_metrics(torch.tensor([-1.0, -2.0]), [0, 1])


def test_dpo_loss_hand_computed():
    # margins: (-1 - -3) - (-2 - -2.5) = 1.5 and (-4 - -1) - (-3 - -1) = -1; beta 0.5
    # loss = mean(-log sigmoid(0.75), -log sigmoid(-0.5)) = mean(0.38687, 0.97408) = 0.68047
    loss = dpo_loss(torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0]),
                    torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -1.0]), beta=0.5)
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.5))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(loss) == pytest.approx(0.68047, abs=1e-5)


def test_dpo_reference_is_the_untouched_model(tiny_model):
    pairs = [PreferenceExample("Q: sky? A:", " blue.", " green."),
             PreferenceExample("Q: snow? A:", " white.", " black cats.")]
    iv = HeadIntervention.for_model(tiny_model, use_scale=False).set_heads(None).init_normal(0.5)
    objective = DPOObjective(tiny_model, pairs, beta=0.5, protocol="clean")
    expected = torch.tensor([float(s) for ex in one_at_a_time(
        tiny_model, [ChoiceExample(p.prompt, (p.chosen[1:], p.rejected[1:]), (0,)) for p in pairs])
        for s in ex]).reshape(2, 2)
    torch.testing.assert_close(objective.reference, expected, rtol=0, atol=1e-4)
    with torch.no_grad():
        assert float(objective.loss(tiny_model, [0, 1])) == pytest.approx(math.log(2), abs=1e-5)
        with iv.attach(tiny_model):  # the policy moves, the reference does not
            assert float(objective.loss(tiny_model, [0, 1])) != pytest.approx(math.log(2), abs=1e-4)
    torch.testing.assert_close(objective.reference, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- folds in compare
FIELDS = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers",
          "Source"]


def write_truthfulqa(folder, n=4):
    """Tiny two-fold TruthfulQA CSVs (the real prompt format, short questions)."""
    (folder / "truthfulqa").mkdir(parents=True)
    for fold in (0, 1):
        for split in ("train", "val", "test"):
            with open(folder / "truthfulqa" / f"fold_{fold}_{split}_seed_42.csv", "w",
                      newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                for i in range(n):
                    writer.writerow({"Type": "x", "Category": "c", "Source": "s",
                                     "Question": f"Is {i + fold} odd?",
                                     "Best Answer": "Yes" if (i + fold) % 2 else "No",
                                     "Correct Answers": "It is" if (i + fold) % 2 else "It is not",
                                     "Incorrect Answers": "No; Maybe" if (i + fold) % 2 else "Yes; Maybe"})


def test_compare_truthfulqa_reports_both_folds_and_their_mean(tiny_model, tmp_path):
    from lofit_lens.methods import compare

    write_truthfulqa(tmp_path / "data")
    frame = compare(tiny_model, "truthfulqa", methods=["zero_shot", "iti"], seeds=[0], k=2,
                    max_eval_examples=2, extra={"data_dir": str(tmp_path / "data")},
                    out=tmp_path / "out", progress=False)
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.json"))  # cards (+ tensors)
    assert runs == ["iti-fold0-seed0.json", "iti-fold1-seed0.json",
                    "zero_shot-fold0-seed0.json", "zero_shot-fold1-seed0.json"]
    for m in ("mc1", "mc2", "mc3"):
        folds = frame[[f"{m}_fold0", f"{m}_fold1"]].to_numpy()
        assert frame[f"{m}_mean"].to_numpy() == pytest.approx(folds.mean(axis=1))
    assert list(frame["params"]) == [0, 0]
    assert "mc2_fold1" in (tmp_path / "out" / "compare.md").read_text()
