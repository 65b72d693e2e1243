"""Zero-shot: the plain model, nothing trained or attached."""

from __future__ import annotations

from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method


def run_zero_shot(ctx: RunContext, options: MethodOptions) -> MethodRun:
    """The plain model (0 trained params)."""
    return MethodRun(None, 0)


register_method(Method("zero_shot", run_zero_shot, seed_independent=True))
