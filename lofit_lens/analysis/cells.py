"""The analyses' cells: head selections, and v tuned on given heads then evaluated.

A cell is phases of the run engine (``lofit_lens.engine``) in ``cache_dir``: ``select``,
``tune`` and ``evaluate`` records keyed by ``run_settings.phase_settings`` (the model and its
weights' hash, the versions, the task, the hashes of the data read, the step's settings). So
a cell is computed once whichever analysis asks first, ``ll.lofit(checkpoint=cache_dir)``
and ``compare(out=cache_dir)`` read the same phases, a cache written with other settings is
never reused, and an interrupted analysis resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from lofit_lens.backends.hooked import ModelDims, model_dims, model_id
from lofit_lens import engine
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.methods.selectors import random_heads
from lofit_lens.config import LoFiTConfig
from lofit_lens.eval.evaluate import example_scores
from lofit_lens.history import RunHistory
from lofit_lens.intervention import Head
from lofit_lens.result import LoFiTResult
from lofit_lens.run_settings import EVAL_SPLIT
from lofit_lens.store import slug
from lofit_lens.tasks.base import Task
from lofit_lens.training import HeadSelection, TaskLike, TrainingSet, resolve_run

Record = dict[str, Any]


def cached_record(folder: str | Path, name: str, settings: Mapping[str, Any],
                  compute: Callable[[], tuple[Record, dict[str, Tensor]]]) -> Record:
    """An analysis's own phase ``name`` in the engine's store in ``folder``: computed and
    saved if absent. ``compute`` returns the JSON part and the tensors.

    The returned record holds ``settings``, ``key``, the JSON part, the tensors (as lists of
    floats, for tables), ``cached`` (whether it was read back) and ``path`` (the card).
    """
    def value() -> dict[str, Any]:
        record, tensors = compute()
        return {**record, **tensors}

    stored = cell_store(folder).record(slug(name), dict(settings), value)
    return {"settings": dict(settings), "key": stored.key,
            **{k: v.tolist() if isinstance(v, Tensor) else v for k, v in stored.value.items()},
            "cached": stored.cached, "path": None if stored.path is None else str(stored.path)}


# ---------------------------------------------------------------------- head selections
def cell_store(cache_dir: str | Path) -> PhaseCheckpoint:
    """The engine's store in ``cache_dir`` (shared by the analyses and parallel workers)."""
    return PhaseCheckpoint(cache_dir)


def cached_selection(model, task: Task, cfg: LoFiTConfig, cache_dir: str | Path,
                     progress: bool = True,
                     data: Optional[Callable[[], TrainingSet]] = None) -> HeadSelection:
    """Step 1 on ``task`` with ``cfg`` through the engine's store in ``cache_dir``
    (``data``: as in ``bias_cell``)."""
    return engine.selection(model, task, cfg, cell_store(cache_dir), progress, data)


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


def cell_record(task: Task, evaluation: engine.Evaluation) -> dict[str, Any]:
    """An evaluated cell as the analyses read it: the primary metric, all metrics, the
    per-example scores (``correct``: 0/1 under the primary metric; for multiple choice also
    ``mc2``), the evaluation's settings and key, ``cached`` and ``path`` (its card)."""
    metric = primary_metric(task)
    extra = {} if task.kind == "generation" else {"mc2": example_scores(evaluation.predictions)["mc2"]}
    return {"settings": evaluation.settings, "key": evaluation.key, "metric": metric,
            "accuracy": evaluation.metrics[metric], "metrics": evaluation.metrics,
            "correct": per_example(task, evaluation.predictions), **extra,
            "cached": evaluation.cached, "path": None if evaluation.path is None else str(evaluation.path)}


def evaluated_cell(model, task: Task, cfg: LoFiTConfig, trained: engine.Trained,
                   cache_dir: str | Path, progress: bool = True, label: str = "eval") -> dict[str, Any]:
    """``trained`` evaluated on ``task``'s test split through the engine (``cell_record``)."""
    return cell_record(task, engine.evaluation(model, task, cfg, EVAL_SPLIT, trained,
                                               cell_store(cache_dir), progress, label))


def bias_cell(model, task: Task, cfg: LoFiTConfig, heads: Sequence[Head],
              cache_dir: str | Path, progress: bool = True,
              data: Optional[Callable[[], TrainingSet]] = None) -> dict[str, Any]:
    """Tune v on ``heads`` for ``task`` and evaluate on its test split: ``cell_record`` plus
    ``k``, ``heads``, the step-2 ``history`` and ``bias`` (v on those heads, as lists).

    ``data``: returns the ``TrainingSet`` of ``(task, cfg)``, called only when v is tuned;
    pass one cached builder to cells of the same task so it is encoded once (for DPO, the
    reference log-probs are a forward pass over the training set)."""
    heads = [tuple(h) for h in heads]
    trained = engine.tuning(model, task, cfg, heads, cell_store(cache_dir), progress, data)
    record = evaluated_cell(model, task, cfg, trained, cache_dir, progress,
                            f"eval {task.name} (K={len(heads)})")
    history = trained.value["history"]
    bias = trained.value["bias"]
    return {**record, "settings": {**trained.settings, "evaluation": record["settings"]},
            "cached": record["cached"] and trained.cached, "k": len(heads),
            "history": {k: history[k] for k in ("epoch_loss", "val_loss", "seconds", "n_train")},
            "heads": [list(h) for h in heads], "bias": [bias[l, h].tolist() for l, h in heads]}


def zero_shot_cell(model, task: Task, cfg: LoFiTConfig, cache_dir: str | Path,
                   progress: bool = True) -> dict[str, Any]:
    """The untouched model on ``task``'s test split (``cell_record``)."""
    return evaluated_cell(model, task, cfg, engine.UNTOUCHED, cache_dir, progress, "eval zero-shot")

