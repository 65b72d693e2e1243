"""Data hygiene: duplicate rows and train/test overlap, counted and named as file:line.

Two findings, both from the task's full splits (before any sampling or cap of a run):

- a **duplicate** is a row with the same prompt and the same answer as an earlier row of
  the same split (a row that appears three times counts two duplicates);
- an **overlap** is a val or test row whose prompt equals a training row's prompt, whatever
  the answers (the model may have been trained on the very question it is tested on).

Prompts are compared after collapsing runs of whitespace and stripping the ends (case and
punctuation count). The prompt is ``Task.data_prompt(example)``: the example's prompt, or
for TruthfulQA the question (its evaluation prompt wraps the question in a fixed primer).
The answer is a generation row's accepted answers, or a multiple-choice row's set of
correct choices.

``check_data(task)`` warns once per task object with a ``DataWarning`` that names at most
``MAX_SHOWN`` rows, overlaps first (then "... and N more"), and returns the counts for
metrics; with ``strict=True`` (``LoFiTConfig.strict_data``, ``--strict-data``) it raises
``DataError`` with the same rows instead, every time. Rows are named ``file:line`` where the
reader knows the line, ``file[i]`` (0-based array index) for a JSON array written on one
line (CLUTRR), else ``<task> <split> row n``. The check hashes strings into dicts: linear in
the data (CLUTRR's 4,051 rows in under 0.1 s). docs/gotchas.md has the paper data's counts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Hashable, Optional

from lofit_lens.errors import GOTCHAS, DataError, DataWarning
from lofit_lens.tasks.base import ChoiceExample, Example, Task

MAX_SHOWN = 5
"""Rows a warning or error lists before "... and N more"."""
CHECKED = ("train", "val", "test")
HELD_OUT = ("val", "test")
_CACHE = "_data_checks"


@dataclass(frozen=True)
class Finding:
    """One flagged row: ``row`` repeats (duplicate) or shares the prompt of (overlap) ``of``."""

    kind: str  # "duplicate" | "overlap"
    split: str
    row: str
    of: str

    def __str__(self) -> str:
        if self.kind == "duplicate":
            return f"{self.row} ({self.split}) repeats {self.of} (same prompt and answer)"
        return f"{self.row} ({self.split}) has the prompt of training row {self.of}"


@dataclass
class DataChecks:
    """The counts of one task's data check and the rows behind them (in file order)."""

    task: str
    rows: dict[str, int]
    duplicates: dict[str, int] = field(default_factory=dict)
    """Duplicate rows per split."""
    overlap: dict[str, int] = field(default_factory=dict)
    """Val / test rows whose prompt is also a training row's."""
    findings: list[Finding] = field(default_factory=list)
    warned: bool = field(default=False, repr=False, compare=False)

    def counts(self) -> dict[str, int]:
        """What metrics carry: ``duplicates`` (all splits), ``train_val_overlap``,
        ``train_test_overlap``."""
        return {"duplicates": sum(self.duplicates.values()),
                "train_val_overlap": self.overlap.get("val", 0),
                "train_test_overlap": self.overlap.get("test", 0)}

    def __bool__(self) -> bool:
        return bool(self.findings)

    def message(self, strict: bool = False) -> str:
        counts = self.counts()
        parts = []
        held = counts["train_val_overlap"] + counts["train_test_overlap"]
        if held:
            per = ", ".join(f"{s} {n}" for s, n in reversed(self.overlap.items()) if n)
            parts.append(f"{held} held-out row(s) whose prompt is also a training row's ({per})")
        if counts["duplicates"]:
            per = ", ".join(f"{s} {n}" for s, n in self.duplicates.items() if n)
            parts.append(f"{counts['duplicates']} duplicate row(s) ({per})")
        shown = [str(f) for f in self.findings[:MAX_SHOWN]]
        extra = len(self.findings) - len(shown)
        body = "\n  ".join(shown + ([f"... and {extra} more"] if extra > 0 else []))
        then = ("Nothing was run (strict_data=True, --strict-data; without it this is a "
                "warning)" if strict else "Pass strict_data=True (--strict-data) to make this "
                "an error")
        why = (["a held-out row seen in training measures memory, not generalisation"]
               if held else []) + (
              ["a duplicate weighs its row twice in training or scoring"]
              if counts["duplicates"] else [])
        return (f"task {self.task!r}: {'; '.join(parts)}:\n  {body}\n"
                f"{'; '.join(why).capitalize()}. {then}; see {GOTCHAS}, \"Duplicate rows and "
                f"train/test overlap\".")


