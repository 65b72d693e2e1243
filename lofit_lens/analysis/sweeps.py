"""LoFiT under varying budgets: number of heads (paper Fig. 5) and training data (Fig. 4).

Both sweeps cache every point on disk (``lofit_lens.analysis.cells``) and return one row per
point with ``method`` ``"lofit"`` (``"random"`` for random heads in ``k_sweep``) plus a
``"zero_shot"`` reference row (the untouched model).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pandas as pd

from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.budgets import FRACTIONS, SIZES
from lofit_lens.analysis.cells import bias_cell, cached_selection, zero_shot_cell
from lofit_lens.methods.selectors import random_heads
from lofit_lens.config import LoFiTConfig
from lofit_lens.executors import ExecutorLike, get_executor
from lofit_lens.intervention import Head
from lofit_lens.stats import wilson_ci
from lofit_lens.tasks.base import Task
from lofit_lens.training import HeadSelection, TaskLike, TrainingSet, resolve_run

DataBuilder = Optional[Callable[[], TrainingSet]]


# ---------------------------------------------------------------------- cells as tasks
# What an executor runs (``lofit_lens.executors``): ``run_item(model, item)`` with one of the
# items below. Each reads its result from the cell cache or computes and writes it there. In
# this process ``data`` shares one encoded training set between the cells of a task; a Ray
# worker gets ``data=None`` and encodes what its cell needs.
@dataclass
class SelectionItem:
    """Step 1 (head selection) of ``task`` under ``cfg``; the result is the ``HeadSelection``
    (``k`` given: its top-``k`` heads)."""

    task: Task
    cfg: LoFiTConfig
    cache_dir: Union[str, Path]
    k: Optional[int] = None
    progress: bool = False
    data: DataBuilder = None

    def run(self, model) -> Union[HeadSelection, list[Head]]:
        selection = cached_selection(model, self.task, self.cfg, self.cache_dir, self.progress,
                                     self.data)
        return selection if self.k is None else selection.top(self.k)


@dataclass
class BiasItem:
    """v tuned on ``heads`` for ``task``, then evaluated (``cells.bias_cell``)."""

    task: Task
    cfg: LoFiTConfig
    heads: Sequence[Head]
    cache_dir: Union[str, Path]
    progress: bool = False
    data: DataBuilder = None

    def run(self, model) -> dict[str, Any]:
        return bias_cell(model, self.task, self.cfg, self.heads, self.cache_dir, self.progress,
                         self.data)


@dataclass
class LoFiTItem:
    """Both steps in one cell: the top-``k`` heads of a selection, then ``bias_cell``."""

    task: Task
    cfg: LoFiTConfig
    k: int
    cache_dir: Union[str, Path]
    progress: bool = False

    def run(self, model) -> dict[str, Any]:
        data = functools.cache(functools.partial(TrainingSet.build, model, self.task, self.cfg))
        selection = cached_selection(model, self.task, self.cfg, self.cache_dir, self.progress, data)
        return bias_cell(model, self.task, self.cfg, selection.top(self.k), self.cache_dir,
                         self.progress, data)


@dataclass
class ZeroShotItem:
    """The untouched model on ``task``'s test split (``cells.zero_shot_cell``)."""

    task: Task
    cfg: LoFiTConfig
    cache_dir: Union[str, Path]
    progress: bool = False

    def run(self, model) -> dict[str, Any]:
        return zero_shot_cell(model, self.task, self.cfg, self.cache_dir, self.progress)


def run_item(model, item):
    """What an executor calls: ``item.run(model)``."""
    return item.run(model)


def selection_task(model, item: SelectionItem):
    return item.run(model)


def bias_task(model, item: BiasItem) -> dict[str, Any]:
    return item.run(model)


def _row(model, task_name: str, method: str, record: dict[str, Any], **extra) -> dict[str, Any]:
    """One point: its accuracy with a Wilson 95% interval over the evaluated examples."""
    low, high = wilson_ci(sum(record["correct"]), len(record["correct"]))
    return {"model": model_id(model), "task": task_name, "method": method, **extra,
            "metric": record["metric"], "accuracy": record["accuracy"], "ci_low": low,
            "ci_high": high, "n_eval": len(record["correct"]), "cached": record["cached"],
            "file": record["path"]}


