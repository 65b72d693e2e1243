"""Fig. 2, task specificity: tune offsets on task T with the heads LoFiT selected on task S.

For each model: the top-K heads selected on each task (paper: K = 3%) and K random heads;
offsets v tuned on every target task with every head set; accuracy on the target's test
split (exact match; TruthfulQA: MC1 on fold 0). Cells below the same-task cell of their
column are marked by a one-sided paired bootstrap: * p < 0.05, + p < 0.1.

Writes to --out, per model: transfer_<model>.{html,png} (accuracy relative to same-task,
with marks), accuracy_/relative_/p_values_/marks_/cells_<model>.csv; and
paper_comparison.csv (our cells next to the paper's Fig. 2 for Llama-2-7B, Gemma-7B and
Llama-2-13B, accuracies in %).

--budget quick (default) trains on 40 examples (step 1: 1 epoch; step 2: 3 epochs at
lr 5e-2), skips validation and evaluates 48 test examples (24 TruthfulQA questions): per
model 3 head selections + 12 cells. --budget paper: 5 + 5 epochs, all data, Table 6
hyperparameters.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from analysis.common import (
    PAPER_MODELS, PAPER_NAMES, RunLog, default_paper_numbers, load, paper_numbers, parser,
    run_options, write_figure, write_table,
)
from lofit_lens import model_dims, transfer_matrix
from lofit_lens.analysis.transfer import RANDOM, TransferResult
from lofit_lens.store import slug

MODULE = "task_specificity"
PAPER_COLUMNS = ("truthfulqa", "mquake", "clutrr")


def paper_cells(numbers: dict, tasks: Sequence[str]) -> pd.DataFrame:
    """The paper's Fig. 2 as rows (paper model, source, target, accuracy %, relative, mark)."""
    rows = []
    for model in PAPER_MODELS:
        table = numbers["figure2"][model]
        parsed = {(s, t): re.fullmatch(r"([\d.]+)([*+]?)", table[PAPER_NAMES[s]][j]).groups()
                  for s in (*PAPER_COLUMNS, RANDOM) for j, t in enumerate(PAPER_COLUMNS)}
        for (s, t), (value, mark) in parsed.items():
            if t in tasks and (s in tasks or s == RANDOM):
                rows.append({"model": model, "source": s, "target": t, "accuracy": float(value),
                             "relative": float(value) / float(parsed[t, t][0]), "mark": mark})
    return pd.DataFrame(rows)


def comparison(ours: dict[str, TransferResult], paper: Optional[pd.DataFrame]) -> pd.DataFrame:
    """One row per (source, target) in paper names; accuracy (%), relative and mark of each
    of our models, then of each paper model."""
    cells = [r.cells.assign(model=m, accuracy=100 * r.cells["accuracy"]) for m, r in ours.items()]
    frame = pd.concat(cells + ([paper] if paper is not None else []), ignore_index=True)
    frame[["source", "target"]] = frame[["source", "target"]].apply(lambda c: c.map(PAPER_NAMES))
    rows = list(dict.fromkeys(zip(frame["source"], frame["target"])))
    wide = frame.set_index(["source", "target", "model"])[["accuracy", "relative", "mark"]]
    wide = wide.unstack("model").reindex(rows)
    models = list(dict.fromkeys(frame["model"]))
    wide = wide.reindex(columns=[(v, m) for m in models for v in ("accuracy", "relative", "mark")])
    wide.columns = [f"{m} {v}" for v, m in wide.columns]
    return wide


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(MODULE, __doc__, k=0.03)
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--paper-numbers", type=Path, default=default_paper_numbers(),
                   help="lofit_paper_numbers.json (default: ../shared/reference/)")
    args = p.parse_args(argv)
    log = RunLog(MODULE, args)
    files, results = [], {}
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        overrides, per_task = run_options(args, args.k, model_dims(model).total_heads)
        result = transfer_matrix(model, args.tasks, k=args.k, seed=args.seed,
                                 cache_dir=args.cache, n_bootstrap=args.n_bootstrap,
                                 progress=not args.quiet, task_overrides=per_task, **overrides)
        results[name] = result
        tag = slug(name)
        for label in ("accuracy", "relative", "p_values", "marks"):
            files.append(write_table(getattr(result, label), args.out / f"{label}_{tag}.csv"))
        files.append(write_table(result.cells, args.out / f"cells_{tag}.csv", index=False))
        k = int(result.cells["k"].iloc[0])
        files += write_figure(result.figure(f"{name}, K={k}: accuracy (%) with heads from "
                                            "another task<br>colour: relative to same-task "
                                            "heads; * p<0.05, + p<0.1"),
                              args.out / f"transfer_{tag}")
        print(f"{name}: accuracy\n{result.accuracy.round(3)}\nmarks\n{result.marks}")
        log.lap(name, start)
        del model
    numbers = paper_numbers(args.paper_numbers)
    paper = paper_cells(numbers, args.tasks) if numbers else None
    files.append(write_table(comparison(results, paper), args.out / "paper_comparison.csv"))
    log.write(args.out, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
