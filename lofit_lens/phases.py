"""Step 1 through one store: the head selection that ``ll.lofit``, ``compare`` and the
analyses all read and write.

A selection is the "select" phase of a ``checkpoint.PhaseCheckpoint``, keyed by
``run_settings.step_settings`` (model and weights, versions, task, data, step-1 fields). Any
of them given the same folder (``lofit(checkpoint=X)``, ``compare(out=X)``,
``transfer_matrix(cache_dir=X)``) finds what another saved there.
"""

from __future__ import annotations

from typing import Callable, Optional

from lofit_lens.checkpoint import PhaseCheckpoint, run_phase
from lofit_lens.config import LoFiTConfig
from lofit_lens.run_settings import STEP1_FIELDS, step_settings
from lofit_lens.tasks.base import Task
from lofit_lens.training import HeadSelection, RunData, TrainingSet, select_heads


def stored_selection(model, task: Task, cfg: LoFiTConfig, store: Optional[PhaseCheckpoint],
                     progress: bool = True,
                     data: Optional[Callable[[], TrainingSet]] = None,
                     examples: Optional[RunData] = None) -> HeadSelection:
    """``select_heads`` on ``task`` with ``cfg``: read from ``store`` when a run with the same
    settings saved it (``history.cached`` is then True), else computed and saved there
    (``store=None``: computed, not saved). ``data``: builds the encoded training set (called
    only when the selection is computed); ``examples``: the training data, if already read."""
    computed = False

    def compute() -> dict:
        nonlocal computed
        computed = True
        return select_heads(model, task, config=cfg, progress=progress,
                            data=data() if data else None).to_phase()

    phase = run_phase(store, "select", step_settings(model, task, cfg, STEP1_FIELDS, examples),
                      compute)
    return HeadSelection.from_phase(phase, cached=not computed)
