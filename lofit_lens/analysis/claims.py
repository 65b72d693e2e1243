"""The paper's claims as tested hypotheses, on any hooked model (docs/claims.md).

``replicate_claims(model, ...)`` runs, for every seed, LoFiT's head selection on every task,
then bias tuning on LoFiT's heads, on random heads, on ITI's heads and on the heads of every
other task, plus ITI and the untouched model, and evaluates each on the seed's own test
subset. From the per-example scores it tests:

1. Table 2: bias tuning on LoFiT's heads beats random heads, and ITI's heads, at the same K.
2. Fig. 2: task-specific heads beat heads transferred from another task.
3. Fig. 3: the selected heads concentrate in a contiguous band of layers, compared with
   random head sets of the same size.
4. Fig. 6: head sets overlap less across tasks than across seeds of one task.
5. Table 1: LoFiT beats ITI, and beats 0-shot.

Design (see docs/claims.md for the reasons):

* **Test subsets.** Each seed is evaluated on its own random subset of the task's test split;
  the seeds' subsets are disjoint (``seed_subsets``), never the top of a file. The seed also
  sets the training sample (``Task.train_examples``) and the initialisation of A and v.
  Per-example outcomes are pooled over seeds: every pair in a test is a distinct example,
  compared within its seed.
* **Tests.** Exact match and MC1: the exact McNemar test (``stats.mcnemar_exact``); MC2: the
  paired permutation test, with the sign test beside it; the paper's one-sided paired
  bootstrap (``stats.paired_bootstrap``) beside every paired test, named as such. All tests
  are one-sided, in the claim's direction, and every effect is oriented so that > 0 favours
  the claim.
* **Families.** Holm's correction within each claim's matrix of comparisons (``details``:
  tasks x contrasts x metrics, or the cells of the transfer matrix), and across the
  claim-level rows of one model (``claims``).
* **Verdicts** (``stats.verdict``): *supported* needs a Holm-corrected p < ``alpha``;
  *underpowered* when the effect points the claimed way but n is below the n that gives 80%
  power at the observed effect at level ``alpha / m`` (m = the family's size, the level at
  which Holm surely rejects); *not supported* otherwise.

Every cell is cached under ``cache_dir`` (``lofit_lens.analysis.cells``): a rerun resumes.
Generation cells are ``cells.bias_cell`` / ``cells.zero_shot_cell`` (shared with the figure
modules); multiple-choice cells and ITI cells are cached here with per-question MC1 and MC2.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lofit_lens.analysis import stats
from lofit_lens.analysis.cells import (
    bias_cell, cached_record, cached_selection, cells_folder, evaluated, zero_shot_cell,
)
from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.baselines.base import BaselineOptions, RunContext
from lofit_lens.baselines.methods import get_method
from lofit_lens.baselines.selectors import random_heads
from lofit_lens.budgets import budget_settings
from lofit_lens.config import LoFiTConfig
from lofit_lens.intervention import Head
from lofit_lens.run_settings import STEP2_FIELDS, eval_examples, eval_settings, step_settings
from lofit_lens.tasks.base import Example, Task
from lofit_lens.training import TrainingSet, resolve_run, tune_biases

CLAIMS: dict[str, str] = {
    "1": "Table 2: bias tuning on LoFiT's heads beats random heads and ITI's heads, at the same K",
    "2": "Fig. 2: task-specific heads beat heads transferred from another task",
    "3": "Fig. 3: the selected heads concentrate in a contiguous band of layers (vs random sets)",
    "4": "Fig. 6: head sets overlap less across tasks than across seeds of one task",
    "5": "Table 1: LoFiT beats ITI, and beats 0-shot",
}
CONTRASTS: dict[str, tuple[str, str]] = {
    "1": ("lofit", "random"), "1b": ("lofit", "iti_heads"),
    "5": ("lofit", "iti"), "5b": ("lofit", "zero_shot"),
}
"""Claim rows that compare two methods: (the claimed winner, the baseline)."""
DEFAULT_TASKS = ("clutrr", "mquake")
DEFAULT_SELECTION_TASKS = ("clutrr", "mquake", "truthfulqa")
SUBSET_SEED = 20240613
"""Seed of the permutation that cuts each task's test split into the seeds' subsets."""
METHODS = ("zero_shot", "iti", "random", "iti_heads", "lofit")
COLUMNS = ["claim", "model", "contrast", "test", "metric", "n", "seeds", "effect", "ci_low",
           "ci_high", "p", "p_holm", "verdict", "n_needed", "n_needed_holm", "unit",
           "p_bootstrap_paper", "family_size", "note"]
"""The columns of ``ClaimsReport.claims`` and ``.details``."""

Log = Callable[[str], None]


# ---------------------------------------------------------------------- test subsets
def _subset_eval_examples(task: Task, rows: Sequence[Example], split: str,
                          max_examples: Optional[int] = None) -> list[Example]:
    if split != "test":
        return task.eval_examples(split, max_examples)
    rows = list(rows)
    return rows if max_examples is None or max_examples >= len(rows) else rows[:max_examples]


def with_test_subset(task: Task, rows: Sequence[Example], label: str) -> Task:
    """A copy of ``task`` whose ``eval_examples("test", ...)`` is ``rows`` (everything else,
    ``describe()`` and the training data included, unchanged: head selections stay shared
    with the other analyses; the evaluated cells are keyed by the rows' hash)."""
    subset = copy.copy(task)
    subset.eval_examples = functools.partial(_subset_eval_examples, task, tuple(rows))
    subset.test_subset = label
    return subset


def seed_subsets(task: Task, seeds: Sequence[int], n: Optional[int],
                 log: Optional[Log] = None) -> dict[int, Task]:
    """``{seed: task restricted to that seed's test subset}``: one seeded permutation of the
    test split (``SUBSET_SEED``), cut into ``len(seeds)`` disjoint runs of ``n`` rows (the
    i-th seed in sorted order takes the i-th run). ``n=None``, or too large: the split cut
    into equal parts."""
    rows = task.examples("test")
    seeds = sorted(seeds)
    per = len(rows) // len(seeds)
    if n is not None and n > per and log:
        log(f"{task.name}: {len(rows)} test rows hold {len(seeds)} disjoint subsets of {per}, "
            f"not {n}: using {per}")
    per = per if n is None else min(n, per)
    if per == 0:
        raise ValueError(f"{task.name}: {len(rows)} test rows cannot give {len(seeds)} seeds a "
                         "test example each")
    order = np.random.default_rng(SUBSET_SEED).permutation(len(rows))
    return {seed: with_test_subset(task, [rows[j] for j in sorted(order[i * per:(i + 1) * per])],
                                   f"seed-subset {i} of {len(seeds)} x {per}")
            for i, seed in enumerate(seeds)}


# ---------------------------------------------------------------------- cells
def mc_bias_cell(model, task: Task, cfg: LoFiTConfig, heads: Optional[Sequence[Head]],
                 cache_dir: Union[str, Path], progress: bool = True,
                 data: Optional[Callable[[], TrainingSet]] = None) -> dict[str, Any]:
    """``cells.bias_cell`` for a multiple-choice task, keeping per-question MC1 (``correct``)
    and MC2 (``mc2``); ``heads=None``: the untouched model (``cells.zero_shot_cell``'s)."""
    if heads is None:
        return cached_record(cells_folder(model, task, cache_dir), "zero_shot-mc",
                             eval_settings(model, task, cfg),
                             lambda: (evaluated(model, task, cfg, None, progress, "eval zero-shot"), {}))
    heads = [tuple(h) for h in heads]
    settings = {**step_settings(model, task, cfg, STEP2_FIELDS), **eval_settings(model, task, cfg),
                "heads": [list(h) for h in heads]}

    def compute():
        tuning = tune_biases(model, task, heads, config=cfg, progress=progress,
                             data=data() if data else None)
        record = evaluated(model, task, cfg, tuning.intervention, progress,
                            f"eval {task.name} (K={len(heads)})")
        bias = torch.stack([tuning.bias[l, h] for l, h in heads])
        return {**record, "k": len(heads), "heads": [list(h) for h in heads],
                "seconds": tuning.history.seconds}, {"bias": bias}

    return cached_record(cells_folder(model, task, cache_dir), "bias-mc", settings, compute)


def iti_cell(model, task: Task, cfg: LoFiTConfig, cache_dir: Union[str, Path],
             options: BaselineOptions = BaselineOptions(), progress: bool = True) -> dict[str, Any]:
    """ITI (``baselines.methods.iti``: probes fitted on the seed's training sample, a fixed
    shift on the K best-probed heads) evaluated on ``task``'s test split; the record keeps
    ITI's heads (``heads``: Table 2's "ITI-heads") and per-example scores. Cached."""
    n_heads = cfg.num_heads(model_dims(model).total_heads)
    settings = {**step_settings(model, task, cfg, ("seed", "protocol")),
                **eval_settings(model, task, cfg), "method": "iti", "k": n_heads,
                "options": dataclasses.asdict(options)}

    def compute():
        ctx = RunContext(model, task, cfg, options, progress)
        start = time.perf_counter()
        run = get_method("iti")(ctx)
        seconds = time.perf_counter() - start
        record = evaluated(model, task, cfg, run.intervention, progress, f"eval {task.name} ITI")
        return {**record, "heads": [list(h) for h in run.heads], "seconds": seconds}, {}

    return cached_record(cells_folder(model, task, cache_dir), "iti", settings, compute)


def claim_runs(tasks: Sequence[str], budget: str, seeds: Sequence[int],
               k: Union[int, float, None] = None, n_test: Optional[int] = None,
               task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
               log: Optional[Log] = None, **overrides) -> dict[tuple[str, int], tuple[Task, LoFiTConfig]]:
    """``{(task, seed): (task restricted to the seed's test subset, config)}``: the runs of
    the claims' design. Settings: the budget's for the task, then ``overrides``, then the
    task's ``task_overrides``, then ``k`` (default: the budget's, else 3%). The budget's
    ``max_eval_examples`` (or ``n_test``) is the size of each seed's subset
    (``seed_subsets``)."""
    seeds = sorted(seeds)
    runs: dict[tuple[str, int], tuple[Task, LoFiTConfig]] = {}
    for task_name in tasks:
        settings = {**budget_settings(budget, str(task_name)), **overrides,
                    **dict(task_overrides or {}).get(str(task_name), {})}
        if k is not None:
            settings["k"] = k
        settings.setdefault("k", 0.03)
        per_seed = settings.pop("max_eval_examples", None) if n_test is None else n_test
        base, _ = resolve_run(task_name, None, {**settings, "seed": seeds[0]})
        subsets = seed_subsets(base, seeds, per_seed, log)
        for seed in seeds:
            runs[task_name, seed] = resolve_run(subsets[seed], None, {
                **settings, "seed": seed, "max_eval_examples": None})
    return runs


def claim_cell(model, task: Task, cfg: LoFiTConfig, heads: Optional[Sequence[Head]],
               cache_dir: Union[str, Path], progress: bool = True,
               data: Optional[Callable[[], TrainingSet]] = None) -> dict[str, Any]:
    """One evaluated cell of the claims' design: v tuned on ``heads`` (``None``: the untouched
    model), cached. Multiple-choice cells keep per-question MC2 too (``mc_bias_cell``);
    generation cells are the figure modules' (``cells.bias_cell`` / ``zero_shot_cell``)."""
    if task.kind != "generation":
        return mc_bias_cell(model, task, cfg, heads, cache_dir, progress, data)
    if heads is None:
        return zero_shot_cell(model, task, cfg, cache_dir, progress)
    return bias_cell(model, task, cfg, heads, cache_dir, progress, data)


# ---------------------------------------------------------------------- claim 3: layer bands
def band_width(counts: Int[np.ndarray, "... layer"], k: Optional[int] = None) -> Int[np.ndarray, "..."]:
    """The fewest consecutive layers that hold at least half (``ceil(k / 2)``) of a head set,
    from its per-layer ``counts`` (``k``: their sum). Small = concentrated in a band."""
    counts = np.asarray(counts)
    n_layers = counts.shape[-1]
    need = np.ceil((counts.sum(-1) if k is None else np.full(counts.shape[:-1], k)) / 2)
    cs = np.concatenate([np.zeros(counts.shape[:-1] + (1,)), np.cumsum(counts, -1)], -1)
    width = np.full(counts.shape[:-1], n_layers)
    for w in range(n_layers, 0, -1):
        best = (cs[..., w:] - cs[..., :-w]).max(-1)
        width = np.where(best >= need, w, width)
    return width


def _layer_counts(heads: Sequence[Head], n_layers: int) -> Int[np.ndarray, " layer"]:
    return np.bincount([int(l) for l, _ in heads], minlength=n_layers)


def random_band_widths(n_layers: int, n_heads: int, k: int, size: tuple[int, ...],
                       rng: np.random.Generator, chunk: int = 4096) -> Int[np.ndarray, "..."]:
    """``band_width`` of uniformly random ``k``-head sets (``size`` of them), drawn in chunks
    of ``chunk`` sets."""
    total = n_layers * n_heads
    draws = int(np.prod(size))
    widths = []
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        picks = np.argpartition(rng.random((m, total)), k - 1, axis=1)[:, :k] if k < total \
            else np.broadcast_to(np.arange(total), (m, total))
        counts = np.stack([np.bincount(row, minlength=n_layers) for row in picks // n_heads])
        widths.append(band_width(counts, k))
    return np.concatenate(widths).reshape(size)


def band_test(sets: Sequence[Sequence[Head]], n_layers: int, n_heads: int,
              n_draws: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Claim 3 on ``sets`` (head sets of one size): the mean ``band_width`` against the same
    mean over as many random sets (Monte Carlo, ``n_draws``). ``effect``: random expectation
    minus observed (layers; > 0 = more concentrated than chance), bootstrap CI over the sets;
    ``p = (1 + #{null <= observed}) / (1 + n_draws)``."""
    k = len(sets[0])
    if any(len(s) != k for s in sets):
        raise ValueError("band_test needs head sets of one size")
    observed = band_width(np.stack([_layer_counts(s, n_layers) for s in sets]), k).astype(float)
    null = random_band_widths(n_layers, n_heads, k, (n_draws, len(sets)),
                              np.random.default_rng(seed)).astype(float)
    expected, sd = float(null.mean()), float(null.std(ddof=1))
    p = (1 + (null.mean(1) <= observed.mean()).sum()) / (1 + n_draws)
    gain = expected - observed
    low, high = stats.bootstrap_ci(gain, seed=seed) if len(gain) > 1 else (float("nan"),) * 2
    return {"n": len(sets), "effect": float(gain.mean()), "ci_low": low, "ci_high": high,
            "p": float(p), "observed": float(observed.mean()), "random": expected,
            "random_sd": sd, "n_needed": stats.paired_mean_n_needed(float(gain.mean()), sd),
            "widths": observed.tolist()}


# ---------------------------------------------------------------------- claim 4: overlap
def _jaccard_matrix(sets: Sequence[Sequence[Head]]) -> Float[np.ndarray, "s s"]:
    frozen = [frozenset(map(tuple, s)) for s in sets]
    return np.array([[len(a & b) / min(len(a), len(b)) for b in frozen] for a in frozen])


def _within_minus_across(jac: Float[np.ndarray, "s s"], labels: Int[np.ndarray, " s"],
                         distinct: Optional[Int[np.ndarray, " s"]] = None) -> float:
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(jac, dtype=bool), 1)
    within = same & upper
    if distinct is not None:  # bootstrap: a seed drawn twice is not a pair of seeds
        within &= distinct[:, None] != distinct[None, :]
    across = ~same & upper
    if not within.any() or not across.any():
        return float("nan")
    return float(jac[within].mean() - jac[across].mean())


def _labelings(group_sizes: Sequence[int]) -> Int[np.ndarray, "assignment s"]:
    """Every assignment of group labels to ``sum(group_sizes)`` items with those sizes."""
    n = sum(group_sizes)
    out: list[list[int]] = []

    def fill(labels: list[int], free: list[int], g: int) -> None:
        if g == len(group_sizes):
            out.append(labels.copy())
            return
        for chosen in itertools.combinations(free, group_sizes[g]):
            for i in chosen:
                labels[i] = g
            fill(labels, [i for i in free if i not in chosen], g + 1)

    fill([0] * n, list(range(n)), 0)
    return np.array(out)


def overlap_test(sets: Mapping[tuple[str, int], Sequence[Head]], max_exact: int = 50_000,
                 n_permutations: int = 20_000, n_bootstrap: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Claim 4: mean Jaccard (the paper's ``|Ti & Tj| / K``) of pairs of seeds of one task
    minus that of pairs from different tasks, against a permutation of the task labels
    (exact over all labelings when there are at most ``max_exact``; p counts the observed
    labeling). CI: bootstrap over seeds within each task. ``n``: seeds per task."""
    keys = list(sets)
    tasks = list(dict.fromkeys(t for t, _ in keys))
    labels = np.array([tasks.index(t) for t, _ in keys])
    jac = _jaccard_matrix([sets[key] for key in keys])
    observed = _within_minus_across(jac, labels)
    sizes = [int((labels == g).sum()) for g in range(len(tasks))]
    count = math.factorial(len(keys)) // math.prod(math.factorial(s) for s in sizes)
    if count <= max_exact:
        perms, method = _labelings(sizes), "exact"
    else:
        rng = np.random.default_rng(seed)
        perms, method = np.array([rng.permutation(labels) for _ in range(n_permutations)]), "monte carlo"
    null = np.array([_within_minus_across(jac, p) for p in perms])
    hits = (null >= observed - 1e-12).sum()
    p = hits / len(null) if method == "exact" else (1 + hits) / (1 + len(null))
    rng = np.random.default_rng(seed)
    by_task = {t: [i for i, (tt, _) in enumerate(keys) if tt == t] for t in tasks}
    boot = []
    for _ in range(n_bootstrap):
        idx = [i for t in tasks for i in rng.choice(by_task[t], size=len(by_task[t]))]
        idx = np.array(idx)
        boot.append(_within_minus_across(jac[np.ix_(idx, idx)], labels[idx], idx))
    boot = np.array(boot)
    boot = boot[np.isfinite(boot)]
    low, high = (np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan))
    n_seeds = min(sizes)
    sd = float(null.std(ddof=1)) if len(null) > 1 else float("nan")
    z = (observed - float(null.mean())) / sd if sd and np.isfinite(sd) and sd > 0 else float("nan")
    n_needed = stats.n_needed_from_z(n_seeds, z)
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(jac, dtype=bool), 1)
    return {"n": n_seeds, "effect": observed, "ci_low": float(low), "ci_high": float(high),
            "p": float(p), "permutations": f"{method} ({len(null)})",
            "within": float(jac[same & upper].mean()), "across": float(jac[~same & upper].mean()),
            "z": z, "n_needed_z": n_needed,
            # the statistic ignores which task is which: the most extreme value is shared by
            # the relabelings of one partition (T! of them for T tasks of equal size)
            "min_p": float((null >= null.max() - 1e-12).mean()) if method == "exact" else
            1 / (1 + len(null))}


# ---------------------------------------------------------------------- paired rows
def _paired_row(a: Sequence[float], b: Sequence[float], metric: str, n_bootstrap: int,
                n_permutations: int) -> dict[str, Any]:
    """The paired test of ``a`` beating ``b`` (one-sided): exact McNemar for 0/1 scores, the
    paired permutation test (sign test beside it) for MC2; the paper's bootstrap beside both."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if metric == "mc2":
        result = stats.paired_permutation_test(a, b, n_permutations=n_permutations)
        sign = stats.paired_sign_test(a, b)
        d = a - b
        n_needed = stats.paired_mean_n_needed(result.effect, float(d.std(ddof=1)) if len(d) > 1 else 0.0)
        row = {**result.row(), "p_sign_test": sign.p, "n_needed": n_needed,
               "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else float("nan")}
    else:
        result = stats.mcnemar_exact(a, b)
        n = len(a)
        p10, p01 = result.details["n10"] / n, result.details["n01"] / n
        row = {**result.row(), "p10": p10, "p01": p01,
               "n_needed": stats.mcnemar_n_needed(p10, p01)}
    row.update(metric=metric, unit="examples",
               p_bootstrap_paper=stats.paired_bootstrap(a, b, n_bootstrap))
    return row


def _needed_at(row: Mapping[str, Any], alpha: float) -> float:
    """The row's n needed at level ``alpha`` (one-sided, 80% power)."""
    if row["test"] == "exact McNemar":
        return stats.mcnemar_n_needed(row["p10"], row["p01"], alpha)
    if row["test"] == "paired permutation":
        return stats.paired_mean_n_needed(row["effect"], row.get("sd_diff", 0.0), alpha)
    if row["test"].startswith("band width"):
        return stats.paired_mean_n_needed(row["effect"], row["random_sd"], alpha)
    if row["test"].startswith("label permutation"):
        return stats.n_needed_from_z(row["n"], row.get("z", float("nan")), alpha)
    return float("nan")


def finish_family(rows: list[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm across ``rows`` (one family), then each row's n needed at ``alpha / m`` and its
    verdict."""
    adjusted = stats.holm([r["p"] for r in rows])
    m = int(np.isfinite([r["p"] for r in rows]).sum())
    for row, p_holm in zip(rows, adjusted):
        row["p_holm"] = float(p_holm)
        row["family_size"] = m
        row["n_needed_holm"] = _needed_at(row, alpha / max(m, 1))
        row["verdict"] = stats.verdict(row["effect"], p_holm, row["n"], row["n_needed_holm"], alpha)
    return rows


# ---------------------------------------------------------------------- the report
@dataclass
class ClaimsReport:
    """The tested claims of one or more models.

    ``claims``: one row per claim, model and contrast (``COLUMNS``; Holm across the rows of
    a model); ``details``: the comparisons behind each row (per task, per transfer cell, per
    metric; Holm within each claim and model); ``accuracy``: every method on every task,
    pooled over seeds and per seed, with 95% intervals (Wilson for 0/1 scores, bootstrap over
    questions for MC2); ``selections``: every head set, with its band width; ``stability``:
    Jaccard across seeds of each task's head sets beside its random expectation;
    ``settings`` and ``seconds`` (wall time per model)."""

    claims: pd.DataFrame
    details: pd.DataFrame
    accuracy: pd.DataFrame
    selections: pd.DataFrame
    stability: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def concat(cls, reports: Sequence["ClaimsReport"]) -> "ClaimsReport":
        frames = {f: pd.concat([getattr(r, f) for r in reports], ignore_index=True)
                  for f in ("claims", "details", "accuracy", "selections", "stability")}
        return cls(**frames, settings={k: v for r in reports for k, v in r.settings.items()},
                   seconds={k: v for r in reports for k, v in r.seconds.items()})

    def markdown(self) -> str:
        """The report's tables as Markdown (claims, power, details, accuracy, stability)."""
        return render_markdown(self)

    def save(self, out: Union[str, Path]) -> list[Path]:
        """``claims.csv``, ``details.csv``, ``accuracy.csv``, ``selections.csv``,
        ``stability.csv`` and ``claims.md`` under ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in ("claims", "details", "accuracy", "selections", "stability"):
            path = out / f"{name}.csv"
            getattr(self, name).to_csv(path, index=False)
            paths.append(path)
        path = out / "claims.md"
        path.write_text(self.markdown())
        return paths + [path]


def seed_intervals(per_seed: Mapping[Any, Sequence[float]], continuous: bool = False,
                   n_bootstrap: int = 2000) -> list[dict[str, Any]]:
    """One row per seed, then one ``"pooled"`` over all seeds' examples: ``seed``, ``n``,
    ``score`` (the mean) and its 95% interval ``ci_low`` / ``ci_high`` (``ci``: Wilson for
    0/1 scores; bootstrap over questions when ``continuous``, e.g. MC2)."""
    rows = []
    groups = [(str(s), list(v)) for s, v in per_seed.items()]
    groups.append(("pooled", [x for v in per_seed.values() for x in v]))
    for label, values in groups:
        values = np.asarray(values, float)
        if continuous:
            low, high = stats.bootstrap_ci(values, n_bootstrap=n_bootstrap)
            how = "bootstrap over questions"
        else:
            low, high = stats.wilson_ci(values.sum(), len(values))
            how = "Wilson"
        rows.append({"seed": label, "n": len(values), "score": float(values.mean()),
                     "ci_low": low, "ci_high": high, "ci": how})
    return rows


def _accuracy_rows(model_name: str, task: str, method: str, metric: str,
                   per_seed: Mapping[int, Sequence[float]], n_bootstrap: int) -> list[dict]:
    return [{"model": model_name, "task": task, "method": method, "metric": metric, **row}
            for row in seed_intervals(per_seed, metric == "mc2", n_bootstrap)]


def replicate_claims(
    model,
    tasks: Sequence[str] = DEFAULT_TASKS,
    selection_tasks: Optional[Sequence[str]] = None,
    budget: str = "claims-quick",
    seeds: Sequence[int] = (0, 1, 2),
    cache_dir: Union[str, Path] = "analysis_out/cache",
    k: Union[int, float, None] = None,
    n_test: Optional[int] = None,
    task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    alpha: float = 0.05,
    n_bootstrap: int = 2000,
    n_permutations: int = 20_000,
    n_draws: int = 10_000,
    options: BaselineOptions = BaselineOptions(),
    progress: bool = False,
    log: Optional[Log] = print,
    **overrides,
) -> ClaimsReport:
    """Test the five claims (module docstring) on ``model``.

    ``tasks``: the tasks evaluated (claims 1, 2, 5; names or task files); ``selection_tasks``
    (default: ``tasks``): the tasks whose head sets claims 3 and 4 compare (selection only,
    no evaluation: a superset of ``tasks``). ``budget``: a name of ``lofit_lens.budgets``;
    its ``max_eval_examples`` (or ``n_test``) is the size of each seed's test subset.
    ``tasks=()``: head selections only (claims 3 and 4; Holm across those two rows).
    ``k``: heads (a count or a share; default the budget's, else 3%). ``task_overrides``:
    ``LoFiTConfig`` fields per task (by name); ``overrides``: for every task.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    say = log or (lambda message: None)
    seeds = sorted(seeds)
    if len(seeds) < 2:
        raise ValueError("replicate_claims needs at least 2 seeds (the paper's claims about "
                         "head selection need seeds to compare; 3 or more recommended)")
    selection_tasks = list(dict.fromkeys([*tasks, *(selection_tasks or [])]))
    name = model_id(model)
    dims = model_dims(model)

    runs = claim_runs(selection_tasks, budget, seeds, k, n_test, task_overrides, say, **overrides)
    labels = {t: runs[t, seeds[0]][0].name for t in selection_tasks}
    n_heads = runs[selection_tasks[0], seeds[0]][1].num_heads(dims.total_heads)
    data = {key: functools.cache(functools.partial(TrainingSet.build, model, *run))
            for key, run in runs.items()}

    def timed(what: str, fn):
        """Run ``fn`` and log its wall time and this process's CPU time (all threads: on a
        shared machine, CPU seconds / threads estimates the wall time on an idle one)."""
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        cached = (value.get("cached") if isinstance(value, dict)
                  else getattr(getattr(value, "history", None), "cached", False))
        say(f"[{name}] {what}: {time.perf_counter() - t0:.0f} s wall, "
            f"{time.process_time() - c0:.0f} s CPU{' (cached)' if cached else ''}")
        return value

    # --- step 1 on every task and seed
    heads: dict[tuple[str, int], list[Head]] = {}
    for (task_name, seed), (task_obj, cfg) in runs.items():
        selection = timed(f"select {task_name} s{seed}", lambda: cached_selection(
            model, task_obj, cfg, cache_dir, progress, data[task_name, seed]))
        heads[task_name, seed] = [tuple(h) for h in selection.top(n_heads)]

    # --- evaluated cells of every task in ``tasks``
    scores: dict[tuple[str, str, int], dict[str, list[float]]] = {}  # (method, task, seed)
    sources = {t: [s for s in tasks if s != t] for t in tasks}
    for seed in seeds:
        for task_name in tasks:
            task_obj, cfg = runs[task_name, seed]
            builder = data[task_name, seed]

            def cell(heads_: Optional[Sequence[Head]]):
                return claim_cell(model, task_obj, cfg, heads_, cache_dir, progress, builder)

            def keep(method: str, record: Mapping[str, Any]) -> None:
                scores[method, task_name, seed] = {m: list(record[m]) for m in ("correct", "mc2")
                                                   if m in record}

            keep("zero_shot", timed(f"zero-shot {task_name} s{seed}", lambda: cell(None)))
            iti = timed(f"ITI {task_name} s{seed}", lambda: iti_cell(model, task_obj, cfg, cache_dir,
                                                                    options, progress))
            keep("iti", iti)
            keep("lofit", timed(f"LoFiT heads {task_name} s{seed}",
                                lambda: cell(heads[task_name, seed])))
            keep("random", timed(f"random heads {task_name} s{seed}",
                                 lambda: cell(random_heads(dims, n_heads, seed))))
            keep("iti_heads", timed(f"ITI heads {task_name} s{seed}",
                                    lambda: cell([tuple(h) for h in iti["heads"]])))
            for source in sources[task_name]:
                keep(f"heads:{source}", timed(f"{source} heads -> {task_name} s{seed}",
                                              lambda: cell(heads[source, seed])))

    seed_text = ",".join(map(str, seeds))

    def pooled(method: str, task_name: str, metric: str = "correct") -> list[float]:
        return [x for s in seeds for x in scores[method, task_name, s][metric]]

    def metric_name(task_name: str, metric: str) -> str:
        if metric == "mc2":
            return "mc2"
        return "exact_match" if runs[task_name, seeds[0]][0].kind == "generation" else "mc1"

    details: list[dict[str, Any]] = []
    claim_rows: list[dict[str, Any]] = []

    # --- claims 1 and 5: method contrasts
    if not tasks:
        say("no evaluated tasks: claims 1, 2 and 5 not tested (head selections only)")
    for claim, pairs in (("1", ("1", "1b")), ("5", ("5", "5b"))) if tasks else ():
        family = []
        for key in pairs:
            winner, baseline = CONTRASTS[key]
            for task_name in tasks:
                metrics = ["correct"] + (["mc2"] if "mc2" in scores[winner, task_name, seeds[0]] else [])
                for metric in metrics:
                    row = _paired_row(pooled(winner, task_name, metric),
                                      pooled(baseline, task_name, metric),
                                      metric_name(task_name, metric), n_bootstrap, n_permutations)
                    family.append({**row, "claim": claim, "model": name, "seeds": seed_text,
                                   "contrast": f"{winner} > {baseline} on {labels[task_name]}"})
        details += finish_family(family, alpha)
        for key in pairs:
            winner, baseline = CONTRASTS[key]
            a = [x for t in tasks for x in pooled(winner, t)]
            b = [x for t in tasks for x in pooled(baseline, t)]
            row = _paired_row(a, b, "+".join(sorted({metric_name(t, "correct") for t in tasks})),
                              n_bootstrap, n_permutations)
            claim_rows.append({**row, "claim": claim, "model": name, "seeds": seed_text,
                               "contrast": f"{winner} > {baseline}, pooled over "
                                           f"{', '.join(labels[t] for t in tasks)}"})

    # --- claim 2: same-task heads against transferred heads
    if any(sources.values()):
        family = []
        for target in tasks:
            for source in sources[target]:
                row = _paired_row(pooled("lofit", target), pooled(f"heads:{source}", target),
                                  metric_name(target, "correct"), n_bootstrap, n_permutations)
                family.append({**row, "claim": "2", "model": name, "seeds": seed_text,
                               "contrast": f"{labels[target]} heads > {labels[source]} heads "
                                           f"on {labels[target]}"})
        details += finish_family(family, alpha)
        same, transferred = [], []
        for target in [t for t in tasks if sources[t]]:
            same += pooled("lofit", target)
            transferred += list(np.mean([pooled(f"heads:{s}", target) for s in sources[target]], 0))
        result = stats.paired_permutation_test(same, transferred, n_permutations=n_permutations)
        d = np.asarray(same) - np.asarray(transferred)
        claim_rows.append({**result.row(), "claim": "2", "model": name, "seeds": seed_text,
                           "metric": "+".join(sorted({metric_name(t, "correct") for t in tasks})),
                           "unit": "examples", "sd_diff": float(d.std(ddof=1)),
                           "p_bootstrap_paper": stats.paired_bootstrap(same, transferred, n_bootstrap),
                           "contrast": "same-task heads > mean of other tasks' heads, per example",
                           "n_needed": stats.paired_mean_n_needed(result.effect, float(d.std(ddof=1)))})
    elif tasks:
        say("claim 2 needs at least two evaluated tasks: not tested")

    # --- claim 3: band width against random head sets
    family = []
    for task_name in selection_tasks:
        res = band_test([heads[task_name, s] for s in seeds], dims.n_layers, dims.n_heads, n_draws)
        family.append({**_band_row(res), "claim": "3", "model": name, "seeds": seed_text,
                       "contrast": f"{labels[task_name]} head sets narrower than random"})
    details += finish_family(family, alpha)
    res = band_test([heads[key] for key in runs], dims.n_layers, dims.n_heads, n_draws)
    claim_rows.append({**_band_row(res), "claim": "3", "model": name, "seeds": seed_text,
                       "contrast": f"all {len(runs)} head sets ({len(selection_tasks)} tasks x "
                                   f"{len(seeds)} seeds) narrower than random"})

    # --- claim 4: overlap within tasks (across seeds) against across tasks
    if len(selection_tasks) >= 2:
        res = overlap_test({key: heads[key] for key in runs}, n_permutations=n_permutations,
                           n_bootstrap=n_bootstrap)
        claim_rows.append({
            "claim": "4", "model": name, "seeds": seed_text,
            "contrast": f"Jaccard across seeds > across tasks ({len(selection_tasks)} tasks)",
            "test": f"label permutation, {res['permutations']}", "metric": "jaccard (|Ti&Tj|/K)",
            "n": res["n"], "unit": "seeds per task", "effect": res["effect"],
            "ci_low": res["ci_low"], "ci_high": res["ci_high"], "p": res["p"], "z": res["z"],
            "n_needed": res["n_needed_z"], "p_bootstrap_paper": float("nan"),
            "note": f"within {res['within']:.3f}, across {res['across']:.3f}, "
                    f"min attainable p {res['min_p']:.4f}"})
    claim_rows = finish_family(claim_rows, alpha)

    # --- accuracy, selections, stability
    accuracy = []
    for task_name in tasks:
        methods = {m: m for m in METHODS} | {f"heads:{s}": f"heads:{labels[s]}"
                                              for s in sources[task_name]}
        for method, shown in methods.items():  # a task file is shown by its name, not its path
            for metric in scores[method, task_name, seeds[0]]:
                accuracy += _accuracy_rows(name, labels[task_name], shown,
                                           metric_name(task_name, metric),
                                           {s: scores[method, task_name, s][metric] for s in seeds},
                                           n_bootstrap)
    selections = []
    for (task_name, seed), hs in heads.items():
        counts = _layer_counts(hs, dims.n_layers)
        layers = np.array([l for l, _ in hs])
        selections.append({"model": name, "task": labels[task_name], "seed": seed, "k": len(hs),
                           "band_width": int(band_width(counts, len(hs))),
                           "layer_mean": float(layers.mean()), "layer_sd": float(layers.std()),
                           "n_layers": dims.n_layers,
                           "heads": " ".join(f"{l}.{h}" for l, h in sorted(hs))})
    stability = []
    for task_name in selection_tasks:
        st = stats.jaccard_stability([heads[task_name, s] for s in seeds], dims.n_layers, dims.n_heads)
        stability.append({"model": name, "task": labels[task_name], "seeds": seed_text,
                          "k": n_heads, **st.row()})
    for a, b in itertools.combinations(selection_tasks, 2):
        cross = [stats.pair_overlap(heads[a, s], heads[b, s], dims.n_layers, dims.n_heads)
                 for s in seeds]
        stability.append({"model": name, "task": f"{labels[a]} vs {labels[b]} (same seed)",
                          "seeds": seed_text, "k": n_heads, "n_sets": 2 * len(seeds),
                          "n_pairs": len(cross),
                          "jaccard": float(np.mean([c["jaccard_paper"] for c in cross])),
                          "jaccard_min": float(min(c["jaccard_paper"] for c in cross)),
                          "jaccard_max": float(max(c["jaccard_paper"] for c in cross)),
                          "iou": float(np.mean([c["iou"] for c in cross])),
                          "jaccard_random": float(np.mean([c["expected_random"] for c in cross])),
                          "p_max": float(max(c["p_value"] for c in cross))})

    first = runs[tasks[0], seeds[0]][1] if tasks else runs[selection_tasks[0], seeds[0]][1]
    settings = {name: {
        "budget": budget, "tasks": [labels[t] for t in tasks],
        "selection_tasks": [labels[t] for t in selection_tasks], "seeds": seeds,
        "k": n_heads, "k_setting": first.k, "total_heads": dims.total_heads,
        "n_test_per_seed": {labels[t]: len(eval_examples(*runs[t, seeds[0]])) for t in tasks},
        "n_train": {labels[t]: runs[t, seeds[0]][1].max_train_examples for t in selection_tasks},
        "epochs": [first.epochs_select, first.epochs_bias], "lr_bias": first.lr_bias,
        "protocol": first.protocol, "alpha": alpha, "iti_alpha": options.iti_alpha}}
    seconds = {name: round(time.perf_counter() - start, 1),
               f"{name} cpu": round(time.process_time() - cpu_start, 1)}
    say(f"[{name}] claims done in {seconds[name]:.0f} s")
    return ClaimsReport(_frame(claim_rows), _frame(details), pd.DataFrame(accuracy),
                        pd.DataFrame(selections), pd.DataFrame(stability), settings, seconds)


def _band_row(res: Mapping[str, Any]) -> dict[str, Any]:
    return {"test": "band width vs random sets, Monte Carlo", "metric": "half-mass band (layers)",
            "n": res["n"], "unit": "head sets", "effect": res["effect"], "ci_low": res["ci_low"],
            "ci_high": res["ci_high"], "p": res["p"], "random_sd": res["random_sd"],
            "n_needed": res["n_needed"], "p_bootstrap_paper": float("nan"),
            "note": f"observed {res['observed']:.2f} layers, random {res['random']:.2f}"}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan if column != "note" else ""
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


# ---------------------------------------------------------------------- markdown
def _effect(row: Mapping[str, Any]) -> str:
    scale = 100 if row["unit"] == "examples" else 1
    fmt = (lambda v: f"{scale * v:+.1f}") if scale == 100 else (lambda v: f"{v:+.2f}")
    if not np.isfinite(row["effect"]):
        return "-"
    ci = (f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
          if np.isfinite(row["ci_low"]) else "")
    return fmt(row["effect"]) + ci


def claims_table(frame: pd.DataFrame) -> str:
    """Markdown of ``claims`` or ``details`` rows: effect in points (paired examples) or in
    layers / Jaccard, 95% CI, p, Holm p, verdict, n needed."""
    if frame.empty:
        return "(none)"
    lines = ["| claim | model | contrast | test | n | seeds | effect [95% CI] | p | p (Holm) | "
             "paired bootstrap p (paper's) | verdict | n needed (α=0.05 / α/m) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        needed = f"{stats.format_n(r['n_needed'])} / {stats.format_n(r['n_needed_holm'])}"
        lines.append(f"| {r['claim']} | {r['model']} | {r['contrast']} | {r['test']} | "
                     f"{int(r['n'])} {r['unit']} | {r['seeds']} | {_effect(r)} | "
                     f"{stats.format_p(r['p'])} | {stats.format_p(r['p_holm'])} | "
                     f"{stats.format_p(r['p_bootstrap_paper'])} | {r['verdict']} | {needed} |")
    return "\n".join(lines)


def accuracy_table(frame: pd.DataFrame) -> str:
    """Markdown of the pooled accuracy rows: score and 95% interval in %, n, the interval's
    method."""
    if frame.empty:
        return "(no task evaluated)"
    pooled = frame[frame["seed"] == "pooled"]
    lines = ["| model | task | method | metric | n | score [95% CI] | per seed | interval |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in pooled.iterrows():
        seeds = frame[(frame["model"] == r["model"]) & (frame["task"] == r["task"])
                      & (frame["method"] == r["method"]) & (frame["metric"] == r["metric"])
                      & (frame["seed"] != "pooled")]
        pct = stats.format_pct
        per_seed = " / ".join(pct(s) for s in seeds["score"])
        lines.append(f"| {r['model']} | {r['task']} | {r['method']} | {r['metric']} | {r['n']} | "
                     f"{pct(r['score'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] | "
                     f"{per_seed} | {r['ci']} |")
    return "\n".join(lines)


def stability_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    lines = ["| model | head sets | K | pairs | Jaccard mean [min, max] | random expectation | "
             "max pairwise p (hypergeometric) |", "|---|---|---|---|---|---|---|"]
    for _, r in frame.iterrows():
        lines.append(f"| {r['model']} | {r['task']} | {r['k']} | {r['n_pairs']} | "
                     f"{r['jaccard']:.2f} [{r['jaccard_min']:.2f}, {r['jaccard_max']:.2f}] | "
                     f"{r['jaccard_random']:.3f} | {stats.format_p(r['p_max'])} |")
    return "\n".join(lines)


def render_markdown(report: ClaimsReport) -> str:
    parts = ["## Claims (one row per claim, model and contrast; Holm across the rows of a model)",
             "", claims_table(report.claims), "",
             "Effects: paired examples in accuracy points (a - b), head sets in layers (random "
             "minus observed half-mass band) or Jaccard (within minus across); > 0 favours the "
             "claim. Tests are one-sided in the claim's direction.", "",
             "## Comparisons behind each claim (Holm within each claim and model)", "",
             claims_table(report.details), "",
             "## Accuracy (pooled over the seeds' disjoint test subsets)", "",
             accuracy_table(report.accuracy), "",
             "## Head-set stability across seeds, and overlap across tasks", "",
             stability_table(report.stability), "",
             "## Settings", ""]
    for model, settings in report.settings.items():
        parts.append(f"- {model}: " + ", ".join(f"{k}={v}" for k, v in settings.items())
                     + f"; wall time {report.seconds.get(model, float('nan')) / 60:.1f} min, "
                     f"CPU time {report.seconds.get(f'{model} cpu', float('nan')) / 60:.1f} min")
    return "\n".join(parts) + "\n"
