"""What a training step and a run record besides their tensors: losses, counts and timings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainingHistory:
    """One training step (head selection or bias tuning): losses, clipping, size and time."""

    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    clipped_steps: int = 0
    """Optimiser steps whose gradient norm exceeded ``max_grad_norm`` (and was clipped)."""
    seconds: float = 0.0
    data_hash: str = ""
    n_train: int = 0
    trainable_parameters: int = 0
    """Parameters that actually train (active heads x d_head per trainable tensor)."""
    frozen_prefix_layer: int = 0
    """Blocks below this layer ran once per row (frozen-prefix cache); 0: every step ran them."""
    cached: bool = False
    """Read back from a cache rather than trained in this process."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "TrainingHistory":
        """Also reads 0.1.0 cards (fewer keys); keys it does not know are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass
class RunHistory:
    """Both steps of a LoFiT run (``tune`` is ``None`` for a selection-only result)."""

    select: TrainingHistory = field(default_factory=TrainingHistory)
    tune: Optional[TrainingHistory] = None

    def to_dict(self) -> dict[str, Any]:
        d = {"select": self.select.to_dict()}
        if self.tune is not None:
            d["tune"] = self.tune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "RunHistory":
        d = d or {}
        return cls(TrainingHistory.from_dict(d.get("select")),
                   TrainingHistory.from_dict(d["tune"]) if d.get("tune") is not None else None)


@dataclass
class RunTimings:
    """Wall-clock seconds of a run's phases (``None``: the phase did not run)."""

    select: Optional[float] = None
    tune: Optional[float] = None
    eval_zero_shot: Optional[float] = None
    eval_lofit: Optional[float] = None
    load_model: Optional[float] = None
    total: Optional[float] = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "RunTimings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})
