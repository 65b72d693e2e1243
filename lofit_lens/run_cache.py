"""On-disk cache for analyses: head selections and evaluated bias-tuning cells.

Every entry is keyed by a hash of the settings that determine it (model id, shape and
dtype; the task and a hash of its training / evaluation data; the step's hyperparameters and
seed), so a cache written with other settings is never reused, and an interrupted analysis
resumes where it stopped. Settings that do not change the learned parameters (validation
size, batch size of evaluation, progress bars) are left out of the key.

Layout under ``cache_dir``::

    <model>/<task>/s<seed>/select-<key>/{selection.json, selection.safetensors}
    <model>/cells/<task>/bias-<key>.json        (v tuned on given heads, then evaluated)
    <model>/cells/<task>/zero_shot-<key>.json   (the untouched model evaluated)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from lofit_lens.config import LoFiTConfig
from lofit_lens.evaluation import evaluate
from lofit_lens.hooked import ModelDims, model_dims, model_id
from lofit_lens.intervention import Head
from lofit_lens.result import LoFiTResult
from lofit_lens.tasks.base import Task, hash_examples
from lofit_lens.training import (
    HeadSelection, TrainingSet, select_heads, training_data, tune_biases,
)

STEP1_FIELDS = ("seed", "l1_lambda", "lr_select", "epochs_select", "batch_size", "init_std",
                "weight_decay", "adam_eps", "dpo_beta", "protocol", "max_grad_norm")
STEP2_FIELDS = ("seed", "lr_bias", "epochs_bias", "batch_size", "init_std", "weight_decay",
                "adam_eps", "dpo_beta", "protocol", "max_grad_norm")
EVAL_SPLIT = "test"


# ---------------------------------------------------------------------- keys and files
def settings_key(settings: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(text: str) -> str:
    """A folder-safe form of a model id or task name (``org/name`` -> ``org__name``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("/", "__"))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write atomically: an interrupted write never leaves a truncated cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def model_settings(model) -> dict[str, Any]:
    return {"model_id": model_id(model), "dims": list(model_dims(model)),
            "dtype": str(getattr(model.cfg, "dtype", ""))}


def task_settings(task: Task) -> dict[str, Any]:
    """The task's identity without file locations (data content is hashed separately)."""
    return {k: v for k, v in task.describe().items() if k not in ("data_dir", "files")}


def eval_examples(task: Task, cfg: LoFiTConfig):
    return task.eval_examples(EVAL_SPLIT, cfg.max_eval_examples)


def step_settings(model, task: Task, cfg: LoFiTConfig, fields: Sequence[str]) -> dict[str, Any]:
    """Model, task, training-data hash and the config ``fields`` of one training step."""
    train, _ = training_data(task, cfg)
    return {**model_settings(model), "task": task_settings(task),
            "train_hash": hash_examples(train), "n_train": len(train),
            **{f: getattr(cfg, f) for f in fields}}


def eval_settings(model, task: Task, cfg: LoFiTConfig) -> dict[str, Any]:
    rows = eval_examples(task, cfg)
    return {**model_settings(model), "task": task_settings(task), "split": EVAL_SPLIT,
            "eval_hash": hash_examples(rows), "n_eval": len(rows)}


