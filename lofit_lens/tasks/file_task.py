"""A task from your own JSONL, JSON or CSV file(s).

Two kinds of rows, told apart by their fields (or pass ``kind=``):

- generation: ``prompt`` and ``answer``, a string or a list of accepted answers. The first
  answer, exactly as written, is the SFT target (so put the separating space in the prompt
  or the answer). The output up to the first stop string is compared with every answer by
  ``match`` (``lofit_lens.tasks.matching``): ``"normalized"`` (SQuAD-style, the default),
  ``"exact"`` (``strip().lower()`` equality) or ``"prefix"``; metrics name the mode used.
- multiple choice: ``prompt``, ``choices`` (a list) and ``correct`` (an index or a list of
  indices; the first is the "best" answer for MC1 and training). Choices are scored after
  the prompt plus a space, so a prompt ends like ``"Q: ... A:"``. Training is SFT on the best
  choice or, with ``loss="dpo"``, DPO on (best choice, first incorrect choice).

In CSV, a list cell is a JSON list (``["a", "b"]``); ``choices`` may also be a
";"-separated string and ``correct`` a plain integer. Other fields are ignored.

Splits: a dict ``{"train": path, "val": path, "test": path}`` (train required); else a
single file whose rows all carry ``split`` (train/val/test); else a single file split
80/10/10 by a shuffle with ``split_seed`` (default 0, independent of the run's seed, so the
test rows stay fixed): ``n // 10`` rows each for val and test, the rest for train. Train and
test must both get rows (so a single file without ``split`` needs at least 10 rows); else
``DataError`` names the file(s) and the count per split when the task is built, before any
model is loaded. Val may be empty.

Every row is checked before anything is returned. Problems raise one ``DataError`` listing
(up to 20) ``path:line: field 'name': what is wrong``; lines are 1-based file lines (in a
CSV the header is line 1). No row is skipped silently. The validated rows are kept as a
``datasets.DatasetDict`` in ``FileTask.dataset``. Repeated rows and val/test rows that share
a training row's prompt are not errors here: ``tasks.hygiene.check_data`` (run by
``lofit-lens run``) warns with their ``path:line``, or raises ``DataError`` with
``strict_data``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import datasets

from lofit_lens.tasks.base import (
    SPLITS,
    ChoiceExample,
    DataError,
    Example,
    GenerationExample,
    ProtocolName,
    Task,
    TaskHyperparams,
)
from lofit_lens.tasks.matching import MatchMode, answer_matches, check_match_mode

Kind = Literal["generation", "multiple_choice"]
PathLike = Union[str, Path]
REQUIRED: dict[str, tuple[str, ...]] = {
    "generation": ("prompt", "answer"),
    "multiple_choice": ("prompt", "choices", "correct"),
}
MAX_REPORTED = 20
_JSON_WS = re.compile(r"[ \t\n\r]*")


class FileTask(Task):
    """A generation or multiple-choice task read from the user's file(s); see the module doc."""

    hyperparams = TaskHyperparams(l1_lambda=1e-3, lr_select=5e-3, lr_bias=1e-2)

    def __init__(
        self,
        path: Union[PathLike, Mapping[str, PathLike]],
        *,
        kind: Optional[Kind] = None,
        loss: Literal["sft", "dpo"] = "sft",
        max_new_tokens: int = 16,
        stop_strings: Sequence[str] = ("\n",),
        split_seed: int = 0,
        name: Optional[str] = None,
        match: MatchMode = "normalized",
        protocol: ProtocolName = "official",
    ):
        self.files = _split_files(path)
        first = next(iter(self.files.values()))
        super().__init__(first.parent, protocol)
        _check_options(kind, loss, max_new_tokens, stop_strings)
        self.match = check_match_mode(match)
        self.name = name or first.stem
        self.loss = loss
        self.max_new_tokens = max_new_tokens
        self.stop_strings = tuple(stop_strings)
        self.split_seed = split_seed
        self.kind, rows, self.split_by = _load_rows(self.files, kind, split_seed)
        if self.kind == "generation" and loss == "dpo":
            raise ValueError("loss='dpo' needs multiple-choice rows (prompt, choices, correct)")
        _check_split_sizes(self.files, rows, self.split_by)
        self.dataset = _to_dataset(rows, self.kind)

    def load_split(self, split: str) -> list[Example]:
        make = _generation_example if self.kind == "generation" else _choice_example
        return [make(row) for row in self.dataset[split]]

    @property
    def match_mode(self) -> str:
        return self.match

    def parse(self, text: str) -> str:
        """The output before the first stop string, stripped (``match`` does the rest)."""
        for stop in self.stop_strings:
            text = text.split(stop)[0]
        return text.strip()

    def is_correct(self, prediction: str, example: GenerationExample) -> bool:
        return answer_matches(prediction, example.answers, self.match)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "files": {split or "all": str(p) for split, p in self.files.items()},
            "split_by": self.split_by,
            "rows": {split: len(self.dataset[split]) for split in SPLITS},
            "max_new_tokens": self.max_new_tokens,
            "stop_strings": list(self.stop_strings),
            "match": self.match,
        }


