"""Where in depth LoFiT's selected heads sit (paper Fig. 3): per-layer counts, thirds, contiguity.

Thirds follow the paper's dashed lines: with ``b = floor(L / 3)`` the lower third is layers
``[0, b)``, the middle ``[b, 2b)`` and the upper ``[2b, L)`` (so the upper third takes the
remainder when ``L`` is not a multiple of 3).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Int

from lofit_lens.result import Head, LoFiTResult


def default_label(result: LoFiTResult) -> str:
    """``"{task}/s{seed}/{model_id}"``: the label analyses give a result by default."""
    return f"{result.config.task}/s{result.seed}/{result.model_id}"


def layer_counts(heads: Iterable[Head], n_layers: int) -> Int[np.ndarray, " layer"]:
    """How many of ``heads`` sit in each of ``n_layers`` layers."""
    layers = [layer for layer, _ in heads]
    return np.bincount(np.asarray(layers, dtype=int), minlength=n_layers)


def thirds_boundaries(n_layers: int) -> tuple[int, int]:
    """The paper's third boundaries ``(floor(L/3), 2 * floor(L/3))``."""
    b = n_layers // 3
    return b, 2 * b


def layer_distribution(result: LoFiTResult) -> pd.DataFrame:
    """Selected heads per layer: columns ``count`` and ``percent`` (of K), indexed by ``layer``."""
    counts = layer_counts(result.selected_heads, result.dims.n_layers)
    percent = 100.0 * counts / max(result.k, 1)
    frame = pd.DataFrame({"count": counts, "percent": percent})
    frame.index.name = "layer"
    return frame


def _segments(used: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` of consecutive layers in the sorted ``used``."""
    runs: list[tuple[int, int]] = []
    for layer in used:
        if runs and layer == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def layer_summary(result: LoFiTResult) -> pd.Series:
    """Peak layers, share of heads per third, and contiguity of the used layers.

    ``n_segments``: maximal runs of consecutive layers holding a selected head;
    ``longest_run``: length of the longest such run; ``mean_gap``: mean number of empty layers
    between consecutive used layers (NaN with fewer than two used layers);
    ``mean_depth``: mean relative depth ``(l + 0.5) / L`` of the selected heads.
    """
    n_layers = result.dims.n_layers
    counts = layer_counts(result.selected_heads, n_layers)
    k = int(counts.sum())
    b1, b2 = thirds_boundaries(n_layers)
    used = [int(layer) for layer in np.flatnonzero(counts)]
    runs = _segments(used)
    gaps = np.diff(used) - 1

    def share(lo: int, hi: int) -> float:
        return float(counts[lo:hi].sum()) / k if k else np.nan

    depth = (np.arange(n_layers) + 0.5) / n_layers
    return pd.Series({
        "n_layers": n_layers,
        "k": k,
        "peak_layers": [int(l) for l in np.flatnonzero(counts == counts.max())] if k else [],
        "peak_count": int(counts.max()) if k else 0,
        "frac_lower": share(0, b1),
        "frac_middle": share(b1, b2),
        "frac_upper": share(b2, n_layers),
        "n_layers_used": len(used),
        "n_segments": len(runs),
        "longest_run": max((last - first + 1 for first, last in runs), default=0),
        "mean_gap": float(gaps.mean()) if len(gaps) else np.nan,
        "mean_depth": float((counts * depth).sum() / k) if k else np.nan,
    })


def granularity_table(results: Sequence[LoFiTResult],
                      labels: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per result: label, task, seed, model and its ``layer_summary``."""
    labels = list(labels) if labels is not None else [default_label(r) for r in results]
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    rows = [{"label": label, "task": r.config.task, "seed": r.seed, "model": r.model_id,
             **layer_summary(r).to_dict()} for label, r in zip(labels, results)]
    return pd.DataFrame(rows).set_index("label")
