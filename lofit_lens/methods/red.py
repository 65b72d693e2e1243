"""RED (Wu et al. 2024): LoFiT's scale A and bias v on every head of every layer, trained in
LoFiT's step-2 loop (``lr_bias``, ``epochs_bias``)."""

from __future__ import annotations

from lofit_lens.methods.base import Method, MethodOptions, MethodRun, RunContext, register_method


def run_red(ctx: RunContext, options: MethodOptions) -> MethodRun:
    """RED: scale A and bias v on every head of every layer."""
    return ctx.tune(None, use_scale=True)


register_method(Method("red", run_red))