# ------------------------------------------------------------------ options and examples
def _split_files(path: Union[PathLike, Mapping[str, PathLike]]) -> dict[Optional[str], Path]:
    """``{None: file}`` for one file, ``{split: file}`` for a dict (train required)."""
    if not isinstance(path, Mapping):
        files: dict[Optional[str], Path] = {None: Path(path)}
    else:
        unknown = set(path) - set(SPLITS)
        if unknown or "train" not in path:
            raise ValueError(f"Split files must be a dict with keys among {SPLITS} including "
                             f"'train'; got {sorted(path)}")
        files = {split: Path(path[split]) for split in SPLITS if split in path}
    for p in files.values():
        if p.suffix.lower() not in (".jsonl", ".json", ".csv"):
            raise ValueError(f"{p}: task files must end in .jsonl, .json or .csv")
        if not p.is_file():
            raise FileNotFoundError(f"Task file not found: {p}")
    return files


def _check_options(kind: Any, loss: Any, max_new_tokens: Any, stop_strings: Any) -> None:
    if kind not in (None, *REQUIRED):
        raise ValueError(f"kind must be one of {list(REQUIRED)}, got {kind!r}")
    if loss not in ("sft", "dpo"):
        raise ValueError(f"loss must be 'sft' or 'dpo', got {loss!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings must be a sequence of non-empty strings, got "
                         f"{stop_strings!r}")


def _generation_example(row: dict[str, Any]) -> GenerationExample:
    answers = row["answers"]
    return GenerationExample(
        prompt=row["prompt"],
        answers=tuple(dict.fromkeys(answers)),
        target=answers[0],
        meta={"file": row["file"], "line": row["line"]},
    )


def _choice_example(row: dict[str, Any]) -> ChoiceExample:
    return ChoiceExample(
        prompt=row["prompt"],
        choices=tuple(row["choices"]),
        correct=tuple(row["correct"]),
        meta={"file": row["file"], "line": row["line"]},
    )


def _to_dataset(rows: list[dict[str, Any]], kind: str) -> datasets.DatasetDict:
    """The validated rows, one ``datasets.Dataset`` per split (possibly empty)."""
    columns = {"prompt": datasets.Value("string")}
    if kind == "generation":
        columns["answers"] = datasets.Sequence(datasets.Value("string"))
    else:
        columns["choices"] = datasets.Sequence(datasets.Value("string"))
        columns["correct"] = datasets.Sequence(datasets.Value("int64"))
    columns |= {"file": datasets.Value("string"), "line": datasets.Value("int64")}
    features = datasets.Features(columns)
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {k: [row[k] for row in rows if row["split"] == split] for k in columns},
            features=features)
        for split in SPLITS
    })


# ------------------------------------------------------------------ reading and checking
@dataclass
class _Source:
    """One file's records: ``(line, fields)`` pairs, and the header if it is a CSV."""

    path: Path
    split: Optional[str]
    columns: Optional[list[str]] = None
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


class _Problems:
    """Collects ``path:line: field: message`` entries; raises them all as one DataError."""

    def __init__(self):
        self.items: list[tuple[str, int, str]] = []

    def add(self, path: Path, line: int, message: str, name: Optional[str] = None) -> None:
        where = f"field '{name}': " if name else ""
        self.items.append((str(path), line, f"{path}:{line}: {where}{message}"))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = [text for *_, text in sorted(self.items)]
        extra = len(lines) - MAX_REPORTED
        body = "\n  ".join(lines[:MAX_REPORTED] + ([f"... and {extra} more"] if extra > 0 else []))
        raise DataError(f"{len(lines)} problem(s) in the task data, nothing loaded:\n  {body}")


class _Bad(Exception):
    """A field value is unusable; the message says why."""


