"""Probe layers: whole layers ranked by their heads' mean ITI probe accuracy."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.methods.selectors.registry import register_selector
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


@register_selector("probe_layers", uses_probes=True)
def probe_layers(ctx) -> list[Head]:
    """Whole layers ranked by their heads' mean probe accuracy, best first, until K heads."""
    return probe_layer_heads(ctx.probes().accuracy, ctx.k)
