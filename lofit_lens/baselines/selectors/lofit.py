"""LoFiT's own selection: the K heads with the largest learned scales ||A|| (step 1)."""

from __future__ import annotations

from lofit_lens.baselines.selectors.registry import register_selector
from lofit_lens.training import select_heads


@register_selector("lofit")
def lofit_heads(ctx) -> list:
    selection = select_heads(ctx.model, ctx.task, config=ctx.cfg, progress=ctx.progress)
    return selection.top(ctx.k)
