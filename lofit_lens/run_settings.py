"""The settings that identify a run's steps: what a cache key or a checkpoint key hashes.

A key covers everything the saved thing depends on: the model (its id, shape, dtype and a
hash of its weights), the versions that change numbers, the task, the hashes of the data the
step reads (training, validation or evaluation rows) and the step's settings. Settings that
do not change the numbers (evaluation batch size, progress bars) are left out, so changing
them reuses saved work.
"""

from __future__ import annotations

from typing import Any, Optional

from lofit_lens.backends.fingerprint import model_fingerprint
from lofit_lens.backends.hooked import model_dims, model_id
from lofit_lens.config import NON_RESULT_FIELDS, STEPS, LoFiTConfig, step_fields
from lofit_lens.tasks.base import Task, hash_examples
from lofit_lens.training import RunData, training_data
from lofit_lens.versions import library_versions

NUMERIC_VERSIONS = ("lofit-lens", "torch", "transformers", "transformer-lens")
"""The packages whose version can change a computed number."""
EVAL_SPLIT = "test"
"""The split the analyses evaluate."""
PHASES = ("select", "tune", "evaluate", "method")
"""Step 1, step 2, an evaluation on one split, a compared method's training."""


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


def task_settings(task: Task) -> dict[str, Any]:
    """The task's identity without file locations (data content is hashed separately), and
    for generation its decoding settings."""
    settings = {k: v for k, v in task.describe().items() if k not in ("data_dir", "files")}
    if task.kind == "generation":
        settings["decoding"] = {"max_new_tokens": task.max_new_tokens,
                                "stop_strings": list(task.stop_strings)}
    return settings


def result_fields(cfg: LoFiTConfig) -> dict[str, Any]:
    """Every config field that can change a number (all but ``NON_RESULT_FIELDS``)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_RESULT_FIELDS}


def phase_settings(phase: str, model, task: Task, cfg: LoFiTConfig, *,
                   data: Optional[RunData] = None, **extra: Any) -> dict[str, Any]:
    """What the cache key of ``phase`` hashes: the model (weights' hash, versions), the task,
    then per phase

    * ``select`` / ``tune``: the hashes of the training and validation rows and the config
      fields marked with that step (``config.step_fields``);
    * ``evaluate``: the split (``extra["split"]``) and the hash of its rows as evaluation
      reads them; ``extra["edit"]`` names what is evaluated (``engine.content_key``, a hash
      of the edit's kind, spec and tensors; ``None``: the untouched model);
    * ``method``: the training data and every config field that can change a number.

    ``data``: the run's training data when already read (else read here); ``extra``: more
    settings of the phase (heads, a method's name and options), kept as given."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: one of {PHASES}")
    settings = {"phase": phase, **model_settings(model), "task": task_settings(task)}
    if phase == "evaluate":
        rows = task.eval_examples(extra["split"], cfg.max_eval_examples)
        settings.update(eval_hash=hash_examples(rows), n_eval=len(rows))
    else:
        settings.update(data_settings(data or training_data(task, cfg)))
        settings.update({f: getattr(cfg, f) for f in step_fields(phase)} if phase in STEPS
                        else result_fields(cfg))
    return {**settings, **extra}

