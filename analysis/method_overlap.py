"""Do LoFiT, JoLA, ITI and bias-based selection pick the same heads?

Per model and task, four scores for every head, each the one its method ranks heads by:

* ``lofit``: ||A|| after LoFiT's step 1 (the shared cache of the figure modules);
* ``jola``: P(head edited) = 1 - (1 - P_A)(1 - P_v) from JoLA's gates, after its one-stage
  training (``lofit_lens.methods.jola``; ``epochs_bias`` epochs at ``lr_select``, l0
  weight ``--jola-l0-lambda``);
* ``iti``: the validation accuracy of ITI's per-head probe (honest_llama's splits on
  TruthfulQA under the official protocol, else a 4:1 split of the training questions);
  ties are broken by position, as ``iti``/``iti_heads`` break them;
* ``bias_based``: ||v|| after v is trained on every head with step 1's budget
  (``epochs_select`` epochs at ``lr_select``).

At equal K (``--ks``, default 3% and 10% of the heads) the top-K sets are compared pairwise with
``lofit_lens.analysis.overlap.head_overlap``: Jaccard ``|Ti & Tj| / K``, its expectation for
random K-sets, ``K / N``, and the hypergeometric p-value of an overlap at least this large.
The Spearman correlation of the full score maps gives a K-free view. JoLA's gates start at
random log-alphas; ``jola_vs_init`` (the Spearman correlation of its final scores with their
initial values) says how much of its ranking training made.

Writes to --out: ``pairs.csv`` (every model, task, K and method pair), ``scores.csv`` (every
head's four scores), ``jaccard_k<pct>.{html,png}`` (one heatmap per model and task, cells
"Jaccard (p)"; the diagonal is 1) and ``run_info.json``. Method scores are cached under
--cache like the figure modules' selections, so a rerun resumes.

    python -m analysis.method_overlap --budget quick   # both embedded models, all three tasks
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.common import RunLog, load, parser, run_options, write_figure, write_table
from lofit_lens.analysis.cells import cached_record, cached_selection
from lofit_lens.analysis.overlap import head_overlap
from lofit_lens.analysis.plotting import plot_method_overlap
from lofit_lens.backends.hooked import model_dims
from lofit_lens.methods.jola import JoLAOptions, spearman, train_jola
from lofit_lens.methods.probes import fit_probes, head_activations, statements
from lofit_lens.config import LoFiTConfig
from lofit_lens.intervention import top_heads
from lofit_lens.result import LoFiTResult
from lofit_lens.run_settings import phase_settings
from lofit_lens.tasks.base import Task
from lofit_lens.tasks.truthfulqa import TruthfulQA
from lofit_lens.training import TrainingSet, resolve_run, tune_biases

MODULE = "method_overlap"
METHODS = ("lofit", "jola", "iti", "bias_based")
DEFAULT_KS = (0.03, 0.1)
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


def figure(pairs: pd.DataFrame, fraction: float, models: Sequence[str],
           tasks: Sequence[str]):
    """Jaccard heatmaps of ``METHODS`` (rows: models, columns: tasks) at K = ``fraction``,
    cells "J (p)" (``plotting.plot_method_overlap``)."""
    return plot_method_overlap(pairs, fraction, models, tasks, METHODS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(MODULE, __doc__, k=None)
    p.add_argument("--ks", type=float, nargs="+", default=list(DEFAULT_KS),
                   help="head fractions (or counts >= 1) at which the top-K sets are compared "
                        "(default 0.03 0.1)")
    p.add_argument("--jola-l0-lambda", type=float, default=JoLAOptions.l0_lambda)
    args = p.parse_args(argv)
    options = JoLAOptions(l0_lambda=args.jola_l0_lambda)
    log = RunLog(MODULE, args)
    overrides, per_task = run_options(args)
    all_pairs, all_scores, records = [], [], {}
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        dims = model_dims(model)
        for task_name in args.tasks:
            task, cfg = resolve_run(task_name, None, {**overrides, **per_task[task_name],
                                                      "seed": args.seed})
            scores, recorded = method_scores(model, task, cfg, args.cache, options, not args.quiet)
            records[f"{name}/{task_name}"] = recorded
            for method, s in scores.items():
                for (layer, head), value in np.ndenumerate(s.numpy()):
                    all_scores.append({"model": name, "task": task_name, "method": method,
                                       "layer": layer, "head": head, "score": float(value)})
            for k in args.ks:
                n = LoFiTConfig(k=int(k) if k >= 1 else k).num_heads(dims.total_heads)
                all_pairs.append(overlap_rows(scores, cfg, name, task_name, n).assign(k_setting=k))
            log.lap(f"{name}/{task_name}", start)
            start = time.perf_counter()
    pairs = pd.concat(all_pairs, ignore_index=True)
    files = [write_table(pairs, args.out / "pairs.csv", index=False),
             write_table(pd.DataFrame(all_scores), args.out / "scores.csv", index=False)]
    for k in args.ks:
        fig = figure(pairs[pairs.k_setting == k], k, args.models, args.tasks)
        files += write_figure(fig, args.out / f"jaccard_k{int(round(100 * k)) if k < 1 else int(k)}")
    log.info["method_records"] = records
    log.write(args.out, files)
    off = pairs[pairs.method_i != pairs.method_j]
    print(off[["model", "task", "k", "method_i", "method_j", "jaccard", "expected_random",
               "p_value", "spearman"]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
