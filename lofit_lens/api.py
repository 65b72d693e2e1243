"""``lofit``: zero-shot evaluation, head selection, bias tuning and evaluation in one call."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence, Union

from lofit_lens import engine
from lofit_lens.backends.fingerprint import model_fingerprint
from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.config import LoFiTConfig, parse_epochs
from lofit_lens.history import RunHistory, RunTimings
from lofit_lens.result import LoFiTResult
from lofit_lens.selection_quality import bootstrap_selections, selection_quality, warn_if_noise
from lofit_lens.tasks.hygiene import check_data
from lofit_lens.training import TaskLike, TrainingSet, resolve_run, training_data

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
    n_heads = cfg.num_heads(model_dims(model).total_heads)
    examples = training_data(task_obj, cfg)  # read and hashed once per run
    store = None if checkpoint is None else PhaseCheckpoint(checkpoint)

    @functools.cache
    def data() -> TrainingSet:  # encoded once for both steps (DPO: reference log-probs too)
        return TrainingSet.build(model, task_obj, cfg, examples)

    evals: dict[str, dict[str, engine.Evaluation]] = {}
    if zero_shot and cfg.eval_splits:
        evals["zero_shot"] = engine.evaluations(model, task_obj, cfg, engine.UNTOUCHED, store,
                                                progress, "zero_shot")
    selected = engine.selection(model, task_obj, cfg, store, progress, data, examples)
    heads = selected.top(n_heads)
    refits = bootstrap_selections(model, task_obj, cfg, cfg.selection_bootstrap, progress, store)
    quality = selection_quality(selected, n_heads, others=refits)
    warn_if_noise(quality)
    tuned = engine.tuning(model, task_obj, cfg, heads, store, progress, data, examples)
    history = RunHistory(selected.history, engine.tuned_history(tuned))
    result = LoFiTResult(
        config=cfg,
        model_id=model_id(model),
        head_scores=selected.scores,
        scale=selected.scale,
        bias=tuned.value["bias"],
        selected_heads=heads,
        history=history,
        data_hash=examples.data_hash,
        model_fingerprint=model_fingerprint(model),
        model_dtype=str(getattr(model.cfg, "dtype", "")),
        selection_quality=quality,
    )
    if cfg.eval_splits:
        evals["lofit"] = engine.evaluations(model, task_obj, cfg, tuned, store, progress, "lofit")
    result.metrics = {label: {split: e.metrics for split, e in per_split.items()}
                      for label, per_split in evals.items()}
    result.predictions = {f"{label}/{split}": e.predictions for label, per_split in evals.items()
                          for split, e in per_split.items()}

    def seconds(label: str) -> Optional[float]:
        return sum(e.seconds for e in evals[label].values()) if label in evals else None

    result.timings = RunTimings(select=history.select.seconds, tune=history.tune.seconds,
                                eval_zero_shot=seconds("zero_shot"), eval_lofit=seconds("lofit"))
    return result
