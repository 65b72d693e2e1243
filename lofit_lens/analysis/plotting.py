"""Plotly figures of LoFiT results; each returns a ``go.Figure`` (shown inline in Jupyter).
The one module of lofit-lens that imports plotly: the analyses compute frames, this draws them.

Conventions: head maps put layer 0 at the BOTTOM (depth grows upwards) and heads on x;
square matrices (overlap, transfer) read like tables, first row at the top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from lofit_lens.analysis.granularity import layer_distribution, thirds_boundaries
from lofit_lens.result import LoFiTResult
from lofit_lens.store import slug, write_bytes, write_text

HEAD_VALUES = {
    "scores": "||A|| (step 1)",
    "scale_norm": "||A||",
    "bias_norm": "||v||",
    "selected": "selected",
}
BROWSER_INSTALL = "apt-get install -y chromium   (or: bash scripts/install_system_deps.sh)"


def head_values(result: LoFiTResult, value: str = "scores") -> Float[Tensor, "layer head"]:
    """The ``[layer, head]`` map ``plot_heads`` draws for ``value``."""
    if value == "scores":
        return result.head_scores.float()
    if value == "scale_norm":
        return result.scale.float().norm(dim=-1)
    if value == "bias_norm":
        return result.bias.float().norm(dim=-1)
    if value == "selected":
        return result.selected_mask.float()
    raise ValueError(f"value={value!r}; choose one of {sorted(HEAD_VALUES)}")


def _result_title(result: LoFiTResult) -> str:
    return f"{result.config.task} / seed {result.seed} / {result.model_id}"


def plot_heads(result: LoFiTResult, value: str = "scores", title: Optional[str] = None,
               show_selected: bool = True) -> go.Figure:
    """Layer x head heatmap of ``value`` (layer 0 at the bottom); the selected heads are
    marked with open circles whose hover gives their rank. A result with a selection-quality
    diagnostic shows its verdict, K/K+1 gap and stability under the title."""
    z = head_values(result, value).numpy()
    n_layers, n_heads = z.shape
    names = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    label = HEAD_VALUES[value]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), text=names,
        colorscale="Viridis", colorbar=dict(title=label),
        hovertemplate=f"%{{text}}<br>{label}: %{{z:.4g}}<extra></extra>",
    ))
    if show_selected and result.selected_heads:
        layers, heads = zip(*result.selected_heads)
        fig.add_trace(go.Scatter(
            x=list(heads), y=list(layers), mode="markers", name="selected",
            text=[f"L{l}H{h} (rank {r + 1})" for r, (l, h) in enumerate(result.selected_heads)],
            marker=dict(symbol="circle-open", size=9, color="red", line=dict(width=2)),
            hovertemplate="%{text}<extra>selected</extra>",
        ))
    title = title or f"{label}: {_result_title(result)}"
    if result.selection_quality is not None:
        title += f"<br><sup>selection: {result.selection_quality.summary()}</sup>"
    fig.update_layout(
        title=title,
        xaxis=dict(title="head", range=[-0.5, n_heads - 0.5], dtick=1 if n_heads <= 24 else None),
        yaxis=dict(title="layer", range=[-0.5, n_layers - 0.5],
                   dtick=1 if n_layers <= 24 else None),
        showlegend=False,
    )
    return fig


def plot_layer_distribution(results: Sequence[LoFiTResult],
                            title: str = "Selected heads per layer") -> go.Figure:
    """Fig. 3: percentage of the selected heads in each layer, one panel per (model, task)
    (rows: models, columns: tasks), seeds side by side; dashed lines at floor(L/3) and
    2 * floor(L/3)."""
    models = list(dict.fromkeys(r.model_id for r in results))
    tasks = list(dict.fromkeys(r.config.task for r in results))
    fig = make_subplots(rows=len(models), cols=len(tasks), shared_yaxes=True,
                        subplot_titles=[f"{m} / {t}" for m in models for t in tasks])
    for r in results:
        row, col = models.index(r.model_id) + 1, tasks.index(r.config.task) + 1
        dist = layer_distribution(r)
        fig.add_trace(go.Bar(
            x=dist.index, y=dist["percent"], name=f"seed {r.seed}",
            customdata=dist["count"],
            hovertemplate=(f"{r.model_id} / {r.config.task} / seed {r.seed}<br>layer %{{x}}: "
                           "%{y:.1f}% (%{customdata} heads)<extra></extra>"),
        ), row=row, col=col)
    for row, model in enumerate(models, start=1):
        n_layers = next(r.dims.n_layers for r in results if r.model_id == model)
        for col in range(1, len(tasks) + 1):
            fig.update_xaxes(range=[-0.5, n_layers - 0.5], row=row, col=col)
            for x in thirds_boundaries(n_layers):
                fig.add_vline(x=x, line_dash="dash", line_color="gray", row=row, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_annotations(font_size=12)
    fig.update_yaxes(title_text="% of selected heads", col=1)
    fig.update_layout(title=title, barmode="group", showlegend=False,
                      height=max(300, 260 * len(models)))
    return fig


def _matrix_heatmap(frame: pd.DataFrame, text: pd.DataFrame, title: Optional[str],
                    colorscale: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(
        z=frame.to_numpy(dtype=float), x=[str(c) for c in frame.columns],
        y=[str(i) for i in frame.index], text=text.to_numpy(), texttemplate="%{text}",
        colorscale=colorscale,
        hovertemplate="%{y} vs %{x}: %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=title, yaxis=dict(autorange="reversed"))
    return fig


def plot_overlap(frame: pd.DataFrame, title: Optional[str] = None,
                 fmt: str = "{:.2f}", colorscale: str = "Blues") -> go.Figure:
    """Heatmap of a square frame (e.g. ``head_overlap(...).jaccard_paper``), values annotated."""
    text = frame.apply(lambda col: col.map(lambda v: "" if pd.isna(v) else fmt.format(v)))
    return _matrix_heatmap(frame, text, title, colorscale)


def plot_transfer(frame: pd.DataFrame, marks: Optional[pd.DataFrame] = None,
                  title: Optional[str] = None, fmt: str = "{:.2f}",
                  colorscale: str = "Blues") -> go.Figure:
    """Fig. 2: rows = source task (heads from), columns = target task; each cell shows its
    value followed by its significance mark (e.g. ``"*"`` p<0.05, ``"+"`` p<0.1) from
    ``marks``, a frame of strings aligned with ``frame``."""
    marks = (marks.reindex(index=frame.index, columns=frame.columns).fillna("")
             if marks is not None else pd.DataFrame("", index=frame.index, columns=frame.columns))
    text = pd.DataFrame(
        [[("" if pd.isna(v) else fmt.format(v)) + str(m) for v, m in zip(vals, ms)]
         for vals, ms in zip(frame.to_numpy(dtype=float), marks.to_numpy())],
        index=frame.index, columns=frame.columns)
    fig = _matrix_heatmap(frame, text, title, colorscale)
    fig.update_layout(xaxis_title="target task", yaxis_title="source task (heads)")
    return fig


def find_browser() -> Optional[str]:
    """The Chrome/Chromium binary kaleido will use (``$BROWSER_PATH``, kaleido's own download,
    or one on ``PATH``/the usual places), or ``None``."""
    try:
        from choreographer.browsers.chromium import Chromium

        path = Chromium.find_browser(skip_local=False)
    except Exception:  # choreographer moved or broke: let kaleido decide
        path = os.environ.get("BROWSER_PATH")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def save_figure(fig: go.Figure, path_without_suffix: str | os.PathLike,
                formats: Sequence[str] = ("html", "png"), scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as ``<path>.<fmt>`` for each format; returns the written paths.

    HTML is written first and self-contained (plotly.js embedded: opens offline). Static
    formats (png, svg, pdf) use kaleido, which drives a headless Chrome/Chromium; without
    one a ``RuntimeError`` says how to install it (the HTML is already on disk then).
    """
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(formats, key=lambda f: f != "html")
    written = []
    for fmt in ordered:
        path = base.with_name(f"{base.name}.{fmt}")
        if fmt == "html":  # atomic (store.write_text): a full disk leaves no truncated page
            write_text(path, fig.to_html(include_plotlyjs=True))
        else:
            if find_browser() is None:
                raise RuntimeError(
                    f"Cannot write {path}: kaleido needs a Chrome/Chromium browser and none "
                    f"was found (searched $BROWSER_PATH, PATH, /usr/bin/chromium). Install "
                    f"one with:  {BROWSER_INSTALL}  or set BROWSER_PATH to an existing "
                    f"Chrome/Chromium binary. Already written: {[str(p) for p in written]}"
                )
            write_bytes(path, fig.to_image(format=fmt, scale=scale))
        written.append(path)
    return written


