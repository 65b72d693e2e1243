"""The compared methods, one callable each, looked up in ``METHODS`` by name.

A method gets a ``RunContext`` (model, task, resolved config and baseline options of one
(seed, fold) run) and returns a ``MethodRun``: what to attach at evaluation (a
``HeadIntervention``, a ``LoRA`` or nothing) and its trainable-parameter count. Bias tuning
always goes through ``lofit_lens.training.tune_biases``, so every bias method shares LoFiT's
loop, hyperparameters (``lr_bias``, ``epochs_bias``) and hook machinery. Every head selector
of ``lofit_lens.baselines.selectors`` (LoFiT's own included) is a method: its heads, then v.
"""

from __future__ import annotations

from typing import Callable, Sequence

from lofit_lens.backends.hooked import hf_tokenizer
from lofit_lens.baselines.base import BaselineOptions, MethodRun, RunContext
from lofit_lens.baselines.iti import honest_llama_answer_offset, iti_intervention
from lofit_lens.baselines.jola import jola_info, train_jola
from lofit_lens.baselines.lora import train_lora
from lofit_lens.baselines.reft import residual_dims, train_reft
from lofit_lens.baselines.repe import num_layers, reading_info, repe_reading, repe_shift
from lofit_lens.baselines.selectors import SELECTORS, Selector
from lofit_lens.errors import ConfigError

__all__ = ["METHODS", "SEED_INDEPENDENT", "BaselineOptions", "MethodRun", "RunContext", "get_method"]


def zero_shot(ctx: RunContext) -> MethodRun:
    return MethodRun(None, 0)


def iti(ctx: RunContext) -> MethodRun:
    """ITI: a fixed shift on the K heads whose probes validate best (0 trained params)."""
    probes = ctx.probes()
    heads = probes.top(ctx.k)
    where, offset = "all", 0
    if ctx.task.protocol == "official":  # honest_llama: answer tokens in MC, last token in generation
        if ctx.task.kind == "multiple_choice":
            prompt = ctx.task.eval_examples("test", 1)[0].prompt
            where, offset = "answer", honest_llama_answer_offset(hf_tokenizer(ctx.model), prompt)
        else:
            where = "last"
    shift = iti_intervention(ctx.dims, probes, heads, ctx.options.iti_alpha, where, offset)
    return MethodRun(shift, 0, heads,
                     {"probe_parameters": ctx.dims.total_heads * probes.parameters_per_probe(),
                      "uses_probes": True})


def red(ctx: RunContext) -> MethodRun:
    """RED: scale A and bias v on every head of every layer."""
    return ctx.tune(None, use_scale=True)


def lora(ctx: RunContext) -> MethodRun:
    o = ctx.options
    adapter, _ = train_lora(ctx.model, ctx.task, ctx.cfg, rank=o.lora_rank, alpha=o.lora_alpha,
                            dropout=o.lora_dropout, lr=o.lora_lr, progress=ctx.progress)
    return MethodRun(adapter, adapter.num_trainable_parameters())


def jola(ctx: RunContext) -> MethodRun:
    """JoLA: gated A and v on every head, one stage, expected-L0 penalty (baselines/jola.py)."""
    o = ctx.options
    module, _, initial = train_jola(ctx.model, ctx.task, ctx.cfg, l0_lambda=o.jola_l0_lambda,
                                    lr=o.jola_lr, progress=ctx.progress)
    return MethodRun(module, module.num_trainable_parameters(), module.active_heads,
                     jola_info(module, initial, o.jola_l0_lambda, o.jola_lr or ctx.cfg.lr_select))


def reft(ctx: RunContext) -> MethodRun:
    """LoReFT on the residual stream at the last prompt position (baselines/reft.py)."""
    o = ctx.options
    module, _ = train_reft(ctx.model, ctx.task, ctx.cfg, rank=o.reft_rank, layers=o.reft_layers,
                           lr=o.reft_lr, progress=ctx.progress)
    return MethodRun(module, module.num_trainable_parameters(), None,
                     {"layers": module.layers, "rank": module.rank})


def repe(ctx: RunContext) -> MethodRun:
    """RepE: a reading vector (PCA of paired differences) added at the best-reading layers."""
    o = ctx.options
    train = ctx.task.train_examples(ctx.cfg.seed, ctx.cfg.max_train_examples)
    reading = repe_reading(ctx.model, ctx.task, train, ctx.cfg.seed, ctx.cfg.eval_batch_size)
    layers = reading.top_layers(num_layers(o.repe_layers, ctx.dims.n_layers))
    shift = repe_shift(residual_dims(ctx.model), reading, layers, o.repe_coeff)
    return MethodRun(shift, 0, None, reading_info(reading, layers, o.repe_coeff))


def tuned_on(selector: Selector) -> Callable[[RunContext], MethodRun]:
    """The method "bias tuning on ``selector``'s heads"."""

    def method(ctx: RunContext) -> MethodRun:
        run = ctx.tune(selector.select(ctx))
        if selector.uses_probes:
            run.info["uses_probes"] = True
        return run

    method.__name__ = method.__qualname__ = selector.name
    method.__doc__ = selector.select.__doc__
    return method


METHODS: dict[str, Callable[[RunContext], MethodRun]] = {
    "zero_shot": zero_shot,
    "iti": iti,
    **{name: tuned_on(selector) for name, selector in SELECTORS.items()},
    "red": red,
    "lora": lora,
    "jola": jola,
    "reft": reft,
    "repe": repe,
}
SEED_INDEPENDENT = frozenset({"zero_shot"})
"""Methods whose result does not depend on the seed: run once, for the first seed."""


def get_method(name: str) -> Callable[[RunContext], MethodRun]:
    """The method ``name``: one of ``METHODS``, or a selector registered since (e.g. by your
    own code with ``@register_selector``), bias-tuned on its heads."""
    if name in METHODS:
        return METHODS[name]
    if name in SELECTORS:
        return tuned_on(SELECTORS[name])
    raise ConfigError(f"Unknown method {name!r}; known methods: {', '.join(known_methods())}")


def known_methods() -> list[str]:
    """The names ``get_method`` takes: ``METHODS``, then selectors registered since."""
    return list(METHODS) + [s for s in SELECTORS if s not in METHODS]


def check_methods(names: Sequence[str]) -> None:
    """``ConfigError`` naming every unknown method in ``names`` and listing the known ones
    (the CLI calls it before a model loads)."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in METHODS and n not in SELECTORS]
    if unknown:
        raise ConfigError(f"Unknown method{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; known methods: "
                          f"{', '.join(known_methods())}")
