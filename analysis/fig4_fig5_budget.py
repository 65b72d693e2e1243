"""Fig. 4 and 5, budgets: LoFiT accuracy vs training examples and vs number of heads.

Per model and task (TruthfulQA: MC1 on fold 0; others: exact match):

* K sweep (Fig. 5): one head selection, then offsets tuned on the top K heads for each
  fraction of --fractions (paper: 1, 3, 10, 20, 50%); --random-heads adds the same K of
  random heads.
* Data efficiency (Fig. 4): full LoFiT (selection and tuning) on n training examples for
  each n of --sizes, K = --k (paper: 10%).

Both include the zero-shot accuracy as a reference. Writes to --out: k_sweep.{csv,html,png}
and data_efficiency.{csv,html,png}.

--budget quick (default) trains on at most 40 examples (step 1: 1 epoch; step 2: 3 epochs
at lr 5e-2), evaluates 48 test examples (24 TruthfulQA questions) and uses K = 3, 10, 50%
and n = 16, 40 (points with the same settings as task_specificity's cells are shared
with it through the cache).
--budget paper: 5 + 5 epochs, all data, the paper's fractions and n = 16 ... 256.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import pandas as pd

from analysis.common import BUDGETS, RunLog, load, parser, run_options, write_figure, write_table
from lofit_lens import data_efficiency, k_sweep, model_dims, plot_data_efficiency, plot_k_sweep

MODULE = "budget"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(MODULE, __doc__, k=0.1)
    p.add_argument("--sweeps", nargs="+", choices=("k", "data"), default=["k", "data"])
    p.add_argument("--fractions", type=float, nargs="+",
                   help="fractions of heads for the K sweep (default: the budget's)")
    p.add_argument("--sizes", type=int, nargs="+",
                   help="training-set sizes for data efficiency (default: the budget's)")
    p.add_argument("--random-heads", action="store_true", help="K sweep with random heads too")
    args = p.parse_args(argv)
    budget = BUDGETS[args.budget]
    fractions = args.fractions or budget.fractions
    sizes = args.sizes or budget.sizes
    log = RunLog(MODULE, args)
    sweeps: dict[str, list[pd.DataFrame]] = {"k": [], "data": []}
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        log.lap(f"{name} load", start)
        total = model_dims(model).total_heads
        for task in args.tasks:
            start = time.perf_counter()

            def options(k) -> dict:  # the paper budget's step-2 rate depends on K
                overrides, per_task = run_options(args, k, total)
                return {**overrides, **per_task[task], "cache_dir": args.cache,
                        "seed": args.seed, "progress": not args.quiet}

            if "k" in args.sweeps:
                # one call per K (the head selection is cached and shared between them)
                sweeps["k"] += [k_sweep(model, task, [f], random_heads_too=args.random_heads,
                                        zero_shot=i == 0, **options(f))
                                for i, f in enumerate(fractions)]
            if "data" in args.sweeps:
                sweeps["data"].append(data_efficiency(model, task, sizes, k=args.k,
                                                      **options(args.k)))
            log.lap(f"{name}/{task}", start)
        del model
    files = []
    plots = {"k": ("k_sweep", plot_k_sweep), "data": ("data_efficiency", plot_data_efficiency)}
    for key in args.sweeps:
        stem, plot = plots[key]
        frame = pd.concat(sweeps[key], ignore_index=True)
        files.append(write_table(frame, args.out / f"{stem}.csv", index=False))
        files += write_figure(plot(frame), args.out / stem)
        print(frame.drop(columns=["file", "cached"]).to_string())
    log.write(args.out, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
