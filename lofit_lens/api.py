"""``lofit``: zero-shot evaluation, head selection, bias tuning and evaluation in one call."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Optional, Sequence, Union


from lofit_lens.backends.fingerprint import model_fingerprint
from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.checkpoint import PhaseCheckpoint, logged_phase, run_phase
from lofit_lens.config import LoFiTConfig, parse_epochs
from lofit_lens.eval.evaluate import split_metrics
from lofit_lens.history import RunHistory, RunTimings, TrainingHistory
from lofit_lens.phases import stored_selection
from lofit_lens.result import LoFiTResult
from lofit_lens.run_settings import (
    STEP2_FIELDS, eval_data_settings, model_settings, step_settings, task_settings,
)
from lofit_lens.tasks.hygiene import check_data
from lofit_lens.training import (
    TaskLike, TrainingSet, resolve_run, training_data, tune_biases,
)

Epochs = Union[int, tuple[int, int], None]


def lofit(
    model,
    task: TaskLike,
    k: Union[int, float, None] = None,
    seed: Optional[int] = None,
    *,
    config: Optional[LoFiTConfig] = None,
    epochs: Epochs = None,
    max_train_examples: Optional[int] = None,
    max_eval_examples: Optional[int] = None,
    eval_splits: Optional[Sequence[str]] = None,
    zero_shot: bool = True,
    progress: bool = True,
    checkpoint: Union[str, Path, None] = None,
    **overrides,
) -> LoFiTResult:
    """Run LoFiT end to end and return a ``LoFiTResult``.

    ``k``: heads to tune, a count or a fraction of all heads. ``epochs``: one number for both
    steps or ``(select, bias)``. ``max_*_examples`` cap the data for quick runs. Any other
    ``LoFiTConfig`` field can be passed as a keyword (``lr_bias=...``, ``l1_lambda=...``).
    Set ``eval_splits=()`` to skip evaluation. With ``checkpoint`` (a folder), the zero-shot
    evaluation and both training steps are saved as they finish, and a rerun with the same
    settings resumes after the last finished one.
    """
    for name, value in (("k", k), ("seed", seed), ("max_train_examples", max_train_examples),
                        ("max_eval_examples", max_eval_examples), ("eval_splits", eval_splits)):
        if value is not None:
            overrides[name] = tuple(value) if name == "eval_splits" else value
    if epochs is not None:
        select, bias = parse_epochs(epochs)
        overrides.update(epochs_select=select, epochs_bias=bias)
    task_obj, cfg = resolve_run(task, config, overrides)
    check_data(task_obj, strict=cfg.strict_data)  # DataWarning, or DataError before any work
    dims = model_dims(model)
    n_heads = cfg.num_heads(dims.total_heads)
    examples = training_data(task_obj, cfg)  # read and hashed once per run
    ckpt = None if checkpoint is None else PhaseCheckpoint(checkpoint)

    def evaluation(label: str, intervention=None) -> dict:
        start = time.perf_counter()
        m, p = split_metrics(model, task_obj, cfg.eval_splits, cfg.max_eval_examples,
                             intervention, cfg.eval_batch_size, progress, label,
                             cfg.eval_batch_tokens)
        return {"metrics": m, "predictions": p, "seconds": time.perf_counter() - start}

    @functools.cache
    def data() -> TrainingSet:  # encoded once for both steps (DPO: reference log-probs too)
        return TrainingSet.build(model, task_obj, cfg, examples)

    def tuning() -> dict:
        t = tune_biases(model, task_obj, heads, config=cfg, progress=progress, data=data())
        return {"bias": t.bias, "history": t.history.to_dict()}

    evals = {}
    if zero_shot and cfg.eval_splits:
        evaluated = {**model_settings(model), "task": task_settings(task_obj),
                     "eval_data": eval_data_settings(task_obj, cfg.eval_splits,
                                                     cfg.max_eval_examples)}
        evals["zero_shot"] = run_phase(ckpt, "zero_shot", evaluated, lambda: evaluation("zero_shot"))
    selected = stored_selection(model, task_obj, cfg, ckpt, progress, data, examples)
    selection_history = selected.history
    heads = selected.top(n_heads)
    tuned = run_phase(ckpt, "tune", {**step_settings(model, task_obj, cfg, STEP2_FIELDS, examples),
                                     "heads": heads}, tuning)
    history = RunHistory(selection_history, TrainingHistory.from_dict(tuned["history"]))
    result = LoFiTResult(
        config=cfg,
        model_id=model_id(model),
        head_scores=selected.scores,
        scale=selected.scale,
        bias=tuned["bias"],
        selected_heads=heads,
        history=history,
        data_hash=examples.data_hash,
        model_fingerprint=model_fingerprint(model),
        model_dtype=str(getattr(model.cfg, "dtype", "")),
    )
    if cfg.eval_splits:
        with logged_phase("lofit"):
            evals["lofit"] = evaluation("lofit", result.intervention())
    result.metrics = {label: e["metrics"] for label, e in evals.items()}
    result.predictions = {f"{label}/{split}": rows for label, e in evals.items()
                          for split, rows in e["predictions"].items()}
    result.timings = RunTimings(
        select=history.select.seconds, tune=history.tune.seconds,
        eval_zero_shot=evals["zero_shot"]["seconds"] if "zero_shot" in evals else None,
        eval_lofit=evals["lofit"]["seconds"] if "lofit" in evals else None)
    return result