# ---------------------------------------------------------------------- sweeps (Fig. 4, 5)
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


# ---------------------------------------------------------------------- the claims' figures (Fig. 2, 4, 5)
def plot_claim_transfer(transfer: pd.DataFrame, model: str) -> go.Figure:
    """Fig. 2 of ``model`` from ``ClaimFigures.transfer``: colour = accuracy relative to the
    column's same-task cell; text = accuracy (%) with its mark and 95% interval."""
    part = transfer[(transfer["model"] == model) & (transfer["seed"] == "pooled")]
    wide = {c: part.pivot(index="source", columns="task", values=c)
            for c in ("accuracy", "ci_low", "ci_high", "mark")}
    order = list(dict.fromkeys(part["source"]))
    wide = {c: v.reindex(index=order, columns=list(dict.fromkeys(part["task"])))
            for c, v in wide.items()}
    acc = wide["accuracy"]
    diag = np.array([acc.loc[t, t] if t in acc.index else np.nan for t in acc.columns])
    relative = acc / np.where(diag > 0, diag, np.nan)
    columns = ("accuracy", "mark", "ci_low", "ci_high")
    text = [[f"{100 * a:.1f}{m if isinstance(m, str) else ''}<br>[{100 * lo:.1f}, {100 * hi:.1f}]"
             for a, m, lo, hi in zip(*(wide[c].loc[s] for c in columns))]
            for s in acc.index]
    k, sizes = int(part["k"].iloc[0]), sorted(set(part["n"]))
    n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    fig = plot_transfer(relative, title=f"{model}, K={k}, {n} test examples per cell: "
                                        "accuracy (%) [95% CI]<br>colour: relative to "
                                        "same-task heads; * Holm p<0.05, + Holm p<0.1")
    fig.data[0].text = np.array(text, dtype=object)
    fig.update_traces(hovertemplate="%{y} heads -> %{x}: %{text}<extra></extra>")
    return fig