def cached_record(folder: Path, name: str, settings: Mapping[str, Any],
                  compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record stored as ``folder/<name>-<key>.json``; computed and written if absent.

    The file holds ``{"settings": ..., "key": ..., **record}``; ``record["cached"]`` says
    whether it was read back.
    """
    key = settings_key(settings)
    path = Path(folder) / f"{slug(name)}-{key}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True, "path": str(path)}
    record = {"settings": dict(settings), "key": key, **compute()}
    write_json(path, record)
    return {**record, "cached": False, "path": str(path)}


# ---------------------------------------------------------------------- head selections
def cached_selection(model, task: Task, cfg: LoFiTConfig, cache_dir: str | Path,
                     progress: bool = True,
                     data: Optional[Callable[[], TrainingSet]] = None) -> HeadSelection:
    """``select_heads`` on ``task`` with ``cfg``, read from / written to ``cache_dir``
    (``data``: as in ``bias_cell``)."""
    settings = step_settings(model, task, cfg, STEP1_FIELDS)
    key = settings_key(settings)
    folder = (Path(cache_dir) / slug(model_id(model)) / slug(task.name) / f"s{cfg.seed}"
              / f"select-{key}")
    card, tensors = folder / "selection.json", folder / "selection.safetensors"
    if card.is_file() and tensors.is_file():
        loaded = load_file(str(tensors))
        history = json.loads(card.read_text())["history"]
        return HeadSelection(loaded["scores"], loaded["scale"], {**history, "cached": True})
    selection = select_heads(model, task, config=cfg, progress=progress,
                             data=data() if data else None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"scores": selection.scores.contiguous().float(),
               "scale": selection.scale.contiguous().float()}, str(tensors))
    write_json(card, {"settings": settings, "key": key, "history": selection.history})
    return selection


def selection_result(selection: HeadSelection, cfg: LoFiTConfig, model_name: str,
                     k: int) -> LoFiTResult:
    """A ``LoFiTResult`` holding the top-``k`` heads of ``selection`` and no offsets (v = 0),
    for the head-set analyses (granularity, overlap)."""
    return LoFiTResult(config=cfg, model_id=model_name, head_scores=selection.scores,
                       scale=selection.scale, bias=torch.zeros_like(selection.scale),
                       selected_heads=selection.top(k), history={"select": selection.history},
                       data_hash=selection.history.get("data_hash", ""))


def random_heads(dims: ModelDims, k: int, seed: int) -> list[Head]:
    """``k`` heads drawn uniformly without replacement (seeded), sorted by (layer, head)."""
    order = torch.randperm(dims.total_heads, generator=torch.Generator().manual_seed(seed))
    return sorted((int(i) // dims.n_heads, int(i) % dims.n_heads) for i in order[:k])


def random_result(dims: ModelDims, k: int, seed: int, model_name: str,
                  label: str = "random") -> LoFiTResult:
    """A ``LoFiTResult`` of ``random_heads`` (zero tensors) labelled as task ``label``."""
    zeros: Float[Tensor, "layer head d_head"] = torch.zeros(dims.n_layers, dims.n_heads, dims.d_head)
    return LoFiTResult(config=LoFiTConfig(task=label, seed=seed, k=k), model_id=model_name,
                       head_scores=zeros[..., 0].clone(), scale=zeros, bias=zeros.clone(),
                       selected_heads=random_heads(dims, k, seed))


# ---------------------------------------------------------------------- evaluated cells
def primary_metric(task: Task) -> str:
    """The metric an analysis reports: exact match (generation) or MC1 (multiple choice)."""
    return "exact_match" if task.kind == "generation" else "mc1"


def per_example(task: Task, rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """0/1 correctness of each evaluated example under ``primary_metric``."""
    key = "correct" if task.kind == "generation" else "mc1"
    return [float(row[key]) for row in rows]


def _evaluated(model, task: Task, cfg: LoFiTConfig, intervention, progress: bool,
               desc: str) -> dict[str, Any]:
    metrics, rows = evaluate(model, task, eval_examples(task, cfg), intervention,
                             cfg.eval_batch_size, progress, desc=desc)
    metric = primary_metric(task)
    return {"metric": metric, "accuracy": metrics[metric], "metrics": metrics,
            "correct": per_example(task, rows)}


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

    def compute() -> dict[str, Any]:
        tuning = tune_biases(model, task, heads, config=cfg, progress=progress,
                             data=data() if data else None)
        record = _evaluated(model, task, cfg, tuning.intervention, progress,
                            f"eval {task.name} (K={len(heads)})")
        history = {k: tuning.history[k] for k in ("epoch_loss", "val_loss", "seconds", "n_train")}
        bias = tuning.bias
        return {**record, "k": len(heads), "history": history, "heads": [list(h) for h in heads],
                "bias": [bias[l, h].tolist() for l, h in heads]}

    return cached_record(cells_folder(model, task, cache_dir), "bias", settings, compute)


def zero_shot_cell(model, task: Task, cfg: LoFiTConfig, cache_dir: str | Path,
                   progress: bool = True) -> dict[str, Any]:
    """The untouched model on ``task``'s test split (cached like ``bias_cell``)."""
    return cached_record(cells_folder(model, task, cache_dir), "zero_shot",
                         eval_settings(model, task, cfg),
                         lambda: _evaluated(model, task, cfg, None, progress, "eval zero-shot"))
