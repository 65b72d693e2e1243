"""The settings that identify a run's steps: what a cache key or a checkpoint key hashes.

Settings that do not change the learned parameters (validation size, evaluation batch size,
progress bars) are left out, so changing them reuses saved work.
"""

from __future__ import annotations

from typing import Any, Sequence

from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.config import LoFiTConfig
from lofit_lens.tasks.base import Task, hash_examples
from lofit_lens.training import training_data

STEP1_FIELDS = ("seed", "l1_lambda", "lr_select", "epochs_select", "batch_size", "init_std",
                "weight_decay", "adam_eps", "dpo_beta", "protocol", "max_grad_norm")
STEP2_FIELDS = ("seed", "lr_bias", "epochs_bias", "batch_size", "init_std", "weight_decay",
                "adam_eps", "dpo_beta", "protocol", "max_grad_norm")
EVAL_SPLIT = "test"



def config_fields(cfg: LoFiTConfig, fields: Sequence[str]) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in fields}


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
    data = training_data(task, cfg)
    return {**model_settings(model), "task": task_settings(task),
            "train_hash": data.data_hash, "n_train": len(data.train),
            **config_fields(cfg, fields)}


def eval_settings(model, task: Task, cfg: LoFiTConfig) -> dict[str, Any]:
    rows = eval_examples(task, cfg)
    return {**model_settings(model), "task": task_settings(task), "split": EVAL_SPLIT,
            "eval_hash": hash_examples(rows), "n_eval": len(rows)}


