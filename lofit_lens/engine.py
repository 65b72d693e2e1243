"""The run engine: every phase of a run through one store.

A phase is head selection (step 1), bias tuning (step 2), a compared method's training, or an
evaluation on one split. Each is a record of a ``checkpoint.PhaseCheckpoint`` named by the
phase and a hash of ``run_settings.phase_settings``. ``ll.lofit(checkpoint=X)``,
``compare(out=X)``, the analysis cells (``cache_dir=X``) and the claims all run their phases
here, so a phase any of them saved in ``X`` is read back by the others. An evaluation's
settings name what it evaluates by a hash of the edit itself (``content_key``), so an edit
evaluated once is never evaluated again, whichever phase trained it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from lofit_lens.backends.hooked import model_dims
from lofit_lens.checkpoint import Phase, PhaseCheckpoint, StoredPhase, phase_record
from lofit_lens.config import LoFiTConfig
from lofit_lens.eval.evaluate import Predictions, evaluate
from lofit_lens.history import TrainingHistory
from lofit_lens.intervention import Head, HeadIntervention, Intervention
from lofit_lens.run_settings import phase_settings
from lofit_lens.store import jsonable
from lofit_lens.tasks.base import Task
from lofit_lens.training import HeadSelection, RunData, TrainingSet, select_heads, tune_biases

Store = Optional[PhaseCheckpoint]
DataBuilder = Optional[Callable[[], TrainingSet]]
"""Builds the encoded training set; called only when a training phase is computed (pass one
cached builder to phases of one run so it is encoded once: for DPO that is a forward pass)."""


def selection(model, task: Task, cfg: LoFiTConfig, store: Store, progress: bool = True,
              data: DataBuilder = None, examples: Optional[RunData] = None) -> HeadSelection:
    """Step 1 on ``task`` with ``cfg``: read from ``store`` when saved there
    (``history.cached`` is then True), else computed and saved (``store=None``: not saved).
    ``examples``: the training data, if already read."""
    def compute() -> Phase:
        return select_heads(model, task, config=cfg, progress=progress,
                            data=data() if data else None).to_phase()

    stored = phase_record(store, "select", phase_settings("select", model, task, cfg,
                                                          data=examples), compute)
    return HeadSelection.from_phase(stored.value, cached=stored.cached, config=cfg)


def content_key(intervention: Optional[Intervention]) -> Optional[str]:
    """What an evaluation of ``intervention`` is keyed by: a SHA-256 of its kind, spec and
    tensor values (``None``: the untouched model). Two phases that trained the same edit
    (``ll.lofit``'s step 2 and ``compare``'s LoFiT row) share its evaluations; an edit
    changed after its training never reads them."""
    if intervention is None:
        return None
    digest = hashlib.sha256(json.dumps(
        {"kind": intervention.kind, "spec": jsonable(intervention.spec())},
        sort_keys=True, default=str).encode())
    for name, tensor in sorted(intervention.state_tensors().items()):
        values = tensor.detach().float().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Trained:
    """A trained phase's outcome: what to attach (``None``: the untouched model), the key
    its evaluations are keyed by (``content_key``), and its saved value."""

    intervention: Optional[Intervention]
    key: Optional[str]
    value: Phase
    cached: bool = False
    path: Optional[Path] = None
    settings: Optional[dict[str, Any]] = None


UNTOUCHED = Trained(None, None, {})
"""The model as it is: what zero-shot evaluates."""


def tuning(model, task: Task, cfg: LoFiTConfig, heads: Optional[Sequence[Head]], store: Store,
           progress: bool = True, data: DataBuilder = None, examples: Optional[RunData] = None,
           use_scale: bool = False) -> Trained:
    """Step 2: v (and A with ``use_scale``) tuned on ``heads`` (``None``: every head), read
    from ``store`` when saved there. The value holds ``bias`` (and ``scale``) for every head,
    ``heads`` and ``history``."""
    heads = None if heads is None else [tuple(h) for h in heads]

    def compute() -> Phase:
        tuned = tune_biases(model, task, heads, config=cfg, use_scale=use_scale,
                            progress=progress, data=data() if data else None)
        value = {"bias": tuned.bias, "history": tuned.history.to_dict()}
        if use_scale:
            value["scale"] = tuned.intervention.scale.detach().cpu().clone()
        return value

    extra = {"heads": None if heads is None else [list(h) for h in heads]}
    if use_scale:
        extra["use_scale"] = True
    stored = phase_record(store, "tune", phase_settings("tune", model, task, cfg, data=examples,
                                                        **extra), compute)
    module = HeadIntervention(model_dims(model), use_scale=use_scale, use_bias=True).set_heads(heads)
    with torch.no_grad():
        module.bias.copy_(stored.value["bias"])
        if use_scale:
            module.scale.copy_(stored.value["scale"])
    return Trained(module, content_key(module), stored.value, stored.cached, stored.path,
                   stored.settings)


def tuned_history(trained: Trained) -> TrainingHistory:
    """Step 2's history of a ``tuning`` record (``cached`` when it was read back)."""
    return TrainingHistory.from_dict({**trained.value["history"], "cached": trained.cached})


def method_training(model, task: Task, cfg: LoFiTConfig, store: Store, method: str,
                    options: dict[str, Any], compute: Callable[[], Phase],
                    examples: Optional[RunData] = None) -> StoredPhase:
    """A compared method's training (``compute`` returns its saved form: ``intervention``
    (kind and spec, or ``None``), its tensors, ``params``, ``heads``, ``info``, ``seconds``),
    read from ``store`` when saved there with the same method, options and settings."""
    return phase_record(store, "method", phase_settings(
        "method", model, task, cfg, data=examples, method=method, options=options), compute)


@dataclass
class Evaluation:
    """One split evaluated: its metrics, per-example rows and the seconds it took when
    computed; ``cached``: read back."""

    metrics: dict[str, Any]
    predictions: Predictions
    seconds: float
    cached: bool
    key: str
    path: Optional[Path]
    settings: dict[str, Any]


def evaluation(model, task: Task, cfg: LoFiTConfig, split: str, trained: Trained, store: Store,
               progress: bool = True, label: str = "eval") -> Evaluation:
    """``trained`` (``UNTOUCHED``: the model as it is) evaluated on ``task``'s ``split``
    (``cfg.max_eval_examples`` rows), read from ``store`` when saved there (keyed by the
    rows and ``trained.key``, the edit's ``content_key``)."""
    rows = task.eval_examples(split, cfg.max_eval_examples)
    if not rows:
        raise ValueError(f"No {task.name} examples in split {split!r} to evaluate")

    def compute() -> Phase:
        start = time.perf_counter()
        metrics, predictions = evaluate(model, task, rows, trained.intervention,
                                        cfg.eval_batch_size, progress, desc=f"{label} {split}",
                                        max_batch_tokens=cfg.eval_batch_tokens)
        return {"metrics": metrics, "predictions": predictions,
                "seconds": time.perf_counter() - start}

    stored = phase_record(store, "evaluate", phase_settings(
        "evaluate", model, task, cfg, split=split, edit=trained.key), compute,
        f"evaluate {label} ({split})")
    v = stored.value
    return Evaluation(v["metrics"], v["predictions"], v["seconds"], stored.cached, stored.key,
                      stored.path, stored.settings)


def evaluations(model, task: Task, cfg: LoFiTConfig, trained: Trained, store: Store,
                progress: bool = True, label: str = "eval") -> dict[str, Evaluation]:
    """``evaluation`` on each of ``cfg.eval_splits``."""
    return {split: evaluation(model, task, cfg, split, trained, store, progress, label)
            for split in cfg.eval_splits}
