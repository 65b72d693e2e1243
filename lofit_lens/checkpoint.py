"""Finished phases of a run kept on disk, so an interrupted run resumes where it stopped.

Each phase is one store artifact (``lofit_lens.store``) named by the phase and a hash of the
settings that phase depends on: a rerun with other settings never picks up stale work, and
one that changes only a later phase (say ``lr_bias``) reuses the earlier ones.
A phase's value is a dict whose tensors go to safetensors and the rest to the JSON card.
Phases saved by 0.1.0 (``<phase>-<key>.pt``) are still read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lofit_lens.store import (
    artifact_exists, folder_lock, jsonable, load_artifact, save_artifact, settings_key,
)

Phase = dict[str, Any]


class PhaseCheckpoint:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def load(self, stem: str) -> Optional[Phase]:
        """The saved value under ``stem`` (``<phase>-<key>``), or ``None``."""
        if artifact_exists(self.directory, name=stem):
            tensors, card = load_artifact(self.directory, kind="phase", name=stem)
            return {**card["value"], **tensors}
        legacy = self.directory / f"{stem}.pt"
        return torch.load(legacy, weights_only=True) if legacy.is_file() else None

    def run(self, phase: str, settings: dict[str, Any], compute: Callable[[], Phase]) -> Phase:
        """``compute()``'s value for ``phase``: loaded if a run with these ``settings`` saved
        it, else computed and saved (under the folder's lock) before it is returned."""
        key = settings_key(settings)
        stem = f"{phase}-{key}"
        saved = self.load(stem)
        if saved is not None:
            return saved
        value = compute()
        tensors = {k: v for k, v in value.items() if isinstance(v, Tensor)}
        rest = {k: v for k, v in value.items() if k not in tensors}
        with folder_lock(self.directory):
            save_artifact(self.directory, tensors, {"phase": phase, "key": key, "value": rest},
                          kind="phase", name=stem)
        return {**jsonable(rest), **tensors}  # as a resumed run reads it back


def run_phase(checkpoint: Optional[PhaseCheckpoint], phase: str, settings: dict[str, Any],
              compute: Callable[[], Phase]) -> Phase:
    return compute() if checkpoint is None else checkpoint.run(phase, settings, compute)
