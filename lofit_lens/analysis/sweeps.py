"""LoFiT under varying budgets: number of heads (paper Fig. 5) and training data (Fig. 4).

Both sweeps cache every point on disk (``lofit_lens.analysis.cells``) and return one row per
point with ``method`` ``"lofit"`` (``"random"`` for random heads in ``k_sweep``) plus a
``"zero_shot"`` reference row (the untouched model).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence, Union

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.budgets import FRACTIONS, SIZES
from lofit_lens.analysis.cells import bias_cell, cached_selection, zero_shot_cell
from lofit_lens.baselines.selectors import random_heads
from lofit_lens.training import TaskLike, TrainingSet, resolve_run



def _row(model, task_name: str, method: str, record: dict[str, Any], **extra) -> dict[str, Any]:
    return {"model": model_id(model), "task": task_name, "method": method, **extra,
            "metric": record["metric"], "accuracy": record["accuracy"],
            "n_eval": len(record["correct"]), "cached": record["cached"], "file": record["path"]}


def k_sweep(
    model,
    task: TaskLike,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
    random_heads_too: bool = False,
    cache_dir: Union[str, Path] = "analysis_out/cache",
    zero_shot: bool = True,
    progress: bool = True,
    **budget_overrides,
) -> pd.DataFrame:
    """Fig. 5: one head selection, then v tuned on the top ``round(f * heads)`` heads for each
    fraction ``f`` (and, with ``random_heads_too``, on as many random heads).

    Columns: model, task, method, fraction, k, metric, accuracy, n_eval, cached, file.
    A fraction rounds like ``LoFiTConfig.k`` (at least one head); fractions that round to
    the same K share one cached cell.
    """
    task_obj, cfg = resolve_run(task, None, {**budget_overrides, "seed": seed})
    total = model_dims(model).total_heads
    data = functools.cache(functools.partial(TrainingSet.build, model, task_obj, cfg))
    selection = cached_selection(model, task_obj, cfg, cache_dir, progress, data)
    rows = []
    for fraction in fractions:
        k = dataclasses.replace(cfg, k=fraction).num_heads(total)
        heads = {"lofit": selection.top(k)}
        if random_heads_too:
            heads["random"] = random_heads(model_dims(model), k, seed)
        for method, chosen in heads.items():
            record = bias_cell(model, task_obj, cfg, chosen, cache_dir, progress, data)
            rows.append(_row(model, task_obj.name, method, record, fraction=fraction, k=k))
    if zero_shot:
        record = zero_shot_cell(model, task_obj, cfg, cache_dir, progress)
        rows.append(_row(model, task_obj.name, "zero_shot", record, fraction=0.0, k=0))
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
    **budget_overrides,
) -> pd.DataFrame:
    """Fig. 4: full LoFiT (head selection and bias tuning) on ``n`` training examples for
    each ``n`` in ``sizes`` (paper: K = 10%).

    Columns: model, task, method, size (requested), n_train (used: a size beyond the
    training set uses all of it), k, metric, accuracy, n_eval, cached, file.
    """
    task_obj, base = resolve_run(task, None, {**budget_overrides, "k": k, "seed": seed})
    n_heads = base.num_heads(model_dims(model).total_heads)
    rows = []
    for size in sizes:
        cfg = dataclasses.replace(base, max_train_examples=size)
        data = functools.cache(functools.partial(TrainingSet.build, model, task_obj, cfg))
        selection = cached_selection(model, task_obj, cfg, cache_dir, progress, data)
        record = bias_cell(model, task_obj, cfg, selection.top(n_heads), cache_dir, progress,
                           data)
        rows.append(_row(model, task_obj.name, "lofit", record, size=size,
                         n_train=record["history"]["n_train"], k=n_heads))
    if zero_shot:
        record = zero_shot_cell(model, task_obj, base, cache_dir, progress)
        rows.append(_row(model, task_obj.name, "zero_shot", record, size=0, n_train=0, k=0))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- plots
def _sweep_figure(frame: pd.DataFrame, x: str, x_title: str, title: str,
                  log_x: bool) -> go.Figure:
    """One panel per task; a line per (model, method); zero-shot as a dotted line per model."""
    tasks = list(dict.fromkeys(frame["task"]))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(frame["model"]))}
    for col, task in enumerate(tasks, start=1):
        part = frame[frame["task"] == task]
        for (model, method), line in part[part["method"] != "zero_shot"].groupby(
                ["model", "method"], sort=False):
            line = line.sort_values(x)
            fig.add_trace(go.Scatter(
                x=line[x], y=line["accuracy"], mode="lines+markers", name=f"{model} {method}",
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
    fig.update_layout(title=title, height=380, width=max(500, 420 * len(tasks)))
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
