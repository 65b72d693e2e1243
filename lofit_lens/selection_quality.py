"""Do the selected heads mean anything? A diagnostic of step 1's ranking, kept with every run.

Step 1 ranks the heads by ||A[l, h]||, where A starts at a random draw (N(0, init_std), seeded)
and trains for a few epochs. A ranking that barely moved from its initialisation, or that
another draw of the data (or another seed) would reorder, is close to random by construction.
``selection_quality`` measures it in four ways, each defined on the ``SelectionQuality`` field:

* movement: how far A moved from its initial draw A0;
* the K/K+1 gap: does the K-th head stand apart from the (K+1)-th;
* the rank signal of the init: is the top K the top K of A0 (then the ranking is the draw's);
* stability: does the top K come back when step 1 is refitted on a bootstrap resample of the
  training data (``bootstrap_selections``, opt-in: n more step-1 runs) or with other seeds;

and states a verdict, "clear", "weak" or "noise", with its reason and, when it is not clear,
what to change. docs/gotchas.md ("Reading the selection-quality diagnostic") shows how to read it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens import engine
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import GOTCHAS, SelectionQualityWarning
from lofit_lens.intervention import Head, top_heads
from lofit_lens.tasks.base import hash_examples
from lofit_lens.training import (
    HeadSelection, RunData, TaskLike, TrainingSet, resolve_run, training_data,
)

VERDICTS = ("clear", "weak", "noise")
"""From best to worst; a run's verdict is the worst any measure gives."""

NOISE_MOVEMENT = 0.1
"""Noise: ``||A - A0||_F`` below a tenth of ``||A0||_F``. A that close to its draw still ranks
the heads by the draw's norms (the spread of ||A0_h|| across heads is about
``1 / sqrt(2 d_head)`` of their size: 9% at d_head 64, 25% at 8)."""
INIT_OVERLAP_P = 0.01
"""The top K shares more heads with A0's top K than two independent K-sets do with this
probability at most (hypergeometric tail): the init's draw still shows in the ranking."""
NOISE_INIT_EXCESS = 0.5
"""... and by this much above chance (``(overlap - K/n) / (1 - K/n)``): noise, the top K is
mostly the init's top K. A significant overlap below it is weak."""
CLEAR_GAP_RATIO = 6.0
"""Clear (without a stability measure): the K/K+1 gap is this many times the typical gap
between neighbouring ranks around K (``gap_ratio``). Noise rankings reach it 3% of the time
(2000 draws each of normal, half-normal, chi_8, chi_64 and exponential scores of 12, 48, 270 and
1024 heads, K = 3, 10, 25%: 0.5-7%, the most for exponential scores and K = 1)."""
GAP_WINDOW = 5
"""``gap_ratio`` compares the K-th gap with the other gaps within ``max(GAP_WINDOW, K)``
ranks of it."""
MAX_GAP_RATIO = 1e6
"""``gap_ratio`` when the neighbouring gaps are all zero (exact ties) and the K-th is not."""
STABLE_EXCESS = 0.5
"""Clear: the mean Jaccard of the top K with its refits' top K, above chance, is at least this
fraction of the way to 1 (``(J - J0) / (1 - J0)``): about two thirds of the heads come back
(at 27 of 270 heads: J >= 0.53, 19 of 27 shared)."""
NOISE_STABILITY_EXCESS = 0.2
"""Noise: below this (at 27 of 270 heads: J < 0.24, fewer than 11 of 27 shared), most of the
top K changes with the data or the seed. Between the two: weak."""

ADVICE = ("train step 1 longer (epochs_select; CLI --epochs N1 N2), on more data "
          "(max_train_examples; --max-train-examples), or with a higher step-1 rate "
          "(lr_select; --lr-select)")
MEASURE_STABILITY = ("measure the top K's stability with selection_bootstrap=N "
                     "(--selection-bootstrap N: N more step-1 runs)")


