"""LoFiT's two steps: head selection (learned scales A + L1) and bias tuning (offsets v).

``select_heads`` trains A on every head and ranks all heads by ||A||; ``tune_biases``
starts again from the untouched model and trains v on the given heads only. The model's
own weights never change: the optimiser sees only the ``HeadIntervention`` parameters.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from lofit_lens.config import LoFiTConfig
from lofit_lens.hooked import model_dims
from lofit_lens.intervention import Head, HeadIntervention, top_heads
from lofit_lens.objectives import Objective, build_objective
from lofit_lens.tasks import Task, get_task
from lofit_lens.tasks.base import hash_examples

TaskLike = Union[str, Task]


@dataclass
class HeadSelection:
    """Step 1's outcome: every head's score ||A[l, h]|| and the learned A."""

    scores: Float[Tensor, "layer head"]
    scale: Float[Tensor, "layer head d_head"]
    history: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int) -> list[Head]:
        return top_heads(self.scores, k)

    def ranking(self) -> list[tuple[Head, float]]:
        """All heads, best first, with their scores."""
        heads = self.top(self.scores.numel())
        return [(h, float(self.scores[h])) for h in heads]


@dataclass
class BiasTuning:
    """Step 2's outcome: the trained intervention (v on ``heads``)."""

    intervention: HeadIntervention
    heads: list[Head]
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def bias(self) -> Float[Tensor, "layer head d_head"]:
        return self.intervention.bias.detach().clone()


