"""The head-selector registry: ``@register_selector(name)`` on a function of a run's context
that returns its K heads. Each selector is also a ``compare`` method (its heads, then v tuned
on them with LoFiT's step 2), in the order the selectors were registered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lofit_lens.intervention import Head

if TYPE_CHECKING:
    from lofit_lens.baselines.base import RunContext


@dataclass(frozen=True)
class Selector:
    name: str
    select: Callable[["RunContext"], list[Head]]
    """``ctx -> heads``: ``ctx.k`` heads of ``ctx.model`` for ``ctx.task`` (seed ``ctx.cfg.seed``)."""
    uses_probes: bool = False
    """Whether it reads ITI's probes (``ctx.probes()``): their fitting time is then counted."""


SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, uses_probes: bool = False):
    """Decorator: make ``fn(ctx) -> heads`` the selector (and compare method) ``name``."""

    def register(fn: Callable[["RunContext"], list[Head]]):
        if name in SELECTORS:
            raise ValueError(f"A head selector named {name!r} is already registered")
        SELECTORS[name] = Selector(name, fn, uses_probes)
        return fn

    return register
