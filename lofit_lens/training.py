"""LoFiT's two steps: head selection (learned scales A + L1) and bias tuning (offsets v).

``select_heads`` trains A on every head and ranks all heads by ||A||; ``tune_biases``
starts again from the untouched model and trains v on the given heads only. The model's
own weights never change: the optimiser sees only the ``HeadIntervention`` parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

import lofit_lens.distributed as distributed
from lofit_lens.config import LoFiTConfig
from lofit_lens.errors import TrainingDivergedError
from lofit_lens.history import TrainingHistory
from lofit_lens.backends.hooked import ModelDims, model_dims
from lofit_lens.intervention import Head, HeadIntervention, Intervention, top_heads
from lofit_lens.objectives import Objective, build_objective
from lofit_lens.prefix import first_edited_layer, frozen_prefix
from lofit_lens.selection_check import check_selection
from lofit_lens.tasks import Task, get_task
from lofit_lens.tasks.base import TrainingExample, hash_examples

TaskLike = Union[str, Task]

logger = logging.getLogger(__name__)


@dataclass
class HeadSelection:
    """Step 1's outcome: every head's score ||A[l, h]||, the learned A and its initial draw
    (``init``; ``None`` when unknown: a phase saved without it, read with no config)."""

    scores: Float[Tensor, "layer head"]
    scale: Float[Tensor, "layer head d_head"]
    history: TrainingHistory = field(default_factory=TrainingHistory)
    init: Optional[Float[Tensor, "layer head d_head"]] = None

    def top(self, k: int) -> list[Head]:
        return top_heads(self.scores, k)

    def ranking(self) -> list[tuple[Head, float]]:
        """All heads, best first, with their scores."""
        heads = self.top(self.scores.numel())
        return [(h, float(self.scores[h])) for h in heads]

    def to_phase(self) -> dict[str, Any]:
        """The saved form (``checkpoint.PhaseCheckpoint``): tensors and the history."""
        phase = {"scores": self.scores, "scale": self.scale, "history": self.history.to_dict()}
        return phase if self.init is None else {**phase, "init": self.init}

    @classmethod
    def from_phase(cls, phase: dict[str, Any], cached: bool = False,
                   config: Optional[LoFiTConfig] = None) -> "HeadSelection":
        """The selection ``to_phase`` saved; a phase saved without the initial A gets it
        drawn again from ``config`` (its seed and init_std: ``initial_scale``), else ``None``."""
        history = TrainingHistory.from_dict({**phase["history"], "cached": cached})
        init = phase.get("init")
        if init is None and config is not None:
            init = initial_scale(ModelDims(*phase["scale"].shape), config.init_std, config.seed)
        return cls(phase["scores"], phase["scale"], history, init)


def initial_scale(dims: ModelDims, std: float, seed: int) -> Float[Tensor, "layer head d_head"]:
    """Step 1's A before training: N(0, std) on every head, drawn from
    ``torch.Generator().manual_seed(seed)`` (what ``select_heads`` starts from)."""
    module = HeadIntervention(dims, use_scale=True, use_bias=False).set_heads(None)
    return module.init_normal(std, torch.Generator().manual_seed(seed)).scale.detach().clone()


@dataclass
class BiasTuning:
    """Step 2's outcome: the trained intervention (v on ``heads``)."""

    intervention: HeadIntervention
    heads: list[Head]
    history: TrainingHistory = field(default_factory=TrainingHistory)

    @property
    def bias(self) -> Float[Tensor, "layer head d_head"]:
        return self.intervention.bias.detach().cpu().clone()


# ---------------------------------------------------------------------- configuration
def resolve_run(task: TaskLike, config: Optional[LoFiTConfig], overrides: dict[str, Any]) -> tuple[Task, LoFiTConfig]:
    """The task object and a config with overrides applied and task defaults filled in
    (returned as given when ``task`` is a task object and ``config`` is already resolved)."""
    if isinstance(task, Task) and config is not None and not overrides and config.is_resolved():
        return task, config
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


@dataclass(frozen=True)
class RunData:
    """A run's training and validation examples, read and hashed once."""

    train: list[TrainingExample]
    val: list[TrainingExample]
    data_hash: str


def training_data(task: Task, cfg: LoFiTConfig) -> RunData:
    """The train and val examples of a run, as the trainer consumes them, and their hash."""
    train = task.training_examples(task.train_examples(cfg.seed, cfg.max_train_examples))
    val = task.training_examples(task.eval_examples("val", cfg.max_val_examples)) \
        if cfg.max_val_examples != 0 else []
    return RunData(train, val, hash_examples(train))


# ---------------------------------------------------------------------- the loop
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_WINDOW = 3
MAX_PARAMETER = 1e4
"""Training has diverged when a loss is not finite; when the mean loss of the last
``DIVERGENCE_WINDOW`` steps exceeds ``DIVERGENCE_FACTOR * first loss + 1`` (nats); or when an
entry of a trained tensor, or a head's norm of it, is not finite or exceeds ``MAX_PARAMETER``
(a head output scaled or shifted ten thousand times: the loss of a model whose norm layers
absorb that can stay flat while the ranking becomes meaningless)."""


