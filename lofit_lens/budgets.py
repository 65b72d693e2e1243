"""Run budgets of the paper's analyses: how much data and training each figure gets.

Shared by ``python -m analysis.<module> --budget NAME`` and the notebooks.

* ``quick`` (default): for the embedded models on a 2-core CPU, under 30 min per module
  for both models. Both steps train on at most 40 training examples: step 1 (the scales A)
  for 1 epoch, step 2 (the offsets v) for 3 epochs at 5x the paper's learning rate
  (``lr_bias=5e-2``; the paper's 1e-2 moves v too little in 15 steps), with no validation.
  Evaluation uses 48 test examples (24 TruthfulQA questions: MC scoring behind a 6-shot
  prompt is the costliest evaluation). The sweeps use fewer points (K = 3%, 10%, 50%; 16
  and 40 training examples). K stays the paper's. Numbers from it are noisy (a 48-example
  test set has a standard error of ~6 points): a check, not a replication. Its cells are
  shared between modules (the 3% cells of task_specificity are the budget module's 3%
  points).
* ``paper``: the paper's protocol (5 + 5 epochs, all training and test data, the Llama-2-7B
  learning rates and lambda of Table 6, the 10%-of-heads bias learning rate where K selects
  at least 10% of the heads); meant for a GPU and 7B models (``--models
  meta-llama/Llama-2-7b-hf``). ``Budget.paper_hyperparams`` marks it; the rates depend on
  the task and K, and ``analysis.common.run_options`` applies them.
* ``smoke``: a seconds-scale run (8 training / 8 test examples) that checks the wiring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lofit_lens.sweeps import FRACTIONS, SIZES


@dataclass(frozen=True)
class Budget:
    """``LoFiTConfig`` overrides for every task, per-task ones, and the sweep points."""

    overrides: dict[str, Any]
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    fractions: tuple[float, ...] = FRACTIONS
    sizes: tuple[int, ...] = SIZES
    paper_hyperparams: bool = False


BUDGETS = {
    "quick": Budget(
        overrides=dict(max_train_examples=40, epochs_select=1, epochs_bias=3, lr_bias=5e-2,
                       max_eval_examples=48, max_val_examples=0),
        task_overrides={"truthfulqa": {"max_eval_examples": 24}},
        fractions=(0.03, 0.1, 0.5), sizes=(16, 40)),
    "paper": Budget(
        overrides=dict(epochs_select=5, epochs_bias=5, max_train_examples=None,
                       max_eval_examples=None),
        paper_hyperparams=True),
    "smoke": Budget(
        overrides=dict(max_train_examples=8, epochs_select=1, epochs_bias=1,
                       max_eval_examples=8, max_val_examples=0),
        task_overrides={"truthfulqa": {"max_eval_examples": 4}},
        fractions=(0.03, 0.1), sizes=(8,)),
}
