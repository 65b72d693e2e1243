"""Which token positions of the current forward pass are answer tokens, and whether an
attached edit acts at chosen positions.

Multiple-choice scoring publishes, around each forward it runs, the index of every position
within its answer (-1 for prompt and padding positions). An edit that acts on answer tokens
only (ITI as honest_llama scores it) reads it in its hook; outside scoring nothing is set.

Generation and MC scoring run a batch's common prompt start once and the rest from its KV
cache. That moves where a prompt's last token falls (into a later forward, behind a cache),
so an edit that acts at chosen positions (a prompt's last token: ReFT, ITI's "last"; answer
tokens: ITI's "answer") says so while it is attached (``position_dependent_edit``), and
they then run every prompt whole (``prefix_sharing_allowed``).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
from jaxtyping import Bool, Int
from torch import Tensor

_ANSWER_INDEX: ContextVar[Optional[Tensor]] = ContextVar("answer_index", default=None)
_POSITION_DEPENDENT: ContextVar[int] = ContextVar("position_dependent_edits", default=0)


@contextlib.contextmanager
def position_dependent_edit() -> Iterator[None]:
    """Mark, for the ``with`` body, that an attached edit acts at chosen positions: prompts
    are then run whole, never split at a shared start (an intervention's ``attach`` enters
    it)."""
    token = _POSITION_DEPENDENT.set(_POSITION_DEPENDENT.get() + 1)
    try:
        yield
    finally:
        _POSITION_DEPENDENT.reset(token)


def prefix_sharing_allowed() -> bool:
    """Whether a batch's common prompt start may run once: no position-dependent edit is
    attached."""
    return _POSITION_DEPENDENT.get() == 0


def answer_index_from_mask(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """0, 1, 2, ... along each row's answer positions (``mask``), -1 elsewhere."""
    mask = mask.bool()
    return torch.where(mask, mask.long().cumsum(-1) - 1, torch.full_like(mask, -1, dtype=torch.long))


@contextlib.contextmanager
def answer_positions(index: Int[Tensor, "batch pos"]) -> Iterator[None]:
    """Publish ``index`` (see ``answer_index_from_mask``) for the forwards inside."""
    token = _ANSWER_INDEX.set(index)
    try:
        yield
    finally:
        _ANSWER_INDEX.reset(token)


def current_answer_index() -> Optional[Int[Tensor, "batch pos"]]:
    """The published answer index of the running forward, or ``None`` outside scoring."""
    return _ANSWER_INDEX.get()
