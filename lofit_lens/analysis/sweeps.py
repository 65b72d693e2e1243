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
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.budgets import FRACTIONS, SIZES
from lofit_lens.analysis.cells import bias_cell, cached_selection, zero_shot_cell
from lofit_lens.baselines.selectors import random_heads
from lofit_lens.config import LoFiTConfig
from lofit_lens.executors import ExecutorLike, get_executor
from lofit_lens.intervals import wilson_ci
from lofit_lens.intervention import Head
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


# ---------------------------------------------------------------------- plots
def _sweep_figure(frame: pd.DataFrame, x: str, x_title: str, title: str,
                  log_x: bool) -> go.Figure:
    """One panel per task; a line per (model, method), with error bars where ``frame`` has
    ``ci_low`` / ``ci_high`` and significance marks where it has ``mark``; zero-shot as a
    dotted line per model."""
    tasks = list(dict.fromkeys(frame["task"]))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(frame["model"]))}
    for col, task in enumerate(tasks, start=1):
        part = frame[frame["task"] == task]
        for (model, method), line in part[part["method"] != "zero_shot"].groupby(
                ["model", "method"], sort=False):
            line = line.sort_values(x)
            errors = (dict(type="data", symmetric=False, array=line["ci_high"] - line["accuracy"],
                           arrayminus=line["accuracy"] - line["ci_low"])
                      if "ci_low" in line else None)
            marks = line["mark"].fillna("") if "mark" in line else None
            fig.add_trace(go.Scatter(
                x=line[x], y=line["accuracy"], error_y=errors, text=marks,
                mode="lines+markers+text" if marks is not None else "lines+markers",
                textposition="middle right", name=f"{model} {method}",
                legendgroup=f"{model} {method}", showlegend=col == 1,
                line=dict(color=colours[model], dash="dash" if method == "random" else "solid"),
                hovertemplate=f"{model} {method}<br>{x_title}: %{{x}}<br>accuracy: "
                              "%{y:.3f}<extra></extra>"), row=1, col=col)
        zero_shot = part[part["method"] == "zero_shot"]
        for accuracy, refs in zero_shot.groupby("accuracy", sort=False):
            # one line per distinct value: models with equal 0-shot share a label
            models = list(dict.fromkeys(refs["model"]))
            fig.add_hline(y=accuracy, line_dash="dot",
                          line_color=colours[models[0]] if len(models) == 1 else "grey",
                          annotation_text=f"0-shot {', '.join(models)}", row=1, col=col)
        fig.update_yaxes(title_text=str(part["metric"].iloc[0]), rangemode="tozero", row=1, col=col)
    fig.update_xaxes(title_text=x_title, type="log" if log_x else "linear")
    fig.update_layout(title=title, height=420, width=max(500, 420 * len(tasks)),
                      margin=dict(t=110))
    return fig


def plot_k_sweep(frame: pd.DataFrame, title: str = "Accuracy vs number of tuned heads"
                 ) -> go.Figure:
    """Fig. 5 from ``k_sweep`` frames (concatenate several models / tasks): x = % of heads."""
    frame = frame.assign(percent=100 * frame["fraction"])
    return _sweep_figure(frame, "percent", "% of heads", title, log_x=True)


def plot_data_efficiency(frame: pd.DataFrame,
                         title: str = "Accuracy vs training examples") -> go.Figure:
    """Fig. 4 from ``data_efficiency`` frames: x = training examples used."""
    return _sweep_figure(frame, "n_train", "training examples", title, log_x=True)
