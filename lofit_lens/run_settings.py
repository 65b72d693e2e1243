"""The settings that identify a run's steps: what a cache key or a checkpoint key hashes.

A key covers everything the saved thing depends on: the model (its id, shape, dtype and a
hash of its weights), the versions that change numbers, the task, the hashes of the data the
step reads (training, validation or evaluation rows) and the step's settings. Settings that
do not change the numbers (evaluation batch size, progress bars) are left out, so changing
them reuses saved work.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lofit_lens.backends.fingerprint import model_fingerprint
from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.config import LoFiTConfig, step_fields
from lofit_lens.tasks.base import Task, hash_examples
from lofit_lens.training import RunData, training_data
from lofit_lens.versions import library_versions

STEP1_FIELDS = step_fields("select")
STEP2_FIELDS = step_fields("tune")
"""The config fields of each training step's key: marked on the fields (``steps=``)."""
EVAL_SPLIT = "test"
NUMERIC_VERSIONS = ("lofit-lens", "torch", "transformers", "transformer-lens")
"""The packages whose version can change a computed number."""



def config_fields(cfg: LoFiTConfig, fields: Sequence[str]) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in fields}


def model_settings(model) -> dict[str, Any]:
    """The model's id, shape, dtype and weights' hash, and the versions that compute with it."""
    versions = library_versions()
    return {"model_id": model_id(model), "dims": list(model_dims(model)),
            "dtype": str(getattr(model.cfg, "dtype", "")), "weights": model_fingerprint(model),
            "versions": {name: versions[name] for name in NUMERIC_VERSIONS}}


def data_settings(data: RunData) -> dict[str, Any]:
    """The hashes and sizes of the rows a training step reads (training and validation)."""
    return {"train_hash": data.data_hash, "n_train": len(data.train),
            "val_hash": hash_examples(data.val), "n_val": len(data.val)}


def eval_data_settings(task: Task, splits: Sequence[str],
                       max_examples: int | None) -> dict[str, str]:
    """The hash of each evaluated split's rows, as evaluation reads them."""
    return {split: hash_examples(task.eval_examples(split, max_examples)) for split in splits}


def task_settings(task: Task) -> dict[str, Any]:
    """The task's identity without file locations (data content is hashed separately)."""
    return {k: v for k, v in task.describe().items() if k not in ("data_dir", "files")}


def eval_examples(task: Task, cfg: LoFiTConfig):
    return task.eval_examples(EVAL_SPLIT, cfg.max_eval_examples)


def step_settings(model, task: Task, cfg: LoFiTConfig, fields: Sequence[str],
                  data: Optional[RunData] = None) -> dict[str, Any]:
    """Model, task, training-data hash and the config ``fields`` of one training step
    (``data``: the run's training data when already read, else read here)."""
    return {**model_settings(model), "task": task_settings(task),
            **data_settings(data or training_data(task, cfg)), **config_fields(cfg, fields)}


def eval_settings(model, task: Task, cfg: LoFiTConfig) -> dict[str, Any]:
    rows = eval_examples(task, cfg)
    return {**model_settings(model), "task": task_settings(task), "split": EVAL_SPLIT,
            "eval_hash": hash_examples(rows), "n_eval": len(rows)}


