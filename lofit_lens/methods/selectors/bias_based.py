"""Bias-based selection: v trained on every head for step 1's budget, top K by ||v||."""

from __future__ import annotations

import dataclasses

from lofit_lens.methods.selectors.registry import register_selector
from lofit_lens.intervention import Head, top_heads
from lofit_lens.training import tune_biases


@register_selector("bias_based")
def bias_based(ctx) -> list[Head]:
    """v on all heads for ``epochs_select`` epochs (LoFiT step 1's budget); the K heads with
    the largest ||v|| (v is then retrained from scratch on them)."""
    ranking = tune_biases(ctx.model, ctx.task, None, progress=ctx.progress,
                          config=dataclasses.replace(ctx.cfg, epochs_bias=ctx.cfg.epochs_select))
    return top_heads(ranking.intervention.bias_norms(), ctx.k)
