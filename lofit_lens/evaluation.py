"""Evaluation: exact match by greedy generation, or MC1/MC2/MC3 by answer log-probs.

Zero-shot is the same code with no intervention attached. Per-example predictions are
returned alongside the metrics.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

from lofit_lens.generation import greedy_generate
from lofit_lens.intervention import HeadIntervention
from lofit_lens.mc_scoring import choice_scores, mc_metrics
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
) -> tuple[dict[str, float], Predictions]:
    """Metrics and per-example predictions of ``model`` (with ``intervention`` if given)."""
    if not examples:
        raise ValueError(f"No {task.name} examples to evaluate")
    attach = intervention.attach(model) if intervention is not None else contextlib.nullcontext()
    with attach:
        if task.kind == "generation":
            return _exact_match(model, task, examples, batch_size, progress, desc)
        return _multiple_choice(model, task, examples, batch_size, progress, desc)


def _exact_match(model, task: Task, examples, batch_size, progress, desc):
    completions = greedy_generate(model, [ex.prompt for ex in examples], task.max_new_tokens,
                                  task.stop_strings, batch_size=batch_size, progress=progress,
                                  desc=desc, with_prompt=task.parse_with_prompt)
    rows, hits = [], 0
    for i, (ex, text) in enumerate(zip(examples, completions)):
        pred = task.parse(text)
        correct = task.is_correct(pred, ex)
        hits += correct
        rows.append({"index": i, "completion": text, "prediction": pred,
                     "answers": list(ex.answers), "correct": bool(correct)})
    return {"exact_match": hits / len(examples), "n": len(examples), "match": task.match_mode}, rows


def _multiple_choice(model, task: Task, examples, batch_size, progress, desc):
    scores = choice_scores(model, examples, batch_size=batch_size, progress=progress, desc=desc,
                           protocol=task.protocol)
    rows, totals = [], {"mc1": 0.0, "mc2": 0.0, "mc3": 0.0}
    for i, (ex, s) in enumerate(zip(examples, scores)):
        m = mc_metrics(s, ex.correct)
        for key in totals:
            totals[key] += m[key]
        rows.append({"index": i, "scores": [round(float(x), 4) for x in s],
                     "correct": list(ex.correct), **m})
    n = len(examples)
    return {**{k: v / n for k, v in totals.items()}, "n": n}, rows


def split_metrics(model, task: Task, splits: Sequence[str], max_examples: Optional[int],
                  intervention: Optional[HeadIntervention], batch_size: int, progress: bool,
                  label: str) -> tuple[dict[str, dict[str, float]], dict[str, Predictions]]:
    """``evaluate`` on each split; returns ({split: metrics}, {split: predictions})."""
    metrics, predictions = {}, {}
    for split in splits:
        rows = task.eval_examples(split, max_examples)
        metrics[split], predictions[split] = evaluate(
            model, task, rows, intervention, batch_size, progress, desc=f"{label} {split}")
    return metrics, predictions

