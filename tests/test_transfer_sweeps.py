"""Transfer matrix (Fig. 2) and budget sweeps (Fig. 4/5): caching, resume, bootstrap marks.

Training runs on the tiny random Llama with two small generated tasks; the paired bootstrap
is checked on synthetic correctness vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lofit_lens import engine
from lofit_lens.backends.hooked import ModelDims, model_dims
from lofit_lens.analysis.plotting import plot_data_efficiency, plot_k_sweep, save_figure
from lofit_lens.methods.selectors import random_heads
from lofit_lens.store import settings_key
from lofit_lens.analysis.sweeps import data_efficiency, k_sweep
from lofit_lens.training import TrainingSet
from lofit_lens.stats import paired_bootstrap_p, wilson_ci
from lofit_lens.analysis.transfer import compare_to_same_task, significance_mark, transfer_matrix

torch.set_num_threads(1)

BUDGET = dict(epochs_select=1, epochs_bias=1, max_train_examples=8, max_val_examples=0,
              max_eval_examples=3, batch_size=4)


@pytest.fixture
def calls(monkeypatch):
    """Counts the training calls made through the engine."""
    counts = {"select": 0, "tune": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(engine, "select_heads", counting("select", engine.select_heads))
    monkeypatch.setattr(engine, "tune_biases", counting("tune", engine.tune_biases))
    return counts


@pytest.fixture
def evaluations(monkeypatch):
    """Counts the evaluations the engine computes."""
    counts = [0]
    real = engine.evaluate

    def counting(*args, **kwargs):
        counts[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", counting)
    return counts


# ---------------------------------------------------------------------- bootstrap
def test_all_wrong_vs_all_right_is_significant():
    correct = {("a", "a"): [1.0] * 20, ("b", "a"): [0.0] * 20,
               ("a", "b"): [1.0] * 20, ("b", "b"): [1.0] * 20}
    acc, rel, p, marks = compare_to_same_task(correct, ["a", "b"], ["a", "b"])
    assert acc.loc["b", "a"] == 0 and rel.loc["b", "a"] == 0 and rel.loc["a", "a"] == 1
    assert p.loc["b", "a"] == 0 and marks.loc["b", "a"] == "*"
    # equal to same-task: not tested, no mark
    assert np.isnan(p.loc["a", "b"]) and marks.loc["a", "b"] == "" and marks.loc["a", "a"] == ""


def test_paired_bootstrap_matches_closed_form():
    # reference all right, cell wrong on one of 20: p = P(that example never drawn) = 0.95^20
    cell = np.ones(20)
    cell[3] = 0
    p = paired_bootstrap_p(cell, np.ones(20), n_bootstrap=20000, seed=1)
    assert p == pytest.approx(0.95 ** 20, abs=0.015)
    # pairing: a cell equal to the reference except one example behaves the same way
    ref = np.tile([1.0, 0.0], 10)
    worse = ref.copy()
    worse[0] = 0
    assert paired_bootstrap_p(worse, ref, 20000, 1) == pytest.approx(0.95 ** 20, abs=0.015)


def test_marks_thresholds_and_bad_input():
    assert [significance_mark(p) for p in (0.01, 0.049, 0.05, 0.07, 0.1, 0.5)] == \
        ["*", "*", "+", "+", "", ""]
    with pytest.raises(ValueError, match="equal 1-d"):
        paired_bootstrap_p(np.ones(3), np.ones(4))


def test_random_heads_seeded_and_distinct():
    dims = ModelDims(3, 4, 8)
    a, b = random_heads(dims, 5, 0), random_heads(dims, 5, 1)
    assert a == random_heads(dims, 5, 0) and a != b
    assert len(set(a)) == 5 and all(0 <= l < 3 and 0 <= h < 4 for l, h in a)


# ---------------------------------------------------------------------- transfer
def test_transfer_matrix_encodes_each_task_once(tiny_model, arithmetic_tasks, tmp_path, monkeypatch):
    built = []
    build = TrainingSet.build.__func__

    def counting(cls, model, task, cfg):
        built.append(task.name)
        return build(cls, model, task, cfg)

    monkeypatch.setattr(TrainingSet, "build", classmethod(counting))
    transfer_matrix(tiny_model, arithmetic_tasks, k=2, cache_dir=tmp_path, n_bootstrap=10,
                    progress=False, **BUDGET)
    # once per task, shared by its head selection and its 3 cells
    assert sorted(built) == ["double", "succ"]


def test_transfer_matrix_shapes_cache_and_resume(tiny_model, arithmetic_tasks, tmp_path, calls):
    res = transfer_matrix(tiny_model, arithmetic_tasks, k=2, cache_dir=tmp_path / "cache",
                          n_bootstrap=50, progress=False, **BUDGET)
    assert list(res.accuracy.index) == ["double", "succ", "random"]
    assert list(res.accuracy.columns) == ["double", "succ"]
    assert res.marks.shape == res.relative.shape == (3, 2)
    assert calls == {"select": 2, "tune": 6}
    assert len(res.cells) == 6 and not res.cells["cached"].any()
    for _, c in res.cells.iterrows():  # Wilson 95% over the cell's 3 test examples
        assert (c["ci_low"], c["ci_high"]) == pytest.approx(wilson_ci(round(3 * c["accuracy"]), 3))
    assert all("[" in t for row in res.figure().data[0].text for t in row)
    assert all(len(h) == 2 for h in res.heads.values())
    tunes = sorted((tmp_path / "cache").glob("tune-*.json"))
    assert len(tunes) == 6 and len(list((tmp_path / "cache").glob("evaluate-*.json"))) == 6
    card = json.loads(tunes[0].read_text())
    assert {"settings", "key", "value", "tensors_sha256"} <= set(card)
    assert card["settings"]["epochs_bias"] == 1 and len(card["settings"]["heads"]) == 2
    v = load_file(str(tunes[0].with_suffix(".safetensors")))["bias"]  # v, zero off the 2 heads
    assert v.shape == tuple(model_dims(tiny_model)[:3])
    cell = res.cells.iloc[0]
    evaluation = json.loads(Path(cell["file"]).read_text())
    edits = {json.loads(Path(f).read_text())["settings"]["edit"] for f in res.cells["file"]}
    assert evaluation["settings"]["edit"] in edits and len(edits) == 6  # each cell its own v
    assert len(evaluation["value"]["predictions"]) == 3
    assert len(list((tmp_path / "cache").glob("select-*.safetensors"))) == 2

    again = transfer_matrix(tiny_model, arithmetic_tasks, k=2, cache_dir=tmp_path / "cache",
                            n_bootstrap=50, progress=False, **BUDGET)
    assert calls == {"select": 2, "tune": 6}  # nothing recomputed
    assert again.cells["cached"].all()
    pd.testing.assert_frame_equal(again.accuracy, res.accuracy)
    assert again.heads == res.heads


def test_interrupted_transfer_resumes_only_missing_cells(tiny_model, arithmetic_tasks, tmp_path, calls,
                                                         monkeypatch):
    real = engine.tune_biases

    def dies_on_third(*args, **kwargs):
        if calls["tune"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "tune_biases", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        transfer_matrix(tiny_model, arithmetic_tasks, k=2, cache_dir=tmp_path, progress=False, **BUDGET)
    monkeypatch.setattr(engine, "tune_biases", real)
    calls.update(select=0, tune=0)
    res = transfer_matrix(tiny_model, arithmetic_tasks, k=2, cache_dir=tmp_path, progress=False, **BUDGET)
    assert calls == {"select": 0, "tune": 3}  # 2 cells and both selections were on disk
    assert res.cells["cached"].sum() == 3
    assert not list(tmp_path.rglob("*.partial"))


def test_other_settings_are_not_reused(tiny_model, arithmetic_tasks, tmp_path, calls, evaluations):
    transfer_matrix(tiny_model, arithmetic_tasks[:1], k=2, cache_dir=tmp_path, random_heads=False,
                    progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 1}
    transfer_matrix(tiny_model, arithmetic_tasks[:1], k=3, cache_dir=tmp_path, random_heads=False,
                    progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 2}  # same selection, other heads
    transfer_matrix(tiny_model, arithmetic_tasks[:1], k=3, cache_dir=tmp_path, random_heads=False,
                    progress=False, **{**BUDGET, "epochs_select": 2})
    # a new selection; its cell is reused only if it picked the very same heads
    assert calls["select"] == 2
    tuned = calls["tune"]
    transfer_matrix(tiny_model, arithmetic_tasks[:1], k=3, cache_dir=tmp_path, random_heads=False,
                    progress=False, seed=1, **BUDGET)
    assert calls == {"select": 3, "tune": tuned + 1}
    evaluated = evaluations[0]
    transfer_matrix(tiny_model, arithmetic_tasks[:1], k=3, cache_dir=tmp_path, random_heads=False,
                    progress=False, **{**BUDGET, "max_eval_examples": 2})
    # same training (v is read back), other evaluation set: only the evaluation is new
    assert calls == {"select": 3, "tune": tuned + 1} and evaluations[0] == evaluated + 1


def test_task_overrides_and_sources(tiny_model, arithmetic_tasks, tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        transfer_matrix(tiny_model, arithmetic_tasks, cache_dir=tmp_path, progress=False,
                        task_overrides={"nope": {}}, **BUDGET)
    res = transfer_matrix(tiny_model, arithmetic_tasks[1:], sources=arithmetic_tasks[:1], k=2, cache_dir=tmp_path,
                          random_heads=False, progress=False,
                          task_overrides={"succ": {"max_eval_examples": 2}}, **BUDGET)
    # the target's own heads are added as the reference row
    assert list(res.accuracy.index) == ["double", "succ"]
    assert (res.cells["n_eval"] == 2).all()


def test_settings_key_is_order_free():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})


# ---------------------------------------------------------------------- sweeps
def test_k_sweep_shares_cells_and_resumes(tiny_model, arithmetic_tasks, tmp_path, calls):
    frame = k_sweep(tiny_model, arithmetic_tasks[0], fractions=(0.01, 0.1, 0.5), cache_dir=tmp_path,
                    random_heads_too=True, progress=False, **BUDGET)
    lofit = frame[frame["method"] == "lofit"]
    assert list(lofit["k"]) == [1, 1, 6]  # 12 heads: 1% and 10% both round to one head
    assert lofit["file"].iloc[0] == lofit["file"].iloc[1]
    assert set(frame["method"]) == {"lofit", "random", "zero_shot"}
    assert calls == {"select": 1, "tune": 4}
    again = k_sweep(tiny_model, arithmetic_tasks[0], fractions=(0.01, 0.1, 0.5), cache_dir=tmp_path,
                    random_heads_too=True, progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 4} and again["cached"].all()
    assert len(plot_k_sweep(pd.concat([frame, again])).data) >= 2
    assert (frame["ci_low"] <= frame["accuracy"]).all() and (frame["accuracy"] <= frame["ci_high"]).all()
    assert plot_k_sweep(frame).data[0].error_y.array is not None  # error bars from the intervals


def test_cells_are_shared_between_analyses(tiny_model, arithmetic_tasks, tmp_path, calls):
    res = transfer_matrix(tiny_model, arithmetic_tasks[:1], k=2, cache_dir=tmp_path, progress=False,
                          **BUDGET)
    assert calls == {"select": 1, "tune": 2}
    # 2 of 12 heads: the same-task cell is K sweep's lofit point, the random row its random one
    frame = k_sweep(tiny_model, arithmetic_tasks[0], fractions=(2 / 12,), random_heads_too=True,
                    cache_dir=tmp_path, progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 2}
    by_method = frame.set_index("method")["accuracy"]
    assert by_method["lofit"] == res.accuracy.loc["double", "double"]
    assert by_method["random"] == res.accuracy.loc["random", "double"]


def test_data_efficiency_points(tiny_model, arithmetic_tasks, tmp_path, calls):
    frame = data_efficiency(tiny_model, arithmetic_tasks[1], sizes=(4, 8, 100), k=2, cache_dir=tmp_path,
                            progress=False, **BUDGET)
    lofit = frame[frame["method"] == "lofit"]
    assert list(lofit["n_train"]) == [4, 8, 12]  # 100 > the 12 training rows: all of them
    assert calls == {"select": 3, "tune": 3}
    assert frame.loc[frame["method"] == "zero_shot", "n_train"].tolist() == [0]
    data_efficiency(tiny_model, arithmetic_tasks[1], sizes=(4, 8, 100), k=2, cache_dir=tmp_path,
                    progress=False, **BUDGET)
    assert calls == {"select": 3, "tune": 3}
    fig = plot_data_efficiency(frame)
    assert fig.data[0].x.tolist() == [4, 8, 12]


def test_sweep_plot_shares_equal_zero_shot_lines():
    """Two models with the same 0-shot accuracy get one labelled line, not two overlapping."""
    rows = [{"model": m, "task": "t", "method": "zero_shot", "size": 0, "n_train": 0,
             "metric": "exact_match", "accuracy": acc} for m, acc in (("a", 0.0), ("b", 0.0))]
    rows += [{"model": "c", "task": "t", "method": "zero_shot", "size": 0, "n_train": 0,
              "metric": "exact_match", "accuracy": 0.25}]
    rows += [{"model": m, "task": "t", "method": "lofit", "size": 8, "n_train": 8,
              "metric": "exact_match", "accuracy": 0.5} for m in "abc"]
    labels = sorted(a.text for a in plot_data_efficiency(pd.DataFrame(rows)).layout.annotations
                    if a.text.startswith("0-shot"))
    assert labels == ["0-shot a, b", "0-shot c"]


# ---------------------------------------------------------------------- analysis modules
@pytest.mark.parametrize("module", ["fig2_task_specificity", "fig3_granularity",
                                    "fig6_head_similarity", "fig4_fig5_budget"])
def test_analysis_module_writes_figures_and_tables(module, tiny_model, data_dir, tmp_path,
                                                   monkeypatch):
    """Each module end to end on the tiny model (smoke budget, real task data)."""
    mod = __import__(f"analysis.{module}", fromlist=["main"])
    monkeypatch.setattr(mod, "load", lambda name, args: tiny_model)
    html_only = lambda fig, path: save_figure(fig, path, formats=("html",))  # noqa: E731
    monkeypatch.setattr("analysis.common.save_figure", html_only)  # PNG export: seconds each
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--models", "tiny-llama", "--tasks", "mquake", "clutrr", "--budget", "smoke",
            "--max-eval-examples", "3", "--out", str(out), "--cache", str(cache), "--quiet",
            "--paper-numbers", str(tmp_path / "absent.json")] if module != "fig4_fig5_budget" else \
        ["--models", "tiny-llama", "--tasks", "mquake", "--budget", "smoke",
         "--max-eval-examples", "3", "--out", str(out), "--cache", str(cache), "--quiet"]
    assert mod.main(argv) == 0
    written = {p.name for p in out.iterdir()}
    assert "run_info.json" in written
    assert any(n.endswith(".csv") for n in written) and any(n.endswith(".html") for n in written)
    info = json.loads((out / "run_info.json").read_text())
    assert set(info["files"]) <= written
    # a rerun reads everything from the cache
    monkeypatch.setattr(engine, "select_heads", None)
    monkeypatch.setattr(engine, "tune_biases", None)
    assert mod.main(argv) == 0


def test_budget_options(tmp_path):
    from analysis.common import parser, run_options

    args = parser("x", "", k=0.03).parse_args(["--tasks", "truthfulqa", "clutrr"])
    overrides, per_task = run_options(args, args.k)
    assert overrides["max_train_examples"] == 40 and overrides["epochs_select"] == 1
    assert overrides["epochs_bias"] == 3 and overrides["lr_bias"] == 5e-2
    assert per_task["truthfulqa"] == {"max_eval_examples": 24, "extra": {"fold": 0}}
    assert per_task["clutrr"] == {}
    args = parser("x", "", k=0.1).parse_args(["--budget", "paper", "--tasks", "clutrr",
                                              "--max-eval-examples", "0", "--epochs", "2", "3"])
    overrides, per_task = run_options(args, args.k, total_heads=270)
    assert overrides["epochs_select"] == 2 and overrides["epochs_bias"] == 3
    assert per_task["clutrr"] == {"max_eval_examples": None, "l1_lambda": 5e-3,
                                  "lr_select": 5e-4, "lr_bias": 5e-3}
    # Table 6's step-2 rate follows the share of heads K selects, given as count or fraction
    for k, lr in ((0.03, 1e-2), (8, 1e-2), (27, 5e-3), (0.5, 5e-3)):
        assert run_options(args, k, total_heads=270)[1]["clutrr"]["lr_bias"] == lr


def test_paper_tables_parse():
    from analysis import fig2_task_specificity as task_specificity
    from analysis import fig3_granularity as granularity
    from analysis import fig6_head_similarity as head_similarity
    from analysis.common import default_paper_numbers, paper_numbers

    numbers = paper_numbers(default_paper_numbers())
    if numbers is None:
        pytest.skip("paper numbers not found")
    cells = task_specificity.paper_cells(numbers, ["mquake", "clutrr"])
    row = cells.set_index(["model", "source", "target"]).loc[("Llama-2-7B", "random", "mquake")]
    assert row["accuracy"] == 71.9 and row["mark"] == "*"
    assert row["relative"] == pytest.approx(71.9 / 73.4)
    wide = task_specificity.comparison({}, cells)
    assert ("Random", "MQuAKE") in wide.index and "Gemma-7B mark" in wide.columns
    long = head_similarity.paper_matrices(numbers, ["MQuAKE", "Random"])
    assert len(long) == 3 * 4
    results = granularity.paper_results(numbers, ["clutrr"])
    assert [r.k for r in results] == [16, 32, 48]  # Gemma-7B, Llama-2-7B, Llama-2-13B


def test_protocol_comparison_table_beside_the_paper():
    from analysis import tables1_2_baselines as pc

    paper = pc.paper_rows()
    if not paper:
        pytest.skip("paper numbers not found")
    assert paper["lofit"]["clutrr/exact_match"] == 89.7 and paper["zero_shot"]["mquake/exact_match"] == 18.9
    table = pd.DataFrame([{"task": "clutrr", "metric": "exact_match", "method": "lofit",
                           "score": 27.5, "std": 0.0, "params": 1728, "task_wall_seconds": 60.0}])
    text = pc.markdown(table, "m", "small", [0])
    row = next(line for line in text.splitlines() if line.startswith("| lofit |"))
    assert "| 1728 |" in row and "27.5" in row and "89.7" in row
    assert "clutrr 1.0 min" in text


def test_public_head_selection_is_cached_and_matches_the_lower_api(tiny_model, arithmetic_tasks, tmp_path, calls):
    import lofit_lens as ll

    first = ll.head_selection(tiny_model, arithmetic_tasks[0], k=2, seed=0, cache_dir=tmp_path, progress=False, **BUDGET)
    again = ll.head_selection(tiny_model, arithmetic_tasks[0], k=2, seed=0, cache_dir=tmp_path, progress=False, **BUDGET)
    assert calls["select"] == 1 and first.selected_heads == again.selected_heads and first.k == 2
    assert torch.equal(first.head_scores, again.head_scores) and not first.bias.any()
    rand = ll.random_selection(tiny_model, 2, seed=0)
    assert rand.selected_heads == random_heads(model_dims(tiny_model), 2, 0)


def test_a_selection_saved_by_lofit_is_reused_by_transfer_matrix(tiny_model, arithmetic_tasks,
                                                                 tmp_path, calls):
    """One store for step 1: ``ll.lofit(checkpoint=X)`` then ``transfer_matrix(cache_dir=X)``
    on the same settings selects the heads of the task lofit ran once, not twice."""
    import lofit_lens as ll

    ll.lofit(tiny_model, arithmetic_tasks[0], k=2, seed=0, checkpoint=tmp_path, zero_shot=False,
             eval_splits=(), progress=False, **BUDGET)
    assert calls["select"] == 1
    res = transfer_matrix(tiny_model, arithmetic_tasks, k=2, cache_dir=tmp_path, n_bootstrap=50,
                          progress=False, **BUDGET)
    assert calls["select"] == 2  # only the second task's selection was computed
    again = ll.lofit(tiny_model, arithmetic_tasks[0], k=2, seed=0, checkpoint=tmp_path,
                     zero_shot=False, eval_splits=(), progress=False, **BUDGET)
    assert calls["select"] == 2 and res.heads["double"] == again.selected_heads


def test_compare_reuses_the_selection_lofit_saved(tiny_model, arithmetic_tasks, tmp_path, calls,
                                                  evaluations):
    """``compare(out=X)``'s lofit and zero-shot rows are the phases ``ll.lofit(checkpoint=X)``
    saved: no second selection, tuning or evaluation."""
    import lofit_lens as ll

    result = ll.lofit(tiny_model, arithmetic_tasks[0], k=2, seed=0, checkpoint=tmp_path,
                      progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 1} and evaluations == [2]
    frame = ll.compare(tiny_model, arithmetic_tasks[0], methods=["zero_shot", "lofit"], k=2,
                       out=tmp_path, progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 1} and evaluations == [2]
    assert list(frame["method"]) == ["zero_shot", "lofit"]
    for label in ("zero_shot", "lofit"):
        shown = frame.set_index("method").loc[label, "exact_match_mean"]
        assert shown == result.metrics[label]["test"]["exact_match"]


def test_lofit_phases_are_the_analyses_cells(tiny_model, arithmetic_tasks, tmp_path, calls,
                                             evaluations):
    """One engine: ``ll.lofit(checkpoint=X)`` selects, tunes and evaluates (0-shot and LoFiT,
    test split); ``transfer_matrix`` and ``k_sweep`` on X with the same settings then compute
    nothing of that task again: their same-task and 0-shot cells are lofit's phases."""
    import lofit_lens as ll

    result = ll.lofit(tiny_model, arithmetic_tasks[0], k=2, seed=0, checkpoint=tmp_path,
                      progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 1} and evaluations == [2]
    frame = k_sweep(tiny_model, arithmetic_tasks[0], fractions=(2 / 12,), cache_dir=tmp_path,
                    progress=False, **BUDGET)
    assert calls == {"select": 1, "tune": 1} and evaluations == [2] and frame["cached"].all()
    by_method = frame.set_index("method")["accuracy"]
    assert by_method["lofit"] == result.metrics["lofit"]["test"]["exact_match"]
    assert by_method["zero_shot"] == result.metrics["zero_shot"]["test"]["exact_match"]
    transfer_matrix(tiny_model, arithmetic_tasks[:1], k=2, cache_dir=tmp_path, progress=False,
                    **BUDGET)
    assert calls["select"] == 1 and calls["tune"] == 2  # only the random-heads row is new
