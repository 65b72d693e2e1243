"""The head scores LoFiT, JoLA, ITI and bias-based selection rank heads by, and how their
top-K sets overlap (``analysis/method_overlap.py`` draws them).

* ``lofit``: ||A|| after LoFiT's step 1;
* ``jola``: P(head edited) = 1 - (1 - P_A)(1 - P_v) from JoLA's gates after its one-stage
  training (``epochs_bias`` epochs at ``lr_select``);
* ``iti``: the validation accuracy of ITI's per-head probe;
* ``bias_based``: ||v|| after v is trained on every head with step 1's budget.

Every score is a phase of the run engine's store in ``cache`` (a rerun reads it back).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from lofit_lens.analysis.cells import cached_record, cached_selection
from lofit_lens.analysis.overlap import head_overlap
from lofit_lens.config import LoFiTConfig
from lofit_lens.intervention import top_heads
from lofit_lens.methods.jola import JoLAOptions, spearman, train_jola
from lofit_lens.methods.probes import fit_probes, head_activations, statements
from lofit_lens.result import LoFiTResult
from lofit_lens.run_settings import phase_settings
from lofit_lens.tasks.base import Task
from lofit_lens.tasks.truthfulqa import TruthfulQA
from lofit_lens.training import TrainingSet, tune_biases

METHODS = ("lofit", "jola", "iti", "bias_based")
Scores = torch.Tensor


# ---------------------------------------------------------------------- the four scores
def _cached_scores(cache: Path, model, task: Task, cfg: LoFiTConfig, name: str,
                   extra: dict, compute: Callable[[], tuple[Scores, dict]]) -> tuple[Scores, dict]:
    """``name``'s head scores as a phase of the engine's store in ``cache``."""
    settings = phase_settings("method", model, task, cfg, method=f"{name} head scores", **extra)

    def run() -> tuple[dict, dict]:
        scores, record = compute()
        return record, {"scores": scores.float()}

    record = cached_record(cache, f"scores-{name}", settings, run)
    return torch.tensor(record["scores"]), record


def jola_scores(model, task, cfg, cache, data, options: JoLAOptions, progress):
    def compute():
        start = time.perf_counter()
        jola, _, initial = train_jola(model, task, cfg, l0_lambda=options.l0_lambda,
                                      lr=options.lr, progress=progress, data=data())
        scores = jola.head_scores()
        return scores, {"seconds": time.perf_counter() - start,
                        "jola_vs_init": spearman(scores, initial),
                        "edited_heads": len(jola.active_heads)}

    return _cached_scores(cache, model, task, cfg, "jola",
                          {"l0_lambda": options.l0_lambda,
                           "jola_lr": options.lr or cfg.lr_select, "epochs": cfg.epochs_bias},
                          compute)


def iti_scores(model, task, cfg, cache, progress):
    """ITI's probe accuracies, fitted as ``RunContext.probes`` fits them (without the sigma
    of the shift, which does not change the ranking)."""
    def compute():
        start = time.perf_counter()
        train = task.train_examples(cfg.seed, cfg.max_train_examples)
        honest_llama = task.protocol == "official" and isinstance(task, TruthfulQA)
        if honest_llama:
            val = task.examples("val")
            found = statements(task, [*train, *val], cfg.seed)
            is_val = (found.groups >= len(train)).numpy()
        else:
            found, is_val = statements(task, train, cfg.seed), None
        acts = head_activations(model, found.pairs, cfg.eval_batch_size,
                                joint=task.protocol == "official")
        probes = fit_probes(acts, found.labels, found.groups, cfg.seed, is_val=is_val)
        return probes.accuracy, {"seconds": time.perf_counter() - start,
                                 "statements": len(found.pairs)}

    return _cached_scores(cache, model, task, cfg, "iti", {}, compute)


def bias_scores(model, task, cfg, cache, data, progress):
    """||v|| after v is trained on every head with step 1's budget: ``epochs_select`` epochs
    at ``lr_select``. (The ``bias_based`` selector of ``compare`` uses ``lr_bias``; at the
    quick budget's 5e-2, v on all heads diverged on TruthfulQA (DPO) with SmolLM2.)"""
    def compute():
        start = time.perf_counter()
        step1 = dataclasses.replace(cfg, epochs_bias=cfg.epochs_select, lr_bias=cfg.lr_select)
        tuning = tune_biases(model, task, None, progress=progress, data=data(), config=step1)
        return tuning.intervention.bias_norms(), {"seconds": time.perf_counter() - start}

    return _cached_scores(cache, model, task, cfg, "bias_based", {}, compute)


def method_scores(model, task: Task, cfg: LoFiTConfig, cache: Path, options: JoLAOptions,
                  progress: bool) -> tuple[dict[str, Scores], dict[str, dict]]:
    """``({method: [layer, head] scores}, {method: what its run recorded})``."""
    data = functools.cache(functools.partial(TrainingSet.build, model, task, cfg))
    selection = cached_selection(model, task, cfg, cache, progress, data)
    scores, records = {"lofit": selection.scores.float()}, {"lofit": {"seconds": selection.history.seconds}}
    scores["jola"], records["jola"] = jola_scores(model, task, cfg, cache, data, options, progress)
    scores["iti"], records["iti"] = iti_scores(model, task, cfg, cache, progress)
    scores["bias_based"], records["bias_based"] = bias_scores(model, task, cfg, cache, data, progress)
    return scores, records


# ---------------------------------------------------------------------- comparing them
def as_result(scores: Scores, cfg: LoFiTConfig, model_name: str, k: int) -> LoFiTResult:
    zeros = torch.zeros(*scores.shape, 1)
    return LoFiTResult(config=cfg, model_id=model_name, head_scores=scores, scale=zeros,
                       bias=zeros.clone(), selected_heads=top_heads(scores, k))


def ties_at_k(scores: Scores, k: int) -> int:
    """How many heads share the K-th best score (more than 1: the cut is a tie-break)."""
    flat = scores.flatten().sort(descending=True).values
    return int((flat == flat[k - 1]).sum())


def overlap_rows(scores: dict[str, Scores], cfg: LoFiTConfig, model_name: str, task: str,
                 k: int) -> pd.DataFrame:
    """One row per unordered method pair (the diagonal included) at ``k`` heads."""
    results = [as_result(scores[m], cfg, model_name, k) for m in METHODS]
    report = head_overlap(results, labels=list(METHODS))
    rows = []
    for _, pair in report.pairs.iterrows():
        rows.append({"model": model_name, "task": task, "k": k,
                     "n_heads": int(pair["n_total_heads"]), "method_i": pair["row"],
                     "method_j": pair["col"], "intersection": int(pair["intersection"]),
                     "jaccard": pair["jaccard_paper"], "expected_random": pair["expected_random"],
                     "p_value": pair["p_value"],
                     "spearman": spearman(scores[pair["row"]], scores[pair["col"]]),
                     "ties_at_k_i": ties_at_k(scores[pair["row"]], k),
                     "ties_at_k_j": ties_at_k(scores[pair["col"]], k)})
    return pd.DataFrame(rows)
