"""On-disk cache for analyses: head selections and evaluated bias-tuning cells.

Every entry is a store artifact (``lofit_lens.store``) keyed by a hash of the settings that
determine it (``lofit_lens.run_settings``: model id, shape, dtype and weights' hash; the
versions; the task and a hash of its training / evaluation data; the step's hyperparameters
and seed), so a cache written with other settings is never reused, and an interrupted
analysis resumes where it stopped.

Layout under ``cache_dir``::

    select-<key>.{json,safetensors}  (step 1: the phase ``ll.lofit(checkpoint=cache_dir)``
                                      saves, so either reuses the other's selection)
    <model>/cells/<task>/bias-<key>.{json,safetensors}  (v tuned on given heads, then evaluated)
    <model>/cells/<task>/zero_shot-<key>.{json,safetensors}  (the untouched model evaluated)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import ModelDims, model_dims, model_id
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.phases import stored_selection
from lofit_lens.baselines.selectors import random_heads
from lofit_lens.config import LoFiTConfig
from lofit_lens.eval.evaluate import evaluate, example_scores
from lofit_lens.history import RunHistory
from lofit_lens.intervention import Head
from lofit_lens.result import LoFiTResult
from lofit_lens.run_settings import (
    STEP2_FIELDS, eval_examples, eval_settings, step_settings,
)
from lofit_lens.store import (
    artifact_exists, load_artifact, save_artifact, settings_key, slug,
)
from lofit_lens.tasks.base import Task
from lofit_lens.training import (
    HeadSelection, TaskLike, TrainingSet, resolve_run, tune_biases,
)

Record = dict[str, Any]


def cached_record(folder: Path, name: str, settings: Mapping[str, Any],
                  compute: Callable[[], tuple[Record, dict[str, Tensor]]]) -> Record:
    """The record stored as ``folder/<name>-<key>.{json,safetensors}``; computed and
    written if absent. ``compute`` returns the JSON part and the tensors.

    The returned record holds ``settings``, ``key``, the JSON part, the tensors (as lists of
    floats, for tables) and ``cached`` (whether it was read back) and ``path`` (the card).
    """
    key = settings_key(settings)
    stem = f"{slug(name)}-{key}"
    folder = Path(folder)
    if artifact_exists(folder, name=stem):
        tensors, card = load_artifact(folder, kind="cell", name=stem)
        return {**card, **{k: v.tolist() for k, v in tensors.items()}, "cached": True,
                "path": str(folder / f"{stem}.json")}
    record, tensors = compute()
    card = {"settings": dict(settings), "key": key, **record}
    path = save_artifact(folder, tensors, card, kind="cell", name=stem)
    return {**card, **{k: v.tolist() for k, v in tensors.items()}, "cached": False, "path": str(path)}


# ---------------------------------------------------------------------- head selections
def cached_selection(model, task: Task, cfg: LoFiTConfig, cache_dir: str | Path,
                     progress: bool = True,
                     data: Optional[Callable[[], TrainingSet]] = None) -> HeadSelection:
    """``select_heads`` on ``task`` with ``cfg``, read from / written to ``cache_dir`` as the
    "select" phase of ``checkpoint.PhaseCheckpoint`` (``data``: as in ``bias_cell``)."""
    return stored_selection(model, task, cfg, PhaseCheckpoint(cache_dir, lock=False), progress,
                            data)


def selection_result(selection: HeadSelection, cfg: LoFiTConfig, model_name: str,
                     k: int) -> LoFiTResult:
    """A ``LoFiTResult`` holding the top-``k`` heads of ``selection`` and no offsets (v = 0),
    for the head-set analyses (granularity, overlap)."""
    return LoFiTResult(config=cfg, model_id=model_name, head_scores=selection.scores,
                       scale=selection.scale, bias=torch.zeros_like(selection.scale),
                       selected_heads=selection.top(k), history=RunHistory(selection.history),
                       data_hash=selection.history.data_hash)


def random_result(dims: ModelDims, k: int, seed: int, model_name: str,
                  label: str = "random") -> LoFiTResult:
    """A ``LoFiTResult`` of ``random_heads`` (zero tensors) labelled as task ``label``."""
    zeros: Float[Tensor, "layer head d_head"] = torch.zeros(dims.n_layers, dims.n_heads, dims.d_head)
    return LoFiTResult(config=LoFiTConfig(task=label, seed=seed, k=k), model_id=model_name,
                       head_scores=zeros[..., 0].clone(), scale=zeros, bias=zeros.clone(),
                       selected_heads=random_heads(dims, k, seed))


def head_selection(model, task: TaskLike, k: Union[int, float], seed: int = 0, *,
                   cache_dir: str | Path, progress: bool = True, **overrides) -> LoFiTResult:
    """Step 1 alone (cached under ``cache_dir``): a ``LoFiTResult`` with the top-``k`` heads
    of ``task`` for ``seed`` and no offsets, for the head-set analyses (overlap, granularity).
    ``overrides``: ``LoFiTConfig`` fields, as in ``lofit``."""
    task_obj, cfg = resolve_run(task, None, {**overrides, "k": k, "seed": seed})
    selection = cached_selection(model, task_obj, cfg, cache_dir, progress=progress)
    return selection_result(selection, cfg, model_id(model), cfg.num_heads(model_dims(model).total_heads))


def random_selection(model, k: int, seed: int = 0, label: str = "random") -> LoFiTResult:
    """``k`` heads of ``model`` drawn at random (seeded), as a ``LoFiTResult`` like
    ``head_selection``'s: the baseline of the overlap analyses."""
    return random_result(model_dims(model), k, seed, model_id(model), label)


