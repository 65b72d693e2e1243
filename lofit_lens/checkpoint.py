"""The run engine's store: finished phases kept on disk, so an interrupted run resumes where
it stopped and another run with the same settings reads them back (``lofit_lens.engine``).

Each phase is one store artifact (``lofit_lens.store``) named by the phase and a hash of the
settings that phase depends on: a rerun with other settings never picks up stale work, and
one that changes only a later phase (say ``lr_bias``) reuses the earlier ones.
A phase's value is a dict whose tensors go to safetensors and the rest to the JSON card.

Every phase logs its start and its end with the seconds it took (``logging``, logger
``lofit_lens.checkpoint``), progress bars or not.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from torch import Tensor

from lofit_lens.store import (
    artifact_exists, jsonable, load_artifact, save_artifact, settings_key, shared_write_lock,
)

Phase = dict[str, Any]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def logged_phase(phase: str) -> Iterator[None]:
    """Log ``phase``'s start, and its end with the seconds it took (or that it failed)."""
    logger.info("%s: started", phase)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("%s: stopped after %.1f s", phase, time.perf_counter() - start)
        raise
    logger.info("%s: done in %.1f s", phase, time.perf_counter() - start)


class PhaseCheckpoint:
    """Phases saved as ``<directory>/<phase>-<key>.{json,safetensors}``. Any number of runs
    and parallel workers may share a directory: a phase is written under the directory's
    shared write lock (``store.shared_write_lock``), and a phase another writer saved
    meanwhile is read back instead of written again."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).resolve()  # a Ray worker resolves it as here

    def _load(self, stem: str) -> Optional[Phase]:
        """The value saved as ``<phase>-<key>``, or ``None``."""
        if not artifact_exists(self.directory, name=stem):
            return None
        tensors, card = load_artifact(self.directory, kind="phase", name=stem)
        return {**card["value"], **tensors}

    def record(self, phase: str, settings: dict[str, Any], compute: Callable[[], Phase],
               label: Optional[str] = None) -> "StoredPhase":
        """``compute()``'s value for ``phase`` with its key and whether it was read back:
        loaded if a run with these ``settings`` saved it, else computed and saved first.
        ``label``: the phase's name in the log (default: ``phase``)."""
        key = settings_key(settings)
        stem = f"{phase}-{key}"
        saved = self._load(stem)
        if saved is not None:
            logger.info("%s: read from %s", label or phase, self.directory)
            return StoredPhase(saved, key, True, self.directory / f"{stem}.json", settings)
        with logged_phase(label or phase):
            value = compute()
        tensors = {k: v for k, v in value.items() if isinstance(v, Tensor)}
        rest = {k: v for k, v in value.items() if k not in tensors}
        with shared_write_lock(self.directory):
            saved = self._load(stem)  # another writer finished it meanwhile: theirs stands
            if saved is not None:
                return StoredPhase(saved, key, True, self.directory / f"{stem}.json", settings)
            path = save_artifact(self.directory, tensors, {"phase": phase, "key": key, "value": rest,
                                                           "settings": settings},
                                 kind="phase", name=stem)
        return StoredPhase({**jsonable(rest), **tensors}, key, False, path, settings)  # as read back


@dataclass(frozen=True)
class StoredPhase:
    """A phase's value, its key (``store.settings_key`` of its settings), whether it was read
    back, its card (``None``: not saved) and the settings it was computed with."""

    value: Phase
    key: str
    cached: bool
    path: Optional[Path]
    settings: dict[str, Any]


def phase_record(checkpoint: Optional[PhaseCheckpoint], phase: str, settings: dict[str, Any],
                 compute: Callable[[], Phase], label: Optional[str] = None) -> StoredPhase:
    """``compute()`` through ``checkpoint`` when there is one (else computed, not saved);
    logged either way (as ``label``, default ``phase``)."""
    if checkpoint is not None:
        return checkpoint.record(phase, settings, compute, label)
    with logged_phase(label or phase):
        return StoredPhase(compute(), settings_key(settings), False, None, settings)