def k_sweep(
    model,
    task: TaskLike,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
    random_heads_too: bool = False,
    cache_dir: Union[str, Path] = "analysis_out/cache",
    zero_shot: bool = True,
    progress: bool = True,
    executor: ExecutorLike = None,
    **budget_overrides,
) -> pd.DataFrame:
    """Fig. 5: one head selection, then v tuned on the top ``round(f * heads)`` heads for each
    fraction ``f`` (and, with ``random_heads_too``, on as many random heads).

    Columns: model, task, method, fraction, k, metric, accuracy, ci_low, ci_high (Wilson
    95%), n_eval, cached, file.
    A fraction rounds like ``LoFiTConfig.k`` (at least one head); fractions that round to
    the same K share one cached cell. ``executor``: ``"local"``, ``"ray"`` or an
    ``Executor`` (``lofit_lens.executors``): the selection, then every cell, as its tasks.
    """
    task_obj, cfg = resolve_run(task, None, {**budget_overrides, "seed": seed})
    total = model_dims(model).total_heads
    run_cells = get_executor(executor)
    local = run_cells.in_process
    data = functools.cache(functools.partial(TrainingSet.build, model, task_obj, cfg)) \
        if local else None
    shown = progress and local
    [selection] = run_cells.map(run_item, model,
                                [SelectionItem(task_obj, cfg, cache_dir, None, shown, data)])
    points, cells = [], {}  # cells: one per distinct head set (equal K share a cell)
    for fraction in fractions:
        k = dataclasses.replace(cfg, k=fraction).num_heads(total)
        heads = {"lofit": selection.top(k)}
        if random_heads_too:
            heads["random"] = random_heads(model_dims(model), k, seed)
        for method, chosen in heads.items():
            key = tuple(map(tuple, chosen))
            cells.setdefault(key, BiasItem(task_obj, cfg, chosen, cache_dir, shown, data))
            points.append((method, fraction, k, key))
    items: list[Any] = list(cells.values())
    if zero_shot:
        items.append(ZeroShotItem(task_obj, cfg, cache_dir, shown))
    records = run_cells.map(run_item, model, items, desc="k sweep cells", progress=progress)
    by_heads, rows = dict(zip(cells, records)), []
    for method, fraction, k, key in points:  # a cell's later points read it back, as cached
        rows.append(_row(model, task_obj.name, method, by_heads[key], fraction=fraction, k=k))
        by_heads[key] = {**by_heads[key], "cached": True}
    if zero_shot:
        rows.append(_row(model, task_obj.name, "zero_shot", records[-1], fraction=0.0, k=0))
    return pd.DataFrame(rows)


def data_efficiency(
    model,
    task: TaskLike,
    sizes: Sequence[int] = SIZES,
    k: Union[int, float] = 0.1,
    seed: int = 0,
    cache_dir: Union[str, Path] = "analysis_out/cache",
    zero_shot: bool = True,
    progress: bool = True,
    executor: ExecutorLike = None,
    **budget_overrides,
) -> pd.DataFrame:
    """Fig. 4: full LoFiT (head selection and bias tuning) on ``n`` training examples for
    each ``n`` in ``sizes`` (paper: K = 10%).

    Columns: model, task, method, size (requested), n_train (used: a size beyond the
    training set uses all of it), k, metric, accuracy, ci_low, ci_high (Wilson 95%), n_eval,
    cached, file.
    ``executor``: ``"local"``, ``"ray"`` or an ``Executor`` (``lofit_lens.executors``): each
    size (selection and bias tuning) is one task.
    """
    task_obj, base = resolve_run(task, None, {**budget_overrides, "k": k, "seed": seed})
    n_heads = base.num_heads(model_dims(model).total_heads)
    run_cells = get_executor(executor)
    shown = progress and run_cells.in_process
    items: list[Any] = [LoFiTItem(task_obj, dataclasses.replace(base, max_train_examples=size),
                                  n_heads, cache_dir, shown) for size in sizes]
    if zero_shot:
        items.append(ZeroShotItem(task_obj, base, cache_dir, shown))
    records = run_cells.map(run_item, model, items, desc="data-efficiency cells",
                            progress=progress)
    rows = [_row(model, task_obj.name, "lofit", record, size=size,
                 n_train=record["history"]["n_train"], k=n_heads)
            for size, record in zip(sizes, records)]
    if zero_shot:
        rows.append(_row(model, task_obj.name, "zero_shot", records[-1], size=0, n_train=0, k=0))
    return pd.DataFrame(rows)
