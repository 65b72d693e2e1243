"""Baselines on the tiny model: every method end to end, parameter counts, ITI probes, head
selectors, LoRA on hooks, compare's table and resume, and ``lofit`` on a task file."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lofit_lens import engine, lofit
from lofit_lens.errors import ConfigError
from lofit_lens.methods import METHODS, compare, get_method, unregister_method
from lofit_lens.methods.iti import iti_intervention
from lofit_lens.methods.lora import LoRA, train_lora
from lofit_lens.methods.probes import fit_probes, statements
from lofit_lens.methods.selectors import probe_layer_heads
from lofit_lens.backends.hooked import ModelDims, hf_tokenizer, model_dims
from lofit_lens.methods.selectors import random_heads
from lofit_lens.tasks import FileTask
from lofit_lens.training import resolve_run

from conftest import tiny_llama


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
TINY = dict(seeds=[0], k=2, epochs=1, max_train_examples=4, max_eval_examples=2,
            max_val_examples=0, progress=False)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """A generation and a multiple-choice JSONL of 20 rows each (seeded 16/2/2 split)."""
    folder = tmp_path_factory.mktemp("tasks")
    gen, mc = folder / "colors.jsonl", folder / "pick.jsonl"
    gen.write_text("".join(json.dumps({"prompt": f"Q: say {w} A:", "answer": " " + w}) + "\n"
                           for w in WORDS * 2))
    mc.write_text("".join(json.dumps({"prompt": f"Q: pick {w} A:", "correct": 0,
                                      "choices": [w, WORDS[(i + 1) % 10], WORDS[(i + 3) % 10]]}) + "\n"
                          for i, w in enumerate(WORDS * 2)))
    return {"generation": gen, "multiple_choice": mc}


def expected_params(model, k: int) -> dict[str, int]:
    """Trainable parameters per method, LoRA from the HF weight shapes."""
    dims = model_dims(model)
    lora = 0
    for layer in model.original_model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            d_out, d_in = proj.weight.shape
            lora += 8 * d_in + d_out * 8
    heads = k * dims.d_head
    d_model = int(model.cfg.d_model)
    return {"zero_shot": 0, "iti": 0, "lofit": heads, "random": heads, "iti_heads": heads,
            "bias_based": heads, "probe_layers": heads, "red": 2 * dims.total_heads * dims.d_head,
            "lora": lora,
            "jola": 2 * dims.total_heads * dims.d_head + 2 * dims.total_heads,  # A, v, 2 log-alphas
            "reft": dims.n_layers * (2 * 4 * d_model + 4),  # R, W, b (rank 4) on every layer
            "repe": 0}


@pytest.fixture(scope="module")
def mc_run(tiny_model, task_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    frame = compare(tiny_model, str(task_files["multiple_choice"]), methods=list(METHODS),
                    out=out, **TINY)
    return frame, out


def test_every_method_runs_on_multiple_choice(tiny_model, mc_run):
    frame, _ = mc_run
    assert list(frame["method"]) == list(METHODS)
    assert dict(zip(frame["method"], frame["params"])) == expected_params(tiny_model, 2)
    assert expected_params(tiny_model, 2)["lora"] == 3 * 8 * (32 + 32 + 32 + 16)  # GQA: W_V 16 wide
    for m in ("mc1", "mc2", "mc3"):
        assert np.isfinite(frame[f"{m}_mean"]).all()
        # one seed: the mean alone, no spread claimed
        assert not frame[m].str.contains("±").any() and frame[f"{m}_std"].isna().all()
    assert (frame["seconds"] >= 0).all()


def test_every_method_runs_on_generation(tiny_model, task_files):
    frame = compare(tiny_model, str(task_files["generation"]), methods=list(METHODS),
                    extra={"max_new_tokens": 3}, **TINY)
    assert dict(zip(frame["method"], frame["params"])) == expected_params(tiny_model, 2)
    assert frame["exact_match_mean"].between(0, 1).all()
    assert set(frame.columns) >= {"exact_match", "exact_match_mean", "exact_match_std", "params",
                                  "seconds"}


def test_compare_writes_tables_and_resumes_without_retraining(tiny_model, task_files, mc_run,
                                                               monkeypatch, caplog):
    frame, out = mc_run
    saved = pd.read_csv(out / "compare.csv")
    assert list(saved["method"]) == list(METHODS)
    np.testing.assert_allclose(saved["mc2_mean"], frame["mc2_mean"])
    markdown = (out / "compare.md").read_text()
    assert "| method | mc1 | mc2 | mc3 | params | seconds |" in markdown
    assert len(list((out / "runs").glob("*.json"))) == len(METHODS)

    def no_run(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(engine, "evaluate", no_run)
    for name in list(METHODS):
        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], run=no_run))
    again = compare(tiny_model, str(task_files["multiple_choice"]), methods=list(METHODS),
                    out=out, **TINY)
    pd.testing.assert_frame_equal(again, frame)
    monkeypatch.undo()
    compare(tiny_model, str(task_files["multiple_choice"]), methods=["zero_shot"], out=out,
            **{**TINY, "k": 3})
    assert json.loads((out / "runs" / "zero_shot-seed0.json").read_text())["settings"]["config"]["k"] == 3


def test_compare_keeps_per_question_scores_and_bootstraps_mc2(mc_run):
    """Every run keeps its per-question scores, whose means are its metrics, so MC2 and MC3
    get a bootstrap interval over questions (not "-")."""
    frame, out = mc_run
    for card in (out / "runs").glob("*.json"):
        run = json.loads(card.read_text())
        kept = run["per_example"][run["split"]]
        for m in ("mc1", "mc2", "mc3"):
            assert np.mean(kept[m]) == pytest.approx(run["metrics"][run["split"]][m])
    assert frame.attrs["ci"]["mc2"] == "bootstrap over questions"
    for m in ("mc2", "mc3"):
        assert (frame[f"{m}_ci_low"] <= frame[f"{m}_mean"] + 1e-12).all()
        assert (frame[f"{m}_mean"] <= frame[f"{m}_ci_high"] + 1e-12).all()


def test_every_saved_intervention_reloads_and_scores_the_same(tiny_model, task_files, mc_run):
    """compare saves each method's intervention (one store format); reloaded, it gives the
    metrics the run recorded."""
    from lofit_lens.methods import load_intervention
    from lofit_lens.eval.evaluate import split_metrics
    from lofit_lens.tasks import get_task

    _, out = mc_run
    task = get_task(str(task_files["multiple_choice"]))
    kinds = {}
    for name in METHODS:
        card = out / "runs" / f"{name}-seed0.json"
        intervention = load_intervention(card)
        kinds[name] = None if intervention is None else intervention.kind
        recorded = json.loads(card.read_text())
        metrics, _ = split_metrics(tiny_model, task, ("test",), TINY.get("max_eval_examples"),
                                   intervention, 16, False, name)
        assert metrics["test"]["mc2"] == pytest.approx(recorded["metrics"]["test"]["mc2"], abs=1e-6), name
    assert kinds["zero_shot"] is None and kinds["lora"] == "lora" and kinds["iti"] == "iti_shift"
    assert kinds["lofit"] == kinds["red"] == "head"


@pytest.fixture
def last_layers():
    """docs/architecture.md's worked example: one function under @register_selector
    (unregistered afterwards)."""
    from lofit_lens.methods.selectors import register_selector

    @register_selector("last_layers")
    def last_layers(ctx):
        """The K heads of the last layers, filled from the top layer down, sorted."""
        dims = ctx.dims
        heads = [(layer, h) for layer in reversed(range(dims.n_layers)) for h in range(dims.n_heads)]
        return sorted(heads[:ctx.k])

    yield "last_layers"
    unregister_method("last_layers")


def test_a_selector_registered_by_user_code_is_a_method(tiny_model, task_files, last_layers):
    assert get_method(last_layers).doc.startswith("The K heads of the last layers")
    assert get_method(last_layers).options().to_dict() == {}  # options-less
    frame = compare(tiny_model, str(task_files["generation"]), methods=[last_layers],
                    extra={"max_new_tokens": 3}, **TINY)
    assert list(frame["method"]) == ["last_layers"]
    assert int(frame["params"].iloc[0]) == 2 * model_dims(tiny_model).d_head
    with pytest.raises(ValueError, match="already registered"):
        from lofit_lens.methods.selectors import register_selector

        register_selector("last_layers")(lambda ctx: [])


def test_unknown_method_lists_the_known_ones(tiny_model, task_files):
    with pytest.raises(ValueError, match="known methods: zero_shot, iti, lofit"):
        compare(tiny_model, str(task_files["generation"]), methods=["lofit", "no_such_method"], **TINY)


def test_unknown_compare_keywords_are_named(tiny_model, task_files):
    """Keywords are LoFiTConfig fields or ``<method>_<field>`` of a registered method."""
    with pytest.raises(ConfigError, match="Unknown compare keywords: iti_alfa, lora_size"):
        compare(tiny_model, str(task_files["generation"]), methods=["zero_shot"], iti_alfa=1.0,
                lora_size=4, lora_rank=4, **TINY)


def test_every_method_option_has_help_and_a_compare_keyword():
    from lofit_lens.methods.base import option_keywords, split_options

    keywords = option_keywords()
    assert {"iti_alpha", "lora_rank", "lora_alpha", "lora_dropout", "lora_lr", "jola_l0_lambda",
            "jola_lr", "reft_rank", "reft_layers", "reft_lr", "repe_coeff", "repe_layers"} <= set(keywords)
    for method in METHODS.values():
        for field in dataclasses.fields(method.options):
            assert field.metadata["help"], (method.name, field.name)
        options = method.options()
        assert type(options).from_dict(options.to_dict()) == options
    options, rest = split_options({"lora_rank": 16, "iti_alpha": 10, "k": 2})
    assert options == {"lora": get_method("lora").options(rank=16),
                       "iti": get_method("iti").options(alpha=10)}
    assert rest == {"k": 2}


# ---------------------------------------------------------------------- head selectors
def test_random_heads_are_seeded():
    dims = ModelDims(4, 8, 16)
    assert random_heads(dims, 5, seed=3) == random_heads(dims, 5, seed=3)
    assert random_heads(dims, 5, seed=3) != random_heads(dims, 5, seed=4)
    heads = random_heads(dims, 32, seed=0)
    assert len(set(heads)) == 32 and all(0 <= l < 4 and 0 <= h < 8 for l, h in heads)


def test_probe_layers_take_whole_layers_then_the_best_heads():
    accuracy = torch.tensor([[0.5, 0.5, 0.5],
                             [0.9, 0.8, 0.7],   # best layer (mean 0.8)
                             [0.6, 1.0, 0.65]])  # second (0.75): heads by accuracy 1, 2, 0
    assert probe_layer_heads(accuracy, 3) == [(1, 0), (1, 1), (1, 2)]
    assert probe_layer_heads(accuracy, 5) == [(1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]


def synthetic_activations(n_questions=40, answers=4, seed=0):
    """Layer 1 head 2 separates true from false perfectly; every other head is noise."""
    gen = torch.Generator().manual_seed(seed)
    n = n_questions * answers
    labels = torch.arange(n) % 2
    acts = torch.randn(n, 2, 3, 4, generator=gen)
    acts[:, 1, 2, 0] = torch.where(labels == 1, 3.0, -3.0) + 0.1 * torch.randn(n, generator=gen)
    return acts, labels, torch.arange(n) // answers


def test_iti_probes_rank_the_separable_head_first():
    acts, labels, groups = synthetic_activations()
    probes = fit_probes(acts, labels, groups, seed=0)
    assert probes.top(1) == [(1, 2)]
    assert probes.accuracy[1, 2] == 1.0
    assert probes.accuracy.flatten().sort().values[-2] < 0.9
    # theta: unit mean(true) - mean(false), here ~ the first axis; sigma: std of projections.
    theta = probes.direction[1, 2]
    assert float(theta.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float(theta[0]) > 0.99
    projected = acts[:, 1, 2] @ theta
    # np.std as ITI computes it (ddof 0)
    assert float(probes.sigma[1, 2]) == pytest.approx(float(projected.std(unbiased=False)), rel=1e-5)


def test_iti_shift_is_alpha_sigma_theta_with_no_trainable_parameters():
    acts, labels, groups = synthetic_activations()
    probes = fit_probes(acts, labels, groups, seed=0)
    iv = iti_intervention(ModelDims(2, 3, 4), probes, [(1, 2), (0, 1)], alpha=15.0)
    assert iv.num_trainable_parameters() == 0
    torch.testing.assert_close(iv.bias[1, 2], 15.0 * probes.sigma[1, 2] * probes.direction[1, 2])
    assert iv.active_heads == [(0, 1), (1, 2)] and float(iv.bias[0, 0].abs().sum()) == 0


def test_iti_statements_for_generation_use_another_examples_answer(task_files):
    task = FileTask(task_files["generation"])
    examples = task.train_examples(seed=0)[:6]
    found = statements(task, examples, seed=0)
    for (prompt, answer), label, q in zip(found.pairs, found.labels, found.groups):
        ex = examples[int(q)]
        assert prompt == ex.prompt
        assert task.is_correct(task.parse(answer), ex) == bool(label)
    assert found.labels.tolist().count(0) == found.labels.tolist().count(1) == 6


# ---------------------------------------------------------------------- LoRA
def test_lora_trains_without_touching_model_weights(tiny_model, task_files):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    task, cfg = resolve_run(str(task_files["generation"]), None,
                            {"max_train_examples": 4, "epochs_bias": 1, "max_val_examples": 0})
    adapter, history = train_lora(tiny_model, task, cfg, rank=8, alpha=8, dropout=0.1, lr=1e-2,
                                  progress=False)
    assert len(history.step_loss) == 1 and not adapter.training
    for name, param in tiny_model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert float(adapter.q_b.abs().sum()) > 0
    ids = torch.tensor([hf_tokenizer(tiny_model)("Q: say red A:").input_ids])
    with torch.no_grad():
        plain = tiny_model(ids)
        with adapter.attach(tiny_model):
            adapted = tiny_model(ids)
    assert not torch.allclose(plain, adapted)


def test_lora_equals_merged_hf_weights(tiny_model, tiny_tokenizer):
    adapter = LoRA.for_model(tiny_model, rank=2, alpha=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.q_b.normal_(0, 0.3)
        adapter.v_b.normal_(0, 0.3)
    adapter.eval()
    reference = tiny_llama(tiny_tokenizer)  # same seed: same weights, plain HF
    with torch.no_grad():
        for l, layer in enumerate(reference.model.layers):
            layer.self_attn.q_proj.weight += 2.0 * adapter.q_b[l] @ adapter.q_a[l]
            layer.self_attn.v_proj.weight += 2.0 * adapter.v_b[l] @ adapter.v_a[l]
        ids = torch.tensor([tiny_tokenizer("the cat sat on the mat").input_ids])
        with adapter.attach(tiny_model):
            got = tiny_model(ids)
        expected = reference(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- lofit on a file
def test_lofit_on_a_generation_file(tiny_model, task_files):
    result = lofit(tiny_model, str(task_files["generation"]), k=2, epochs=1, max_train_examples=4,
                   max_eval_examples=2, max_val_examples=0, extra={"max_new_tokens": 3},
                   progress=False)
    assert 0 <= result.metrics["lofit"]["test"]["exact_match"] <= 1
    assert len(result.selected_heads) == 2
    assert result.history.tune.trainable_parameters == 2 * model_dims(tiny_model).d_head


def test_lofit_on_a_multiple_choice_file_with_dpo(tiny_model, task_files):
    result = lofit(tiny_model, str(task_files["multiple_choice"]), k=2, epochs=1,
                   max_train_examples=4, max_eval_examples=2, max_val_examples=0,
                   extra={"loss": "dpo"}, progress=False)
    assert result.config.extra == {"loss": "dpo"}
    # DPO starts at log 2 (policy == reference up to the 1e-3 init); SFT would be ~log(vocab).
    assert result.history.tune.step_loss[0] == pytest.approx(math.log(2), abs=0.01)
    for m in ("mc1", "mc2", "mc3"):
        assert 0 <= result.metrics["lofit"]["test"][m] <= 1


def test_cli_compare_prints_the_table(tiny_model, task_files, tmp_path, monkeypatch, capsys):
    import lofit_lens
    from lofit_lens.cli import main

    monkeypatch.setattr(lofit_lens, "load_model", lambda name, device=None: tiny_model)
    args = ["compare", "--task", str(task_files["multiple_choice"]), "--k", "2", "--epochs", "1",
            "--max-train-examples", "4", "--max-eval-examples", "2", "--quiet",
            "--out", str(tmp_path)]
    assert main(args + ["--methods", "zero_shot", "random"]) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and (tmp_path / "compare.md").is_file()
    assert main(args + ["--methods", "lofit", "no_such_method"]) == 2
    assert "known methods" in capsys.readouterr().err


def test_summary_table_spread_over_seeds():
    from lofit_lens.methods.compare import summary_table

    cells = [{"method": "lofit", "split": "test", "fold": None, "seed": s, "params": 512,
              "seconds": 1.0, "metrics": {"test": {"exact_match": v, "n": 10}}}
             for s, v in ((0, 0.2), (1, 0.4))]
    row = summary_table(cells, ["lofit"]).iloc[0]
    assert row["exact_match"] == "30.0 ± 14.1"  # sample std of (20, 40)
    assert row["exact_match_mean"] == pytest.approx(0.3)


def test_dpo_reference_is_computed_once_per_run(tiny_model, task_files, monkeypatch):
    import lofit_lens as ll
    from lofit_lens.objectives import DPOObjective

    built = []
    original = DPOObjective.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DPOObjective, "__init__", counting)
    ll.lofit(tiny_model, str(task_files["multiple_choice"]), k=2, epochs=1, max_train_examples=6,
             max_val_examples=4, eval_splits=(), extra={"loss": "dpo"}, progress=False)
    assert len(built) == 2  # train + val, shared by both steps


def test_compare_runs_are_keyed_by_what_changes_results(tiny_model, task_files, tmp_path,
                                                         monkeypatch):
    """A run is read back when only speed settings changed; a method's own option recomputes
    that method alone (its evaluation too), not the others."""
    task = str(task_files["generation"])
    methods = ["random", "iti"]
    first = compare(tiny_model, task, methods=methods, out=tmp_path, **TINY)
    evaluated = []
    real = engine.evaluate

    def counting(model, task_, rows, intervention, *args, **kwargs):
        evaluated.append(kwargs.get("desc", ""))
        return real(model, task_, rows, intervention, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", counting)
    again = compare(tiny_model, task, methods=methods, out=tmp_path,
                    **{**TINY, "eval_batch_size": 7, "prefix_cache_mb": 0.0})
    assert evaluated == []
    pd.testing.assert_frame_equal(again, first)
    compare(tiny_model, task, methods=methods, out=tmp_path, iti_alpha=1.0, **TINY)
    assert [d.split()[0] for d in evaluated] == ["iti"]
