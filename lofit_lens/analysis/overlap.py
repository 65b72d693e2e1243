"""How similar LoFiT's head sets are across tasks, seeds and models (paper Fig. 6).

Same model (same ``model_id`` and head grid): heads are compared by identity.

* ``jaccard_paper`` = ``|Ti & Tj| / K``, the paper's definition; with unequal sizes
  ``K = min(Ki, Kj)`` (so a subset scores 1).
* ``iou`` = ``|Ti & Tj| / |Ti | Tj|``.
* ``emd_layers``: ``scipy.stats.wasserstein_distance`` on the layer indices of the heads
  (= per-layer counts as weights), in layers; this reproduces Fig. 6 from the Fig. 3 counts.
* ``expected_random``: the mean of ``|Ti & Tj| / K`` for random head sets of sizes Ki, Kj
  among the N heads: the intersection is hypergeometric, mean ``Ki * Kj / N``, so
  ``Ki * Kj / (N * K)``.
* ``p_value``: exact ``P(X >= |Ti & Tj|)`` for ``X ~ Hypergeom(N, Ki, Kj)``, i.e. the chance
  that a random Kj-head set meets the fixed Ki-head set at least as much as observed (by
  symmetry, the same when both sets are random). Small = more overlap than chance.

Different models (different ``model_id`` or grid): heads are not identifiable, so both sets
are mapped to relative depth: a head in layer ``l`` of an ``L``-layer model sits at
``(l + 0.5) / L``.

* ``jaccard_paper`` / ``iou`` (an APPROXIMATION): overlap of the multisets of depth bins
  (``n_bins`` equal bins of [0, 1]): intersection ``sum_b min(ci_b, cj_b)``, union
  ``sum_b max(ci_b, cj_b)``. It is much looser than head identity, so compare it only
  with its own ``expected_random``.
* ``expected_random`` / ``p_value``: Monte Carlo with ``n_permutations`` pairs of random
  head sets of the same sizes on the two grids, binned the same way;
  ``p = (1 + #{sim >= obs}) / (1 + n_permutations)``.
* ``emd_depth`` (all pairs): EMD between the relative-depth distributions, in units of the
  whole depth ([0, 1]). ``emd_layers`` of a cross-depth pair is ``emd_depth * ref_layers``,
  in layers of the reference model (by default the first result's); pairs of equal depth
  keep their own layers (the two agree when all depths are equal).

The pair ``method`` column says which of the two comparisons was used.

``pair_overlap`` and ``jaccard_stability`` compare bare head sets on one grid (e.g. one task's
selections over seeds, for the claims): ``compare`` on a pair, and its means over all pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from scipy.stats import hypergeom, wasserstein_distance

from lofit_lens.analysis.granularity import default_label
from lofit_lens.result import Head, LoFiTResult

MATRICES = ("jaccard_paper", "iou", "emd_layers", "emd_depth", "expected_random", "p_value")


@dataclass(frozen=True)
class HeadSet:
    """The selected heads of one result, with the grid they live on."""

    label: str
    model: str
    heads: frozenset[Head]
    n_layers: int
    n_heads: int

    @classmethod
    def of(cls, result: LoFiTResult, label: Optional[str] = None) -> "HeadSet":
        if not result.selected_heads:
            raise ValueError(f"{default_label(result)} selected no heads: nothing to compare")
        dims = result.dims
        return cls(label or default_label(result), result.model_id,
                   frozenset(result.selected_heads), dims.n_layers, dims.n_heads)

    @property
    def k(self) -> int:
        return len(self.heads)

    @property
    def layers(self) -> Int[np.ndarray, "k"]:
        return np.array(sorted(layer for layer, _ in self.heads))

    @property
    def depths(self) -> Float[np.ndarray, "k"]:
        """Relative depth ``(l + 0.5) / L`` of each head."""
        return (self.layers + 0.5) / self.n_layers

    def same_grid(self, other: "HeadSet") -> bool:
        return (self.model, self.n_layers, self.n_heads) == (
            other.model, other.n_layers, other.n_heads)


def _depth_bins(layers: Int[np.ndarray, "..."], n_layers: int, n_bins: int) -> Int[np.ndarray, "..."]:
    return np.minimum(((layers + 0.5) / n_layers * n_bins).astype(int), n_bins - 1)


def _bin_counts(bins: Int[np.ndarray, "draw k"], n_bins: int) -> Int[np.ndarray, "draw bin"]:
    return (bins[..., None] == np.arange(n_bins)).sum(axis=-2)


def _random_bin_counts(s: HeadSet, n_bins: int, n_draws: int,
                       rng: np.random.Generator) -> Int[np.ndarray, "draw bin"]:
    """Depth-bin counts of ``n_draws`` uniformly random ``s.k``-head sets on ``s``'s grid."""
    total = s.n_layers * s.n_heads
    keys = rng.random((n_draws, total))
    picks = np.argpartition(keys, s.k - 1, axis=1)[:, :s.k] if s.k < total else \
        np.broadcast_to(np.arange(total), (n_draws, total))
    return _bin_counts(_depth_bins(picks // s.n_heads, s.n_layers, n_bins), n_bins)


def compare(a: HeadSet, b: HeadSet, ref_layers: int, n_bins: int = 10,
            n_permutations: int = 1000, rng: Optional[np.random.Generator] = None) -> dict:
    """All similarity measures of one pair (see the module docstring)."""
    k = min(a.k, b.k)
    emd_depth = wasserstein_distance(a.depths, b.depths)
    if a.n_layers == b.n_layers:
        emd_layers = wasserstein_distance(a.layers, b.layers)
    else:
        emd_layers = emd_depth * ref_layers
    if a.same_grid(b):
        method, total = "heads", a.n_layers * a.n_heads
        inter, union = len(a.heads & b.heads), len(a.heads | b.heads)
        expected = a.k * b.k / total
        p_value = float(hypergeom.sf(inter - 1, total, a.k, b.k))
    else:
        method, total = "depth_bins", np.nan
        ca = _bin_counts(_depth_bins(a.layers, a.n_layers, n_bins), n_bins)
        cb = _bin_counts(_depth_bins(b.layers, b.n_layers, n_bins), n_bins)
        inter, union = int(np.minimum(ca, cb).sum()), int(np.maximum(ca, cb).sum())
        rng = rng if rng is not None else np.random.default_rng(0)
        sim = np.minimum(_random_bin_counts(a, n_bins, n_permutations, rng),
                         _random_bin_counts(b, n_bins, n_permutations, rng)).sum(axis=1)
        expected = float(sim.mean())
        p_value = float((1 + (sim >= inter).sum()) / (1 + n_permutations))
    return {
        "method": method, "k_i": a.k, "k_j": b.k, "n_total_heads": total,
        "intersection": inter, "union": union,
        "jaccard_paper": inter / k, "iou": inter / union,
        "emd_layers": float(emd_layers), "emd_depth": float(emd_depth),
        "expected_random": expected / k, "p_value": p_value,
    }


@dataclass
class OverlapReport:
    """Square DataFrames (``labels`` x ``labels``) of each measure, and one row per pair.

    ``pairs`` holds every unordered pair, the diagonal included (a result against itself in
    ``head_overlap``; seed 0 against seed 1 in ``paper_style_matrix``).
    """

    labels: list[str]
    jaccard_paper: pd.DataFrame
    iou: pd.DataFrame
    emd_layers: pd.DataFrame
    emd_depth: pd.DataFrame
    expected_random: pd.DataFrame
    p_value: pd.DataFrame
    pairs: pd.DataFrame


def _report(labels: list[str], cells: dict[tuple[int, int], dict],
            ref_layers: int, n_bins: int) -> OverlapReport:
    """Fill symmetric matrices from the upper-triangle ``cells``."""
    n = len(labels)
    frames = {}
    for name in MATRICES:
        values = np.full((n, n), np.nan)
        for (i, j), row in cells.items():
            values[i, j] = values[j, i] = row[name]
        frames[name] = pd.DataFrame(values, index=labels, columns=labels)
    frames["emd_layers"].attrs.update(
        unit="layers", ref_layers=ref_layers,
        note="pairs of equal depth: layers of their own model; other pairs: "
             "relative-depth EMD x ref_layers")
    frames["emd_depth"].attrs.update(unit="fraction of depth, (l + 0.5) / L")
    frames["jaccard_paper"].attrs.update(n_bins=n_bins, note="|Ti & Tj| / min(Ki, Kj)")
    pairs = pd.DataFrame([{"row": labels[i], "col": labels[j], **row}
                          for (i, j), row in sorted(cells.items())])
    return OverlapReport(labels=labels, pairs=pairs, **frames)


def _unique_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"Duplicate labels {duplicates}: pass distinct labels=[...]")
    return labels


def head_overlap(results: Sequence[LoFiTResult], labels: Optional[Sequence[str]] = None,
                 n_permutations: int = 1000, seed: int = 0, n_bins: int = 10,
                 ref_layers: Optional[int] = None) -> OverlapReport:
    """Pairwise similarity of the results' head sets (see the module docstring).

    ``labels`` default to ``"{task}/s{seed}/{model_id}"``. ``n_permutations``, ``seed`` and
    ``n_bins`` only matter for pairs of different models; ``ref_layers`` (default: the first
    result's depth) is the unit of their ``emd_layers``. For the paper's Fig. 6 layout (two
    seeds on the diagonal) use ``paper_style_matrix``.
    """
    labels = _unique_labels(labels if labels is not None else [default_label(r) for r in results])
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    sets = [HeadSet.of(r, label) for r, label in zip(results, labels)]
    ref_layers = ref_layers or sets[0].n_layers
    rng = np.random.default_rng(seed)
    cells = {(i, j): {"result_i": sets[i].label, "result_j": sets[j].label,
                      **compare(sets[i], sets[j], ref_layers, n_bins, n_permutations, rng)}
             for i in range(len(sets)) for j in range(i, len(sets))}
    return _report(labels, cells, ref_layers, n_bins)


def paper_style_matrix(results_by_task: Mapping[str, Sequence[LoFiTResult]],
                       n_permutations: int = 1000, seed: int = 0, n_bins: int = 10,
                       ref_layers: Optional[int] = None) -> OverlapReport:
    """Fig. 6: rows/columns are the tasks in the mapping's order (e.g. TruthfulQA, MQuAKE,
    CLUTRR, Random); the diagonal compares a task's first two results (seed 0 vs seed 1),
    off-diagonal cells the first result of each task (seed 0 vs seed 0).

    A task with a single result gets itself on the diagonal (Jaccard 1, EMD 0, as the
    paper's Random row). Put a random head set under a key such as ``"Random"`` to get the
    paper's last row.
    """
    tasks = list(results_by_task)
    if any(len(results_by_task[t]) == 0 for t in tasks):
        raise ValueError("Every task needs at least one result")
    first = [HeadSet.of(results_by_task[t][0]) for t in tasks]
    second = [HeadSet.of(results_by_task[t][min(1, len(results_by_task[t]) - 1)])
              for t in tasks]
    ref_layers = ref_layers or first[0].n_layers
    rng = np.random.default_rng(seed)
    cells = {}
    for i in range(len(tasks)):
        for j in range(i, len(tasks)):
            a, b = first[i], (second[i] if i == j else first[j])
            cells[i, j] = {"result_i": a.label, "result_j": b.label,
                           **compare(a, b, ref_layers, n_bins, n_permutations, rng)}
    return _report(tasks, cells, ref_layers, n_bins)


# ---------------------------------------------------------------------- stability across seeds
@dataclass(frozen=True)
class Stability:
    """How alike the head sets of one task are across seeds: pairwise ``|Ti & Tj| / K``
    (the paper's Jaccard), its expectation for random sets of the same sizes, and the
    pairwise hypergeometric p-values (small: more overlap than chance)."""

    n_sets: int
    n_pairs: int
    jaccard: float
    jaccard_min: float
    jaccard_max: float
    iou: float
    expected_random: float
    p_values: tuple[float, ...]

    def row(self) -> dict[str, Any]:
        return {"n_sets": self.n_sets, "n_pairs": self.n_pairs, "jaccard": self.jaccard,
                "jaccard_min": self.jaccard_min, "jaccard_max": self.jaccard_max,
                "iou": self.iou, "jaccard_random": self.expected_random,
                "p_max": max(self.p_values) if self.p_values else float("nan")}


def _head_set(heads: Sequence[Head], n_layers: int, n_heads: int, label: str) -> HeadSet:
    return HeadSet(label, "model", frozenset(tuple(map(int, h)) for h in heads), n_layers, n_heads)


def pair_overlap(a: Sequence[Head], b: Sequence[Head], n_layers: int,
                 n_heads: int) -> dict[str, Any]:
    """``compare`` of two head sets on one grid: jaccard_paper, iou, expected_random,
    p_value, ..."""
    if not a or not b:
        raise ValueError("pair_overlap needs two non-empty head sets")
    return compare(_head_set(a, n_layers, n_heads, "a"), _head_set(b, n_layers, n_heads, "b"),
                   ref_layers=n_layers)


def jaccard_stability(head_sets: Sequence[Sequence[Head]], n_layers: int,
                      n_heads: int) -> Stability:
    """Stability of ``head_sets`` (e.g. one task's selections over seeds) on an
    ``n_layers x n_heads`` grid: means over all unordered pairs. One set: NaNs."""
    pairs = [pair_overlap(a, b, n_layers, n_heads)
             for a, b in itertools.combinations(head_sets, 2)]
    if not pairs:
        nan = float("nan")
        return Stability(len(head_sets), 0, nan, nan, nan, nan, nan, ())
    jac = np.array([p["jaccard_paper"] for p in pairs])
    return Stability(len(head_sets), len(pairs), float(jac.mean()), float(jac.min()),
                     float(jac.max()), float(np.mean([p["iou"] for p in pairs])),
                     float(np.mean([p["expected_random"] for p in pairs])),
                     tuple(float(p["p_value"]) for p in pairs))
