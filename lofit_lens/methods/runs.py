"""One method's run through the engine: its training a ``method`` phase, then evaluated.

``trained_method`` runs a registered method on a ``RunContext`` as a ``method`` phase of the
context's store (``lofit_lens.engine``): the intervention in its saved form, its trainable
parameters, heads, info and training seconds. A method that tunes v with ``ctx.tune`` (LoFiT
and every head selector, RED) trains through the engine's ``tune`` phase, so ``compare``'s
LoFiT row reads the step 2 that ``ll.lofit(checkpoint=...)`` or an analysis saved in the
same folder; evaluations are keyed by the edit itself (``engine.content_key``), so that
row reads their evaluations too.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from lofit_lens import engine
from lofit_lens.checkpoint import Phase
from lofit_lens.intervention import Intervention, rebuild_intervention
from lofit_lens.methods.base import MethodRun, RunContext, get_method
from lofit_lens.store import jsonable

STATE = "state/"
"""Prefix of an intervention's tensors in a ``method`` phase."""


def saved_form(run: MethodRun, seconds: float) -> Phase:
    """A method's run as its ``method`` phase value: the intervention (kind and spec, its
    tensors on the CPU under ``STATE``), ``params``, ``heads``, ``info`` and ``seconds``."""
    value: Phase = {"intervention": None, "params": run.params, "seconds": seconds,
                    "heads": None if run.heads is None else [list(h) for h in run.heads],
                    "info": jsonable(run.info)}
    if run.intervention is not None:
        value["intervention"] = {"kind": run.intervention.kind, "spec": run.intervention.spec()}
        value.update({STATE + k: v.detach().cpu()
                      for k, v in run.intervention.state_tensors().items()})
    return value


def rebuilt(value: Phase) -> Optional[Intervention]:
    """The intervention of a ``method`` phase value (``None``: the untouched model)."""
    saved = value["intervention"]
    if saved is None:
        return None
    tensors = {k[len(STATE):]: v for k, v in value.items() if k.startswith(STATE)}
    return rebuild_intervention(saved["kind"], saved["spec"], tensors)


def trained_method(ctx: RunContext, name: str) -> engine.Trained:
    """The method ``name`` trained on ``ctx`` (read from ``ctx.phases`` when saved there with
    the same method, options and settings); its ``key``, what its evaluations are keyed by,
    is the edit's ``engine.content_key`` (``None``: the untouched model)."""
    method = get_method(name)

    def compute() -> Phase:
        probes_fitted_before = ctx.probe_seconds
        start = time.perf_counter()
        run = method(ctx)
        seconds = time.perf_counter() - start
        if run.info.get("uses_probes") and probes_fitted_before is not None:
            seconds += probes_fitted_before  # probes were shared from an earlier method
        return saved_form(run, seconds)

    options: dict[str, Any] = jsonable(method.keywords(ctx.options_for(name)))
    stored = engine.method_training(ctx.model, ctx.task, ctx.cfg, ctx.phases, name, options,
                                    compute)
    intervention = rebuilt(stored.value)
    return engine.Trained(intervention, engine.content_key(intervention), stored.value,
                          stored.cached, stored.path, stored.settings)
