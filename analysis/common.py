"""What the analysis modules share: command line, budgets, task options, output files.

Budgets (``--budget NAME``): the registry ``lofit_lens.budgets`` (the same names as
``lofit-lens --budget`` and the notebooks'). The run settings (``--k``, ``--seed``,
``--epochs``, ``--max-train-examples``, ``--max-eval-examples``, ``--protocol``) are
``LoFiTConfig`` fields, their flags made by ``lofit_lens.config.add_config_arguments`` as for
the ``lofit-lens`` command line; ``--max-train-examples``, ``--max-eval-examples`` and
``--epochs`` override any budget.

TruthfulQA runs on fold 0 only (the paper averages the two folds); pass
``--truthfulqa-fold 1`` for the other.

``--executor ray`` (``--ray-address`` for a cluster) runs the head selections and cells as Ray
tasks (docs/scale.md); the default runs them one after another in this process.

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

from lofit_lens import (
    BUDGETS, ConfigError, LoFiTConfig, LoFiTResult, model_dims, model_id, save_figure,
)
from lofit_lens.budgets import budget_help, get_budget
from lofit_lens.config import add_config_arguments, config_overrides
from lofit_lens.analysis.cells import selection_result
from lofit_lens.analysis.sweeps import SelectionItem, run_item
from lofit_lens.executors import get_executor, set_default_executor
from lofit_lens.training import resolve_run
from lofit_lens.versions import library_versions

TASKS = ("truthfulqa", "mquake", "clutrr")
MODELS = ("smollm2-135m", "gemma3-270m")
PAPER_NAMES = {"truthfulqa": "TruthfulQA", "mquake": "MQuAKE", "clutrr": "CLUTRR",
               "random": "Random"}
PAPER_MODELS = ("Llama-2-7B", "Gemma-7B", "Llama-2-13B")
BUDGET_SETTINGS = ("max_train_examples", "max_eval_examples", "epochs")
"""The ``LoFiTConfig`` flags that override the budget (default: the budget's)."""


class SettingsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that checks the run settings once parsed: a bad one (``--epochs
    1 2 3``, ``--epochs 0``, ...) is a usage error before any model loads."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        try:
            overrides, per_task = run_options(parsed)
            for task in parsed.tasks:
                options = {n: v for n, v in per_task[task].items() if n != "extra"}
                LoFiTConfig(**{**overrides, **options,
                               **{n: getattr(parsed, n) for n in ("k", "seed")
                                  if getattr(parsed, n, None) is not None}})
        except ConfigError as err:
            self.error(str(err))
        if getattr(parsed, "executor", None) is not None:  # what executor=None means from here on
            set_default_executor(parsed.executor, parsed.ray_address)
        return parsed


def parser(module: str, description: str, k: Optional[float],
           seed: bool = True, out: Optional[str] = None) -> argparse.ArgumentParser:
    """The common options; ``k``: this figure's paper K (None: the module has no ``--k``);
    ``seed=False`` for a module with its own seed option (``--seeds``); ``out``: the default
    output folder's name under analysis_out/ (default: the module's)."""
    out = out or module
    p = SettingsParser(prog=f"python -m analysis.{module}", description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="embedded short names or Hub ids / HF folders (default: both embedded)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help="lofit_lens.budgets (default quick): " + budget_help())
    p.add_argument("--out", type=Path, default=Path("analysis_out") / out,
                   help=f"figures and tables (default analysis_out/{out})")
    p.add_argument("--cache", type=Path, default=Path("analysis_out") / "cache",
                   help="cache of head selections and cells, shared by the modules "
                        "(default analysis_out/cache)")
    names = (("k",) if k is not None else ()) + (("seed",) if seed else ()) + BUDGET_SETTINGS
    add_config_arguments(p, names + ("protocol",),
                         defaults={"k": k, "seed": 0, "protocol": LoFiTConfig.protocol},
                         fallbacks={n: "the budget's" for n in BUDGET_SETTINGS},
                         notes={"k": ", as the paper for this figure"})
    p.add_argument("--truthfulqa-fold", type=int, default=0, choices=(0, 1))
    p.add_argument("--data-dir", help="folder of the LoFiT splits (default: lofit_lens's)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model dtype (paper: float32 for 7B, bfloat16 for 13B and Gemma)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the cells run: one after another here (local, the default), or "
                        "as Ray tasks, one GPU each when there are GPUs (needs "
                        "lofit-lens[ray]; docs/scale.md). Put --cache on a path every node sees")
    p.add_argument("--ray-address", help="a running Ray cluster (auto, HOST:6379, "
                                         "ray://HOST:10001; default: a local Ray instance)")
    return p


def run_options(args, k=None, total_heads: Optional[int] = None,
                ) -> tuple[dict[str, Any], dict[str, dict]]:
    """(``LoFiTConfig`` overrides for every task, per-task overrides) of the budget, the
    paper hyperparameters at ``k`` heads (paper budget: Table 6's step-2 rate for 10% of
    the heads when ``k`` selects at least 10% of ``total_heads``) and the command-line
    overrides."""
    budget = get_budget(args.budget)
    given = config_overrides(args, BUDGET_SETTINGS)
    max_eval = given.pop("max_eval_examples", ...)
    overrides = dict(budget.overrides, protocol=getattr(args, "protocol", "official"), **given)
    per_task: dict[str, dict] = {}
    for task in args.tasks:
        options = dict(budget.task_overrides.get(task, {}))
        if max_eval is not ...:
            options["max_eval_examples"] = max_eval
        extra = {"data_dir": args.data_dir} if args.data_dir else {}
        if task == "truthfulqa":
            extra["fold"] = args.truthfulqa_fold
        if extra:
            options["extra"] = extra
        if budget.paper_hyperparams:
            options.update({n: v for n, v in budget.task_settings(task, k, total_heads).items()
                            if n in ("l1_lambda", "lr_select", "lr_bias")})
        per_task[task] = options
    return overrides, per_task


def head_sets(model, args, k: float, seeds: Sequence[int]) -> dict[tuple[str, int], LoFiTResult]:
    """``{(task, seed): result}``: the top-``k`` heads selected on each task (cached, shared
    with the other modules) as ``LoFiTResult``s without offsets."""
    overrides, per_task = run_options(args, k, model_dims(model).total_heads)
    runs = {}
    for task in args.tasks:
        for seed in seeds:
            runs[task, seed] = resolve_run(task, None, {**overrides, **per_task[task], "k": k,
                                                        "seed": seed})
    executor = get_executor()  # --executor
    shown = not args.quiet and executor.in_process
    selections = executor.map(run_item, model, [SelectionItem(task_obj, cfg, args.cache, None, shown)
                                                for task_obj, cfg in runs.values()],
                              desc="head selections", progress=not args.quiet)
    return {key: selection_result(selection, cfg, model_id(model),
                                  cfg.num_heads(model_dims(model).total_heads))
            for (key, (_, cfg)), selection in zip(runs.items(), selections)}


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
