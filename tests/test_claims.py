"""lofit_lens.analysis.claims (with claims_data, claims_tests, claims_report): the whole
pipeline on the tiny model (seconds), its test subsets, the head-set statistics and the
verdict rules."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lofit_lens import stats
from lofit_lens.analysis.claim_figures import ClaimFigures, claim_figures
from lofit_lens.analysis.claims import replicate_claims
from lofit_lens.analysis.claims_data import seed_subsets
from lofit_lens.analysis.claims_report import COLUMNS
from lofit_lens.analysis.claims_tests import band_test, band_width, finish_family, overlap_test
from lofit_lens.methods import METHODS
from lofit_lens.training import resolve_run

torch.set_num_threads(1)

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "owl", "fox"]
# seconds-scale: 8 training examples, 1 + 1 epochs, 4 test examples per seed
TINY = dict(max_train_examples=8, epochs_select=1, epochs_bias=1, max_val_examples=0,
            batch_size=4, max_eval_examples=4)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def task_paths(tmp_path_factory):
    """Two generation tasks and a multiple-choice task, 12 train / 24 test rows each."""
    folder = tmp_path_factory.mktemp("claims_tasks")
    split = lambda i: "train" if i < 12 else "test"  # noqa: E731
    say = [{"prompt": f"Q: {i} say {w} A:", "answer": " " + w, "split": split(i)}
           for i, w in enumerate(WORDS * 3)]
    succ = [{"prompt": f"Q: after {w} A:", "answer": " " + WORDS[(i + 1) % 12], "split": split(i)}
            for i, w in enumerate(WORDS * 3)]
    pick = [{"prompt": f"Q: pick {w} A:", "correct": 0, "split": split(i),
             "choices": [w, WORDS[(i + 1) % 12], WORDS[(i + 5) % 12]]}
            for i, w in enumerate(WORDS * 3)]
    return {"say": _write(folder / "say.jsonl", say), "succ": _write(folder / "succ.jsonl", succ),
            "pick": _write(folder / "pick.jsonl", pick)}


@pytest.fixture(scope="module")
def report(tiny_model, task_paths, tmp_path_factory):
    cache = tmp_path_factory.mktemp("claims_cache")
    result = replicate_claims(tiny_model, tasks=[task_paths["say"], task_paths["pick"]],
                              selection_tasks=[task_paths["succ"]], budget="smoke", seeds=(0, 1, 2),
                              cache_dir=cache, k=3, n_bootstrap=200, n_permutations=2000,
                              n_draws=500, log=None, **TINY)
    return result, cache


# ---------------------------------------------------------------------- the pipeline
def test_pipeline_table_columns_and_rows(report):
    result, _ = report
    frame = result.claims
    assert list(frame.columns[:len(COLUMNS)]) == COLUMNS
    # 1: lofit > random, lofit > iti_heads; 2; 3; 4; 5: lofit > iti, lofit > zero_shot
    assert sorted(frame["claim"]) == ["1", "1", "2", "3", "4", "5", "5"]
    assert (frame["model"] == "tiny-llama").all() and (frame["seeds"] == "0,1,2").all()
    paired = frame[frame["unit"] == "examples"]
    assert (paired["n"] == 2 * 3 * 4).all()  # 2 evaluated tasks x 3 seeds x 4 examples
    assert (frame["family_size"] == 7).all()
    assert frame["p"].between(0, 1).all() and (frame["p_holm"] >= frame["p"] - 1e-12).all()
    assert set(frame.loc[frame["claim"] == "1", "test"]) == {"exact McNemar"}
    # MC2 of the multiple-choice task: the permutation test, the sign test beside it
    mc2 = result.details[result.details["metric"] == "mc2"]
    assert len(mc2) == 4 and (mc2["test"] == "paired permutation").all()
    assert mc2["p_sign_test"].between(0, 1).all()
    # the paper's bootstrap beside every paired test
    assert result.details.loc[result.details["unit"] == "examples", "p_bootstrap_paper"].notna().all()


def test_verdicts_follow_the_corrected_p_values(report):
    result, _ = report
    for frame in (result.claims, result.details):
        for _, row in frame.iterrows():
            supported = row["effect"] > 0 and row["p_holm"] < 0.05
            assert (row["verdict"] == "supported") == supported, row.to_dict()
            underpowered = (not supported and row["effect"] > 0
                            and math.isfinite(row["n_needed_holm"]) and row["n_needed_holm"] > row["n"])
            assert row["verdict"].startswith("underpowered") == underpowered, row.to_dict()
            if underpowered:
                assert "n ≈" in row["verdict"] and "needed" in row["verdict"]


def test_holm_families(report):
    result, _ = report
    for (claim, _), family in result.details.groupby(["claim", "model"]):
        adjusted = stats.holm(family["p"].to_list())
        np.testing.assert_allclose(family["p_holm"], adjusted)
        assert (family["family_size"] == len(family)).all()


def test_accuracy_has_intervals_and_stability_its_random_expectation(report):
    result, _ = report
    acc = result.accuracy
    assert {"zero_shot", "iti", "random", "iti_heads", "lofit"} <= set(acc["method"])
    assert ((acc["ci_low"] <= acc["score"] + 1e-12) & (acc["score"] <= acc["ci_high"] + 1e-12)).all()
    assert set(acc.loc[acc["metric"] == "mc2", "ci"]) == {"bootstrap over questions"}
    assert set(acc.loc[acc["metric"] != "mc2", "ci"]) == {"Wilson"}
    pooled = acc[acc["seed"] == "pooled"]
    assert (pooled["n"] == 12).all()
    stab = result.stability
    assert {"say", "pick", "succ"} <= set(stab["task"])
    assert stab["jaccard_random"].to_list() == pytest.approx([3 / 12] * len(stab))  # K / N
    assert len(result.selections) == 3 * 3 and (result.selections["k"] == 3).all()


def test_report_saves_markdown_and_csv(report, tmp_path):
    result, _ = report
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"claims.csv", "details.csv", "accuracy.csv",
                                       "selections.csv", "stability.csv", "claims.md"}
    text = (tmp_path / "claims.md").read_text()
    assert "| claim | model | contrast |" in text and "paired bootstrap p (paper's)" in text
    assert pd.read_csv(tmp_path / "claims.csv")["claim"].astype(str).tolist() == \
        result.claims["claim"].tolist()


def test_rerun_reads_every_cell_from_the_cache(report, tiny_model, task_paths, monkeypatch):
    result, cache = report

    def no_training(*args, **kwargs):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr("lofit_lens.engine.select_heads", no_training)
    monkeypatch.setattr("lofit_lens.engine.tune_biases", no_training)
    monkeypatch.setattr("lofit_lens.engine.evaluate", no_training)
    monkeypatch.setitem(METHODS, "iti", dataclasses.replace(METHODS["iti"], run=no_training))
    again = replicate_claims(tiny_model, tasks=[task_paths["say"], task_paths["pick"]],
                             selection_tasks=[task_paths["succ"]], budget="smoke", seeds=(0, 1, 2),
                             cache_dir=cache, k=3, n_bootstrap=200, n_permutations=2000,
                             n_draws=500, log=None, **TINY)
    pd.testing.assert_frame_equal(again.claims, result.claims)


# ---------------------------------------------------------------------- test subsets
def test_seed_subsets_are_random_disjoint_and_not_the_top(task_paths):
    task, _ = resolve_run(task_paths["say"], None, {})
    test = task.examples("test")
    subsets = seed_subsets(task, [2, 0, 1], 5)
    rows = {s: t.eval_examples("test") for s, t in subsets.items()}
    assert all(len(r) == 5 for r in rows.values())
    prompts = [{ex.prompt for ex in r} for r in rows.values()]
    assert all(not (a & b) for i, a in enumerate(prompts) for b in prompts[i + 1:])
    assert {ex.prompt for ex in rows[0]} != {ex.prompt for ex in test[:5]}
    # the rest of the task is untouched: training rows, other splits, its description
    assert subsets[0].train_examples(0) == task.train_examples(0)
    assert subsets[0].describe() == task.describe()
    assert len(task.eval_examples("test")) == 24
    # too many rows asked: the split is cut into equal parts (with a note)
    notes = []
    assert all(len(t.eval_examples("test")) == 8 for t in seed_subsets(task, [0, 1, 2], 50, notes.append).values())
    assert notes and "disjoint subsets of 8" in notes[0]


# ---------------------------------------------------------------------- head-set statistics
def test_band_width_by_hand():
    assert band_width(np.array([0, 3, 1, 0, 2])) == 1  # half of 6 = 3 heads, all in layer 1
    assert band_width(np.array([1, 1, 1, 1])) == 2
    assert band_width(np.array([2, 0, 0, 0, 1, 1])) == 1
    assert band_width(np.array([1, 0, 0, 0, 0, 1, 0, 1])) == 3  # 2 of 3 heads: layers 5..7
    assert list(band_width(np.array([[1, 1, 1, 1], [0, 4, 0, 0]]))) == [2, 1]


def test_band_test_tells_a_band_from_chance():
    band = [[(10, h) for h in range(6)] + [(11, 0), (11, 1)] for _ in range(3)]
    result = band_test(band, n_layers=30, n_heads=9, n_draws=2000)
    assert result["observed"] == 1 and result["effect"] > 5 and result["p"] < 0.01
    spread = [[(l, 0) for l in range(0, 30, 4)] for _ in range(3)]  # one head every 4 layers
    assert band_test(spread, 30, 9, n_draws=2000)["p"] > 0.5


def test_overlap_test_exact_permutation():
    a = [(0, 0), (0, 1), (1, 0)]
    b = [(2, 0), (2, 1), (3, 0)]
    c = [(4, 0), (4, 1), (5, 0)]
    sets = {(t, s): heads for t, heads in (("a", a), ("b", b), ("c", c)) for s in range(3)}
    result = overlap_test(sets, n_bootstrap=200)
    assert result["effect"] == pytest.approx(1.0)  # identical within tasks, disjoint across
    assert result["p"] == pytest.approx(6 / 1680)  # the 3! relabelings of the true partition
    assert result["min_p"] == pytest.approx(6 / 1680)  # already the smallest attainable
    # shuffled: the same head set on every task and seed gives no within/across difference
    same = {key: a for key in sets}
    assert overlap_test(same, n_bootstrap=50)["effect"] == pytest.approx(0.0)


def test_finish_family_underpowered_and_supported():
    rows = [
        {"test": "exact McNemar", "n": 60, "effect": 0.05, "p": 0.2, "p10": 0.1, "p01": 0.05},
        {"test": "exact McNemar", "n": 200, "effect": 0.2, "p": 1e-6, "p10": 0.25, "p01": 0.05},
        {"test": "exact McNemar", "n": 60, "effect": -0.05, "p": 0.9, "p10": 0.05, "p01": 0.1},
    ]
    out = finish_family(rows)
    assert out[0]["verdict"].startswith("underpowered (n ≈") and out[0]["n_needed_holm"] > 60
    assert out[0]["n_needed_holm"] == stats.mcnemar_n_needed(0.1, 0.05, 0.05 / 3)
    assert out[1]["verdict"] == "supported" and out[1]["p_holm"] == pytest.approx(3e-6)
    assert out[2]["verdict"] == "not supported" and out[2]["n_needed_holm"] == math.inf


def test_selection_only_tests_claims_3_and_4(report, tiny_model, task_paths):
    result, cache = report
    only = replicate_claims(tiny_model, tasks=[],
                            selection_tasks=[task_paths["say"], task_paths["pick"], task_paths["succ"]],
                            budget="smoke", seeds=(0, 1, 2), cache_dir=cache, k=3, n_bootstrap=200,
                            n_permutations=2000, n_draws=500, log=None, **TINY)
    assert sorted(only.claims["claim"]) == ["3", "4"] and (only.claims["family_size"] == 2).all()
    full = result.claims.set_index("claim")
    for _, row in only.claims.iterrows():  # the same head sets as the full run's
        assert row["effect"] == pytest.approx(full.loc[row["claim"], "effect"])
    assert only.accuracy.empty and len(only.selections) == 9
    assert "(no task evaluated)" in only.markdown()


def test_without_transfer_claim_2_is_skipped_and_the_rest_read_back(report, tiny_model,
                                                                    task_paths):
    result, cache = report
    lines = []
    skipped = replicate_claims(tiny_model, tasks=[task_paths["say"], task_paths["pick"]],
                               selection_tasks=[task_paths["succ"]], budget="smoke",
                               seeds=(0, 1, 2), cache_dir=cache, k=3, n_bootstrap=200,
                               n_permutations=2000, n_draws=500, log=lines.append,
                               transfer=False, **TINY)
    assert sorted(skipped.claims["claim"]) == ["1", "1", "3", "4", "5", "5"]
    assert "transfer cells skipped: claim 2 not tested" in lines
    assert not any(" heads -> " in line for line in lines)  # no transfer cell computed
    assert all("(cached)" in line for line in lines if " s wall" in line)
    full = result.claims.set_index(["claim", "contrast"])
    for _, row in skipped.claims.iterrows():  # the same cells as the full run's
        assert row["effect"] == pytest.approx(full.loc[(row["claim"], row["contrast"]), "effect"])
    assert skipped.settings["tiny-llama"]["transfer"] is False
    assert result.settings["tiny-llama"]["transfer"] is True


# ---------------------------------------------------------------------- Fig. 2/4/5 with CIs
@pytest.fixture(scope="module")
def figures(report, tiny_model, task_paths):
    _, cache = report
    return claim_figures(tiny_model, tasks=[task_paths["say"], task_paths["pick"]],
                         sources=[task_paths["succ"]], budget="smoke", seeds=(0, 1, 2),
                         cache_dir=cache, k=3, fractions=(0.1, 0.25, 0.5), sizes=(4, 8),
                         log=None, **TINY)


def test_claim_figures_read_the_claims_cells_back(report, figures):
    result, _ = report
    pooled = {name: frame[frame["seed"] == "pooled"].set_index(
        ["task", *({"transfer": ["source"], "k_sweep": ["method", "k"],
                    "data_efficiency": ["method", "size"]}[name])])
        for name, frame in (("transfer", figures.transfer), ("k_sweep", figures.k_sweep),
                            ("data_efficiency", figures.data_efficiency))}
    acc = result.accuracy[(result.accuracy["seed"] == "pooled") & (result.accuracy["metric"] != "mc2")]
    acc = acc.set_index(["task", "method"])["score"]
    for task in ("say", "pick"):
        other = "pick" if task == "say" else "say"
        for source, method in ((task, "lofit"), (other, f"heads:{other}"), ("random", "random")):
            row = pooled["transfer"].loc[(task, source)]
            assert row["cached"] and row["accuracy"] == pytest.approx(acc[task, method])
            assert row["n"] == 12 and row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert not pooled["transfer"].loc[(task, "succ"), "cached"]  # not a claims cell
        # the budget's K (3) and training size (8) are the claims' LoFiT cells
        assert pooled["k_sweep"].loc[(task, "lofit", 3), "cached"]
        assert pooled["k_sweep"].loc[(task, "lofit", 3), "accuracy"] == pytest.approx(acc[task, "lofit"])
        assert pooled["data_efficiency"].loc[(task, "lofit", 8), "cached"]
        assert pooled["data_efficiency"].loc[(task, "lofit", 4), "n_train"] == 4
        assert pooled["k_sweep"].loc[(task, "zero_shot", 0), "accuracy"] == pytest.approx(acc[task, "zero_shot"])


def test_claim_figures_tests_and_holm(report, figures):
    result, _ = report
    details = result.details[result.details["claim"] == "2"].set_index("contrast")
    transfer = figures.transfer[figures.transfer["seed"] == "pooled"]
    tested = transfer[transfer["source"] != transfer["task"]]
    assert len(tested) == 2 * 3 and (tested["reference"] != "").all()
    np.testing.assert_allclose(tested["p_holm"], stats.holm(tested["p"].to_list()))
    for _, row in tested[tested["source"].isin(["say", "pick"])].iterrows():  # the claims' own p
        assert row["p"] == pytest.approx(
            details.loc[f"{row['task']} heads > {row['source']} heads on {row['task']}", "p"])
    assert set(tested.loc[tested["p_holm"] < 0.05, "mark"]) <= {"*"}
    assert ((tested["effect_low"] <= tested["effect"]) & (tested["effect"] <= tested["effect_high"])).all()
    for frame, reference in ((figures.k_sweep, "K=3"), (figures.data_efficiency, "n=8")):
        pooled = frame[frame["seed"] == "pooled"]
        points = pooled[(pooled["method"] == "lofit") & (pooled["reference"] != "")]
        assert set(points["reference"]) == {reference}
        assert len(points) == 2 * (len(frame[frame["method"] == "lofit"]["k" if reference == "K=3" else "size"].unique()) - 1)
        np.testing.assert_allclose(points["p_holm"], stats.holm(points["p"].to_list()))
        assert len(frame[frame["seed"] != "pooled"]) == 3 * len(pooled)  # per-seed rows too


def test_claim_figures_draw_intervals(figures, tmp_path):
    figs = figures.figures()
    assert set(figs) == {"fig2_transfer_tiny-llama", "fig5_k_sweep", "fig4_data_efficiency"}
    sweep_line = figs["fig5_k_sweep"].data[0]
    assert sweep_line.error_y.array is not None and len(sweep_line.error_y.array) == 3
    heat = figs["fig2_transfer_tiny-llama"].data[0]
    assert all("[" in text for row in heat.text for text in row)
    table = figures.markdown()
    assert table.count("## Fig.") == 3
    rows = [line for line in table.splitlines() if line.startswith("| tiny-llama")]
    assert rows and all(line.count("|") == 11 for line in rows)  # 10 cells, tested or not
    paths = figures.save(tmp_path, formats=("html",))
    assert {p.name for p in paths} >= {"transfer.csv", "k_sweep.csv", "data_efficiency.csv",
                                       "settings.json", "claim_figures.md", "fig5_k_sweep.html"}
    tables_only = figures.save(tmp_path / "tables", formats=())
    assert {p.suffix for p in tables_only} == {".csv", ".json", ".md"}
    again = ClaimFigures.load(tmp_path)  # the saved tables draw the same figures and tables
    assert again.markdown() == figures.markdown() and again.settings == json.loads(
        json.dumps(figures.settings))
    assert set(again.figures()) == set(figs)
    (tmp_path / "k_sweep.csv").unlink()
    with pytest.raises(FileNotFoundError, match="k_sweep"):
        ClaimFigures.load(tmp_path)


def test_claims_and_claim_figures_command_lines_share_the_design():
    from analysis import draw_claim_figures as figures_cli
    from analysis import run_claims as claims_cli

    argv = ["--models", "smollm2-135m", "--seeds", "0", "1", "--k", "0.1", "--truthfulqa-fold", "1"]
    ours = figures_cli.build_parser().parse_args(argv)
    a = claims_cli.design_options(claims_cli.build_parser().parse_args(argv))
    b = figures_cli.design_options(ours)
    a.pop("log"), b.pop("log")
    assert a == b  # the same runs, so the figures read the claims' cells back
    assert b["budget"] == "claims-quick" and b["seeds"] == [0, 1] and b["k"] == 0.1
    assert b["task_overrides"] == {"truthfulqa": {"extra": {"fold": 1}}}
    assert ours.fractions == [0.03, 0.1, 0.5] and ours.sizes == [16, 40]
    assert figures_cli.build_parser().parse_args(argv + ["--sizes"]).sizes == []


def test_claim_figures_effects_point_the_documented_way(figures):
    pooled = {name: frame[frame["seed"] == "pooled"] for name, frame in
              (("transfer", figures.transfer), ("k", figures.k_sweep), ("n", figures.data_efficiency))}
    t = pooled["transfer"].set_index(["task", "source"])
    for (task, source), row in t[t["reference"] != ""].iterrows():  # same-task minus this cell
        assert row["effect"] == pytest.approx(t.loc[(task, task), "accuracy"] - row["accuracy"])
    for key, column, reference in (("k", "k", 3), ("n", "size", 8)):
        frame = pooled[key].set_index(["task", "method", column])
        for (task, method, point), row in frame[frame["reference"] != ""].iterrows():
            assert row["effect"] == pytest.approx(
                row["accuracy"] - frame.loc[(task, "lofit", reference), "accuracy"])


def test_claim_figures_without_the_claims_point_draws_untested(report, tiny_model, task_paths):
    _, cache = report
    said = []
    figs = claim_figures(tiny_model, tasks=[task_paths["say"]], sources=[], budget="smoke",
                         seeds=(0, 1, 2), cache_dir=cache, k=3, fractions=(0.5,), sizes=(),
                         log=said.append, **TINY)
    assert figs.data_efficiency.empty and (figs.k_sweep["reference"] == "").all()
    assert any("not among" in line and "without tests" in line for line in said)
    assert "Fig. 5" in figs.markdown() and "Fig. 4" not in figs.markdown()


@pytest.mark.parametrize("bad", [dict(fractions=(1.0,)), dict(sizes=(0,)), dict(seeds=(0, 0, 1))])
def test_claim_figures_rejects_bad_points(tiny_model, task_paths, tmp_path, bad):
    options = dict(tasks=[task_paths["say"]], budget="smoke", seeds=(0, 1), cache_dir=tmp_path,
                   k=3, log=None, **TINY)
    with pytest.raises(ValueError, match="fractions|seeds"):
        claim_figures(tiny_model, **{**options, **bad})


def test_methods_beyond_the_paper_are_compared_with_lofit_on_the_same_subsets(report, tiny_model,
                                                                             task_paths):
    """``beyond``: JoLA and RepE on the claims' seeds and subsets (LoFiT's cells read back),
    each against LoFiT with two-sided paired tests, Holm across those rows."""
    result, cache = report
    again = replicate_claims(tiny_model, tasks=[task_paths["say"], task_paths["pick"]],
                             selection_tasks=[task_paths["succ"]], budget="smoke", seeds=(0, 1, 2),
                             cache_dir=cache, k=3, n_bootstrap=200, n_permutations=2000,
                             n_draws=500, log=None, beyond=("jola", "repe"), **TINY)
    pd.testing.assert_frame_equal(again.claims, result.claims)  # the paper's claims unchanged
    beyond = again.details[again.details["claim"] == "beyond"]
    assert len(beyond) == 2 * 3  # per method: each task, then both pooled
    assert (beyond["alternative"] == "two-sided").all() and (beyond["family_size"] == 6).all()
    assert beyond["p"].between(0, 1).all() and (beyond["p_holm"] >= beyond["p"] - 1e-12).all()
    pooled = beyond[beyond["contrast"].str.contains("pooled")]
    assert sorted(pooled["contrast"].str.split().str[2]) == ["jola,", "repe,"]
    n_per_task = result.accuracy.query("method == 'lofit'").groupby("task")["n"].max()
    assert set(pooled["n"]) == {int(n_per_task.sum())}  # the same examples as LoFiT's
    assert {"jola", "repe"} <= set(again.accuracy["method"])