def _load_rows(files: dict[Optional[str], Path], kind: Optional[str], split_seed: int):
    """(kind, validated rows with their split, how splits were assigned); DataError if any
    row is bad."""
    problems = _Problems()
    sources = [_read(path, split, problems) for split, path in files.items()]
    kind = kind or _detect_kind(sources, problems)
    single = None in files
    by_column = single and any("split" in fields for _, fields in sources[0].records)
    rows: list[dict[str, Any]] = []
    for source in sources if kind else []:
        rows += _check_source(source, kind, by_column, problems)
    problems.raise_if_any()
    if not single:
        split_by = "files"
    elif by_column:
        split_by = "split column"
    else:
        split_by = f"seeded 80/10/10 (split_seed={split_seed})"
        for row, split in zip(rows, _seeded_splits(len(rows), split_seed)):
            row["split"] = split
    if not any(row["split"] == "train" for row in rows):
        raise DataError(f"No training rows in {', '.join(map(str, files.values()))}")
    return kind, rows, split_by


def _check_split_sizes(files: dict[Optional[str], Path], rows: list[dict[str, Any]],
                       split_by: str) -> None:
    """DataError unless train and test both have rows (evaluation needs test, training train)."""
    counts = {split: sum(row["split"] == split for row in rows) for split in SPLITS}
    empty = [split for split in ("train", "test") if not counts[split]]
    if not empty:
        return
    where = ", ".join(map(str, files.values()))
    if split_by.startswith("seeded"):
        fix = ("a file without a 'split' field is split 80/10/10 with n // 10 rows each for "
               "val and test, so it needs at least 10 rows; add rows, give each row a 'split' "
               "(train/val/test), or pass separate files {'train': ..., 'test': ...}")
    elif split_by == "files":
        fix = "pass a file for each of them, e.g. {'train': ..., 'test': ...}"
    else:
        fix = "mark some rows with that split in the 'split' field"
    sizes = ", ".join(f"{split} {counts[split]}" for split in SPLITS)
    raise DataError(f"{where}: {len(rows)} rows give {sizes} ({split_by}): no "
                    f"{' and no '.join(empty)} rows; {fix}")


