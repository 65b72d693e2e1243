"""``LoFiTConfig``: every knob of a LoFiT run, serialisable to and from JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lofit_lens.tasks.base import ProtocolName, TaskHyperparams, check_protocol


@dataclass
class LoFiTConfig:
    """Settings of a two-step LoFiT run. ``None`` learning rates / lambda take the task's
    defaults (see ``lofit_lens.tasks`` and docs/hyperparameters in the README)."""

    task: str = "clutrr"
    protocol: ProtocolName = "official"
    """``official`` (the authors' code, point by point) or ``clean``; see docs/protocol.md."""
    k: Union[int, float] = 0.1
    """Heads to keep: a count (int >= 1) or a fraction of all heads (0 < float < 1)."""
    seed: int = 0
    l1_lambda: Optional[float] = None
    lr_select: Optional[float] = None
    lr_bias: Optional[float] = None
    epochs_select: int = 2
    epochs_bias: int = 3
    batch_size: int = 8
    init_std: float = 1e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    dpo_beta: float = 0.5
    max_grad_norm: Optional[float] = None
    """Gradient clipping by total norm; ``None``: the protocol's (official: 1.0, HF Trainer's
    default in the authors' code; clean: none); 0 turns it off."""
    max_train_examples: Optional[int] = None
    max_val_examples: Optional[int] = 64
    """Validation (teacher-forced loss after each epoch) uses at most this many val rows."""
    max_eval_examples: Optional[int] = None
    eval_splits: tuple[str, ...] = ("test",)
    eval_batch_size: int = 16
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form task options (e.g. ``{"fold": 1}`` for TruthfulQA, ``data_dir``)."""

    def resolved(self, defaults: TaskHyperparams) -> "LoFiTConfig":
        """A copy with unset learning rates, lambda and clipping filled from the task's and
        the protocol's defaults."""
        check_protocol(self.protocol)
        clip = self.max_grad_norm
        return dataclasses.replace(
            self,
            max_grad_norm=(1.0 if self.protocol == "official" else 0.0) if clip is None else clip,
            l1_lambda=defaults.l1_lambda if self.l1_lambda is None else self.l1_lambda,
            lr_select=defaults.lr_select if self.lr_select is None else self.lr_select,
            lr_bias=defaults.lr_bias if self.lr_bias is None else self.lr_bias,
        )

    def num_heads(self, total_heads: int) -> int:
        """``k`` as a head count out of ``total_heads`` (a fraction rounds, at least 1)."""
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"k must be an int count or a float fraction, got {k!r}")
        if isinstance(k, float) and not k.is_integer():
            if not 0 < k < 1:
                raise ValueError(f"k={k}: a fraction must lie in (0, 1)")
            return max(1, round(k * total_heads))
        if not 1 <= int(k) <= total_heads:
            raise ValueError(f"k={int(k)} heads: the model has {total_heads} heads")
        return int(k)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(self.eval_splits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoFiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown LoFiTConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "eval_splits" in d:
            d["eval_splits"] = tuple(d["eval_splits"])
        return cls(**d)
