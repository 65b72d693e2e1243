"""What the analysis modules share: command line, budgets, task options, output files.

Budgets (``--budget quick|paper|smoke``): ``lofit_lens.budgets``.

``--max-train-examples``, ``--max-eval-examples`` and ``--epochs`` override any budget.
TruthfulQA runs on fold 0 only (the paper averages the two folds); pass
``--truthfulqa-fold 1`` for the other.

Results are cached under ``--cache`` (default ``analysis_out/cache``, shared by all
modules: a head selection made by one module is reused by the others), so rerunning a
module after an interruption resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import torch

from lofit_lens.budgets import BUDGETS
from lofit_lens.cli import k_value
from lofit_lens.config import LoFiTConfig
from lofit_lens.hooked import model_dims, model_id
from lofit_lens.plotting import save_figure
from lofit_lens.result import LoFiTResult
from lofit_lens.run_cache import cached_selection, selection_result
from lofit_lens.tasks import clutrr, mquake, truthfulqa
from lofit_lens.training import resolve_run
from lofit_lens.versions import library_versions

TASKS = ("truthfulqa", "mquake", "clutrr")
MODELS = ("smollm2-135m", "gemma3-270m")
PAPER_NAMES = {"truthfulqa": "TruthfulQA", "mquake": "MQuAKE", "clutrr": "CLUTRR",
               "random": "Random"}
PAPER_MODELS = ("Llama-2-7B", "Gemma-7B", "Llama-2-13B")
# Table 6, Llama-2-7B: step-2 learning rate with K = 10% of heads (the 3% one is the task's
# PAPER_HYPERPARAMS.lr_bias).
PAPER_HYPERPARAMS = {"clutrr": clutrr.PAPER_HYPERPARAMS, "mquake": mquake.PAPER_HYPERPARAMS,
                     "truthfulqa": truthfulqa.PAPER_HYPERPARAMS}
PAPER_LR_BIAS_10PCT = {"clutrr": 5e-3, "mquake": 5e-3, "truthfulqa": 5e-3}


BUDGET_HELP = (
    "quick (default): <=40 training examples, 1 epoch for step 1, 3 epochs at lr 5e-2 for "
    "step 2, no validation, 48 test "
    "examples (24 TruthfulQA questions), sweeps at K=3/10/50%% and 16/40 examples: under "
    "30 min per module for both embedded models on 2 CPU cores. paper: 5+5 epochs, all "
    "data, Table 6 hyperparameters (for a GPU and 7B models). smoke: 8 training / 8 test "
    "examples, a wiring check."
)


def parser(module: str, description: str, k: Optional[float],
           seed: bool = True) -> argparse.ArgumentParser:
    """The common options; ``k``: this figure's paper K (None: the module has no ``--k``);
    ``seed=False`` for a module with its own seed option (``--seeds``)."""
    p = argparse.ArgumentParser(prog=f"python -m analysis.{module}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="embedded short names or Hub ids / HF folders (default: both embedded)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick", help=BUDGET_HELP)
    p.add_argument("--out", type=Path, default=Path("analysis_out") / module,
                   help=f"figures and tables (default analysis_out/{module})")
    p.add_argument("--cache", type=Path, default=Path("analysis_out") / "cache",
                   help="cache of head selections and cells, shared by the modules "
                        "(default analysis_out/cache)")
    if k is not None:
        p.add_argument("--k", type=k_value, default=k,
                       help=f"heads: a count or a fraction of all heads (default {k}, as the "
                            "paper for this figure)")
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-examples", type=int, help="override the budget (0 = all)")
    p.add_argument("--max-eval-examples", type=int,
                   help="override the budget for every task (0 = all)")
    p.add_argument("--epochs", type=int, nargs="+", metavar="N",
                   help="override the budget: epochs for both steps, or step 1 and step 2")
    p.add_argument("--truthfulqa-fold", type=int, default=0, choices=(0, 1))
    p.add_argument("--protocol", default="official", choices=("official", "clean"),
                   help="the authors' code point by point (default) or without their quirks "
                        "(docs/protocol.md)")
    p.add_argument("--data-dir", help="folder of the LoFiT splits (default: lofit_lens's)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model dtype (paper: float32 for 7B, bfloat16 for 13B and Gemma)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def head_fraction(k, total_heads: int) -> float:
    """``k`` (a count or a fraction of all heads) as the fraction of heads it selects."""
    return LoFiTConfig(k=k).num_heads(total_heads) / total_heads


def run_options(args, k=None, total_heads: Optional[int] = None,
                ) -> tuple[dict[str, Any], dict[str, dict]]:
    """(``LoFiTConfig`` overrides for every task, per-task overrides) of the budget, the
    paper hyperparameters at ``k`` heads (paper budget: Table 6's step-2 rate for 10% of
    the heads when ``k`` selects at least 10% of ``total_heads``) and the command-line
    overrides."""
    budget = BUDGETS[args.budget]
    overrides = dict(budget.overrides, protocol=getattr(args, "protocol", "official"))
    if args.max_train_examples is not None:
        overrides["max_train_examples"] = args.max_train_examples or None
    if args.epochs:
        overrides.update(epochs_select=args.epochs[0], epochs_bias=args.epochs[-1])
    per_task: dict[str, dict] = {}
    for task in args.tasks:
        options = dict(budget.task_overrides.get(task, {}))
        if args.max_eval_examples is not None:
            options["max_eval_examples"] = args.max_eval_examples or None
        extra = {"data_dir": args.data_dir} if args.data_dir else {}
        if task == "truthfulqa":
            extra["fold"] = args.truthfulqa_fold
        if extra:
            options["extra"] = extra
        if budget.paper_hyperparams:
            hp = PAPER_HYPERPARAMS[task]
            large_k = k is not None and head_fraction(k, total_heads) >= 0.1
            lr_bias = PAPER_LR_BIAS_10PCT[task] if large_k else hp.lr_bias
            options.update(l1_lambda=hp.l1_lambda, lr_select=hp.lr_select, lr_bias=lr_bias)
        per_task[task] = options
    return overrides, per_task


def head_sets(model, args, k: float, seeds: Sequence[int]) -> dict[tuple[str, int], LoFiTResult]:
    """``{(task, seed): result}``: the top-``k`` heads selected on each task (cached, shared
    with the other modules) as ``LoFiTResult``s without offsets."""
    overrides, per_task = run_options(args, k, model_dims(model).total_heads)
    results = {}
    for task in args.tasks:
        for seed in seeds:
            task_obj, cfg = resolve_run(task, None, {**overrides, **per_task[task], "k": k,
                                                     "seed": seed})
            n_heads = cfg.num_heads(model_dims(model).total_heads)
            selection = cached_selection(model, task_obj, cfg, args.cache, not args.quiet)
            results[task, seed] = selection_result(selection, cfg, model_id(model), n_heads)
    return results


def load(name: str, args):
    """``lofit_lens.load_model`` with the command line's device and dtype."""
    from lofit_lens import load_model

    return load_model(name, device=args.device, dtype=getattr(torch, args.dtype))


