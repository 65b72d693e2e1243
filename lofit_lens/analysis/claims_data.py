"""The data the claims are tested on (``claims.replicate_claims``): the runs of every task
and seed, their head selections and the per-example scores of every method.

* **Test subsets.** Each seed is evaluated on its own random subset of the task's test split;
  the seeds' subsets are disjoint (``seed_subsets``), never the top of a file. The seed also
  sets the training sample (``Task.train_examples``) and the initialisation of A and v.
* **Cells.** Every cell is phases of the run engine in ``cache_dir`` (``lofit_lens.engine``,
  through ``lofit_lens.analysis.cells``): a rerun resumes, and a cell shared with the figure
  modules, ``ll.lofit(checkpoint=cache_dir)`` or ``compare(out=cache_dir)`` is computed once.
  Multiple-choice cells keep per-question MC1 and MC2.

``collect_claims`` runs, for every seed, LoFiT's head selection on every task, then bias
tuning on LoFiT's heads, on random heads, on ITI's heads and on the heads of every other
task, plus ITI and the untouched model, and gathers them in a ``ClaimsData``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from lofit_lens.analysis.cells import (
    bias_cell, cached_selection, cell_store, evaluated_cell, zero_shot_cell,
)
from lofit_lens.backends.hooked import ModelDims, model_dims, model_id
from lofit_lens.methods.base import MethodOptions, RunContext, check_methods
from lofit_lens.methods.iti import ITIOptions
from lofit_lens.methods.runs import trained_method
from lofit_lens.methods.selectors import random_heads
from lofit_lens.budgets import budget_settings
from lofit_lens.config import LoFiTConfig
from lofit_lens.intervention import Head
from lofit_lens.tasks.base import Example, Task
from lofit_lens.selection_quality import SelectionQuality, selection_quality
from lofit_lens.training import HeadSelection, TrainingSet, resolve_run

DEFAULT_TASKS = ("clutrr", "mquake")
DEFAULT_SELECTION_TASKS = ("clutrr", "mquake", "truthfulqa")
SUBSET_SEED = 20240613
"""Seed of the permutation that cuts each task's test split into the seeds' subsets."""
METHODS = ("zero_shot", "iti", "random", "iti_heads", "lofit")

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
def method_cell(model, task: Task, cfg: LoFiTConfig, cache_dir: Union[str, Path], name: str,
                options: Optional[MethodOptions] = None, progress: bool = True) -> dict[str, Any]:
    """The method ``name`` trained on the seed's training sample and evaluated on ``task``'s
    test split, both through the engine (the same phases as ``compare``'s row); the record
    keeps the method's heads (``heads``: for ITI, Table 2's "ITI-heads"), per-example scores
    and the training ``seconds``."""
    ctx = RunContext(model, task, cfg, {} if options is None else {name: options}, progress,
                     cell_store(cache_dir))
    trained = trained_method(ctx, name)
    record = evaluated_cell(model, task, cfg, trained, cache_dir, progress,
                            f"eval {task.name} {name}")
    return {**record, "cached": record["cached"] and trained.cached,
            "heads": trained.value["heads"], "seconds": trained.value["seconds"]}


def iti_cell(model, task: Task, cfg: LoFiTConfig, cache_dir: Union[str, Path],
             options: ITIOptions = ITIOptions(), progress: bool = True) -> dict[str, Any]:
    """ITI (``methods.iti``: probes fitted on the seed's training sample, a fixed shift on
    the K best-probed heads): ``method_cell``."""
    return method_cell(model, task, cfg, cache_dir, "iti", options, progress)


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
    model), through the engine (``cells.bias_cell`` / ``zero_shot_cell``; multiple-choice
    cells keep per-question MC2 too)."""
    if heads is None:
        return zero_shot_cell(model, task, cfg, cache_dir, progress)
    return bias_cell(model, task, cfg, heads, cache_dir, progress, data)