@dataclass(frozen=True)
class SelectionQuality:
    """How well step 1's top K stands out from noise. ``None``: not measurable (no init known,
    K = every head, no refits)."""

    k: int
    n_heads: int
    verdict: str
    """"clear", "weak" or "noise" (``VERDICTS``): the worst of the measures below."""
    reason: str
    """One line: the measures that decided the verdict."""
    advice: str = ""
    """What to change when the verdict is not clear ("" when it is)."""
    gap: Optional[float] = None
    """``||A||_(K) - ||A||_(K+1)``: the K-th highest head score minus the (K+1)-th."""
    gap_ratio: Optional[float] = None
    """``K * gap / median(j * (||A||_(j) - ||A||_(j+1)))`` over the other ranks j within
    ``max(GAP_WINDOW, K)`` of K: the K/K+1 gap in units of the neighbouring gaps, each gap
    weighted by its rank so that the gaps of a smooth, noise-like ranking are alike (Renyi's
    spacings). About 1 (below 6 in 97% of noise rankings) when heads K and K+1 are
    interchangeable; far above 1 when the top K stands apart."""
    movement: Optional[float] = None
    """``||A - A0||_F / ||A0||_F``: how far A moved from its initial draw A0, in units of the
    draw's size (0: not at all)."""
    moved_share: Optional[float] = None
    """The share of heads whose ``||A_h - A0_h||`` exceeds the median ``||A0_h||``."""
    init_overlap: Optional[float] = None
    """``|T & T0| / K``, T the top K by ||A|| and T0 the top K by ||A0||: how much of the top
    K is the draw's top K."""
    init_overlap_chance: Optional[float] = None
    """``K / n``: the expected ``init_overlap`` of two independent K-sets."""
    init_overlap_p: Optional[float] = None
    """The probability that two independent K-sets share at least as many heads
    (hypergeometric tail)."""
    init_rank_correlation: Optional[float] = None
    """Spearman's rank correlation of ``||A||`` and ``||A0||`` over every head."""
    stability: Optional[float] = None
    """Mean Jaccard ``|T & T_i| / |T | T_i|`` of the top K with each refit's top K."""
    stability_chance: Optional[float] = None
    """The exact expected Jaccard of two independent uniformly random K-sets of n heads
    (their intersection is hypergeometric): ``sum_i P(I = i) * i / (2K - i)``."""
    stability_runs: int = 0
    """How many refits ``stability`` averages over (0: not measured)."""
    stability_source: str = ""
    """What the refits are: "bootstrap" (``bootstrap_selections``), "seeds", ..."""

    @property
    def clear(self) -> bool:
        return self.verdict == "clear"

    def summary(self) -> str:
        """One line: the verdict, the K/K+1 gap and the stability."""
        gap = "n/a" if self.gap is None else f"{self.gap:.3g}" + (
            "" if self.gap_ratio is None else f" ({self.gap_ratio:.1f}x neighbours)")
        stability = "not measured" if self.stability is None else (
            f"Jaccard {self.stability:.2f} over {self.stability_runs} {self.stability_source} "
            f"refits (chance {self.stability_chance:.2f})")
        return f"{self.verdict}; K/K+1 gap {gap}; stability {stability}"

    def message(self) -> str:
        """The warning's text: verdict, reason and advice."""
        text = f"step 1's head selection is {self.verdict} (top {self.k} of {self.n_heads}): {self.reason}"
        if not self.advice:
            return text
        return f"{text}. To fix: {self.advice} ({GOTCHAS}: reading the selection-quality diagnostic)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectionQuality":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in known})


# ---------------------------------------------------------------------- the measures
def _head_set(scores: Float[Tensor, "layer head"], k: int) -> set[Head]:
    return set(top_heads(scores, k))


def _overlap_pmf(n: int, k: int) -> list[float]:
    """``P(|X & Y| = i)`` for i = 0..k, X and Y independent uniform k-subsets of n."""
    total = math.comb(n, k)
    return [math.comb(k, i) * math.comb(n - k, k - i) / total for i in range(k + 1)]


def expected_jaccard(n: int, k: int) -> float:
    """The exact ``E[|X & Y| / |X | Y|]`` of two independent uniform k-subsets of n."""
    return sum(p * i / (2 * k - i) for i, p in enumerate(_overlap_pmf(n, k)))