def plot_claim_figures(transfer: pd.DataFrame, k_sweep: pd.DataFrame,
                       data_efficiency: pd.DataFrame) -> dict[str, go.Figure]:
    """``{file stem: figure}`` of a ``ClaimFigures``' frames: ``fig2_transfer_<model>`` per
    model, ``fig5_k_sweep``, ``fig4_data_efficiency`` (pooled rows, Wilson 95% error bars)."""
    figs = {f"fig2_transfer_{slug(m)}": plot_claim_transfer(transfer, m)
            for m in dict.fromkeys(transfer["model"])}
    for stem, frame, plot, title in (
            ("fig5_k_sweep", k_sweep, plot_k_sweep, "share of heads tuned"),
            ("fig4_data_efficiency", data_efficiency, plot_data_efficiency, "training examples")):
        if not frame.empty:
            figs[stem] = plot(frame[frame["seed"] == "pooled"],
                              title=f"Accuracy vs {title}, pooled over seeds (95% Wilson "
                                    f"CI)<br>* / +: Holm p < 0.05 / 0.1 against the claims' "
                                    f"point (the budget's K or training size)")
    return figs


# ---------------------------------------------------------------------- method overlap
def plot_method_overlap(pairs: pd.DataFrame, fraction: float, models: Sequence[str],
                        tasks: Sequence[str], methods: Sequence[str]) -> go.Figure:
    """Jaccard heatmaps of the top-K head sets of ``methods`` (rows: models, columns: tasks)
    at K = ``fraction``, cells "J (p)"; ``pairs``: one row per model, task and unordered
    method pair (``method_i``, ``method_j``, ``jaccard``, ``p_value``, ``k``, ``n_heads``)."""
    methods = list(methods)
    titles = []
    for m in models:
        for t in tasks:
            mine = pairs[(pairs.model == m) & (pairs.task == t)]
            k = int(mine.k.iloc[0]) if len(mine) else 0
            n = int(mine.n_heads.iloc[0]) if len(mine) else 0
            titles.append(f"{m} / {t}: K={k} of {n} (random {k / n if n else 0:.2f})")
    fig = make_subplots(rows=len(models), cols=len(tasks), subplot_titles=titles,
                        horizontal_spacing=0.08, vertical_spacing=0.14)
    for r, m in enumerate(models, 1):
        for c, t in enumerate(tasks, 1):
            mine = pairs[(pairs.model == m) & (pairs.task == t)]
            z = np.full((len(methods), len(methods)), np.nan)
            text = np.full(z.shape, "", dtype=object)
            for _, row in mine.iterrows():
                i, j = methods.index(row.method_i), methods.index(row.method_j)
                for a, b in ((i, j), (j, i)):
                    z[a, b] = row.jaccard
                    text[a, b] = f"{row.jaccard:.2f}" + ("" if a == b else f"<br>p={row.p_value:.2g}")
            fig.add_trace(go.Heatmap(z=z, x=methods, y=methods, text=text,
                                     texttemplate="%{text}", zmin=0, zmax=1,
                                     colorscale="Blues", showscale=(r == 1 and c == 1),
                                     hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"),
                          row=r, col=c)
            fig.update_yaxes(autorange="reversed", row=r, col=c)
    fig.update_annotations(font_size=11)
    fig.update_layout(title=f"Top-K head overlap across methods (Jaccard |Ti & Tj| / K), "
                            f"K = {fraction:.0%} of the heads",
                      height=330 * len(models) + 80, width=360 * len(tasks) + 80)
    return fig
