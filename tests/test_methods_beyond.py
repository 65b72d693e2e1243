"""JoLA, ReFT and RepE on the tiny model: the gates against hand computations, LoReFT against
its formula and at the last prompt position in every kind of forward, the RepE reading."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from lofit_lens.backends.hooked import attached_hooks, hf_tokenizer, model_dims
from lofit_lens.methods import compare, load_intervention
from lofit_lens.methods.iti import ITIShift
from lofit_lens.methods.jola import (
    JoLA, L0PenalisedObjective, deterministic_gate, jola_result, open_probability, sample_gate,
)
from lofit_lens.methods.reft import LoReFT, PromptEndObjective, prompt_ends, resid_post_name
from lofit_lens.methods.repe import (
    ResidualShift, contrast_pairs, read_directions, repe_shift,
)
from lofit_lens.methods.probes import Statements
from lofit_lens.padding import encode_prompt
from lofit_lens.eval.generation import greedy_generate
from lofit_lens.eval.mc_scoring import choice_scores
from lofit_lens.intervention import HeadIntervention
from lofit_lens.objectives import build_objective
from lofit_lens.tasks.base import ChoiceExample, PreferenceExample, SFTExample

TOKENS = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [6, 10, 14, 18, 22, 26, 30, 34]])


def logits(model, intervention=None) -> torch.Tensor:
    if intervention is None:
        return model(TOKENS, return_type="logits")
    with intervention.attach(model):
        return model(TOKENS, return_type="logits")


def random_jola(model, log_alpha: float, seed: int = 0) -> JoLA:
    """A JoLA with large random A and v (so an open gate shows) and all log-alphas equal."""
    jola = JoLA.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        jola.scale.copy_(torch.randn(jola.scale.shape, generator=g))
        jola.bias.copy_(torch.randn(jola.bias.shape, generator=g))
        jola.log_alpha_scale.fill_(log_alpha)
        jola.log_alpha_bias.fill_(log_alpha)
    return jola


# ---------------------------------------------------------------------- JoLA
def test_expected_l0_is_the_hand_computed_open_probability():
    """P(gate != 0) = sigmoid(log_alpha - beta log(-gamma/zeta)) with beta 0.33, (gamma,
    zeta) = (-0.1, 1.1), against the hand formula and against sampled gates."""
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0])
    hand = [1 / (1 + math.exp(-(a + 0.33 * math.log(11)))) for a in log_alpha.tolist()]
    assert open_probability(log_alpha).tolist() == pytest.approx(hand, abs=1e-6)
    assert hand[2] == pytest.approx(0.6881, abs=1e-4)  # log_alpha 0: sigmoid(0.33 ln 11)
    noise = torch.rand(200_000, 1, generator=torch.Generator().manual_seed(0)) * (1 - 2e-6) + 1e-6
    sampled = (sample_gate(log_alpha, noise) > 0).float().mean(dim=0)
    assert sampled.tolist() == pytest.approx(hand, abs=4e-3)
    # evaluation: clamp(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1), exactly 0 below sigmoid = 1/12
    gate = deterministic_gate(torch.tensor([-10.0, math.log(1 / 11) - 1e-3, 0.0, 10.0]))
    assert gate.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0], abs=1e-6)
    assert gate[0] == 0 and gate[1] == 0 and gate[3] == 1


def test_penalty_is_the_mean_open_probability_of_all_gates(tiny_model):
    jola = random_jola(tiny_model, 0.0)
    with torch.no_grad():
        jola.log_alpha_bias.fill_(-2.0)
    expected = 0.5 * (open_probability(torch.tensor(0.0)) + open_probability(torch.tensor(-2.0)))
    assert float(jola.penalty()) == pytest.approx(float(expected), abs=1e-6)
    dims = model_dims(tiny_model)
    assert jola.num_trainable_parameters() == 2 * dims.total_heads * (dims.d_head + 1)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_closed_gates_give_exactly_the_base_model(tiny_model, mode):
    jola = random_jola(tiny_model, -100.0)
    jola.train(mode == "train")
    assert torch.equal(logits(tiny_model, jola), logits(tiny_model))


def test_a_gate_forced_open_equals_lofits_edit_on_that_head(tiny_model):
    jola = random_jola(tiny_model, -100.0).eval()
    with torch.no_grad():
        jola.log_alpha_scale[1, 2] = 100.0
        jola.log_alpha_bias[1, 2] = 100.0
    lofit = HeadIntervention(model_dims(tiny_model)).set_heads([(1, 2)])
    with torch.no_grad():
        lofit.scale.copy_(jola.scale)
        lofit.bias.copy_(jola.bias)
    edited = logits(tiny_model, jola)
    torch.testing.assert_close(edited, logits(tiny_model, lofit), rtol=0, atol=1e-6)
    assert not torch.allclose(edited, logits(tiny_model), atol=1e-3)  # the head did change
    assert jola.active_heads == [(1, 2)]
    # only the v-gate open: LoFiT's bias-only edit
    with torch.no_grad():
        jola.log_alpha_scale[1, 2] = -100.0
    bias_only = HeadIntervention(model_dims(tiny_model), use_scale=False).set_heads([(1, 2)])
    with torch.no_grad():
        bias_only.bias.copy_(jola.bias)
    torch.testing.assert_close(logits(tiny_model, jola), logits(tiny_model, bias_only), rtol=0, atol=1e-6)


def test_training_gates_are_sampled_per_forward_and_seeded(tiny_model):
    jola = random_jola(tiny_model, 0.0).train()
    jola.noise = torch.Generator().manual_seed(3)
    first, second = logits(tiny_model, jola), logits(tiny_model, jola)
    assert not torch.equal(first, second)  # a fresh draw per forward
    jola.noise = torch.Generator().manual_seed(3)
    assert torch.equal(logits(tiny_model, jola), first)


def test_the_penalised_objective_adds_the_weighted_penalty(tiny_model):
    jola = random_jola(tiny_model, 0.0).eval()
    rows = [SFTExample("ab:", "ba."), SFTExample("cd:", "dc.")]
    inner = build_objective(tiny_model, rows, 0.5, "clean")
    with jola.attach(tiny_model):
        plain = inner.loss(tiny_model, [0, 1])
        penalised = L0PenalisedObjective(inner, jola, 0.3).loss(tiny_model, [0, 1])
    assert float(penalised - plain) == pytest.approx(0.3 * float(jola.penalty()), abs=1e-6)


def test_jola_heads_feed_plot_heads_and_head_overlap(tiny_model):
    from lofit_lens.analysis.overlap import head_overlap
    from lofit_lens.analysis.plotting import plot_heads
    from lofit_lens.config import LoFiTConfig

    jola = random_jola(tiny_model, -1.0)
    with torch.no_grad():
        jola.log_alpha_scale[0, 1] = 3.0
        jola.log_alpha_bias[2, 3] = 2.0
    cfg = LoFiTConfig(task="toy", k=2)
    result = jola_result(jola, cfg, "tiny-llama", k=2)
    assert result.selected_heads == [(0, 1), (2, 3)]
    torch.testing.assert_close(result.head_scores, jola.head_scores())
    assert 0 < float(result.head_scores.min()) and float(result.head_scores.max()) < 1
    plot_heads(result)
    other = jola_result(random_jola(tiny_model, -1.0), cfg, "tiny-llama", k=2)
    report = head_overlap([result, other], labels=["jola", "ties"])
    assert report.jaccard_paper.loc["jola", "jola"] == 1.0


def test_jola_trains_and_records_its_gates(tiny_model, tiny_task_file, tmp_path):
    frame = compare(tiny_model, str(tiny_task_file), methods=["jola"], out=tmp_path, seeds=[0],
                    k=2, epochs=1, max_train_examples=8, max_eval_examples=2,
                    max_val_examples=0, extra={"max_new_tokens": 3}, progress=False)
    dims = model_dims(tiny_model)
    assert int(frame["params"][0]) == 2 * dims.total_heads * (dims.d_head + 1)
    card = json.loads((tmp_path / "runs" / "jola-seed0.json").read_text())
    info = card["info"]
    assert len(info["head_scores"]) == dims.n_layers and info["total_heads"] == dims.total_heads
    assert info["l0_lambda"] == 0.05 and -1 <= info["spearman_with_init"] <= 1
    assert info["lr"] == 5e-3  # the run's lr_select (a task file's default)
    reloaded = load_intervention(tmp_path / "runs" / "jola-seed0.json")
    assert isinstance(reloaded, JoLA) and not reloaded.training
    assert [list(h) for h in reloaded.active_heads] == card["heads"]


# ---------------------------------------------------------------------- ReFT
def random_reft(model, layers=(1,), rank: int = 3, seed: int = 0) -> LoReFT:
    reft = LoReFT.for_model(model, layers, rank=rank, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # away from the initialisation, so a wrong position shows
        reft.source_bias.mul_(20)
    return reft.eval()


def test_loreft_is_h_plus_rt_of_wh_plus_b_minus_rh(tiny_model):
    """The hooked edit against the formula written out by hand, at the last position of an
    unpadded forward (no cache: a sequence's first forward)."""
    reft = random_reft(tiny_model)
    r = torch.linalg.qr(reft.rotation[0].detach())[0].T  # [rank, d_model]
    torch.testing.assert_close(r @ r.T, torch.eye(3), rtol=0, atol=1e-5)  # orthonormal rows
    w, b = reft.weight[0].detach(), reft.source_bias[0].detach()

    def by_hand(h, hook):
        last = h[:, -1]
        edited = last + (last @ w.T + b - last @ r.T) @ r
        return torch.cat([h[:, :-1], edited[:, None]], dim=1)

    with torch.no_grad():
        with attached_hooks(tiny_model, [(resid_post_name(1), by_hand)]):
            expected = tiny_model(TOKENS, return_type="logits")
        got = logits(tiny_model, reft)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert reft.num_trainable_parameters() == 2 * 3 * 32 + 3


def edited_positions(model, reft, run) -> list[torch.Tensor]:
    """Per forward: the [batch, pos] positions whose layer-1 residual ReFT changed."""
    box: dict[str, torch.Tensor] = {}
    changed: list[torch.Tensor] = []

    def before(resid, hook):
        box["before"] = resid.detach().clone()

    def after(resid, hook):
        changed.append((resid.detach() - box.pop("before")).abs().amax(-1) > 0)

    with attached_hooks(model, [(resid_post_name(1), before)]):
        with reft.attach(model):
            with attached_hooks(model, [(resid_post_name(1), after)]):
                run()
    return changed


def test_reft_edits_the_last_prompt_token_of_each_training_row(tiny_model):
    rows = [SFTExample("abc:", "cba."), SFTExample("a:", "a."), SFTExample("abcdef:", "f.")]
    objective = PromptEndObjective(build_objective(tiny_model, rows, 0.5, "clean"))
    reft = random_reft(tiny_model)
    changed = edited_positions(tiny_model, reft, lambda: objective.loss(tiny_model, [0, 1, 2]))
    assert len(changed) == 1
    prompt_lengths = [len(encode_prompt(hf_tokenizer(tiny_model), ex.prompt)) for ex in rows]
    assert [row.nonzero().flatten().tolist() for row in changed[0]] == [[n - 1] for n in prompt_lengths]


def test_reft_dpo_rows_publish_chosen_then_rejected_ends(tiny_model):
    rows = [PreferenceExample("ab:", " yes", " no"), PreferenceExample("abcd:", " no", " yes")]
    inner = build_objective(tiny_model, rows, 0.5, "clean")
    objective = PromptEndObjective(inner)
    reft = random_reft(tiny_model)
    changed = edited_positions(tiny_model, reft, lambda: objective.loss(tiny_model, [0, 1]))
    ends = [len(p) - 1 for p, _ in inner.chosen] + [len(p) - 1 for p, _ in inner.rejected]
    assert [row.nonzero().flatten().tolist() for row in changed[0]] == [[e] for e in ends]


@pytest.mark.parametrize("prompts", [["abc:", "abcdef:"],
                                     # a common start that generation would run once
                                     ["the answer is abc:", "the answer is abcdef:"]])
def test_reft_generation_edits_the_prefill_only_and_matches_a_full_recompute(tiny_model, prompts):
    """Cached greedy decoding with ReFT equals decoding by full forwards in which the
    prompt's last token is edited (and nothing else), for left-padded prompts of two lengths,
    also when they share a long start (ReFT attached: prompts run whole, not split there)."""
    reft = random_reft(tiny_model, layers=(0, 1))
    with reft.attach(tiny_model):
        cached = greedy_generate(tiny_model, prompts, 5, batch_size=2, progress=False)
    tok = hf_tokenizer(tiny_model)
    for prompt, text in zip(prompts, cached):
        ids = encode_prompt(tok, prompt)
        end = torch.tensor([len(ids) - 1])
        new: list[int] = []
        with torch.no_grad(), reft.attach(tiny_model), prompt_ends(end):
            for _ in range(5):
                out = tiny_model(torch.tensor([ids + new]), return_type="logits")
                new.append(int(out[0, -1].argmax()))
        eos = tok.eos_token_id
        new = new[:new.index(eos)] if eos in new else new
        assert text == tok.decode(new, skip_special_tokens=True)
    changed = edited_positions(tiny_model, reft, lambda: greedy_generate(
        tiny_model, prompts, 3, batch_size=2, progress=False))
    assert changed[0].shape[1] > 1 and changed[0][:, -1].all() and not changed[0][:, :-1].any()
    assert all(not c.any() for c in changed[1:])  # decoding steps: nothing edited


def test_reft_mc_scores_agree_between_shared_prefix_and_full_sequences(tiny_model):
    examples = [ChoiceExample("Q: pick red A:", ["red", "blue", "cat"], [0]),
                ChoiceExample("Q: a longer question A:", ["sun", "moon"], [1])]
    reft = random_reft(tiny_model, layers=(1, 2))
    with reft.attach(tiny_model):
        shared = choice_scores(tiny_model, examples, share_prefix=True, protocol="clean", progress=False)
        full = choice_scores(tiny_model, examples, share_prefix=False, protocol="clean", progress=False)
    plain = choice_scores(tiny_model, examples, share_prefix=False, protocol="clean", progress=False)
    for s, f, p in zip(shared, full, plain):
        torch.testing.assert_close(s, f, rtol=0, atol=1e-4)
        assert not torch.allclose(f, p, atol=1e-3)


# ---------------------------------------------------------------------- RepE
def test_reading_vector_is_the_signed_first_component_of_paired_differences():
    """Pairs that differ along e_3 (plus noise) give u = +e_3 and a held-out accuracy of 1."""
    g = torch.Generator().manual_seed(0)
    n_questions, d = 20, 6
    base = torch.randn(n_questions, 1, d, generator=g) * 3  # shared by a question's two rows
    acts = base.repeat(1, 2, 1)
    acts[:, 0, 3] += 2.0  # the true row
    acts[:, 1, 3] -= 2.0
    acts += torch.randn(acts.shape, generator=g) * 0.1
    acts = acts.reshape(2 * n_questions, 1, d)
    found = Statements([("p", "a")] * 2 * n_questions, torch.tensor([1, 0] * n_questions),
                       torch.arange(n_questions).repeat_interleave(2))
    pairs = contrast_pairs(found)
    assert pairs[:2] == [(0, 1, 0), (2, 3, 1)]
    reading = read_directions(acts, pairs, seed=0)
    assert float(reading.direction[0, 3]) > 0.99  # unit norm, so the rest is ~0
    assert float(reading.accuracy[0]) == 1.0
    projected = acts[:, 0] @ reading.direction[0]
    assert float(reading.sigma[0]) == pytest.approx(float(projected.std(unbiased=False)), rel=1e-5)


def test_repe_shift_adds_coeff_sigma_u_at_every_position(tiny_model):
    from lofit_lens.methods.repe import Reading
    from lofit_lens.methods.reft import residual_dims

    dims = residual_dims(tiny_model)
    direction = torch.nn.functional.normalize(torch.randn(dims.n_layers, dims.d_model), dim=-1)
    reading = Reading(direction, torch.rand(dims.n_layers), torch.rand(dims.n_layers) + 0.5, 10)
    shift = repe_shift(dims, reading, [2], coeff=3.0)
    assert shift.num_trainable_parameters() == 0 and shift.trainable() == []
    seen = {}

    def grab(resid, hook, key):
        seen[key] = resid.clone()

    with torch.no_grad():
        with attached_hooks(tiny_model, [(resid_post_name(2), functools.partial(grab, key="base"))]):
            tiny_model(TOKENS, return_type=None)
        with shift.attach(tiny_model):
            with attached_hooks(tiny_model, [(resid_post_name(2), functools.partial(grab, key="shifted"))]):
                tiny_model(TOKENS, return_type=None)
    expected = 3.0 * reading.sigma[2] * direction[2]
    torch.testing.assert_close(seen["shifted"] - seen["base"], expected.expand_as(seen["base"]),
                               rtol=0, atol=1e-5)
    again = ResidualShift.from_saved(shift.spec(), shift.state_tensors())
    torch.testing.assert_close(again.shift, shift.shift)


# ---------------------------------------------------------------------- analysis.method_overlap
def test_method_overlap_scores_every_head_and_compares_top_k(tiny_model, tiny_task_file, tmp_path):
    from analysis.method_overlap import figure
    from lofit_lens.analysis.method_scores import METHODS, method_scores, overlap_rows
    from lofit_lens.methods.jola import JoLAOptions
    from lofit_lens.training import resolve_run

    task, cfg = resolve_run(str(tiny_task_file), None, dict(
        max_train_examples=8, epochs_select=1, epochs_bias=1, max_val_examples=0, protocol="clean"))
    scores, records = method_scores(tiny_model, task, cfg, tmp_path, JoLAOptions(), False)
    assert list(scores) == list(METHODS)
    assert all(tuple(s.shape) == (3, 4) and torch.isfinite(s).all() for s in scores.values())
    assert -1 <= records["jola"]["jola_vs_init"] <= 1
    again, _ = method_scores(tiny_model, task, cfg, tmp_path, JoLAOptions(), False)
    for method in METHODS:  # read back from the cache
        torch.testing.assert_close(again[method], scores[method])

    same = {m: scores["lofit"] for m in METHODS}  # identical rankings: full overlap
    pairs = overlap_rows(same, cfg, "tiny", "reverse", 3)
    assert len(pairs) == 10  # 4 methods: 6 pairs and the diagonal
    assert (pairs.jaccard == 1).all()
    assert pairs.expected_random.tolist() == pytest.approx([3 / 12] * 10)
    assert pairs.p_value.iloc[1] == pytest.approx(1 / math.comb(12, 3))
    pairs = overlap_rows(scores, cfg, "tiny", "reverse", 3)
    row = pairs[(pairs.method_i == "lofit") & (pairs.method_j == "jola")].iloc[0]
    assert row.jaccard == row.intersection / 3
    figure(pairs, 0.25, ["tiny"], ["reverse"])


def test_a_last_position_iti_shift_generates_as_one_prompt_at_a_time(tiny_model):
    """ITI's "last" shift edits the last position of each forward: batched prompts with a
    common start must give what each prompt gives alone (a split at the shared start would
    also edit the start's last token)."""
    shift = ITIShift(model_dims(tiny_model), "last").set_heads(None)  # every head
    with torch.no_grad():
        shift.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))  # the split shows
    prompts = ["the answer is abc:", "the answer is abcdef:", "the answer is x:"]
    with shift.attach(tiny_model):
        batched = greedy_generate(tiny_model, prompts, 5, batch_size=3, progress=False)
        alone = [greedy_generate(tiny_model, [p], 5, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == alone
