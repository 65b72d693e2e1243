"""Fig. 3, granularity: in which layers the heads LoFiT selects sit, per (model, task).

Selects the top-K heads on each task (paper: K = 3%; TruthfulQA on fold 0), for each seed
of --seeds, and writes to --out: layer_distribution.{html,png} (percentage of the selected
heads per layer, one panel per model and task, dashed lines at floor(L/3) and
2 floor(L/3)), granularity.csv (peak layers, share per third, contiguity: see
lofit_lens.analysis.granularity.layer_summary), layer_counts.csv (count per layer), and the same
table and figure for the paper's Fig. 3 head sets (paper_granularity.csv,
paper_layer_distribution.{html,png}).

Only step 1 (head selection) runs here; selections are cached and shared with
task_specificity and head_similarity. --budget quick (default) trains the scales on 40
examples for 1 epoch; --budget paper on all training data for 5 epochs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import torch

from analysis.common import (
    PAPER_NAMES, RunLog, default_paper_numbers, head_sets, load, paper_numbers, parser,
    write_figure, write_table,
)
from lofit_lens import (
    LoFiTConfig, LoFiTResult, granularity_table, layer_distribution, plot_layer_distribution,
)

MODULE = "granularity"


def paper_results(numbers: dict, tasks: Sequence[str]) -> list[LoFiTResult]:
    """The paper's Fig. 3 head sets as results (heads numbered within each layer: only the
    layers are known)."""
    results = []
    for model, by_task in numbers["figure3"]["data"].items():
        for task in tasks:
            entry = by_task[PAPER_NAMES[task]]
            counts = {int(layer): n for layer, n in entry["heads_per_layer"].items()}
            width = max(counts.values())
            zeros = torch.zeros(entry["n_layers"], width, 1)
            results.append(LoFiTResult(
                config=LoFiTConfig(task=task), model_id=model, head_scores=zeros[..., 0],
                scale=zeros, bias=zeros,
                selected_heads=[(layer, h) for layer, n in counts.items() for h in range(n)]))
    return results


def counts_table(results: Sequence[LoFiTResult]) -> pd.DataFrame:
    frames = [layer_distribution(r).reset_index().assign(model=r.model_id, task=r.config.task,
                                                          seed=r.seed) for r in results]
    return pd.concat(frames, ignore_index=True)[["model", "task", "seed", "layer", "count",
                                                 "percent"]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(MODULE, __doc__, k=0.03, seed=False)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--paper-numbers", type=Path, default=default_paper_numbers(),
                   help="lofit_paper_numbers.json (default: ../shared/reference/)")
    args = p.parse_args(argv)
    log = RunLog(MODULE, args)
    results: list[LoFiTResult] = []
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        results += head_sets(model, args, args.k, args.seeds).values()
        log.lap(name, start)
        del model
    files = write_figure(plot_layer_distribution(results, title=f"Selected heads per layer "
                                                 f"(K = {args.k})"),
                         args.out / "layer_distribution")
    table = granularity_table(results)
    files.append(write_table(table, args.out / "granularity.csv"))
    files.append(write_table(counts_table(results), args.out / "layer_counts.csv", index=False))
    print(table[["k", "peak_layers", "frac_lower", "frac_middle", "frac_upper",
                 "n_segments"]].to_string())
    numbers = paper_numbers(args.paper_numbers)
    if numbers:
        paper = paper_results(numbers, args.tasks)
        files.append(write_table(granularity_table(paper), args.out / "paper_granularity.csv"))
        files += write_figure(plot_layer_distribution(paper, title="Paper Fig. 3 (3% heads)"),
                              args.out / "paper_layer_distribution")
    log.write(args.out, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