def write_table(frame: pd.DataFrame, path: Path, index: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=index)
    return path


def write_figure(fig, path: Path) -> list[Path]:
    """HTML + PNG; without a browser for PNG, the HTML only (with a warning)."""
    try:
        return save_figure(fig, path)
    except RuntimeError as err:
        print(f"warning: {err}", file=sys.stderr)
        return [path.with_name(path.name + ".html")]


def paper_numbers(path: Optional[Path]) -> Optional[dict]:
    """The paper's numbers (``lofit_paper_numbers.json``), or None (with a note) if absent."""
    if path is None or not Path(path).is_file():
        print(f"note: paper numbers not found ({path}); skipping the paper comparison",
              file=sys.stderr)
        return None
    return json.loads(Path(path).read_text())


def default_paper_numbers() -> Path:
    """``../shared/reference/lofit_paper_numbers.json`` beside the default data folder."""
    from lofit_lens.tasks.base import default_data_dir

    return default_data_dir().parents[1] / "reference" / "lofit_paper_numbers.json"


class RunLog:
    """Collects timings and settings; ``write`` saves ``run_info.json`` in the out folder."""

    def __init__(self, module: str, args):
        self.start = time.perf_counter()
        self.info: dict[str, Any] = {
            "module": module, "argv": sys.argv[1:],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "versions": library_versions(), "seconds": {},
        }

    def lap(self, label: str, since: float) -> None:
        self.info["seconds"][label] = round(time.perf_counter() - since, 1)
        print(f"[{label}] {self.info['seconds'][label]:.0f} s", flush=True)

    def write(self, out: Path, files: Sequence[Path]) -> None:
        self.info["seconds"]["total"] = round(time.perf_counter() - self.start, 1)
        self.info["files"] = sorted(str(Path(f).relative_to(out)) for f in files)
        (out / "run_info.json").write_text(json.dumps(self.info, indent=2, default=str))
        print(f"wrote {len(files)} files to {out} in {self.info['seconds']['total']:.0f} s")