# ---------------------------------------------------------------------- the data
@dataclass
class ClaimsData:
    """What the claims of one model are tested on.

    ``runs[task, seed]``: the task restricted to the seed's test subset and its config
    (``claim_runs``); ``labels``: each task's name as shown (a task file by its name, not its
    path); ``heads[task, seed]``: the top ``n_heads`` heads of LoFiT's selection on every
    task of ``selection_tasks``; ``scores[method, task, seed]``: per-example ``correct`` (and
    ``mc2`` for multiple choice) of every method of ``METHODS``, and ``heads:<source>`` (v
    tuned on the heads of each task of ``sources[task]``), on every task of ``tasks``."""

    model: str
    dims: ModelDims
    budget: str
    options: ITIOptions
    seeds: list[int]
    tasks: list[str]
    selection_tasks: list[str]
    runs: dict[tuple[str, int], tuple[Task, LoFiTConfig]]
    labels: dict[str, str]
    n_heads: int
    heads: dict[tuple[str, int], list[Head]]
    scores: dict[tuple[str, str, int], dict[str, list[float]]]
    sources: dict[str, list[str]]
    quality: dict[tuple[str, int], SelectionQuality]
    """``selection_quality`` of each selection, its stability measured against the other seeds'."""
    beyond: list[str] = dataclasses.field(default_factory=list)
    """Methods beyond LoFiT's paper (JoLA, ReFT, RepE, ...) run on the same subsets: their
    ``scores`` are compared with LoFiT's (``claims_tests.beyond_lofit``)."""

    @property
    def seed_text(self) -> str:
        return ",".join(map(str, self.seeds))

    def tag(self, claim: str) -> dict[str, str]:
        """The keys that open every row of ``claim``: claim, model, seeds."""
        return {"claim": claim, "model": self.model, "seeds": self.seed_text}

    def pooled(self, method: str, task_name: str, metric: str = "correct") -> list[float]:
        """``method``'s per-example ``metric`` on ``task_name``, the seeds' subsets in turn."""
        return [x for s in self.seeds for x in self.scores[method, task_name, s][metric]]

    def metric_name(self, task_name: str, metric: str) -> str:
        if metric == "mc2":
            return "mc2"
        return "exact_match" if self.runs[task_name, self.seeds[0]][0].kind == "generation" else "mc1"


def collect_claims(model, tasks: Sequence[str], selection_tasks: Optional[Sequence[str]],
                   budget: str, seeds: Sequence[int], cache_dir: Union[str, Path],
                   k: Union[int, float, None] = None, n_test: Optional[int] = None,
                   task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   options: ITIOptions = ITIOptions(), progress: bool = False,
                   log: Optional[Log] = None, beyond: Sequence[str] = (),
                   transfer: bool = True, **overrides) -> ClaimsData:
    """Every head selection and evaluated cell of the claims on ``model`` (the arguments of
    ``replicate_claims``), cached under ``cache_dir``; each step logged with its wall and
    CPU time. ``transfer=False`` skips claim 2's cells (v tuned on another task's heads)."""
    say = log or (lambda message: None)
    seeds = sorted(seeds)
    if len(seeds) < 2:
        raise ValueError("replicate_claims needs at least 2 seeds (the paper's claims about "
                         "head selection need seeds to compare; 3 or more recommended)")
    selection_tasks = list(dict.fromkeys([*tasks, *(selection_tasks or [])]))
    check_methods(list(beyond))
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
    selections: dict[tuple[str, int], HeadSelection] = {}
    for (task_name, seed), (task_obj, cfg) in runs.items():
        selections[task_name, seed] = timed(f"select {task_name} s{seed}", lambda: cached_selection(
            model, task_obj, cfg, cache_dir, progress, data[task_name, seed]))
    heads = {key: [tuple(h) for h in sel.top(n_heads)] for key, sel in selections.items()}
    quality = {(t, s): selection_quality(sel, n_heads, others_source="seeds", others=[
        selections[t, other] for other in seeds if other != s]) for (t, s), sel in selections.items()}

    # --- evaluated cells of every task in ``tasks``
    scores: dict[tuple[str, str, int], dict[str, list[float]]] = {}  # (method, task, seed)
    sources = {t: [s for s in tasks if s != t] if transfer else [] for t in tasks}
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
            for method in beyond:
                keep(method, timed(f"{method} {task_name} s{seed}", lambda: method_cell(
                    model, task_obj, cfg, cache_dir, method, progress=progress)))
    if not tasks:
        say("no evaluated tasks: claims 1, 2 and 5 not tested (head selections only)")
    elif not transfer and len(tasks) > 1:
        say("transfer cells skipped: claim 2 not tested")
    return ClaimsData(name, dims, budget, options, seeds, list(tasks), selection_tasks, runs,
                      labels, n_heads, heads, scores, sources, quality, list(beyond))