def overlap_tail(n: int, k: int, shared: int) -> float:
    """``P(|X & Y| >= shared)`` for two independent uniform k-subsets of n."""
    return min(1.0, sum(_overlap_pmf(n, k)[shared:]))


def gap_ratio(scores: Float[Tensor, "layer head"], k: int) -> tuple[Optional[float], Optional[float]]:
    """``(gap, gap_ratio)`` of ``SelectionQuality`` (``None`` for K = n, or no neighbours)."""
    values = scores.flatten().double().sort(descending=True).values
    n = values.numel()
    if k >= n:
        return None, None
    gaps = (values[:-1] - values[1:]).tolist()  # gaps[j - 1]: between ranks j and j + 1
    gap = gaps[k - 1]
    width = max(GAP_WINDOW, k)
    others = [j * gaps[j - 1] for j in range(max(1, k - width), min(n - 1, k + width) + 1) if j != k]
    if not others:
        return gap, None
    typical = statistics.median(others)
    if typical > 0:
        return gap, k * gap / typical
    return gap, MAX_GAP_RATIO if gap > 0 else 0.0


def _spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float(rx @ ry) / denominator if denominator > 0 else 0.0


def _scores(item: Union[HeadSelection, Tensor]) -> Float[Tensor, "layer head"]:
    if isinstance(item, HeadSelection):
        return item.scores.float()
    return item.float() if item.ndim == 2 else item.float().norm(dim=-1)


def selection_quality(
    selection: Union[HeadSelection, Float[Tensor, "layer head d_head"]],
    k: int,
    *,
    init: Optional[Float[Tensor, "layer head d_head"]] = None,
    others: Sequence[Union[HeadSelection, Float[Tensor, "layer head"]]] = (),
    others_source: str = "bootstrap",
) -> SelectionQuality:
    """The diagnostic of the top ``k`` heads of ``selection`` (a ``HeadSelection``, or A).

    ``init``: A before training (default: the selection's ``init``; ``None`` there too: the
    measures against the init are not reported). ``others``: refits of step 1 (their
    ``HeadSelection`` or head scores ``[layer, head]``) to measure stability against; what they
    are is ``others_source`` ("bootstrap": ``bootstrap_selections``; "seeds": other seeds).
    The verdict is the worst the measures give (thresholds: the module constants)."""
    scale = selection.scale if isinstance(selection, HeadSelection) else selection
    if init is None and isinstance(selection, HeadSelection):
        init = selection.init
    scale = scale.detach().cpu().float()
    # the run's own scores when given (its top K is what was tuned), else ||A|| per head
    scores = (selection.scores.detach().cpu().float() if isinstance(selection, HeadSelection)
              else scale.norm(dim=-1))
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: the selection ranks {n} heads")
    top = _head_set(scores, k)
    findings: list[tuple[str, str]] = []  # (verdict, why)
    values: dict[str, Any] = {"init_overlap_chance": k / n,
                              "stability_chance": expected_jaccard(n, k)}

    gap, ratio = gap_ratio(scores, k)
    values.update(gap=gap, gap_ratio=ratio)

    init = None if init is None else init.detach().cpu().float()
    if init is not None and float(init.norm()) > 0:  # init_std 0: no draw to compare with
        init_scores = init.norm(dim=-1)
        movement = float((scale - init).norm() / init.norm())
        moved = (scale - init).norm(dim=-1) > init_scores.median()
        shared = len(top & _head_set(init_scores, k))
        chance = k / n
        overlap, p = shared / k, overlap_tail(n, k, shared)
        values.update(movement=movement, moved_share=float(moved.float().mean()),
                      init_overlap=overlap, init_overlap_p=p,
                      init_rank_correlation=_spearman(scores.flatten(), init_scores.flatten()))
        if movement < NOISE_MOVEMENT and k < n:
            findings.append(("noise", f"A moved {movement:.2g}x the size of its initial draw, "
                                      "so the ranking is the draw's"))
        if p < INIT_OVERLAP_P and k < n:
            excess = (overlap - chance) / (1 - chance)
            level = "noise" if excess >= NOISE_INIT_EXCESS else "weak"
            findings.append((level, f"{shared} of the top {k} are the initial draw's top {k} "
                                    f"({k * chance:.2g} by chance, p = {p:.2g})"))

    if k == n:
        findings.append(("clear", "K is every head: the ranking leaves none out"))
    elif others:
        jaccards = []
        for other in others:
            theirs = _head_set(_scores(other), k)
            jaccards.append(len(top & theirs) / len(top | theirs))
        stability = sum(jaccards) / len(jaccards)
        j0 = values["stability_chance"]
        excess = (stability - j0) / (1 - j0)
        values.update(stability=stability, stability_runs=len(others), stability_source=others_source)
        said = (f"the top {k} has a mean Jaccard of {stability:.2f} with {len(others)} "
                f"{others_source} refits (chance {j0:.2f})")
        if excess < NOISE_STABILITY_EXCESS:
            findings.append(("noise", said))
        elif excess < STABLE_EXCESS:
            findings.append(("weak", said))
        else:
            findings.append(("clear", said))
    elif ratio is not None and ratio >= CLEAR_GAP_RATIO:
        findings.append(("clear", f"the K/K+1 gap is {ratio:.1f}x the neighbouring gaps"))
    else:
        shown = "unmeasurable (too few heads)" if ratio is None else f"{ratio:.1f}x the neighbouring gaps"
        findings.append(("weak", f"the K/K+1 gap is {shown} (clear: >= {CLEAR_GAP_RATIO:g}x) "
                                 "and the top K's stability was not measured"))

    verdict = max((level for level, _ in findings), key=VERDICTS.index)
    reason = "; ".join(why for level, why in findings if level == verdict)
    if verdict == "clear":
        advice = ""
    elif others:
        advice = ADVICE
    elif verdict == "weak":  # it may be fine: measuring says
        advice = f"{MEASURE_STABILITY}; to make the top K stand out, {ADVICE}"
    else:
        advice = f"{ADVICE}; then {MEASURE_STABILITY}"
    return SelectionQuality(k=k, n_heads=n, verdict=verdict, reason=reason, advice=advice, **values)


