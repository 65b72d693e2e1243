"""ITI's heads: the K heads whose linear probes validate best."""

from __future__ import annotations

from lofit_lens.methods.selectors.registry import register_selector
from lofit_lens.intervention import Head


@register_selector("iti_heads", uses_probes=True)
def iti_heads(ctx) -> list[Head]:
    """ITI's heads: the K heads whose probes validate best."""
    return ctx.probes().top(ctx.k)
