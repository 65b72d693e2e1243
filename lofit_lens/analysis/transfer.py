"""Task specificity of LoFiT's heads (paper Fig. 2): tune v on task T with heads chosen on S.

``transfer_matrix`` selects the top-K heads on every source task S (and draws K random
heads), tunes offsets on every target task T with each head set, and evaluates on T's test
split with T's primary metric (exact match; MC1 for multiple choice). Cells are compared
with the same-task cell (S = T) of their column by a one-sided paired bootstrap over test
examples. Head selections and every cell are cached on disk (see ``lofit_lens.analysis.cells``):
a rerun reads what is done and computes the rest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from lofit_lens.config import LoFiTConfig
from lofit_lens.executors import ExecutorLike, get_executor
from lofit_lens.backends.hooked import model_dims
from lofit_lens.intervention import Head
from lofit_lens.analysis.sweeps import BiasItem, SelectionItem, bias_task, selection_task
from lofit_lens.methods.selectors import random_heads as draw_random_heads
from lofit_lens.stats import paired_bootstrap_p, wilson_ci
from lofit_lens.tasks.base import Task
from lofit_lens.training import TaskLike, TrainingSet, resolve_run

RANDOM = "random"
MARKS = ((0.05, "*"), (0.1, "+"))


@dataclass
class TransferResult:
    """Fig. 2 as frames with rows = source of the heads (tasks, then ``"random"``) and
    columns = target task.

    ``accuracy``: the target's primary metric; ``relative``: ``acc(S->T) / acc(T->T)``;
    ``p_values``: paired bootstrap p of cells below same-task (NaN elsewhere); ``marks``:
    ``"*"`` p < 0.05, ``"+"`` p < 0.1; ``cells``: one row per cell (accuracy with its Wilson
    95% interval ``ci_low`` / ``ci_high``, the cache file);
    ``heads``: the head set of each row.
    """

    accuracy: pd.DataFrame
    relative: pd.DataFrame
    p_values: pd.DataFrame
    marks: pd.DataFrame
    cells: pd.DataFrame
    heads: dict[str, list[Head]]

    def figure(self, title: Optional[str] = None):
        """``plot_transfer`` coloured by ``relative``; cells show the accuracy (%) and mark,
        as the paper's Fig. 2 does, and the accuracy's Wilson 95% interval."""
        from lofit_lens.analysis.plotting import plot_transfer

        fig = plot_transfer(self.relative, self.marks, title=title)
        bounds = {b: 100 * self.cells.pivot(index="source", columns="target", values=b)
                  .reindex(index=self.accuracy.index, columns=self.accuracy.columns)
                  for b in ("ci_low", "ci_high")}
        fig.data[0].text = ((100 * self.accuracy).round(1).astype(str) + self.marks + "<br>["
                            + bounds["ci_low"].round(1).astype(str) + ", "
                            + bounds["ci_high"].round(1).astype(str) + "]").to_numpy()
        fig.update_traces(hovertemplate="%{y} heads -> %{x}: %{text}, relative %{z:.3f}"
                                        "<extra></extra>")
        return fig


def significance_mark(p: float) -> str:
    return next((mark for level, mark in MARKS if p < level), "")


def compare_to_same_task(correct: Mapping[tuple[str, str], Sequence[float]],
                         rows: Sequence[str], cols: Sequence[str], n_bootstrap: int = 1000,
                         seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                                                 pd.DataFrame]:
    """(accuracy, relative, p_values, marks) from per-example correctness ``correct[S, T]``;
    the reference of column T is cell (T, T)."""
    acc = pd.DataFrame(np.nan, index=list(rows), columns=list(cols))
    p_values = acc.copy()
    marks = pd.DataFrame("", index=acc.index, columns=acc.columns)
    for (s, t), values in correct.items():
        acc.loc[s, t] = float(np.mean(values))
    for t in cols:
        reference = np.asarray(correct[t, t], dtype=float)
        for s in rows:
            if s != t and acc.loc[s, t] < acc.loc[t, t]:
                p = paired_bootstrap_p(np.asarray(correct[s, t]), reference, n_bootstrap, seed)
                p_values.loc[s, t], marks.loc[s, t] = p, significance_mark(p)
    diag = np.array([acc.loc[t, t] for t in cols])
    relative = acc / np.where(diag > 0, diag, np.nan)
    return acc, relative, p_values, marks


def _label(task: TaskLike) -> str:
    return task.name if isinstance(task, Task) else Path(str(task)).stem.lower()


def resolve_tasks(tasks: Sequence[TaskLike], overrides: Mapping[str, Any],
                  task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                  ) -> dict[str, tuple[Task, LoFiTConfig]]:
    """``{label: (task, config)}``: ``overrides`` for every task, then that task's entry of
    ``task_overrides`` (by label, e.g. ``{"truthfulqa": {"max_eval_examples": 24}}``)."""
    extra = dict(task_overrides or {})
    unknown = set(extra) - {_label(t) for t in tasks}
    if unknown:
        raise ValueError(f"task_overrides for unknown tasks {sorted(unknown)}")
    return {_label(t): resolve_run(t, None, {**overrides, **extra.get(_label(t), {})})
            for t in tasks}


def transfer_matrix(
    model,
    tasks: Sequence[TaskLike],
    sources: Optional[Sequence[TaskLike]] = None,
    k: Union[int, float] = 0.03,
    seed: int = 0,
    random_heads: bool = True,
    cache_dir: Union[str, Path] = "analysis_out/cache",
    n_bootstrap: int = 1000,
    progress: bool = True,
    task_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    executor: ExecutorLike = None,
    **budget_overrides,
) -> TransferResult:
    """Fig. 2 on ``model``: heads from each source (default: ``tasks``), tuned on each target.

    Rows are the sources, then any target that is not a source (its same-task cell is the
    reference of its column), then ``"random"`` (K uniform heads, seeded by ``seed``).
    ``k``: a count or a fraction of all heads (paper: 3%). ``budget_overrides`` are
    ``LoFiTConfig`` fields for every task (``epochs_select=1``, ``max_train_examples=48``,
    ``max_eval_examples=48``, ...); ``task_overrides`` adds per-task ones. Head selections
    and cells are cached under ``cache_dir`` (layout: ``lofit_lens.analysis.cells``).
    ``executor``: ``"local"`` (one after another here), ``"ray"`` (each head selection, then
    each cell, a Ray task; put ``cache_dir`` on a shared path) or an ``Executor``
    (``lofit_lens.executors``; ``None``: the process default, local).
    """
    overrides = {**budget_overrides, "k": k, "seed": seed}
    sources = list(sources) if sources is not None else list(tasks)
    runs = resolve_tasks(list({_label(t): t for t in [*sources, *tasks]}.values()),
                         overrides, task_overrides)
    targets = list(dict.fromkeys(_label(t) for t in tasks))
    rows = list(dict.fromkeys([_label(s) for s in sources] + targets))
    dims = model_dims(model)
    n_heads = next(iter(runs.values()))[1].num_heads(dims.total_heads)

    run_cells = get_executor(executor)
    local = run_cells.in_process
    # each task's training set is encoded once, by the first selection or cell that trains
    # (in this process; a Ray worker encodes what its cells need)
    data = {label: functools.cache(functools.partial(TrainingSet.build, model, *run))
            if local else None for label, run in runs.items()}
    shown = progress and local
    selected = run_cells.map(selection_task, model, [
        SelectionItem(*runs[source], cache_dir, n_heads, shown, data[source]) for source in rows],
        desc="head selections", progress=progress)
    heads: dict[str, list[Head]] = dict(zip(rows, selected))
    if random_heads:
        rows.append(RANDOM)
        heads[RANDOM] = draw_random_heads(dims, n_heads, seed)

    records, correct = [], {}
    cells = [(s, t) for s in rows for t in targets]
    items = [BiasItem(*runs[target], heads[source], cache_dir, shown, data[target])
             for source, target in cells]
    records_of = run_cells.map(bias_task, model, items, desc="transfer cells", progress=progress)
    for (source, target), record in zip(cells, records_of):
        correct[source, target] = record["correct"]
        low, high = wilson_ci(sum(record["correct"]), len(record["correct"]))
        records.append({"source": source, "target": target, "metric": record["metric"],
                        "accuracy": record["accuracy"], "ci_low": low, "ci_high": high,
                        "n_eval": len(record["correct"]),
                        "k": n_heads, "cached": record["cached"], "file": record["path"]})
    acc, relative, p_values, marks = compare_to_same_task(correct, rows, targets, n_bootstrap, seed)
    table = pd.DataFrame(records)
    table["relative"] = [relative.loc[s, t] for s, t in cells]
    table["p_value"] = [p_values.loc[s, t] for s, t in cells]
    table["mark"] = [marks.loc[s, t] for s, t in cells]
    return TransferResult(acc, relative, p_values, marks, table, heads)

