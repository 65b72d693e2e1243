"""What every compared method shares: its options, one (seed, fold) run's context (ITI probes
fitted once, on demand) and what a method returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from lofit_lens.backends.hooked import model_dims
from lofit_lens.baselines.iti import (
    Probes, end_q_statements, fit_probes, head_activations, statements,
)
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.config import LoFiTConfig
from lofit_lens.intervention import Head
from lofit_lens.tasks.base import Task
from lofit_lens.tasks.truthfulqa import TruthfulQA
from lofit_lens.training import tune_biases


@dataclass(frozen=True)
class BaselineOptions:
    """Settings of the baselines (LoFiT's own are in ``LoFiTConfig``)."""

    iti_alpha: float = 15.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    lora_lr: float = 5e-4
    jola_l0_lambda: float = 0.05
    """JoLA: weight of the mean expected L0 over all gates (baselines/jola.py)."""
    jola_lr: Optional[float] = None
    """JoLA: learning rate (``None``: the run's ``lr_select``, LoFiT's rate for A on every head)."""
    reft_rank: int = 4
    reft_layers: Optional[tuple[int, ...]] = None
    """ReFT: the layers whose residual stream is edited (``None``: all)."""
    reft_lr: float = 4e-3
    repe_coeff: float = 2.0
    """RepE: the shift is ``repe_coeff * sigma_l * u_l`` per chosen layer (baselines/repe.py)."""
    repe_layers: Union[int, float] = 0.25
    """RepE: layers shifted, a count or a share of all layers (best held-out reading first)."""


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
                 progress: bool = True, phases: Optional[PhaseCheckpoint] = None):
        self.model, self.task, self.cfg, self.options, self.progress = model, task, cfg, options, progress
        self.phases = phases
        """Where step 1 is read from and saved (``lofit_lens.phases``); ``None``: not saved."""
        self.settings: Optional[dict[str, Any]] = None
        """What the runs of this context depend on (``compare`` fills it once)."""
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
