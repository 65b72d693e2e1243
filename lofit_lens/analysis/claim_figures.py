"""Fig. 2, 4 and 5 with 95% confidence intervals, from the cells of the claims.

``claim_figures(model, ...)`` uses the design of ``claims.replicate_claims``: every seed has
its own training sample and its own disjoint random test subset (``claims_data.claim_runs``),
and every cell is a cached ``claims_data.claim_cell``. With the same budget, seeds and cache, the
claims' cells are read back, not recomputed: the same-task, random-heads and other-task cells
of Fig. 2, and the budget's K and training size in Fig. 4/5. Per-example outcomes are pooled
over seeds (every pair in a test is a distinct example, compared within its seed):

* ``transfer`` (Fig. 2): v tuned on each target task with the K heads selected on each
  source task (same seed), or K random heads. Each cell is tested against its column's
  same-task cell: exact McNemar, one-sided (same-task better), Holm across the matrix.
* ``k_sweep`` (Fig. 5): v tuned on the top ``round(f * heads)`` heads of the seed's
  selection, for each fraction ``f``. Each point against the budget's K: exact McNemar,
  two-sided, Holm across the model's sweep.
* ``data_efficiency`` (Fig. 4): both steps on ``n`` training examples, for each ``n``, at the
  budget's K. Each point against the budget's training size, tested like ``k_sweep``.

Every accuracy carries a Wilson 95% interval (``stats.seed_intervals``), per seed and pooled;
0-shot rows in ``k_sweep`` and ``data_efficiency`` give the plots' reference line. Marks:
``*`` Holm p < 0.05, ``+`` Holm p < 0.1. A sweep without the budget's point (K or training
size) is drawn untested, with a logged note. Multiple-choice targets are scored by MC1.

This module computes the tables; ``analysis.plotting`` draws them (``ClaimFigures.figures``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from lofit_lens import stats
from lofit_lens.analysis.cells import cached_selection
from lofit_lens.analysis.claims_data import (
    DEFAULT_SELECTION_TASKS, DEFAULT_TASKS, claim_cell, claim_runs,
)
from lofit_lens.analysis.transfer import RANDOM, significance_mark
from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.methods.selectors import random_heads
from lofit_lens.intervention import Head
from lofit_lens.training import TrainingSet

FRACTIONS = (0.03, 0.1, 0.5)
"""Fig. 5's points on a 2-core CPU (the paper's sweep: ``budgets.FRACTIONS``)."""
SIZES = (16, 40)
"""Fig. 4's points on a 2-core CPU (the paper's: ``budgets.SIZES``)."""

FRAMES = ("transfer", "k_sweep", "data_efficiency")
"""The tables of ``ClaimFigures``, in the order ``save`` writes them."""

Log = Callable[[str], None]


@dataclass
class ClaimFigures:
    """Fig. 2, 4 and 5 as frames; one row per point and seed (``seed``: the seed, or
    ``"pooled"``). Every row: ``model``, ``task`` (the target), ``seed``, ``n``, ``metric``,
    ``accuracy`` with ``ci_low`` / ``ci_high`` (Wilson 95%), ``cached``. Pooled rows of a
    tested point add ``reference``, ``effect`` (point minus reference, or reference minus
    point in ``transfer``, so > 0 favours same-task heads) with its 95% interval
    (``effect_low``, ``effect_high``: Newcombe's for paired proportions), ``p``, ``p_holm``
    and ``mark``.

    ``transfer``: ``source`` (a task, or ``"random"``) and ``k``; ``k_sweep``: ``method``
    (``"lofit"``, ``"zero_shot"``), ``fraction``, ``k``; ``data_efficiency``: ``method``,
    ``size``, ``n_train``, ``k``."""

    transfer: pd.DataFrame
    k_sweep: pd.DataFrame
    data_efficiency: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: Sequence["ClaimFigures"]) -> "ClaimFigures":
        frames = {f: pd.concat([getattr(p, f) for p in parts], ignore_index=True) for f in FRAMES}
        return cls(**frames, settings={k: v for p in parts for k, v in p.settings.items()})

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "ClaimFigures":
        """What ``save`` wrote to ``folder`` (the tables and settings; the figures are drawn
        again from them). A missing table: ``FileNotFoundError`` naming it."""
        folder = Path(folder)
        frames = {}
        for name in FRAMES:
            path = folder / f"{name}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no {name} table (ClaimFigures.save writes "
                                        f"{', '.join(f + '.csv' for f in FRAMES)})")
            text = path.read_text().strip()
            frame = pd.read_csv(path, dtype={"seed": str}) if text else pd.DataFrame()
            frames[name] = _frame(frame.to_dict("records")) if not frame.empty else frame
        settings = folder / "settings.json"
        return cls(**frames, settings=json.loads(settings.read_text()) if settings.is_file() else {})

    def figures(self) -> dict[str, Any]:
        """``{file stem: plotly figure}``: ``fig2_transfer_<model>`` per model,
        ``fig5_k_sweep``, ``fig4_data_efficiency`` (``plotting.plot_claim_figures``)."""
        from lofit_lens.analysis.plotting import plot_claim_figures

        return plot_claim_figures(self.transfer, self.k_sweep, self.data_efficiency)

    def markdown(self) -> str:
        """The pooled rows of the three figures as Markdown tables (accuracy in % with its
        95% interval; effect against the reference in points with its interval; Holm p)."""
        parts = []
        for title, frame, column, label, effect_label in (
                ("Fig. 2: heads from a source task, tuned on a target task (one-sided tests)",
                 self.transfer, "source", "heads from", "same-task minus this"),
                ("Fig. 5: share of heads tuned (two-sided tests)", self.k_sweep, "k", "K",
                 "this minus reference"),
                ("Fig. 4: training examples (two-sided tests)", self.data_efficiency, "n_train",
                 "n train", "this minus reference")):
            if frame.empty:
                continue
            lines = [f"## {title}", "", f"| model | task | {label} | metric | n | accuracy [95% "
                     f"CI] | reference | {effect_label} [95% CI] | p | p (Holm) |", "|---" * 10 + "|"]
            for _, r in frame[frame["seed"] == "pooled"].iterrows():
                shown = "0-shot" if r.get("method") == "zero_shot" else r[column]
                pct, fp = stats.format_pct, stats.format_p
                tested = bool(r["reference"])
                effect = (f"{100 * r['effect']:+.1f} [{100 * r['effect_low']:+.1f}, "
                          f"{100 * r['effect_high']:+.1f}] | {fp(r['p'])} | "
                          f"{fp(r['p_holm'])}{r['mark']}" if tested else " | | ")
                lines.append(f"| {r['model']} | {r['task']} | {shown} | {r['metric']} | {r['n']} | "
                             f"{pct(r['accuracy'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}] | "
                             f"{r['reference']} | {effect} |")
            parts += lines + [""]
        return "\n".join(parts)

    def save(self, out: Union[str, Path], formats: Sequence[str] = ("html", "png")) -> list[Path]:
        """``transfer.csv``, ``k_sweep.csv``, ``data_efficiency.csv``, ``settings.json``,
        ``claim_figures.md`` and every figure under ``out`` (``formats=()``: no figure)."""
        from lofit_lens.analysis.plotting import save_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in FRAMES:
            path = out / f"{name}.csv"
            getattr(self, name).to_csv(path, index=False)
            paths.append(path)
        path = out / "settings.json"
        path.write_text(json.dumps(self.settings, indent=2, default=str))
        paths.append(path)
        path = out / "claim_figures.md"
        path.write_text(self.markdown())
        paths.append(path)
        for stem, fig in (self.figures().items() if formats else ()):
            paths += save_figure(fig, out / stem, formats)
        return paths


# ---------------------------------------------------------------------- rows and tests
def _rows(keys: Mapping[str, Any], per_seed: Mapping[int, Mapping[str, Any]]) -> list[dict]:
    """One row per seed and a pooled row for one point (``stats.seed_intervals``: Wilson
    95%); ``per_seed``: the seeds' records."""
    cached = {str(s): r["cached"] for s, r in per_seed.items()}
    cached["pooled"] = all(cached.values())
    metric = next(iter(per_seed.values()))["metric"]
    return [{**keys, "seed": row["seed"], "n": row["n"], "metric": metric,
             "accuracy": row["score"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
             "cached": cached[row["seed"]]}
            for row in stats.seed_intervals({s: r["correct"] for s, r in per_seed.items()})]


def _pooled(per_seed: Mapping[int, Mapping[str, Any]]) -> np.ndarray:
    return np.concatenate([np.asarray(per_seed[s]["correct"], float) for s in sorted(per_seed)])


def _tests(rows: list[dict], tested: Sequence[tuple[int, np.ndarray, np.ndarray, str]],
           alternative: str) -> None:
    """McNemar of each ``(row index, a, b, reference label)`` (``a`` against ``b``), then Holm
    across them (one family); written into the pooled rows."""
    results = [stats.mcnemar_exact(a, b, alternative=alternative) for _, a, b, _ in tested]
    adjusted = stats.holm([r.p for r in results])
    for (i, _, _, reference), result, p_holm in zip(tested, results, adjusted):
        rows[i].update(reference=reference, effect=result.effect, effect_low=result.ci_low,
                       effect_high=result.ci_high, p=result.p, p_holm=float(p_holm),
                       mark=significance_mark(float(p_holm)))


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("reference", "effect", "effect_low", "effect_high", "p", "p_holm", "mark"):
        if column not in frame:
            frame[column] = "" if column in ("reference", "mark") else np.nan
    frame[["reference", "mark"]] = frame[["reference", "mark"]].fillna("")
    return frame


# ---------------------------------------------------------------------- the figures
def claim_figures(
    model,
    tasks: Sequence[str] = DEFAULT_TASKS,
    sources: Optional[Sequence[str]] = DEFAULT_SELECTION_TASKS,
    budget: str = "claims-quick",
    seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] = FRACTIONS,
    sizes: Sequence[int] = SIZES,
    cache_dir: Union[str, Path] = "analysis_out/cache",
    k: Union[int, float, None] = None,
    n_test: Optional[int] = None,
    task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    progress: bool = False,
    log: Optional[Log] = print,
    **overrides,
) -> ClaimFigures:
    """Fig. 2 (``tasks`` as targets, heads from ``sources``, ``tasks`` and K random heads),
    Fig. 5 (``fractions``) and Fig. 4 (``sizes``) on ``model``, on the claims' design (module
    docstring). ``budget``, ``seeds``, ``k``, ``n_test``, ``task_overrides`` and
    ``overrides``: as in ``replicate_claims``; pass the same ones to read its cells back.
    ``fractions`` lie in (0, 1); ``sizes`` are counts of training examples; ``fractions=()`` /
    ``sizes=()`` skip a sweep."""
    say = log or (lambda message: None)
    seeds = sorted(seeds)
    if not tasks:
        raise ValueError("claim_figures needs at least one task to evaluate")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds}: each seed once (a repeated seed would split the test "
                         "set for a seed that is then pooled once)")
    bad = [f for f in fractions if not 0 < f < 1] + [n for n in sizes if not (
        isinstance(n, int) and n > 0)]
    if bad:
        raise ValueError(f"fractions must lie in (0, 1) and sizes be positive counts; got {bad}")
    sources = list(dict.fromkeys([*tasks, *(sources or [])]))
    runs = claim_runs(sources, budget, seeds, k, n_test, task_overrides, say, **overrides)
    labels = {t: runs[t, seeds[0]][0].name for t in sources}
    if len(set(labels.values())) != len(labels) or RANDOM in labels.values():
        raise ValueError(f"task names {list(labels.values())}: each must be distinct and not "
                         f"{RANDOM!r} (the random-heads row)")
    name = model_id(model)
    dims = model_dims(model)
    first = runs[tasks[0], seeds[0]][1]
    n_heads = first.num_heads(dims.total_heads)
    @functools.cache
    def sized_run(task_name: str, seed: int, size: Optional[int]):
        task_obj, cfg = runs[task_name, seed]
        if size is not None:
            cfg = dataclasses.replace(cfg, max_train_examples=size)
        return task_obj, cfg, functools.cache(functools.partial(TrainingSet.build, model, task_obj, cfg))

    def run_at(task_name: str, seed: int, size: Optional[int] = None):
        """(task, config, training-set builder) of a run with ``size`` training examples
        (``None``: the budget's); one builder per run, shared by its selection and cells."""
        budget_size = runs[task_name, seed][1].max_train_examples
        return sized_run(task_name, seed, None if size == budget_size else size)

    @functools.cache
    def selection(task_name: str, seed: int, size: Optional[int] = None):
        task_obj, cfg, data = run_at(task_name, seed, size)
        return cached_selection(model, task_obj, cfg, cache_dir, progress, data)

    def cell(task_name: str, seed: int, heads: Optional[Sequence[Head]], what: str,
             size: Optional[int] = None) -> dict[str, Any]:
        task_obj, cfg, data = run_at(task_name, seed, size)
        record = claim_cell(model, task_obj, cfg, heads, cache_dir, progress, data)
        say(f"[{name}] {what} s{seed}: {record['metric']} {100 * record['accuracy']:.1f}"
            f"{' (cached)' if record['cached'] else ''}")
        return record

    zero_shot = {t: {s: cell(t, s, None, f"zero-shot {labels[t]}") for s in seeds} for t in tasks}
    top = {(t, s): [tuple(h) for h in selection(t, s).top(n_heads)] for t in sources for s in seeds}

    # --- Fig. 2
    rows: list[dict] = []
    tested = []
    for target in tasks:
        keys = {"model": name, "task": labels[target], "k": n_heads}
        same = {s: cell(target, s, top[target, s], f"{labels[target]} heads -> {labels[target]}")
                for s in seeds}
        heads_of = {labels[src]: {s: top[src, s] for s in seeds} for src in sources if src != target}
        heads_of[RANDOM] = {s: random_heads(dims, n_heads, s) for s in seeds}
        rows += _rows({**keys, "source": labels[target]}, same)
        for source, heads in heads_of.items():
            records = {s: cell(target, s, heads[s], f"{source} heads -> {labels[target]}")
                       for s in seeds}
            rows += _rows({**keys, "source": source}, records)
            tested.append((len(rows) - 1, _pooled(same), _pooled(records), f"{labels[target]} heads"))
    _tests(rows, tested, "greater")
    transfer = _frame(rows)

    # --- Fig. 5 and Fig. 4: one row per point, then 0-shot
    def sweep(what: str, points: Sequence[Any], keys: Callable[[str, Any], dict],
              zero_keys: dict, record: Callable[[str, int, Any], dict],
              reference: Any) -> pd.DataFrame:
        """Rows of every point of every task; each point but ``reference`` tested against it
        (no test when ``reference`` is not among ``points``)."""
        if reference not in points:
            say(f"[{name}] {what}: the claims' point ({reference}) is not among {list(points)}: "
                "drawn without tests")
        rows, tested = [], []
        for task_name in tasks:
            at = {p: {s: record(task_name, s, p) for s in seeds} for p in points}
            for point in points:
                rows += _rows({"model": name, "task": labels[task_name], "method": "lofit",
                               **keys(task_name, point)}, at[point])
                if reference in at and point != reference:
                    tested.append((len(rows) - 1, _pooled(at[point]), _pooled(at[reference]),
                                   what.split()[0] + f"={reference}"))
            rows += _rows({"model": name, "task": labels[task_name], "method": "zero_shot",
                           **zero_keys}, zero_shot[task_name])
        _tests(rows, tested, "two-sided")
        return _frame(rows)

    def k_of(fraction: float) -> int:
        return dataclasses.replace(first, k=fraction).num_heads(dims.total_heads)

    share = {}  # K -> the first fraction that rounds to it (fractions of one K share a cell)
    for f in fractions:
        share.setdefault(k_of(f), f)
    k_sweep = sweep(
        "K sweep", list(share), lambda t, k: {"fraction": share[k], "k": k},
        {"fraction": 0.0, "k": 0},
        lambda t, s, k: cell(t, s, [tuple(h) for h in selection(t, s).top(k)], f"K={k} {labels[t]}"),
        n_heads) if fractions else pd.DataFrame()

    def used(t: str, n: int) -> int:  # a size beyond the training data uses all of it
        return len(runs[t, seeds[0]][0].train_examples(seeds[0], n))

    data_efficiency = sweep(
        "n training examples", list(sizes),
        lambda t, n: {"size": n, "n_train": used(t, n), "k": n_heads},
        {"size": 0, "n_train": 0, "k": 0},
        lambda t, s, n: cell(t, s, [tuple(h) for h in selection(t, s, n).top(n_heads)],
                             f"n={n} {labels[t]}", size=n),
        first.max_train_examples) if sizes else pd.DataFrame()
    settings = {name: {"budget": budget, "tasks": [labels[t] for t in tasks],
                       "sources": [labels[t] for t in sources], "seeds": seeds,
                       "k": n_heads, "fractions": list(fractions), "sizes": list(sizes),
                       "n_test_per_seed": {labels[t]: len(zero_shot[t][seeds[0]]["correct"])
                                           for t in tasks},
                       "epochs": [first.epochs_select, first.epochs_bias],
                       "lr_bias": first.lr_bias, "protocol": first.protocol}}
    return ClaimFigures(transfer, k_sweep, data_efficiency, settings)