def _seeded_splits(n: int, seed: int) -> list[str]:
    """80/10/10 labels for ``n`` rows in file order: ``n // 10`` each for val and test."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    labels = ["train"] * n
    held = n // 10
    for i in order[:held]:
        labels[i] = "val"
    for i in order[held:2 * held]:
        labels[i] = "test"
    return labels


def _detect_kind(sources: list[_Source], problems: _Problems) -> Optional[str]:
    if not any(s.records or s.columns for s in sources):
        return None  # nothing readable: the reading problems say why
    names = set()
    for s in sources:
        names.update(s.columns or [])
        for _, fields in s.records:
            names.update(fields)
    found = [k for k, marker in (("generation", "answer"), ("multiple_choice", "choices"))
             if marker in names]
    if len(found) == 1:
        return found[0]
    problems.add(sources[0].path, 1, f"cannot tell the task kind from the fields "
                 f"{sorted(names)}: generation rows need 'prompt' and 'answer', multiple-"
                 "choice rows 'prompt', 'choices' and 'correct' (or pass kind=...)")
    return None


def _check_source(source: _Source, kind: str, need_split: bool, problems: _Problems):
    """Validated rows of one file; problems are recorded, not raised."""
    required = REQUIRED[kind] + (("split",) if need_split else ())
    if source.columns is not None:
        missing = [name for name in required if name not in source.columns]
        for name in missing:
            problems.add(source.path, 1, "missing column", name)
        if missing:
            return []
    rows = []
    for line, fields in source.records:
        row: dict[str, Any] = {"file": str(source.path), "line": line, "split": source.split}
        ok = True
        for name in required:
            try:
                if name not in fields:
                    raise _Bad("missing field")
                row.update(_CHECKS[name](fields[name], source.columns is not None, row))
            except _Bad as bad:
                problems.add(source.path, line, str(bad), name)
                ok = False
        if ok:
            rows.append(row)
    return rows


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise _Bad("empty string")
    return value


def _texts(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or not values:
        raise _Bad(f"expected a non-empty list of {what}, got {_describe(values)}")
    for i, v in enumerate(values):
        try:
            _text(v)
        except _Bad as bad:
            raise _Bad(f"item {i}: {bad}") from None
    return values


def _json_cell(cell: str) -> Any:
    if not cell.strip():
        raise _Bad("empty cell")
    try:
        return json.loads(cell)
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON in cell ({e.msg}): {cell[:60]!r}") from None


def _check_prompt(value: Any, is_csv: bool, row: dict) -> dict:
    return {"prompt": _text(value)}


def _check_answer(value: Any, is_csv: bool, row: dict) -> dict:
    if is_csv and value.lstrip().startswith("["):
        value = _json_cell(value)
    if isinstance(value, str):
        return {"answers": [_text(value)]}
    if not isinstance(value, list):
        raise _Bad(f"expected a string or a list of strings, got {_describe(value)}")
    return {"answers": _texts(value, "answer strings")}


def _check_choices(value: Any, is_csv: bool, row: dict) -> dict:
    if is_csv:
        value = (_json_cell(value) if value.lstrip().startswith("[")
                 else [part.strip() for part in value.split(";")])
    choices = _texts(value, "choice strings")
    if len(choices) < 2:
        raise _Bad(f"need at least 2 choices, got {len(choices)}")
    seen = {}
    for i, choice in enumerate(choices):
        if choice in seen:
            raise _Bad(f"choice {i} repeats choice {seen[choice]}: {choice[:60]!r}")
        seen[choice] = i
    return {"choices": choices}


def _check_correct(value: Any, is_csv: bool, row: dict) -> dict:
    if is_csv:
        value = _json_cell(value)
    indices = [value] if not isinstance(value, list) else value
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise _Bad(f"expected an index or a non-empty list of indices, got {_describe(value)}")
    if len(set(indices)) < len(indices):
        raise _Bad(f"repeated index in {indices}")
    if "choices" in row:
        n = len(row["choices"])
        out = [i for i in indices if not 0 <= i < n]
        if out:
            raise _Bad(f"index {out[0]} out of range for {n} choices")
        if len(indices) == n:
            raise _Bad("no incorrect choice: every choice is marked correct (MC scoring and "
                       "DPO need one)")
    return {"correct": indices}


def _check_split(value: Any, is_csv: bool, row: dict) -> dict:
    value = value.strip() if is_csv else value
    if value not in SPLITS:
        raise _Bad(f"expected one of {list(SPLITS)}, got {_describe(value)}")
    return {"split": value}


_CHECKS = {"prompt": _check_prompt, "answer": _check_answer, "choices": _check_choices,
           "correct": _check_correct, "split": _check_split}


def _read(path: Path, split: Optional[str], problems: _Problems) -> _Source:
    """Parse one file into records with their line numbers (syntax errors -> problems)."""
    source = _Source(path, split)
    known = len(problems.items)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(path, raw[:e.start].count(b"\n") + 1, "not valid UTF-8 text")
        return source
    if path.suffix.lower() == ".csv":
        _read_csv(text, source, problems)
    elif path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        _read_json_array(text, source, problems)
    else:
        _read_json_lines(text, source, problems)
    if not source.records and len(problems.items) == known:
        problems.add(path, 1, "no rows")
    return source


def _read_json_lines(text: str, source: _Source, problems: _Problems) -> None:
    for line, content in enumerate(text.split("\n"), 1):
        if not content.strip():
            continue
        try:
            fields = json.loads(content)
        except json.JSONDecodeError as e:
            problems.add(source.path, line, f"invalid JSON ({e.msg}, column {e.colno})")
            continue
        _add_record(fields, line, source, problems)


def _read_json_array(text: str, source: _Source, problems: _Problems) -> None:
    """A JSON array of objects; each element's line is where it starts."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        problems.add(source.path, e.lineno, f"invalid JSON ({e.msg}, column {e.colno})")
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for item in items:
        pos = _JSON_WS.match(text, pos).end()
        _add_record(item, text.count("\n", 0, pos) + 1, source, problems)
        pos = _JSON_WS.match(text, decoder.raw_decode(text, pos)[1]).end() + 1  # past ","


def _add_record(fields: Any, line: int, source: _Source, problems: _Problems) -> None:
    if isinstance(fields, dict):
        source.records.append((line, fields))
    else:
        problems.add(source.path, line, f"expected a JSON object, got {_describe(fields)}")


def _read_csv(text: str, source: _Source, problems: _Problems) -> None:
    """Rows of a CSV with a header (line 1); a row's line is the line where it starts."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        source.columns = [name.strip() for name in next(reader)]
        while True:
            line = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                break
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(source.columns):
                problems.add(source.path, line, f"{len(cells)} cells, the header has "
                             f"{len(source.columns)}")
                continue
            source.records.append((line, dict(zip(source.columns, cells))))
    except StopIteration:
        problems.add(source.path, 1, "empty CSV file (no header)")
    except csv.Error as e:
        problems.add(source.path, reader.line_num, f"invalid CSV ({e})")