# ---------------------------------------------------------------------- configuration
def resolve_run(task: TaskLike, config: Optional[LoFiTConfig], overrides: dict[str, Any]) -> tuple[Task, LoFiTConfig]:
    """The task object and a config with overrides applied and task defaults filled in."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LoFiTConfig)}
    if unknown:
        raise TypeError(f"Unknown LoFiT options: {sorted(unknown)}")
    if isinstance(task, Task):  # a task object brings its protocol
        if overrides.get("protocol", task.protocol) != task.protocol:
            raise ValueError(f"protocol={overrides['protocol']!r} contradicts the task's "
                             f"{task.protocol!r}: build the task with that protocol")
        task_obj, overrides = task, {**overrides, "protocol": task.protocol}
    else:
        protocol = overrides.get("protocol", config.protocol if config else LoFiTConfig.protocol)
        task_obj = get_task(task, protocol=protocol, **_task_options(config, overrides))
    base = config or LoFiTConfig(task=task_obj.name)
    cfg = dataclasses.replace(base, task=task if isinstance(task, str) else task_obj.name, **overrides)
    return task_obj, cfg.resolved(task_obj.hyperparams)


def _task_options(config: Optional[LoFiTConfig], overrides: dict[str, Any]) -> dict[str, Any]:
    extra = dict((config.extra if config else {}) or {})
    extra.update(overrides.get("extra", {}) or {})
    return extra


def training_data(task: Task, cfg: LoFiTConfig):
    """(train examples, val examples) of a run, as the trainer consumes them."""
    train = task.training_examples(task.train_examples(cfg.seed, cfg.max_train_examples))
    val = task.training_examples(task.eval_examples("val", cfg.max_val_examples)) \
        if cfg.max_val_examples != 0 else []
    return train, val


# ---------------------------------------------------------------------- the loop
def train_intervention(
    model,
    intervention: HeadIntervention,
    train: Objective,
    val: Optional[Objective],
    *,
    epochs: int,
    lr: float,
    l1_lambda: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    adam_eps: float = 1e-8,
    max_grad_norm: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """AdamW with linear decay to zero (no warm-up); ``l1_lambda * sum|A|`` is added when the
    scale trains; gradients of loss and penalty together are clipped to ``max_grad_norm``
    (total norm, as HF's Trainer does; 0: no clipping). Returns the loss history (per step,
    per epoch, validation per epoch) and how many steps were clipped."""
    params = intervention.trainable()
    optimizer = torch.optim.AdamW(params, lr=lr, eps=adam_eps, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    shuffle = torch.Generator().manual_seed(seed)
    history: dict[str, Any] = {"step_loss": [], "epoch_loss": [], "val_loss": [], "clipped_steps": 0}
    use_l1 = intervention.use_scale and l1_lambda > 0

    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    with intervention.attach(model):
        if getattr(train, "reference_at_init", False):  # official DPO: TRL's reference
            intervention.eval()
            train.compute_reference(model)
        if getattr(val, "reference_at_init", False):  # TRL: at the first evaluation
            val.reference = torch.zeros(0, 2)
        for epoch in range(epochs):
            intervention.train()  # e.g. LoRA dropout on; validation below runs in eval mode
            order = torch.randperm(len(train), generator=shuffle).tolist()
            epoch_losses = []
            for start in range(0, len(order), batch_size):
                loss = train.loss(model, order[start:start + batch_size])
                total_loss = loss + l1_lambda * intervention.scale.abs().sum() if use_l1 else loss
                optimizer.zero_grad(set_to_none=True)
                total_loss.backward()
                if max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    history["clipped_steps"] += int(norm > max_grad_norm)
                optimizer.step()
                schedule.step()
                epoch_losses.append(loss.item())
                history["step_loss"].append(epoch_losses[-1])
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{sum(epoch_losses) / len(epoch_losses):.4f}")
            history["epoch_loss"].append(sum(epoch_losses) / max(1, len(epoch_losses)))
            if val is not None and len(val):
                intervention.eval()
                history["val_loss"].append(validation_loss(model, val, batch_size))
                bar.set_postfix(epoch=epoch + 1, loss=f"{history['epoch_loss'][-1]:.4f}",
                                val=f"{history['val_loss'][-1]:.4f}")
    bar.close()
    intervention.eval()
    return history


@torch.no_grad()
def validation_loss(model, objective: Objective, batch_size: int) -> float:
    """Mean task loss over ``objective`` (call with the intervention attached)."""
    if getattr(objective, "reference_at_init", False) and len(objective.reference) != len(objective):
        objective.compute_reference(model)
    losses, weights = [], []
    for start in range(0, len(objective), batch_size):
        rows = list(range(start, min(start + batch_size, len(objective))))
        losses.append(objective.loss(model, rows).item())
        weights.append(len(rows))
    return sum(l * w for l, w in zip(losses, weights)) / sum(weights)


@dataclass
class TrainingSet:
    """A run's encoded training and validation data (for DPO: with the untouched model's
    reference log-probs). Build it once to share it between the two steps."""

    train: Objective
    val: Optional[Objective]
    data_hash: str

    @classmethod
    def build(cls, model, task: Task, cfg: LoFiTConfig) -> "TrainingSet":
        train, val = training_data(task, cfg)
        return cls(build_objective(model, train, cfg.dpo_beta, cfg.protocol),
                   build_objective(model, val, cfg.dpo_beta, cfg.protocol) if val else None,
                   hash_examples(train))


# ---------------------------------------------------------------------- the two steps
def select_heads(model, task: TaskLike, *, config: Optional[LoFiTConfig] = None,
                 progress: bool = True, data: Optional[TrainingSet] = None,
                 **overrides) -> HeadSelection:
    """Step 1: learn A on ALL heads with an L1 penalty; rank every head by ||A||."""
    task_obj, cfg = resolve_run(task, config, overrides)
    data = data or TrainingSet.build(model, task_obj, cfg)
    train, val, data_hash = data.train, data.val, data.data_hash
    intervention = HeadIntervention(model_dims(model), use_scale=True, use_bias=False)
    intervention.set_heads(None).init_normal(cfg.init_std, torch.Generator().manual_seed(cfg.seed))
    start = time.perf_counter()
    history = train_intervention(
        model, intervention, train, val, epochs=cfg.epochs_select, lr=cfg.lr_select,
        l1_lambda=cfg.l1_lambda, batch_size=cfg.batch_size, seed=cfg.seed,
        weight_decay=cfg.weight_decay, adam_eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
        desc="step 1: select heads",
        progress=progress,
    )
    history.update(seconds=time.perf_counter() - start, data_hash=data_hash, n_train=len(train))
    return HeadSelection(intervention.scale_norms(), intervention.scale.detach().clone(), history)


def tune_biases(model, task: TaskLike, heads: Optional[Sequence[Head]], *,
                config: Optional[LoFiTConfig] = None, use_scale: bool = False,
                progress: bool = True, data: Optional[TrainingSet] = None,
                **overrides) -> BiasTuning:
    """Step 2: learn v on ``heads`` only (``None``: all heads), from the untouched model.

    ``use_scale=True`` also learns A on those heads (RED-style when ``heads`` is None).
    ``data``: a ``TrainingSet`` built for the same config (shared with step 1).
    """
    task_obj, cfg = resolve_run(task, config, overrides)
    data = data or TrainingSet.build(model, task_obj, cfg)
    train, val, data_hash = data.train, data.val, data.data_hash
    intervention = HeadIntervention(model_dims(model), use_scale=use_scale, use_bias=True)
    intervention.set_heads(heads).init_normal(cfg.init_std,
                                              torch.Generator().manual_seed(cfg.seed + 1))
    start = time.perf_counter()
    history = train_intervention(
        model, intervention, train, val, epochs=cfg.epochs_bias, lr=cfg.lr_bias,
        l1_lambda=0.0, batch_size=cfg.batch_size, seed=cfg.seed + 1,
        weight_decay=cfg.weight_decay, adam_eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
        desc="step 2: tune biases",
        progress=progress,
    )
    history.update(seconds=time.perf_counter() - start, data_hash=data_hash, n_train=len(train),
                   trainable_parameters=intervention.num_trainable_parameters())
    return BiasTuning(intervention, intervention.active_heads if heads is None else list(heads), history)
