"""Random heads: K heads drawn uniformly without replacement (seeded)."""

from __future__ import annotations

import torch

from lofit_lens.backends.hooked import ModelDims
from lofit_lens.methods.selectors.registry import register_selector
from lofit_lens.intervention import Head


def random_heads(dims: ModelDims, k: int, seed: int) -> list[Head]:
    """``k`` heads drawn uniformly without replacement (seeded), sorted by (layer, head)."""
    order = torch.randperm(dims.total_heads, generator=torch.Generator().manual_seed(seed))
    return sorted((int(i) // dims.n_heads, int(i) % dims.n_heads) for i in order[:k])


@register_selector("random")
def random_selection(ctx) -> list[Head]:
    """K heads drawn uniformly without replacement (seeded)."""
    return random_heads(ctx.dims, ctx.k, ctx.cfg.seed)
