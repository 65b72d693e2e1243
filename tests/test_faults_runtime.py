"""Runtime faults get named errors, and nothing is lost silently.

- Prompts longer than the model's context (``cfg.n_ctx``): evaluation cuts them from the
  left and counts them in the metrics (``truncated_prompts``); training refuses them with
  ``PromptTooLongError``. Checked on an absolute-position model (GPT-2 layout, where a long
  input used to die with an IndexError in the embedding) and a rotary one (Llama layout,
  where it used to run past n_ctx silently).
- A plain Hugging Face model: ``UnsupportedModelError`` from the first function that touches it.
- A task file too small to give train and test rows: ``DataError`` before any model is loaded.
"""

from __future__ import annotations

import json

import pytest
import torch

import lofit_lens as ll
from lofit_lens.backends.hooked import model_dims
from lofit_lens.batching import fit_prompt
from lofit_lens.errors import PromptTooLongError, UnsupportedModelError
from lofit_lens.eval.evaluate import evaluate
from lofit_lens.eval.generation import greedy_generate
from lofit_lens.eval.mc_scoring import choice_scores
from lofit_lens.intervention import HeadIntervention
from lofit_lens.objectives import build_objective
from lofit_lens.tasks import FileTask
from lofit_lens.tasks.base import ChoiceExample, DataError, PreferenceExample, SFTExample

NEW_TOKENS = 4
SHORT = ["abc:", "hello there:", "q: 2+2? a:"]
LONG = "the quick brown fox jumps over the lazy dog. " * 2 + "q: colour of the sky? a:"


def _bridge(name: str, hf_model, tokenizer):
    transformer_bridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge
    from lofit_lens.backends.hf import finish

    hf_model.config.architectures = [type(hf_model).__name__]
    model = transformer_bridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer,
                                                 device="cpu", dtype=torch.float32)
    model.cfg.default_prepend_bos = False
    return finish(model, name, tokenizer)