def check_divergence(history: TrainingHistory, params: Sequence[torch.Tensor], desc: str,
                     lr: float) -> None:
    """Raise ``TrainingDivergedError`` when the last step shows divergence (see above)."""
    losses, step = history.step_loss, len(history.step_loss)
    hint = (f"lower the learning rate (lr={lr:g}); nothing of this step was saved, finished "
            "steps are kept in the checkpoint")
    if not math.isfinite(losses[-1]):
        raise TrainingDivergedError(f"{desc}: the loss is {losses[-1]} at optimiser step {step}; {hint}")
    with torch.no_grad():
        largest = max((float(p.detach().norm(dim=-1).max()) for p in params if p.numel()), default=0.0)
    if not largest <= MAX_PARAMETER:  # also catches nan and inf
        raise TrainingDivergedError(
            f"{desc}: a trained tensor reached a norm of {largest:.3g} after optimiser step "
            f"{step} (limit {MAX_PARAMETER:g}; not finite or absurdly large); {hint}")
    recent = losses[-DIVERGENCE_WINDOW:]
    limit = DIVERGENCE_FACTOR * losses[0] + 1.0
    if len(recent) == DIVERGENCE_WINDOW and sum(recent) / len(recent) > limit:
        raise TrainingDivergedError(
            f"{desc}: the loss rose from {losses[0]:.3f} to a mean of {sum(recent) / len(recent):.3f} "
            f"over the last {DIVERGENCE_WINDOW} steps (limit {limit:.3f}); {hint}")


