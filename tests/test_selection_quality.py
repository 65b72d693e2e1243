"""The selection-quality diagnostic: exact measures on hand-built A, a trained selection that
passes and one from its initialisation that does not, and where the verdict is kept."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from scipy.stats import hypergeom

import lofit_lens as ll
from lofit_lens.backends.hooked import model_dims
from lofit_lens.config import NON_RESULT_FIELDS, LoFiTConfig
from lofit_lens.errors import ConfigError, SelectionQualityWarning
from lofit_lens.history import RunHistory, TrainingHistory
from lofit_lens.result import LoFiTResult
from lofit_lens.selection_quality import (
    SelectionQuality, bootstrap_selections, expected_jaccard, gap_ratio, overlap_tail,
    selection_quality, warn_if_noise,
)
from lofit_lens.training import HeadSelection, initial_scale

pytestmark = pytest.mark.tl3  # also run under TransformerLens 3.x (scripts/test.sh)

TRAINED = dict(epochs_select=5, lr_select=1e-2, l1_lambda=1e-3, max_val_examples=0, batch_size=8,
               progress=False)
"""Step 1 on the tiny model and the reverse task that ranks 3 of 12 heads the same way on
every bootstrap resample (seeds 0-3 measured: mean Jaccard 1.0 over 3 refits; ~2 s)."""


def scale_from_scores(scores: list[float], d_head: int = 4) -> torch.Tensor:
    """A ``[3, 4, d_head]`` whose head norms are ``scores`` (one entry per head)."""
    scale = torch.zeros(12, d_head)
    scale[:, 0] = torch.tensor(scores)
    return scale.reshape(3, 4, d_head)


def renyi_scores(k: int, n: int = 12, gap: float = 1.0) -> list[float]:
    """Scores whose rank-weighted gaps ``j * (s_(j) - s_(j+1))`` are all 1 except the K-th,
    ``gap``: a noise-like ranking with a chosen K/K+1 gap (``gap_ratio`` = ``gap`` exactly)."""
    values = [0.0]
    for j in range(n - 1, 0, -1):
        values.append(values[-1] + (gap if j == k else 1.0) / j)
    return values[::-1]


# ---------------------------------------------------------------------- exact measures
def test_gap_and_gap_ratio_on_hand_built_scores():
    linear = torch.arange(12, 0, -1, dtype=torch.float32).reshape(3, 4)  # every gap 1
    # rank-weighted gaps j * 1 = j; the others within 5 ranks of K = 3: 1, 2, 4, 5, 6, 7, 8
    assert gap_ratio(linear, 3) == pytest.approx((1.0, 3 / 5))
    gap, ratio = gap_ratio(torch.tensor(renyi_scores(3, gap=10.0)).reshape(3, 4), 3)
    assert gap == pytest.approx(10 / 3) and ratio == pytest.approx(10.0)
    assert gap_ratio(linear, 12) == (None, None)  # K = every head: no (K+1)-th


def test_chance_levels_are_exact():
    # expected Jaccard of two random K-sets, by enumerating every pair of 2-sets of 6 heads
    sets = [set(c) for c in itertools.combinations(range(6), 2)]
    brute = sum(len(a & b) / len(a | b) for a in sets for b in sets) / len(sets) ** 2
    assert expected_jaccard(6, 2) == pytest.approx(brute, abs=1e-12)
    pmf = [hypergeom.pmf(i, 270, 27, 27) for i in range(28)]
    assert expected_jaccard(270, 27) == pytest.approx(sum(p * i / (54 - i) for i, p in enumerate(pmf)))
    assert expected_jaccard(270, 27) == pytest.approx(27 / (2 * 270 - 27), rel=0.1)  # roughly
    for shared in (0, 1, 3):
        assert overlap_tail(12, 3, shared) == pytest.approx(hypergeom.sf(shared - 1, 12, 3, 3))


def test_movement_and_init_overlap_on_hand_built_scales():
    init = torch.ones(3, 4, 8)
    scale = init.clone()
    scale[0, 0] += 2.0  # one head moved by 2 * sqrt(8); ||A0||_F = sqrt(96)
    q = selection_quality(scale, 3, init=init)
    assert q.movement == pytest.approx(2 * math.sqrt(8) / math.sqrt(96))
    assert q.moved_share == pytest.approx(1 / 12)  # only (0, 0) moved more than ||A0_h||
    assert q.init_overlap_chance == pytest.approx(3 / 12)

    same = selection_quality(init.clone() * torch.linspace(1, 2, 12).reshape(3, 4, 1), 3,
                             init=init * torch.linspace(1, 2, 12).reshape(3, 4, 1))
    assert same.movement == 0 and same.moved_share == 0
    assert same.init_overlap == 1 and same.init_overlap_p == pytest.approx(1 / math.comb(12, 3))
    assert same.init_rank_correlation == pytest.approx(1.0)
    unknown = selection_quality(scale, 3)
    assert unknown.movement is None and unknown.init_overlap is None


def test_stability_is_the_mean_jaccard_with_each_refit():
    scale = scale_from_scores(list(range(12, 0, -1)))  # top 3: heads 0, 1, 2 (flat order)
    same = torch.arange(12, 0, -1, dtype=torch.float32).reshape(3, 4)
    two_shared = torch.tensor([9.0, 8, 0, 7] + [0] * 8).reshape(3, 4)  # top 3: 0, 1, 3
    q = selection_quality(scale, 3, others=[same, two_shared], others_source="seeds")
    assert q.stability == pytest.approx((1.0 + 2 / 4) / 2)
    assert q.stability_runs == 2 and q.stability_source == "seeds"
    assert q.stability_chance == pytest.approx(expected_jaccard(12, 3))
    assert selection_quality(scale, 3).stability is None
    assert "not measured" in selection_quality(scale, 3).summary()


# ---------------------------------------------------------------------- verdicts
def test_verdicts_on_hand_built_selections():
    init = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e-3
    at_init = selection_quality(init.clone(), 3, init=init)
    assert at_init.verdict == "noise" and "initial draw" in at_init.reason
    for name in ("epochs_select", "max_train_examples", "lr_select", "--selection-bootstrap"):
        assert name in at_init.advice

    gapped = scale_from_scores(renyi_scores(3, gap=10.0)) + init  # moved far, a clear gap
    assert selection_quality(gapped, 3, init=init).verdict == "clear"
    smooth = scale_from_scores(renyi_scores(3, gap=1.0)) + init  # moved far, no gap
    weak = selection_quality(smooth, 3, init=init)
    assert weak.verdict == "weak" and "not measured" in weak.reason and weak.advice

    disjoint = [torch.tensor([0.0] * 3 + [1.0] * 3 + [0.0] * 6).reshape(3, 4),
                torch.tensor([0.0] * 6 + [1.0] * 3 + [0.0] * 3).reshape(3, 4)]
    assert selection_quality(gapped, 3, init=init, others=disjoint).verdict == "noise"
    assert selection_quality(smooth, 3, init=init, others=[smooth, smooth]).verdict == "clear"


def test_quality_round_trips_and_warns_only_on_noise():
    init = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e-3
    noisy = selection_quality(init.clone(), 3, init=init)
    assert SelectionQuality.from_dict(json.loads(json.dumps(noisy.to_dict()))) == noisy
    with pytest.warns(SelectionQualityWarning, match="noise .*To fix: train step 1 longer"):
        warn_if_noise(noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_noise(None)
        warn_if_noise(selection_quality(scale_from_scores(renyi_scores(3, gap=10.0)), 3))
        smooth = selection_quality(scale_from_scores(renyi_scores(3, gap=1.0)), 3)
        assert smooth.verdict == "weak"
        warn_if_noise(smooth)  # weak: reported with the result, not warned about


# ---------------------------------------------------------------------- on the tiny model
def test_a_trained_selection_is_clear(tiny_model, tiny_task_file):
    task = str(tiny_task_file)
    selection = ll.select_heads(tiny_model, task, **TRAINED)
    cfg = LoFiTConfig(task=task, **{k: v for k, v in TRAINED.items() if k != "progress"})
    refits = bootstrap_selections(tiny_model, task, cfg, 3)
    quality = selection_quality(selection, 3, others=refits)
    assert quality.verdict == "clear", quality.reason
    assert quality.movement > 10 and quality.stability_source == "bootstrap"
    assert all(r.history.data_hash != selection.history.data_hash for r in refits)  # resampled
    assert all(not torch.equal(r.init, selection.init) for r in refits)  # other draws


def test_a_selection_from_its_init_is_noise(tiny_model, tiny_task_file):
    task = str(tiny_task_file)
    untrained = dict(TRAINED, epochs_select=1, lr_select=1e-9)  # A stays at its draw
    selection = ll.select_heads(tiny_model, task, **untrained)
    quality = selection_quality(selection, 3)
    assert quality.verdict == "noise" and quality.movement < 1e-3 and quality.init_overlap == 1
    cfg = LoFiTConfig(task=task, **{k: v for k, v in untrained.items() if k != "progress"})
    refits = bootstrap_selections(tiny_model, task, cfg, 3)  # other seeds: other draws
    # without the init (an all-zero one is ignored), the refits alone tell it is noise
    alone = selection_quality(selection, 3, init=torch.zeros_like(selection.scale), others=refits)
    assert alone.movement is None and alone.verdict == "noise", alone.reason


def test_the_init_is_recorded_saved_and_regenerated(tiny_model, tiny_task_file):
    selection = ll.select_heads(tiny_model, str(tiny_task_file), **dict(TRAINED, epochs_select=1))
    dims = model_dims(tiny_model)
    assert torch.equal(selection.init, initial_scale(dims, 1e-3, 0))
    back = HeadSelection.from_phase(selection.to_phase())
    assert torch.equal(back.init, selection.init)
    old = {k: v for k, v in selection.to_phase().items() if k != "init"}  # saved before it
    assert HeadSelection.from_phase(old).init is None
    regenerated = HeadSelection.from_phase(old, config=LoFiTConfig(init_std=1e-3, seed=0))
    assert torch.equal(regenerated.init, selection.init)


# ---------------------------------------------------------------------- where it is kept
def quality_result() -> LoFiTResult:
    init = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)) * 1e-3
    scale = init + torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    return LoFiTResult(config=LoFiTConfig(task="t", k=2), model_id="m",
                       head_scores=scale.norm(dim=-1), scale=scale,
                       bias=torch.zeros(3, 4, 8), selected_heads=[(0, 1), (2, 3)],
                       history=RunHistory(TrainingHistory(), TrainingHistory()),
                       selection_quality=selection_quality(scale, 2, init=init))


def test_result_keeps_the_quality_and_old_cards_load(tmp_path):
    result = quality_result()
    result.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "result.json").read_text())["selection_quality"]["verdict"]
    assert LoFiTResult.load(tmp_path / "r").selection_quality == result.selection_quality
    legacy = Path(__file__).parent / "fixtures" / "result_v0.1.0"  # written by 0.1.0
    assert LoFiTResult.load(legacy).selection_quality is None


def test_metrics_json_summary_and_heatmap_show_it():
    from lofit_lens.analysis.plotting import plot_heads
    from lofit_lens.cli import format_run, run_metrics

    result = quality_result()
    result.config = LoFiTConfig(task="t", k=2, eval_splits=("test",))
    metrics = run_metrics(result)
    assert metrics["selection_quality"] == result.selection_quality.to_dict()
    said = f"selection: {result.selection_quality.verdict}; K/K+1 gap "
    assert said in format_run(result, metrics, Path("out"), [])
    assert said in plot_heads(result).layout.title.text
    result.selection_quality = None
    assert run_metrics(result)["selection_quality"] is None
    assert "selection:" not in plot_heads(result).layout.title.text


def test_cli_run_writes_it_and_warns_once(tmp_path, tiny_model, tiny_task_file, monkeypatch, capsys):
    """``run`` writes the diagnostic into metrics.json and says an unclear verdict once, as a
    CLI line (the Python warning ``ll.lofit`` gives is not repeated)."""
    from lofit_lens.cli import main

    real = ll.lofit

    def lofit(model, task, **kwargs):  # as api.lofit does: measure, keep, warn
        result = real(model, task, **kwargs)
        result.selection_quality = selection_quality(result.scale, result.k,
                                                     init=result.scale.clone())  # never moved
        warn_if_noise(result.selection_quality)
        return result

    monkeypatch.setattr("lofit_lens.lofit", lofit)
    monkeypatch.setattr("lofit_lens.cli._checked_model", lambda args: tiny_model)  # no doctor
    monkeypatch.setattr("lofit_lens.analysis.plotting.save_figure", lambda fig, path: [])  # kaleido: 13 s
    out = tmp_path / "run"
    rc = main(["run", "--task", str(tiny_task_file), "--k", "2", "--epochs", "1",
               "--max-train-examples", "2", "--max-val-examples", "0",
               "--max-eval-examples", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection_quality"]["verdict"] == "noise"
    assert err.count("step 1's head selection is") == 1 and "SelectionQualityWarning" not in err
    assert "lofit-lens: warning: step 1's head selection is" in err


def test_selection_bootstrap_is_a_checked_opt_in_setting():
    from lofit_lens.cli import COMPARE_SETTINGS, RUN_SETTINGS

    assert LoFiTConfig().selection_bootstrap == 0  # never by default: it costs n step-1 runs
    with pytest.raises(ConfigError, match="selection_bootstrap=-1"):
        LoFiTConfig(selection_bootstrap=-1)
    assert "selection_bootstrap" in NON_RESULT_FIELDS  # no cache key or run identity changes
    assert "selection_bootstrap" in RUN_SETTINGS and "selection_bootstrap" not in COMPARE_SETTINGS


def test_k_of_every_head_has_nothing_to_judge():
    init = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    quality = selection_quality(init.clone(), 12, init=init, others=[init.norm(dim=-1)])
    assert quality.verdict == "clear" and quality.gap is None and "n/a" in quality.summary()
