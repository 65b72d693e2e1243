"""Tasks: CLUTRR, MQuAKE, TruthfulQA and your own files, behind one ``Task`` interface."""

from lofit_lens.tasks.base import (
    ChoiceExample,
    DataError,
    Example,
    GenerationExample,
    PreferenceExample,
    SFTExample,
    Task,
    TaskHyperparams,
    TrainingExample,
)
from lofit_lens.tasks.clutrr import Clutrr
from lofit_lens.tasks.file_task import FileTask
from lofit_lens.tasks.hygiene import check_data
from lofit_lens.tasks.mquake import MQuAKE
from lofit_lens.tasks.registry import get_task, list_tasks, register_task
from lofit_lens.tasks.truthfulqa import TruthfulQA

__all__ = [
    "Task", "TaskHyperparams", "Example", "GenerationExample", "ChoiceExample",
    "TrainingExample", "SFTExample", "PreferenceExample", "DataError",
    "get_task", "register_task", "list_tasks", "check_data",
    "Clutrr", "MQuAKE", "TruthfulQA", "FileTask",
]
