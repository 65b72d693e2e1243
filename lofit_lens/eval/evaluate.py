"""Evaluation: exact match by greedy generation, or MC1/MC2/MC3 by answer log-probs.

Zero-shot is the same code with no intervention attached. Per-example predictions are
returned alongside the metrics.

Every metrics dict holds ``truncated_prompts``: how many prompts did not fit the model's
context with the tokens to generate / the longest answer and were cut from the left
(``lofit_lens.batching.fit_prompt``; 0 normally). Their prediction rows carry
``truncated_tokens``. It is a count, not a score.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

from lofit_lens.backends.hooked import check_hooked_model
from lofit_lens.batching import EVAL_BATCH_TOKENS
from lofit_lens.eval.generation import greedy_generate
from lofit_lens.intervention import HeadIntervention
from lofit_lens.eval.mc_scoring import choice_scores, mc_metrics
from lofit_lens.tasks.base import ChoiceExample, GenerationExample, Task

Predictions = list[dict[str, Any]]


def evaluate(
    model,
    task: Task,
    examples: Sequence[GenerationExample | ChoiceExample],
    intervention: Optional[HeadIntervention] = None,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "evaluate",
    max_batch_tokens: int = EVAL_BATCH_TOKENS,
) -> tuple[dict[str, float], Predictions]:
    """Metrics and per-example predictions of ``model`` (with ``intervention`` if given).
    Batches hold at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens."""
    check_hooked_model(model)
    if not examples:
        raise ValueError(f"No {task.name} examples to evaluate")
    attach = intervention.attach(model) if intervention is not None else contextlib.nullcontext()
    with attach:
        if task.kind == "generation":
            return _exact_match(model, task, examples, batch_size, max_batch_tokens, progress, desc)
        return _multiple_choice(model, task, examples, batch_size, max_batch_tokens, progress, desc)


def _exact_match(model, task: Task, examples, batch_size, max_batch_tokens, progress, desc):
    truncated: dict[int, int] = {}
    completions = greedy_generate(model, [ex.prompt for ex in examples], task.max_new_tokens,
                                  task.stop_strings, batch_size=batch_size, progress=progress,
                                  desc=desc, with_prompt=task.parse_with_prompt,
                                  truncated=truncated, max_batch_tokens=max_batch_tokens)
    rows, hits = [], 0
    for i, (ex, text) in enumerate(zip(examples, completions)):
        pred = task.parse(text)
        correct = task.is_correct(pred, ex)
        hits += correct
        rows.append({"index": i, "completion": text, "prediction": pred,
                     "answers": list(ex.answers), "correct": bool(correct)})
    _mark_truncated(rows, truncated)
    return {"exact_match": hits / len(examples), "n": len(examples), "match": task.match_mode,
            "truncated_prompts": len(truncated)}, rows


def _multiple_choice(model, task: Task, examples, batch_size, max_batch_tokens, progress, desc):
    truncated: dict[int, int] = {}
    scores = choice_scores(model, examples, batch_size=batch_size, progress=progress, desc=desc,
                           protocol=task.protocol, truncated=truncated,
                           max_batch_tokens=max_batch_tokens)
    rows, totals = [], {"mc1": 0.0, "mc2": 0.0, "mc3": 0.0}
    for i, (ex, s) in enumerate(zip(examples, scores)):
        m = mc_metrics(s, ex.correct)
        for key in totals:
            totals[key] += m[key]
        rows.append({"index": i, "scores": [round(float(x), 4) for x in s],
                     "correct": list(ex.correct), **m})
    n = len(examples)
    _mark_truncated(rows, truncated)
    return {**{k: v / n for k, v in totals.items()}, "n": n,
            "truncated_prompts": len(truncated)}, rows


def _mark_truncated(rows: Predictions, truncated: dict[int, int]) -> None:
    """``truncated_tokens`` on the rows whose prompt was cut (other rows stay as they were)."""
    for i, n in truncated.items():
        rows[i]["truncated_tokens"] = n


def split_metrics(model, task: Task, splits: Sequence[str], max_examples: Optional[int],
                  intervention: Optional[HeadIntervention], batch_size: int, progress: bool,
                  label: str, max_batch_tokens: int = EVAL_BATCH_TOKENS,
                  ) -> tuple[dict[str, dict[str, float]], dict[str, Predictions]]:
    """``evaluate`` on each split; returns ({split: metrics}, {split: predictions})."""
    metrics, predictions = {}, {}
    for split in splits:
        rows = task.eval_examples(split, max_examples)
        if not rows:
            raise ValueError(f"No {task.name} examples in split {split!r} to evaluate "
                             f"(eval_splits={list(splits)})")
        metrics[split], predictions[split] = evaluate(
            model, task, rows, intervention, batch_size, progress, desc=f"{label} {split}",
            max_batch_tokens=max_batch_tokens)
    return metrics, predictions


def example_scores(rows: Predictions) -> dict[str, list[float]]:
    """Each example's score per metric, in order, from ``evaluate``'s rows: ``exact_match``
    (0/1) for generation, ``mc1``/``mc2``/``mc3`` for multiple choice. What paired tests and
    bootstrap intervals read."""
    if rows and "mc2" in rows[0]:
        return {m: [float(row[m]) for row in rows] for m in ("mc1", "mc2", "mc3")}
    return {"exact_match": [float(row["correct"]) for row in rows]}
