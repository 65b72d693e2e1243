"""Step 1's ranking checked before it is kept: a saturated or flat ranking is a named problem.

With a step-1 learning rate far too high (``1e3`` typed for ``1e-3``), Adam's first steps move
every entry of A by about the rate, so every head's ||A|| ends near ``lr * sqrt(d_head)``:
each head's output is scaled hundreds of times and the order of the heads is noise. A
selection whose median head is scaled that far, or whose scores barely differ, is stopped
with ``DegenerateSelectionError`` instead of being saved as valid.
"""

from __future__ import annotations

import math

from jaxtyping import Float
from torch import Tensor

from lofit_lens.errors import DegenerateSelectionError

MIN_RELATIVE_SPREAD = 0.01
"""Flat: ``max - min`` of the head scores below this fraction of their maximum."""
MAX_MEDIAN_SCALE = 10.0
"""Saturated: the median head's root-mean-square entry of A (``||A|| / sqrt(d_head)``) above
this, i.e. a typical head's output multiplied by about ten or more. Trained selections stay
far below 1 (SmolLM2 on CLUTRR: ||A|| of 0.1-0.5 over 64 entries); the 1e3 typo gives 1000."""


def relative_spread(scores: Float[Tensor, "layer head"]) -> float:
    """``(max - min) / max`` of the head scores (0 when all are zero)."""
    high = float(scores.max())
    return 0.0 if high <= 0 else (high - float(scores.min())) / high


def check_selection(scores: Float[Tensor, "layer head"], lr: float, d_head: int) -> None:
    """Raise ``DegenerateSelectionError`` when ``scores`` (||A|| per head) cannot rank the heads."""
    low, high = float(scores.min()), float(scores.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DegenerateSelectionError("step 1 gave non-finite head scores: lower lr_select")
    median_scale = float(scores.median()) / math.sqrt(d_head)
    pinned = lr * math.sqrt(d_head)
    where = f"all {scores.numel()} head scores lie in [{low:.4g}, {high:.4g}]"
    if median_scale > MAX_MEDIAN_SCALE:
        raise DegenerateSelectionError(
            f"step 1 saturated: {where} (lr_select x sqrt(d_head) = {pinned:.4g}), so the "
            f"median head's output is scaled about {median_scale:.0f}x and the ranking is "
            f"noise; the selection was not kept. lr_select={lr:g} is far too high "
            "(1e3 where 1e-3 was meant?)")
    if relative_spread(scores) < MIN_RELATIVE_SPREAD:
        cause = ("every A is zero (the L1 penalty removed them all): lower l1_lambda" if high == 0
                 else "change lr_select, or train step 1 for more epochs or on more data")
        raise DegenerateSelectionError(
            f"step 1's head scores have no spread: {where}, so their order is noise and the "
            f"selection was not kept. {cause}")