def train_intervention(
    model,
    intervention: Intervention,
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
    prefix_budget_mb: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> TrainingHistory:
    """AdamW with linear decay to zero (no warm-up); ``l1_lambda * sum|t|`` over the
    intervention's ``l1_parameters()`` (LoFiT: the scales A) is added to the loss; gradients
    of loss and penalty together are clipped to ``max_grad_norm`` (total norm, as HF's
    Trainer does; 0: no clipping). Returns the loss history (per step, per epoch, validation
    per epoch) and how many steps were clipped; a diverging run raises
    ``TrainingDivergedError`` (``check_divergence``). ``prefix_budget_mb`` > 0: when the
    intervention edits no layer below ``l0`` > 0, the residual entering ``l0`` is computed once
    per row and every forward runs only the blocks from ``l0`` on (``lofit_lens.prefix``; this
    much memory, then disk).

    Data-parallel (``lofit_lens.distributed``) while a process group of more than one process
    is initialised: each process computes the loss of its shard of every global batch,
    weighted by the shard's share of it, and the gradients are summed over the processes
    before the L1 term, clipping, the optimiser step and the divergence guard, which all see
    the global batch's values; progress shows on rank 0 only."""
    params = intervention.trainable()
    world, rank = distributed.world_size(), distributed.rank()
    optimizer = torch.optim.AdamW(params, lr=lr, eps=adam_eps, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    shuffle = torch.Generator().manual_seed(seed)
    history = TrainingHistory()
    penalised = intervention.l1_parameters() if l1_lambda > 0 else []

    with tqdm(total=total, desc=desc, disable=not progress or rank > 0, leave=False) as bar, \
            intervention.attach(model), \
            frozen_prefix(model, [train, val], first_edited_layer(intervention), batch_size,
                          prefix_budget_mb) as cached:
        history.frozen_prefix_layer = first_edited_layer(intervention) if cached else 0
        if getattr(train, "reference_at_init", False):  # official DPO: TRL's reference
            intervention.eval()
            train.compute_reference(model)
        if getattr(val, "reference_at_init", False):  # TRL: at the first evaluation
            val.reference = torch.zeros(0, 2)
        for epoch in range(epochs):
            started = time.perf_counter()
            intervention.train()  # e.g. LoRA dropout on; validation below runs in eval mode
            order = torch.randperm(len(train), generator=shuffle).tolist()
            epoch_losses = []
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                if world > 1:
                    optimizer.zero_grad(set_to_none=True)
                    loss_value = _data_parallel_backward(model, train, batch, params, world, rank)
                    if penalised:  # the same on every process: added once, after the sum
                        (l1_lambda * sum(p.abs().sum() for p in penalised)).backward()
                else:
                    loss = train.loss(model, batch)
                    total_loss = loss + l1_lambda * sum(p.abs().sum() for p in penalised).to(loss.device) \
                        if penalised else loss
                    optimizer.zero_grad(set_to_none=True)
                    total_loss.backward()
                    loss_value = loss.item()
                if max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    history.clipped_steps += int(norm > max_grad_norm)
                optimizer.step()
                schedule.step()
                epoch_losses.append(loss_value)
                history.step_loss.append(epoch_losses[-1])
                check_divergence(history, params, desc, lr)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{sum(epoch_losses) / len(epoch_losses):.4f}")
            history.epoch_loss.append(sum(epoch_losses) / max(1, len(epoch_losses)))
            if val is not None and len(val):
                intervention.eval()
                history.val_loss.append(validation_loss(model, val, batch_size))
                bar.set_postfix(epoch=epoch + 1, loss=f"{history.epoch_loss[-1]:.4f}",
                                val=f"{history.val_loss[-1]:.4f}")
            logger.info("%s: epoch %d/%d, %d step%s, loss %.4f%s, %.1f s", desc, epoch + 1, epochs,
                        len(epoch_losses), "" if len(epoch_losses) == 1 else "s", history.epoch_loss[-1],
                        f", validation loss {history.val_loss[-1]:.4f}" if history.val_loss else "",
                        time.perf_counter() - started)
    intervention.eval()
    return history


def _data_parallel_backward(model, objective: Objective, batch: list[int], params,
                            world: int, rank: int) -> float:
    """This process's shard of ``batch``: its loss times its share of the batch's loss weight
    (target tokens for SFT, pairs for DPO), backward, then the gradients summed over the
    processes: the single-process gradient of the whole batch. Returns the batch's loss."""
    mine = distributed.shard(batch, rank, world)
    weight = distributed.loss_weight(objective, batch)
    if mine:
        local = objective.loss(model, mine) * (distributed.loss_weight(objective, mine) / weight)
        local.backward()
    else:  # a batch smaller than the world: this process adds zeros
        local = torch.zeros(())
    return distributed.all_reduce_gradients(params, local)


@torch.no_grad()
def validation_loss(model, objective: Objective, batch_size: int) -> float:
    """Mean task loss over ``objective`` (call with the intervention attached); data-parallel,
    each process scores every world-th batch and the sums are added up."""
    if getattr(objective, "reference_at_init", False) and len(objective.reference) != len(objective):
        objective.compute_reference(model)
    world, rank = distributed.world_size(), distributed.rank()
    losses, weights = [], []
    for i, start in enumerate(range(0, len(objective), batch_size)):
        if i % world != rank:
            continue
        rows = list(range(start, min(start + batch_size, len(objective))))
        losses.append(objective.loss(model, rows).item())
        weights.append(len(rows))
    total, weight = distributed.all_reduce_sum([sum(l * w for l, w in zip(losses, weights)),
                                                float(sum(weights))])
    return total / weight


@dataclass
class TrainingSet:
    """A run's encoded training and validation data (for DPO: with the untouched model's
    reference log-probs). Build it once to share it between the two steps."""

    train: Objective
    val: Optional[Objective]
    data_hash: str

    @classmethod
    def build(cls, model, task: Task, cfg: LoFiTConfig,
              examples: Optional[RunData] = None) -> "TrainingSet":
        """Encode the run's data (``examples``: already read by ``training_data``)."""
        data = examples or training_data(task, cfg)
        def objective(rows, split):
            return build_objective(model, rows, cfg.dpo_beta, cfg.protocol, where=f"{task.name} {split}")

        return cls(objective(data.train, "train"), objective(data.val, "val") if data.val else None,
                   data.data_hash)


# ---------------------------------------------------------------------- the two steps
def select_heads(model, task: TaskLike, *, config: Optional[LoFiTConfig] = None,
                 progress: bool = True, data: Optional[TrainingSet] = None,
                 **overrides) -> HeadSelection:
    """Step 1: learn A on ALL heads with an L1 penalty; rank every head by ||A||."""
    task_obj, cfg = resolve_run(task, config, overrides)
    data = data or TrainingSet.build(model, task_obj, cfg)
    train, val, data_hash = data.train, data.val, data.data_hash
    init = initial_scale(model_dims(model), cfg.init_std, cfg.seed)
    intervention = HeadIntervention(model_dims(model), use_scale=True, use_bias=False).set_heads(None)
    with torch.no_grad():
        intervention.scale.copy_(init)
    start = time.perf_counter()
    history = train_intervention(
        model, intervention, train, val, epochs=cfg.epochs_select, lr=cfg.lr_select,
        l1_lambda=cfg.l1_lambda, batch_size=cfg.batch_size, seed=cfg.seed,
        weight_decay=cfg.weight_decay, adam_eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
        prefix_budget_mb=cfg.prefix_cache_mb, desc="step 1: select heads",
        progress=progress,
    )
    history.seconds, history.data_hash, history.n_train = time.perf_counter() - start, data_hash, len(train)
    history.trainable_parameters = intervention.num_trainable_parameters()
    scores = intervention.scale_norms().cpu()
    check_selection(scores, cfg.lr_select, model_dims(model).d_head)
    return HeadSelection(scores, intervention.scale.detach().cpu().clone(), history, init)


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
        prefix_budget_mb=cfg.prefix_cache_mb, desc="step 2: tune biases",
        progress=progress,
    )
    history.seconds, history.data_hash, history.n_train = time.perf_counter() - start, data_hash, len(train)
    history.trainable_parameters = intervention.num_trainable_parameters()
    return BiasTuning(intervention, intervention.active_heads if heads is None else list(heads), history)
