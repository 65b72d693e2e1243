"""Head selectors for bias tuning (LoFiT Table 2) that need no training of their own."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import ModelDims
from lofit_lens.intervention import Head


def probe_layer_heads(accuracy: Float[Tensor, "layer head"], k: int) -> list[Head]:
    """Probe-layers: layers ranked by the mean probe accuracy of their heads, taken whole,
    best first, until ``k`` heads are filled; the last layer taken gives its best heads by
    probe accuracy."""
    layer_order = torch.argsort(accuracy.mean(dim=1), descending=True, stable=True)
    heads: list[Head] = []
    for layer in layer_order.tolist():
        by_head = torch.argsort(accuracy[layer], descending=True, stable=True).tolist()
        heads += [(layer, h) for h in by_head[:k - len(heads)]]
        if len(heads) == k:
            break
    return heads


def random_heads(dims: ModelDims, k: int, seed: int) -> list[Head]:
    """``k`` heads drawn uniformly without replacement (seeded), sorted by (layer, head)."""
    order = torch.randperm(dims.total_heads, generator=torch.Generator().manual_seed(seed))
    return sorted((int(i) // dims.n_heads, int(i) % dims.n_heads) for i in order[:k])