# ---------------------------------------------------------------------- evaluated cells
def primary_metric(task: Task) -> str:
    """The metric an analysis reports: exact match (generation) or MC1 (multiple choice)."""
    return "exact_match" if task.kind == "generation" else "mc1"


def per_example(task: Task, rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """0/1 correctness of each evaluated example under ``primary_metric``."""
    return example_scores(rows)[primary_metric(task)]


def evaluated(model, task: Task, cfg: LoFiTConfig, intervention, progress: bool,
              desc: str) -> dict[str, Any]:
    """A cell's record: the primary metric, all metrics, and the per-example scores
    (``correct``: 0/1 under the primary metric; for multiple choice also ``mc2``)."""
    metrics, rows = evaluate(model, task, eval_examples(task, cfg), intervention,
                             cfg.eval_batch_size, progress, desc=desc,
                             max_batch_tokens=cfg.eval_batch_tokens)
    metric = primary_metric(task)
    extra = {} if task.kind == "generation" else {"mc2": example_scores(rows)["mc2"]}
    return {"metric": metric, "accuracy": metrics[metric], "metrics": metrics,
            "correct": per_example(task, rows), **extra}


def cells_folder(model, task: Task, cache_dir: str | Path) -> Path:
    """Where the evaluated cells of ``task`` live; shared by all analyses, so a cell with the
    same settings (e.g. the same-task cell of ``transfer_matrix`` and the 3% point of
    ``k_sweep``) is computed once."""
    return Path(cache_dir) / slug(model_id(model)) / "cells" / slug(task.name)


def bias_cell(model, task: Task, cfg: LoFiTConfig, heads: Sequence[Head],
              cache_dir: str | Path, progress: bool = True,
              data: Optional[Callable[[], TrainingSet]] = None) -> dict[str, Any]:
    """Tune v on ``heads`` for ``task`` and evaluate on its test split; cached as one JSON
    (heads, v on those heads, losses, metrics, per-example correctness).

    ``data``: returns the ``TrainingSet`` of ``(task, cfg)``, called only when the cell is
    computed; pass one cached builder to cells of the same task so it is encoded once
    (for DPO, the reference log-probs are a forward pass over the training set)."""
    heads = [tuple(h) for h in heads]
    settings = {**step_settings(model, task, cfg, STEP2_FIELDS), **eval_settings(model, task, cfg),
                "heads": [list(h) for h in heads]}

    def compute() -> tuple[dict[str, Any], dict[str, Tensor]]:
        tuning = tune_biases(model, task, heads, config=cfg, progress=progress,
                             data=data() if data else None)
        record = evaluated(model, task, cfg, tuning.intervention, progress,
                            f"eval {task.name} (K={len(heads)})")
        history = {k: getattr(tuning.history, k) for k in ("epoch_loss", "val_loss", "seconds", "n_train")}
        bias = torch.stack([tuning.bias[l, h] for l, h in heads]) if heads else torch.zeros(0)
        return ({**record, "k": len(heads), "history": history, "heads": [list(h) for h in heads]},
                {"bias": bias})

    return cached_record(cells_folder(model, task, cache_dir), "bias", settings, compute)


def zero_shot_cell(model, task: Task, cfg: LoFiTConfig, cache_dir: str | Path,
                   progress: bool = True) -> dict[str, Any]:
    """The untouched model on ``task``'s test split (cached like ``bias_cell``)."""
    return cached_record(cells_folder(model, task, cache_dir), "zero_shot",
                         eval_settings(model, task, cfg),
                         lambda: (evaluated(model, task, cfg, None, progress, "eval zero-shot"), {}))
