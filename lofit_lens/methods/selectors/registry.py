"""The head-selector registry: ``@register_selector(name)`` on a function of a run's context
that returns its K heads makes it the method ``name`` (options-less): its heads, then v tuned
on them with LoFiT's step 2 (``RunContext.tune``)."""

from __future__ import annotations

from typing import Callable

from lofit_lens.intervention import Head
from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method

Select = Callable[[RunContext], list[Head]]
"""``ctx -> heads``: ``ctx.k`` heads of ``ctx.model`` for ``ctx.task`` (seed ``ctx.cfg.seed``)."""


def tuned_on(select: Select, uses_probes: bool = False) -> Callable[[RunContext, MethodOptions], MethodRun]:
    """The method "bias tuning on ``select``'s heads"; ``uses_probes``: ``select`` reads ITI's
    probes (``ctx.probes()``), so their fitting time is counted."""

    def run(ctx: RunContext, options: MethodOptions) -> MethodRun:
        tuned = ctx.tune(select(ctx))
        if uses_probes:
            tuned.info["uses_probes"] = True
        return tuned

    run.__doc__ = select.__doc__
    return run


def register_selector(name: str, uses_probes: bool = False) -> Callable[[Select], Select]:
    """Decorator: make ``select(ctx) -> heads`` the method ``name`` (its heads, then v)."""

    def register(select: Select) -> Select:
        register_method(Method(name, tuned_on(select, uses_probes)))
        return select

    return register
