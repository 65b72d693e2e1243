"""The compared methods, one callable each, looked up in ``METHODS`` by name.

A method gets a ``RunContext`` (model, task, resolved config and baseline options of one
(seed, fold) run) and returns a ``MethodRun``: what to attach at evaluation (a
``HeadIntervention``, a ``LoRA`` or nothing) and its trainable-parameter count. Bias tuning
always goes through ``lofit_lens.training.tune_biases``, so every bias method shares LoFiT's
loop, hyperparameters (``lr_bias``, ``epochs_bias``) and hook machinery.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from lofit_lens.baselines.iti import (
    Probes, end_q_statements, fit_probes, head_activations, honest_llama_answer_offset, iti_intervention,
    statements,
)
from lofit_lens.baselines.lora import train_lora
from lofit_lens.baselines.selectors import probe_layer_heads
from lofit_lens.config import LoFiTConfig
from lofit_lens.backends.hooked import hf_tokenizer, model_dims
from lofit_lens.intervention import Head, top_heads
from lofit_lens.baselines.selectors import random_heads
from lofit_lens.tasks.base import Task
from lofit_lens.tasks.truthfulqa import TruthfulQA
from lofit_lens.training import select_heads, tune_biases


@dataclass(frozen=True)
class BaselineOptions:
    """Settings of the baselines (LoFiT's own are in ``LoFiTConfig``)."""

    iti_alpha: float = 15.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    lora_lr: float = 5e-4


@dataclass
class MethodRun:
    """What a method produced: the thing to attach (``None``: the plain model), its
    trainable-parameter count, the heads it acts on (``None``: all or not head-based)."""

    intervention: Optional[Any]
    params: int
    heads: Optional[list[Head]] = None
    info: dict[str, Any] = field(default_factory=dict)


class RunContext:
    """One (seed, fold) run shared by all methods; ITI probes are fitted once, on demand."""

    def __init__(self, model, task: Task, cfg: LoFiTConfig, options: BaselineOptions,
                 progress: bool = True):
        self.model, self.task, self.cfg, self.options, self.progress = model, task, cfg, options, progress
        self.dims = model_dims(model)
        self.k = cfg.num_heads(self.dims.total_heads)
        self._probes: Optional[Probes] = None
        self.probe_seconds: Optional[float] = None

    @property
    def honest_llama(self) -> bool:
        """ITI as honest_llama runs it (official protocol, TruthfulQA's CSV splits)."""
        return self.task.protocol == "official" and isinstance(self.task, TruthfulQA)

    def probes(self) -> Probes:
        if self._probes is None:
            start = time.perf_counter()
            train = self.task.train_examples(self.cfg.seed, self.cfg.max_train_examples)
            joint, batch = self.task.protocol == "official", self.cfg.eval_batch_size
            if self.honest_llama:  # train CSV fits, val CSV scores; sigma from all questions
                val = self.task.examples("val")
                found = statements(self.task, [*train, *val], self.cfg.seed)
                is_val = (found.groups >= len(train)).numpy()
                everything = [ex for split in ("train", "val", "test") for ex in self.task.examples(split)]
                sigma_acts = head_activations(self.model, end_q_statements(everything, self.cfg.seed),
                                              batch, joint=True)
            else:
                found, is_val, sigma_acts = statements(self.task, train, self.cfg.seed), None, None
            acts = head_activations(self.model, found.pairs, batch, joint=joint)
            self._probes = fit_probes(acts, found.labels, found.groups, self.cfg.seed,
                                      is_val=is_val, sigma_acts=sigma_acts)
            self.probe_seconds = time.perf_counter() - start
        return self._probes

    def tune(self, heads: Optional[Sequence[Head]], cfg: Optional[LoFiTConfig] = None,
             **kwargs) -> MethodRun:
        """Bias tuning (LoFiT step 2) on ``heads`` (``None``: all heads)."""
        tuning = tune_biases(self.model, self.task, heads, config=cfg or self.cfg,
                             progress=self.progress, **kwargs)
        return MethodRun(tuning.intervention, tuning.intervention.num_trainable_parameters(),
                         None if heads is None else list(heads))


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


def lofit(ctx: RunContext) -> MethodRun:
    selection = select_heads(ctx.model, ctx.task, config=ctx.cfg, progress=ctx.progress)
    return ctx.tune(selection.top(ctx.k))


def random_selection(ctx: RunContext) -> MethodRun:
    return ctx.tune(random_heads(ctx.dims, ctx.k, ctx.cfg.seed))


def iti_heads(ctx: RunContext) -> MethodRun:
    run = ctx.tune(ctx.probes().top(ctx.k))
    run.info["uses_probes"] = True
    return run


def bias_based(ctx: RunContext) -> MethodRun:
    """v on all heads for ``epochs_select`` epochs (LoFiT step 1's budget), top-K by ||v||,
    then v retrained from scratch on those."""
    ranking = tune_biases(ctx.model, ctx.task, None, progress=ctx.progress,
                          config=dataclasses.replace(ctx.cfg, epochs_bias=ctx.cfg.epochs_select))
    return ctx.tune(top_heads(ranking.intervention.bias_norms(), ctx.k))


def probe_layers(ctx: RunContext) -> MethodRun:
    run = ctx.tune(probe_layer_heads(ctx.probes().accuracy, ctx.k))
    run.info["uses_probes"] = True
    return run


def red(ctx: RunContext) -> MethodRun:
    """RED: scale A and bias v on every head of every layer."""
    return ctx.tune(None, use_scale=True)


def lora(ctx: RunContext) -> MethodRun:
    o = ctx.options
    adapter, _ = train_lora(ctx.model, ctx.task, ctx.cfg, rank=o.lora_rank, alpha=o.lora_alpha,
                            dropout=o.lora_dropout, lr=o.lora_lr, progress=ctx.progress)
    return MethodRun(adapter, adapter.num_trainable_parameters())


METHODS: dict[str, Callable[[RunContext], MethodRun]] = {
    "zero_shot": zero_shot,
    "iti": iti,
    "lofit": lofit,
    "random": random_selection,
    "iti_heads": iti_heads,
    "bias_based": bias_based,
    "probe_layers": probe_layers,
    "red": red,
    "lora": lora,
}
SEED_INDEPENDENT = frozenset({"zero_shot"})
"""Methods whose result does not depend on the seed: run once, for the first seed."""


def get_method(name: str) -> Callable[[RunContext], MethodRun]:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]
