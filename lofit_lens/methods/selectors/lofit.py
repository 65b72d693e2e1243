"""LoFiT's own selection: the K heads with the largest learned scales ||A|| (step 1)."""

from __future__ import annotations

from lofit_lens.methods.selectors.registry import register_selector
from lofit_lens.engine import selection


@register_selector("lofit")
def lofit_heads(ctx) -> list:
    """Step 1 through the run's phase store (``compare(out=X)`` reads a selection that
    ``ll.lofit(checkpoint=X)`` or an analysis saved in X, and saves its own there)."""
    return selection(ctx.model, ctx.task, ctx.cfg, ctx.phases, ctx.progress).top(ctx.k)
