"""Fig. 6, head-set similarity: how much LoFiT's head sets for different tasks overlap.

Per model: the top-K heads (paper: K = 3%) selected on each task with two seeds (the
diagonal compares seed 0 with seed 1), plus K random heads, compared by the paper's
Jaccard |Ti & Tj| / K and by the earth mover's distance between their per-layer
distributions (in layers); see lofit_lens.analysis.overlap. Across models (SmolLM2 vs Gemma, whose
heads cannot be matched), the seed-0 sets are compared on relative depth: a depth-bin
overlap and the EMD in units of the whole depth.

Writes to --out: jaccard_<model>/emd_<model>.{html,png,csv}, p_value_<model>.csv (more
overlap than chance, hypergeometric), pairs_<model>.csv, paper_comparison.csv (ours next to
the paper's Fig. 6), and with two or more models cross_model_{jaccard,emd_depth}.{html,png}
and cross_model_pairs.csv.

Only step 1 (head selection) runs here; selections are cached and shared with the other
modules. --budget quick (default) trains the scales on 40 examples for 1 epoch (6
selections per model); --budget paper on all training data for 5 epochs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from analysis.common import (
    PAPER_MODELS, PAPER_NAMES, RunLog, default_paper_numbers, head_sets, load, paper_numbers,
    parser, write_figure, write_table,
)
from lofit_lens import head_overlap, model_dims, model_id, paper_style_matrix, plot_overlap
from lofit_lens.analysis.cells import random_result
from lofit_lens.analysis.overlap import OverlapReport
from lofit_lens.store import slug

MODULE = "head_similarity"
SEEDS = (0, 1)


def long_matrix(report: OverlapReport, model: str) -> pd.DataFrame:
    """Jaccard and EMD (layers) of every ordered (row, col) pair of ``report``."""
    frames = {name: getattr(report, name).stack() for name in ("jaccard_paper", "emd_layers")}
    frame = pd.DataFrame(frames).rename_axis(["row", "col"]).reset_index()
    return frame.assign(model=model)


def paper_matrices(numbers: dict, labels: Sequence[str]) -> pd.DataFrame:
    """The paper's Fig. 6 in the same long form, restricted to ``labels``."""
    order = [PAPER_NAMES[t] for t in ("truthfulqa", "mquake", "clutrr", "random")]
    fig = numbers["figure6"]
    rows = [{"row": a, "col": b, "model": model,
             "jaccard_paper": fig["jaccard"][model][i][j],
             "emd_layers": fig["emd_layers"][model][i][j]}
            for model in PAPER_MODELS for i, a in enumerate(order) for j, b in enumerate(order)
            if a in labels and b in labels]
    return pd.DataFrame(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(MODULE, __doc__, k=0.03)
    p.add_argument("--n-permutations", type=int, default=1000,
                   help="random draws for the cross-model p-values")
    p.add_argument("--paper-numbers", type=Path, default=default_paper_numbers(),
                   help="lofit_paper_numbers.json (default: ../shared/reference/)")
    args = p.parse_args(argv)
    log = RunLog(MODULE, args)
    files, long, first_seed = [], [], []
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        sets = head_sets(model, args, args.k, SEEDS)
        n_heads = sets[args.tasks[0], 0].k
        by_task = {PAPER_NAMES[t]: [sets[t, s] for s in SEEDS] for t in args.tasks}
        by_task[PAPER_NAMES["random"]] = [random_result(model_dims(model), n_heads, args.seed,
                                                        model_id(model))]
        report = paper_style_matrix(by_task, n_permutations=args.n_permutations)
        tag = slug(name)
        for measure, fmt, scale in (("jaccard_paper", "{:.2f}", "Blues"),
                                    ("emd_layers", "{:.2f}", "Reds")):
            short = "jaccard" if measure == "jaccard_paper" else "emd"
            frame = getattr(report, measure)
            files.append(write_table(frame, args.out / f"{short}_{tag}.csv"))
            title = (f"{name}: {'Jaccard |Ti & Tj| / K' if short == 'jaccard' else 'EMD (layers)'}"
                     f", K={n_heads}, diagonal = seed 0 vs 1")
            files += write_figure(plot_overlap(frame, title, fmt, scale), args.out / f"{short}_{tag}")
        files.append(write_table(report.p_value, args.out / f"p_value_{tag}.csv"))
        files.append(write_table(report.pairs, args.out / f"pairs_{tag}.csv", index=False))
        print(f"{name}: Jaccard\n{report.jaccard_paper.round(2)}\nEMD\n{report.emd_layers.round(2)}")
        long.append(long_matrix(report, name))
        first_seed += [sets[t, 0] for t in args.tasks]
        log.lap(name, start)
        del model
    numbers = paper_numbers(args.paper_numbers)
    labels = [PAPER_NAMES[t] for t in (*args.tasks, "random")]
    table = pd.concat(long + ([paper_matrices(numbers, labels)] if numbers else []))
    wide = table.pivot_table(index=["row", "col"], columns="model", sort=False,
                             values=["jaccard_paper", "emd_layers"])
    wide.columns = [f"{model} {measure}" for measure, model in wide.columns]
    files.append(write_table(wide, args.out / "paper_comparison.csv"))
    if len(args.models) > 1:
        files += cross_model(first_seed, args)
    log.write(args.out, files)
    return 0


def cross_model(results, args) -> list[Path]:
    """Seed-0 head sets of all models compared on relative depth."""
    labels = [f"{r.model_id}/{r.config.task}" for r in results]
    report = head_overlap(results, labels=labels, n_permutations=args.n_permutations)
    files = [write_table(report.pairs, args.out / "cross_model_pairs.csv", index=False)]
    files += write_figure(plot_overlap(report.jaccard_paper, "Across models: depth-bin overlap "
                                       "(same model: Jaccard |Ti & Tj| / K)"),
                          args.out / "cross_model_jaccard")
    files += write_figure(plot_overlap(report.emd_depth, "Across models: EMD of relative "
                                       "depth (fraction of the depth)", colorscale="Reds"),
                          args.out / "cross_model_emd_depth")
    return files


if __name__ == "__main__":
    sys.exit(main())
