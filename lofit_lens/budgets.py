"""Run budgets: how much data and training a run gets. The one registry of budget names,
shared by ``lofit-lens run|compare --budget NAME``, every ``python -m analysis.<module>
--budget NAME`` and the notebooks (``LOFIT_NOTEBOOK_BUDGET``).

A budget is a set of ``LoFiTConfig`` overrides (for every task, and per task) plus the sweep
points of Fig. 4/5; ``budget_settings(name, task)`` gives the overrides of one task. Explicit
settings (keywords, command-line flags) override a budget's.

* ``quick`` (default of the figure modules): for the embedded models on a 2-core CPU, under
  30 min per module for both models. Both steps train on at most 40 training examples: step 1
  (the scales A) for 1 epoch, step 2 (the offsets v) for 3 epochs at 5x the paper's learning
  rate (``lr_bias=5e-2``; the paper's 1e-2 moves v too little in 15 steps), with no
  validation. Evaluation uses 48 test examples (24 TruthfulQA questions: MC scoring behind a
  6-shot prompt is the costliest evaluation). The sweeps use fewer points (K = 3%, 10%, 50%;
  16 and 40 training examples). K stays the paper's. Numbers from it are noisy (a 48-example
  test set has a standard error of ~6 points): a check, not a replication. Its cells are
  shared between modules (the 3% cells of fig2_task_specificity are fig4_fig5_budget's 3%
  points).
* ``small`` (default of ``analysis.tables1_2_baselines``): CPU, about 30 minutes for SmolLM2
  on 2 cores: epochs (1, 2), at most 100 training examples, 100 test examples per task (50
  questions per TruthfulQA fold).
* ``protocol`` (default of ``analysis.protocol_effect``, quoted by docs/protocol.md): the
  quick training on 80 training examples, 200 test examples (50 TruthfulQA questions).
* ``paper``: the paper's protocol (5 + 5 epochs, all training and test data, the Llama-2-7B
  learning rates and lambda of Table 6, the 10%-of-heads step-2 learning rate where K selects
  at least 10% of the heads); meant for a GPU and 7B models (``--models
  meta-llama/Llama-2-7b-hf``). ``Budget.paper_hyperparams`` marks it; the rates depend on
  the task and K, and ``budget_settings`` applies them (for the paper's three tasks).
* ``smoke``: a seconds-scale run (8 training / 8 test examples) that checks the wiring.
* ``claims-quick`` / ``claims-converge`` / ``claims-paper`` (``analysis.run_claims``,
  docs/claims.md): the claims as
  tested hypotheses. ``max_eval_examples`` is there the size of each seed's own random test
  subset (the seeds' subsets are disjoint); ``None`` cuts the whole test split into one
  subset per seed. ``claims-quick`` (2-core CPU) takes K = 10% (K = 3% is 2 heads of Gemma 3
  270M's 72), 40 training examples and epochs 1 + 2, and spends the time on test examples
  and seeds instead; ``claims-converge`` keeps its K and test subsets but trains both steps
  for the paper's 5 epochs on all training data (CPU hours); ``claims-paper`` is the
  paper's protocol, for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lofit_lens.errors import ConfigError
from lofit_lens.tasks import clutrr, mquake, truthfulqa
from lofit_lens.tasks.base import TaskHyperparams

FRACTIONS = (0.01, 0.03, 0.1, 0.2, 0.5)
"""The paper's K sweep (Fig. 4): fractions of all heads."""
SIZES = (16, 32, 64, 128, 256)
"""The paper's data-efficiency sweep (Fig. 5): training examples."""

PAPER_HYPERPARAMS: dict[str, TaskHyperparams] = {
    "clutrr": clutrr.PAPER_HYPERPARAMS, "mquake": mquake.PAPER_HYPERPARAMS,
    "truthfulqa": truthfulqa.PAPER_HYPERPARAMS}
"""Table 6, Llama-2-7B: lambda and learning rates (the step-2 rate is the one for K = 3%)."""
PAPER_LR_BIAS_10PCT = {"clutrr": 5e-3, "mquake": 5e-3, "truthfulqa": 5e-3}
"""Table 6, Llama-2-7B: the step-2 learning rate with K = 10% of the heads."""


@dataclass(frozen=True)
class Budget:
    """``LoFiTConfig`` overrides for every task, per-task ones, and the sweep points."""

    overrides: dict[str, Any]
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    fractions: tuple[float, ...] = FRACTIONS
    sizes: tuple[int, ...] = SIZES
    paper_hyperparams: bool = False
    description: str = ""

    def task_settings(self, task: str, k: Union[int, float, None] = None,
                      total_heads: Optional[int] = None) -> dict[str, Any]:
        """The per-task overrides of ``task`` (a name; a file task has none), with Table 6's
        lambda and rates when ``paper_hyperparams``: the 10%-of-heads step-2 rate when ``k``
        selects at least 10% of ``total_heads`` (``k=None``: the 3% one)."""
        name = str(task).lower()
        options = dict(self.task_overrides.get(name, {}))
        if self.paper_hyperparams and name in PAPER_HYPERPARAMS:
            hp = PAPER_HYPERPARAMS[name]
            large_k = k is not None and head_fraction(k, total_heads) >= 0.1
            options.update(l1_lambda=hp.l1_lambda, lr_select=hp.lr_select,
                           lr_bias=PAPER_LR_BIAS_10PCT[name] if large_k else hp.lr_bias)
        return options


BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        overrides=dict(max_train_examples=40, epochs_select=1, epochs_bias=3, lr_bias=5e-2,
                       max_eval_examples=48, max_val_examples=0),
        task_overrides={"truthfulqa": {"max_eval_examples": 24}},
        fractions=(0.03, 0.1, 0.5), sizes=(16, 40),
        description="<=40 training examples, 1 epoch for step 1, 3 epochs at lr 5e-2 for "
                    "step 2, no validation, 48 test examples (24 TruthfulQA questions), sweeps "
                    "at K=3/10/50% and 16/40 examples: under 30 min per figure module for both "
                    "embedded models on 2 CPU cores"),
    "paper": Budget(
        overrides=dict(epochs_select=5, epochs_bias=5, max_train_examples=None,
                       max_eval_examples=None),
        paper_hyperparams=True,
        description="5+5 epochs, all data, Table 6 hyperparameters (for a GPU and 7B models)"),
    "smoke": Budget(
        overrides=dict(max_train_examples=8, epochs_select=1, epochs_bias=1,
                       max_eval_examples=8, max_val_examples=0),
        task_overrides={"truthfulqa": {"max_eval_examples": 4}},
        fractions=(0.03, 0.1), sizes=(8,),
        description="8 training / 8 test examples, 1+1 epochs: a wiring check"),
    "small": Budget(
        overrides=dict(epochs_select=1, epochs_bias=2, max_train_examples=100,
                       max_eval_examples=100),
        task_overrides={"truthfulqa": {"max_eval_examples": 50}},
        fractions=(0.03, 0.1, 0.5), sizes=(16, 40, 100),
        description="<=100 training examples, epochs 1+2, 100 test examples (50 questions per "
                    "TruthfulQA fold): Tables 1/2 in about 30 min on 2 CPU cores"),
    "protocol": Budget(
        overrides=dict(max_train_examples=80, epochs_select=1, epochs_bias=3, lr_bias=5e-2,
                       max_val_examples=0, max_eval_examples=200),
        task_overrides={"truthfulqa": {"max_eval_examples": 50}},
        fractions=(0.03, 0.1, 0.5), sizes=(16, 40, 80),
        description="quick's training on <=80 examples, 200 test examples (50 TruthfulQA "
                    "questions): analysis.protocol_effect's, quoted in docs/protocol.md"),
    "claims-quick": Budget(
        overrides=dict(k=0.1, max_train_examples=40, epochs_select=1, epochs_bias=2,
                       lr_bias=5e-2, max_val_examples=0, max_eval_examples=80),
        task_overrides={"truthfulqa": {"max_eval_examples": 24}},
        fractions=(0.1,), sizes=(40,),
        description="analysis.run_claims on a 2-core CPU (docs/claims.md): K=10%, <=40 training "
                    "examples, epochs 1+2 (lr 5e-2), no validation; max_eval_examples is the "
                    "size of each seed's disjoint random test subset (80; 24 TruthfulQA "
                    "questions)"),
    "claims-converge": Budget(
        overrides=dict(k=0.1, max_train_examples=None, epochs_select=5, epochs_bias=5,
                       max_val_examples=64, max_eval_examples=80),
        task_overrides={"truthfulqa": {"max_eval_examples": 24}},
        fractions=(0.1,),
        description="analysis.run_claims at convergence on a CPU (issue 23): claims-quick's "
                    "K=10% and test subsets, but step 1 for the paper's 5 epochs on all "
                    "training data with the validation loss after each epoch, and step 2 as "
                    "in the paper (5 epochs at the task's rate)"),
    "claims-paper": Budget(
        overrides=dict(k=0.03, epochs_select=5, epochs_bias=5, max_train_examples=None,
                       max_eval_examples=None),
        paper_hyperparams=True, fractions=(0.03,),
        description="analysis.run_claims for a GPU: the paper's K=3%, 5+5 epochs, all training "
                    "data, Table 6 hyperparameters; the whole test split, cut into one "
                    "disjoint random subset per seed"),
}
"""Every budget name, in the order the command lines list them."""


def get_budget(name: str) -> Budget:
    """The budget called ``name``; ``ConfigError`` listing the names for an unknown one."""
    try:
        return BUDGETS[name]
    except KeyError:
        raise ConfigError(f"Unknown budget {name!r}: expected one of {list(BUDGETS)}") from None


def budget_settings(name: str, task: str, k: Union[int, float, None] = None,
                    total_heads: Optional[int] = None) -> dict[str, Any]:
    """``LoFiTConfig`` overrides of budget ``name`` for ``task``: the budget's overrides for
    every task, then its per-task ones (see ``Budget.task_settings`` for ``k``)."""
    budget = get_budget(name)
    return {**budget.overrides, **budget.task_settings(task, k, total_heads)}


def budget_help() -> str:
    """One line per budget, for a ``--budget`` flag's help."""
    return "; ".join(f"{name}: {b.description}" for name, b in BUDGETS.items()).replace("%", "%%")


def head_fraction(k: Union[int, float], total_heads: Optional[int]) -> float:
    """``k`` (a count or a fraction of all heads) as the fraction of heads it selects
    (a fraction without ``total_heads`` stands for itself)."""
    from lofit_lens.config import LoFiTConfig

    if total_heads is None:
        if isinstance(k, float) and 0 < k < 1:
            return k
        raise ConfigError(f"k={k!r} heads: the share of heads it selects needs total_heads")
    return LoFiTConfig(k=k).num_heads(total_heads) / total_heads
