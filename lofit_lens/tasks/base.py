"""The task interface: what training and evaluation need to know about a task.

A task turns rows of a data file into examples of one of two kinds:

- ``GenerationExample``: a prompt and the accepted answers; trained by SFT on the first
  answer, scored by greedy generation + exact match after ``Task.parse``.
- ``ChoiceExample``: a prompt and answer choices with the indices of the correct ones;
  trained by SFT on a correct choice or by DPO on (correct, incorrect) pairs, scored by
  MC1/MC2/MC3 from summed answer-token log-probs.

Training sees the model-agnostic ``SFTExample`` / ``PreferenceExample`` pairs only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, Union

from lofit_lens.errors import DataError  # noqa: F401  (re-exported: lofit_lens.tasks.DataError)

SPLITS = ("train", "val", "test")
DATA_DIR_ENV = "LOFIT_DATA_DIR"

ProtocolName = Literal["official", "clean"]
PROTOCOLS: tuple[str, ...] = ("official", "clean")
"""``official``: the authors' code point by point (fc2869/lo-fit, honest_llama, TRL 0.8.1);
``clean``: the paper's text with their quirks removed. docs/protocol.md lists each difference."""


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}: expected one of {PROTOCOLS}")
    return protocol


@dataclass(frozen=True)
class GenerationExample:
    """A prompt whose continuation is judged by exact match against ``answers``."""

    prompt: str
    answers: tuple[str, ...]
    """Accepted answers, already normalised like ``Task.parse`` output; ``answers[0]`` is the
    training target."""
    target: str
    """The exact continuation trained on by SFT (e.g. ``" Paris"``); EOS is appended by the
    trainer."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ChoiceExample:
    """A prompt with answer choices; ``correct`` holds the indices of the true ones."""

    prompt: str
    choices: tuple[str, ...]
    correct: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def true_choices(self) -> list[str]:
        return [c for i, c in enumerate(self.choices) if i in self.correct]

    @property
    def false_choices(self) -> list[str]:
        return [c for i, c in enumerate(self.choices) if i not in self.correct]


Example = Union[GenerationExample, ChoiceExample]


@dataclass(frozen=True)
class SFTExample:
    """Cross-entropy on ``target`` tokens given ``prompt`` (prompt tokens are not trained)."""

    prompt: str
    target: str


@dataclass(frozen=True)
class PreferenceExample:
    """DPO pair: ``chosen`` should become more likely than ``rejected`` given ``prompt``."""

    prompt: str
    chosen: str
    rejected: str


TrainingExample = Union[SFTExample, PreferenceExample]


@dataclass(frozen=True)
class TaskHyperparams:
    """Per-task LoFiT defaults (Table 6 in docs/protocol.md), overridable in ``LoFiTConfig``."""

    l1_lambda: float
    lr_select: float
    lr_bias: float


def default_data_dir() -> Path:
    """``$LOFIT_DATA_DIR``, else ``../shared/datasets/lofit`` seen from cwd or this checkout."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo_root):
        candidate = (base / ".." / "shared" / "datasets" / "lofit").resolve()
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "datasets" / "lofit"


def require_files(data_dir: Path, names: Sequence[str], origin: str) -> None:
    """Fail with a message that lists the missing files and where they come from."""
    missing = [n for n in names if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Missing data files under {data_dir}: {', '.join(missing)}.\n"
            f"They come from {origin}. Pass data_dir=... or set ${DATA_DIR_ENV} to the folder "
            "holding the LoFiT splits (default: ../shared/datasets/lofit)."
        )


def hash_examples(examples: Sequence[Any]) -> str:
    """A stable SHA-256 over dataclass examples (used to fingerprint training data)."""
    digest = hashlib.sha256()
    for ex in examples:
        row = asdict(ex)
        row.pop("meta", None)
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


class Task(ABC):
    """A named dataset with splits, a prompt format, a loss and a metric.

    Subclasses set ``name``, ``kind`` and ``hyperparams`` and implement ``load_split``.
    Generation tasks also set ``max_new_tokens``/``stop_strings`` and may override ``parse``.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["generation", "multiple_choice"]]
    loss: Literal["sft", "dpo"] = "sft"
    hyperparams: ClassVar[TaskHyperparams]
    max_new_tokens: ClassVar[int] = 16
    stop_strings: ClassVar[tuple[str, ...]] = ("\n",)
    train_sample_size: ClassVar[int | None] = None
    """If set, training uses this many examples sampled with ``train_sample_seed`` (CLUTRR: 300)."""

    def __init__(self, data_dir: str | Path | None = None, protocol: ProtocolName = "official"):
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.protocol = check_protocol(protocol)
        self._cache: dict[str, list[Example]] = {}

    @abstractmethod
    def load_split(self, split: str) -> list[Example]:
        """Read one split from ``self.data_dir`` (rows in file order)."""

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._cache:
            self._cache[split] = self.load_split(split)
        return self._cache[split]

    def train_sample_seed(self, seed: int) -> int:
        """The seed of the ``train_sample_size`` sample: the run's own seed by default."""
        return seed

    def train_examples(self, seed: int, max_examples: int | None = None) -> list[Example]:
        """The training set of a run: the task's seeded sample, then at most ``max_examples``."""
        rows = list(self.examples("train"))
        n = self.train_sample_size
        if n is not None and len(rows) > n:
            rows = random.Random(self.train_sample_seed(seed)).sample(rows, n)
        if max_examples is not None and len(rows) > max_examples:
            rows = random.Random(seed + 1).sample(rows, max_examples)
        return rows

    def eval_examples(self, split: str, max_examples: int | None = None) -> list[Example]:
        """Evaluation rows; a cap takes a fixed (seed 0) random subset, not the file's head
        (MQuAKE's test file is ordered by edit)."""
        rows = list(self.examples(split))
        if max_examples is not None and len(rows) > max_examples:
            keep = sorted(random.Random(0).sample(range(len(rows)), max_examples))
            rows = [rows[i] for i in keep]
        return rows

    def data_prompt(self, example: Example) -> str:
        """The text that identifies a row for the data checks (``tasks.hygiene``): two rows
        with equal data prompts (and answers) are duplicates, a test row with a training
        row's data prompt is an overlap. The example's prompt by default."""
        return example.prompt

    @property
    def parse_with_prompt(self) -> bool:
        """Whether ``parse`` reads prompt + output decoded together (the authors' code does)
        rather than the output alone."""
        return False

    def parse(self, text: str) -> str:
        """Generated text (see ``parse_with_prompt``) -> normalised prediction."""
        return text.split("\n")[0].strip().lower()

    @property
    def match_mode(self) -> str:
        """How ``is_correct`` compares (reported in metrics): the built-in tasks compare the
        parsed prediction with their answers exactly."""
        return "exact"

    def is_correct(self, prediction: str, example: GenerationExample) -> bool:
        return prediction in example.answers

    def training_examples(self, examples: Sequence[Example]) -> list[TrainingExample]:
        """Examples -> what the trainer consumes, by ``self.loss``."""
        out: list[TrainingExample] = []
        for ex in examples:
            if isinstance(ex, GenerationExample):
                out.append(SFTExample(ex.prompt, ex.target))
            elif self.loss == "dpo":  # choices follow the prompt after a space, as in scoring
                out.append(PreferenceExample(ex.prompt, " " + ex.choices[ex.correct[0]],
                                             " " + ex.false_choices[0]))
            else:
                out.append(SFTExample(ex.prompt, " " + ex.choices[ex.correct[0]]))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "loss": self.loss,
                "protocol": self.protocol, "data_dir": str(self.data_dir)}