@pytest.fixture(scope="module", params=["absolute", "rotary"])
def short_model(request, tiny_tokenizer):
    """A tiny model with a small context: GPT-2 layout (learned absolute positions, n_ctx 32)
    or Llama layout (rotary, n_ctx 40)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import tiny_llama

    tok = tiny_tokenizer
    if request.param == "absolute":
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)).eval()
        model = _bridge("gpt2", hf, tok)
        assert model.cfg.positional_embedding_type == "standard" and model.cfg.n_ctx == 32
    else:
        hf = tiny_llama(tok)
        hf.config.max_position_embeddings = 40
        model = _bridge("tiny-llama", hf, tok)
        assert model.cfg.positional_embedding_type == "rotary" and model.cfg.n_ctx == 40
    return model


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _generation_task(folder, prompts):
    rows = [{"prompt": p, "answer": " x", "split": "test"} for p in prompts]
    rows.append({"prompt": "abc:", "answer": " cba", "split": "train"})
    return FileTask(_write_rows(folder / "gen.jsonl", rows), max_new_tokens=NEW_TOKENS)


# ------------------------------------------------------------------ row 1: context length
def test_fit_prompt_rule():
    ids = [1, 5, 6, 7, 8, 9]
    assert fit_prompt(ids, 2, 10, bos=1) == (ids, 0)  # fits: untouched, the same list
    assert fit_prompt(ids, 2, 10, bos=1)[0] is ids
    assert fit_prompt(ids, 2, 5, bos=1) == ([1, 8, 9], 3)  # left cut, BOS kept
    assert fit_prompt(ids, 2, 5, bos=None) == ([7, 8, 9], 3)
    assert fit_prompt(ids, 2, None, bos=1) == (ids, 0)  # no n_ctx known: untouched
    with pytest.raises(PromptTooLongError, match="no room"):
        fit_prompt(ids, 5, 5, bos=None)


def test_over_long_generation_prompt_is_cut_from_the_left(short_model, tmp_path):
    model, tok = short_model, short_model.hf_tokenizer
    n_ctx = model.cfg.n_ctx
    assert len(tok(LONG).input_ids) == len(LONG) > n_ctx  # one token per character
    if model.cfg.positional_embedding_type == "standard":  # the hazard being fixed
        with pytest.raises(IndexError):
            model(torch.tensor([tok(LONG).input_ids]))

    task = _generation_task(tmp_path, SHORT + [LONG])
    metrics, rows = evaluate(model, task, task.examples("test"), batch_size=4, progress=False)
    assert metrics["truncated_prompts"] == 1 and metrics["n"] == 4
    assert rows[3]["truncated_tokens"] == len(LONG) - (n_ctx - NEW_TOKENS)
    assert all("truncated_tokens" not in r for r in rows[:3])
    # The model saw the prompt's last n_ctx - max_new_tokens tokens.
    tail = LONG[-(n_ctx - NEW_TOKENS):]
    assert rows[3]["completion"] == greedy_generate(model, [tail], NEW_TOKENS, task.stop_strings,
                                                    progress=False)[0]

    # Prompts that fit: the same results as alone, and as with no context limit at all.
    short_task = _generation_task(tmp_path, SHORT)
    short_metrics, short_rows = evaluate(model, short_task, short_task.examples("test"),
                                         batch_size=4, progress=False)
    assert short_metrics["truncated_prompts"] == 0
    assert [r["completion"] for r in short_rows] == [r["completion"] for r in rows[:3]]
    plain = greedy_generate(model, SHORT, NEW_TOKENS, task.stop_strings, progress=False)
    n_ctx_before = model.cfg.n_ctx
    try:
        model.cfg.n_ctx = 10**6  # the rule never triggers: the code path before the rule
        unlimited = greedy_generate(model, SHORT, NEW_TOKENS, task.stop_strings, progress=False)
    finally:
        model.cfg.n_ctx = n_ctx_before
    assert plain == unlimited == [r["completion"] for r in short_rows]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_over_long_choice_prompt_is_cut_from_the_left(short_model, share_prefix):
    model, n_ctx = short_model, short_model.cfg.n_ctx
    long_ex = ChoiceExample(LONG, ("blue", "green", "red"), (0,))
    # A short prompt with a long answer in the same group: its answer padding must not make
    # the cut example's positions run past n_ctx (absolute positions).
    wide = ChoiceExample("q: pick? a:", ("a much longer answer", "x"), (1,))
    truncated: dict[int, int] = {}
    got = choice_scores(model, [wide, long_ex], progress=False, share_prefix=share_prefix,
                        truncated=truncated)
    keep = n_ctx - len(" green")  # the longest answer, one token per character
    assert truncated == {1: len(LONG) - keep}
    cut = ChoiceExample(LONG[-keep:], long_ex.choices, long_ex.correct)
    alone = choice_scores(model, [cut], progress=False, share_prefix=share_prefix)[0]
    torch.testing.assert_close(got[1], alone, rtol=0, atol=1e-5)
    wide_alone = choice_scores(model, [wide], progress=False, share_prefix=share_prefix)[0]
    torch.testing.assert_close(got[0], wide_alone, rtol=0, atol=1e-5)


def test_over_long_choice_prompt_counts_in_mc_metrics(short_model, tmp_path):
    rows = [{"prompt": p, "choices": ["blue", "green"], "correct": 0, "split": "test"}
            for p in SHORT + [LONG]]
    rows.append({"prompt": "abc:", "choices": ["x", "y"], "correct": 0, "split": "train"})
    task = FileTask(_write_rows(tmp_path / "mc.jsonl", rows))
    metrics, preds = evaluate(short_model, task, task.examples("test"), progress=False)
    assert metrics["truncated_prompts"] == 1 and set(metrics) == {"mc1", "mc2", "mc3", "n",
                                                                  "truncated_prompts"}
    assert preds[3]["truncated_tokens"] == len(LONG) - (short_model.cfg.n_ctx - len(" green"))
    short, _ = evaluate(short_model, task, task.examples("test")[:3], progress=False)
    assert short["truncated_prompts"] == 0


def test_over_long_training_example_is_refused_before_training(short_model, tmp_path):
    with pytest.raises(PromptTooLongError, match=r"mine train examples.*example 1 \("):
        build_objective(short_model, [SFTExample("abc:", " cba"), SFTExample(LONG, " blue")],
                        0.1, where="mine train")
    with pytest.raises(PromptTooLongError, match="rejected answer"):
        prompt = "a" * (short_model.cfg.n_ctx - len(" yes"))  # the chosen answer fits
        build_objective(short_model, [PreferenceExample(prompt, " yes", " a long no!")],
                        0.1, protocol="clean")

    rows = [{"prompt": "abc:", "answer": " cba", "split": "train"},
            {"prompt": LONG, "answer": " blue", "split": "train"},
            {"prompt": "abc:", "answer": " cba", "split": "test"}]
    task = FileTask(_write_rows(tmp_path / "train_long.jsonl", rows))
    with pytest.raises(PromptTooLongError, match="do not fit the model's context"):
        ll.lofit(short_model, task, k=1, epochs=1, eval_splits=(), progress=False)


@pytest.mark.slow
def test_smollm2_context_is_read_from_the_bridge_cfg(smollm2):
    """The embedded SmolLM2's bridge holds its 8192-token context (no paper prompt is near it)."""
    from lofit_lens.batching import context_length

    assert context_length(smollm2) == 8192