def normalize_prompt(text: str) -> str:
    """The prompt as compared: runs of whitespace collapsed to one space, ends stripped."""
    return " ".join(text.split())


def answer_key(example: Example) -> Hashable:
    """A row's answer as compared: the accepted answers, or the set of correct choices."""
    if isinstance(example, ChoiceExample):
        return frozenset(normalize_prompt(c) for c in example.true_choices)
    return tuple(normalize_prompt(a) for a in example.answers)


def location(task: Task, split: str, index: int, example: Example) -> str:
    """``file:line``, ``file[i]`` or ``<task> <split> row n`` (1-based) for one row."""
    meta = example.meta or {}
    where = meta.get("file")
    if where is not None and meta.get("line") is not None:
        return f"{where}:{meta['line']}"
    if where is not None and meta.get("index") is not None:
        return f"{where}[{meta['index']}]"
    return f"{task.name} {split} row {index + 1}"


def find_problems(task: Task) -> DataChecks:
    """Count (and locate) duplicate rows and val/test rows sharing a training prompt."""
    report = DataChecks(task=task.name, rows={})
    train_prompts: dict[str, str] = {}
    for split in CHECKED:
        examples = task.examples(split)
        report.rows[split] = len(examples)
        seen: dict[tuple[str, Hashable], str] = {}
        duplicates = overlap = 0
        for i, ex in enumerate(examples):
            here = location(task, split, i, ex)
            prompt = normalize_prompt(task.data_prompt(ex))
            key = (prompt, answer_key(ex))
            if key in seen:
                duplicates += 1
                report.findings.append(Finding("duplicate", split, here, seen[key]))
            else:
                seen[key] = here
            if split == "train":
                train_prompts.setdefault(prompt, here)
            elif prompt in train_prompts:
                overlap += 1
                report.findings.append(Finding("overlap", split, here, train_prompts[prompt]))
        report.duplicates[split] = duplicates
        if split in HELD_OUT:
            report.overlap[split] = overlap
    report.findings.sort(key=_shown_first)  # stable: file order within a group
    return report


def _shown_first(finding: Finding) -> tuple[int, int]:
    """Leakage first (test, then val), then duplicates (train, val, test)."""
    if finding.kind == "overlap":
        return 0, -CHECKED.index(finding.split)
    return 1, CHECKED.index(finding.split)


def check_data(task: Task, strict: bool = False) -> dict[str, int]:
    """The task's data-check counts (``DataChecks.counts``), computed once per task object.

    Findings give one ``DataWarning`` (the first time) or, with ``strict``, a ``DataError``
    (every time); both name the rows. Call it before any model work."""
    report: Optional[DataChecks] = getattr(task, _CACHE, None)
    if report is None:
        report = find_problems(task)
        try:
            setattr(task, _CACHE, report)
        except AttributeError:  # a task that takes no attributes is checked again next time
            pass
    if report and strict:
        raise DataError(report.message(strict=True))
    if report and not report.warned:
        report.warned = True
        warnings.warn(report.message(), DataWarning, stacklevel=2)
    return report.counts()


def data_report(task: Task) -> DataChecks:
    """The full ``DataChecks`` of ``task`` (counts and every finding), without warning."""
    report: Optional[DataChecks] = getattr(task, _CACHE, None)
    return report if report is not None else find_problems(task)