def warn_if_noise(quality: Optional[SelectionQuality]) -> None:
    """A ``SelectionQualityWarning`` with the verdict, its reason and the advice when the
    selection cannot be told from noise (verdict "noise"; a "weak" one is reported with the
    result, not warned about); it points at the caller's caller (the line that called
    ``ll.lofit``)."""
    if quality is not None and quality.verdict == "noise":
        warnings.warn(quality.message(), SelectionQualityWarning, stacklevel=3)


# ---------------------------------------------------------------------- stability, opt-in
def bootstrap_selections(model, task: TaskLike, cfg: LoFiTConfig, n: int, progress: bool = False,
                         store: Optional[PhaseCheckpoint] = None) -> list[HeadSelection]:
    """``n`` refits of step 1 with ``cfg``, each on a bootstrap resample (rows drawn with
    replacement, as many as there are) of the run's training data and with seed
    ``cfg.seed + 1 + i`` (a new initial draw and data order: refits that shared the run's
    draw would agree wherever the draw still decides, and look stable). No validation loss is
    computed. It costs ``n`` step-1 runs, each an engine ``select`` phase in ``store`` (read
    back when saved there); pass the result as ``selection_quality(others=...)``."""
    if n <= 0:
        return []
    task_obj, cfg = resolve_run(task, cfg, {})
    data = training_data(task_obj, cfg)
    refits = []
    for i in range(n):
        seed = cfg.seed + 1 + i
        rows = torch.randint(len(data.train), (len(data.train),),
                             generator=torch.Generator().manual_seed(seed)).tolist()
        train = [data.train[r] for r in rows]
        sample = RunData(train, [], hash_examples(train))
        refit_cfg = dataclasses.replace(cfg, seed=seed)
        refits.append(engine.selection(
            model, task_obj, refit_cfg, store, progress, examples=sample,
            data=functools.partial(TrainingSet.build, model, task_obj, refit_cfg, sample)))
    return refits