# ------------------------------------------------------------------ row 2: plain HF model
def test_plain_hf_model_is_a_named_error(tiny_hf, tiny_task_file):
    task = FileTask(tiny_task_file)
    calls = [
        lambda: model_dims(tiny_hf),
        lambda: HeadIntervention.for_model(tiny_hf),
        lambda: ll.lofit(tiny_hf, task, k=1, epochs=1, progress=False),
        lambda: evaluate(tiny_hf, task, task.examples("test"), progress=False),
        lambda: greedy_generate(tiny_hf, ["abc:"], 2, progress=False),
        lambda: choice_scores(tiny_hf, [ChoiceExample("q:", ("a", "b"), (0,))], progress=False),
        lambda: build_objective(tiny_hf, [SFTExample("abc:", " cba")], 0.1),
    ]
    for call in calls:
        with pytest.raises(UnsupportedModelError) as err:
            call()
        message = str(err.value)
        assert "LlamaForCausalLM is a plain Hugging Face model" in message
        assert "lofit_lens.load_model(name)" in message and "TransformerBridge" in message
        assert isinstance(err.value, TypeError)  # what callers caught before


def test_hooked_models_pass_the_check(tiny_model):
    assert model_dims(tiny_model).n_heads == 4


# ------------------------------------------------------------------ row 3: too few rows
def test_file_too_small_to_split_fails_when_built(tmp_path):
    rows = [{"prompt": f"Q: {i}? A:", "answer": f" {i}"} for i in range(9)]
    path = _write_rows(tmp_path / "nine.jsonl", rows)
    with pytest.raises(DataError) as err:
        FileTask(path)
    message = str(err.value)
    assert str(path) in message and "9 rows give train 9, val 0, test 0" in message
    assert "at least 10 rows" in message
    assert len(FileTask(_write_rows(tmp_path / "ten.jsonl", rows + rows[:1])).examples("test")) == 1

    column = _write_rows(tmp_path / "col.jsonl", [{**r, "split": "train"} for r in rows])
    with pytest.raises(DataError, match=r"col\.jsonl: 9 rows give train 9, val 0, test 0"):
        FileTask(column)
    with pytest.raises(DataError, match=r"no test rows; pass a file"):
        FileTask({"train": path})


def test_cli_reports_a_too_small_file_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from lofit_lens.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the task file was checked")

    monkeypatch.setattr("lofit_lens.load_model", no_model)
    path = _write_rows(tmp_path / "few.jsonl", [{"prompt": "Q: a? A:", "answer": " b"}] * 3)
    assert main(["run", "--task", str(path), "--model", "smollm2-135m",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "few.jsonl: 3 rows give train 3, val 0, test 0" in err
