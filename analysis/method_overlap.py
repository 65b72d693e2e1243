"""Do LoFiT, JoLA, ITI and bias-based selection pick the same heads?

Per model and task, four scores for every head, each the one its method ranks heads by:

* ``lofit``: ||A|| after LoFiT's step 1 (the shared cache of the figure modules);
* ``jola``: P(head edited) = 1 - (1 - P_A)(1 - P_v) from JoLA's gates, after its one-stage
  training (``lofit_lens.methods.jola``; ``epochs_bias`` epochs at ``lr_select``, l0
  weight ``--jola-l0-lambda``);
* ``iti``: the validation accuracy of ITI's per-head probe (honest_llama's splits on
  TruthfulQA under the official protocol, else a 4:1 split of the training questions);
  ties are broken by position, as ``iti``/``iti_heads`` break them;
* ``bias_based``: ||v|| after v is trained on every head with step 1's budget
  (``epochs_select`` epochs at ``lr_select``).

At equal K (``--ks``, default 3% and 10% of the heads) the top-K sets are compared pairwise with
``lofit_lens.analysis.overlap.head_overlap``: Jaccard ``|Ti & Tj| / K``, its expectation for
random K-sets, ``K / N``, and the hypergeometric p-value of an overlap at least this large.
The Spearman correlation of the full score maps gives a K-free view. JoLA's gates start at
random log-alphas; ``jola_vs_init`` (the Spearman correlation of its final scores with their
initial values) says how much of its ranking training made.

Writes to --out: ``pairs.csv`` (every model, task, K and method pair), ``scores.csv`` (every
head's four scores), ``jaccard_k<pct>.{html,png}`` (one heatmap per model and task, cells
"Jaccard (p)"; the diagonal is 1) and ``run_info.json``. The scores are computed by
``lofit_lens.analysis.method_scores``, as phases of the engine's store in --cache, so a rerun
resumes.

    python -m analysis.method_overlap --budget quick   # both embedded models, all three tasks
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from analysis.common import RunLog, load, parser, run_options, write_figure, write_table
from lofit_lens import LoFiTConfig, model_dims
from lofit_lens.analysis.method_scores import METHODS, method_scores, overlap_rows
from lofit_lens.analysis.plotting import plot_method_overlap
from lofit_lens.methods.jola import JoLAOptions
from lofit_lens.training import resolve_run

MODULE = "method_overlap"
DEFAULT_KS = (0.03, 0.1)


def figure(pairs: pd.DataFrame, fraction: float, models: Sequence[str],
           tasks: Sequence[str]):
    """Jaccard heatmaps of ``METHODS`` (rows: models, columns: tasks) at K = ``fraction``,
    cells "J (p)" (``plotting.plot_method_overlap``)."""
    return plot_method_overlap(pairs, fraction, models, tasks, METHODS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser(MODULE, __doc__, k=None)
    p.add_argument("--ks", type=float, nargs="+", default=list(DEFAULT_KS),
                   help="head fractions (or counts >= 1) at which the top-K sets are compared "
                        "(default 0.03 0.1)")
    p.add_argument("--jola-l0-lambda", type=float, default=JoLAOptions.l0_lambda)
    args = p.parse_args(argv)
    options = JoLAOptions(l0_lambda=args.jola_l0_lambda)
    log = RunLog(MODULE, args)
    overrides, per_task = run_options(args)
    all_pairs, all_scores, records = [], [], {}
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        dims = model_dims(model)
        for task_name in args.tasks:
            task, cfg = resolve_run(task_name, None, {**overrides, **per_task[task_name],
                                                      "seed": args.seed})
            scores, recorded = method_scores(model, task, cfg, args.cache, options, not args.quiet)
            records[f"{name}/{task_name}"] = recorded
            for method, s in scores.items():
                for (layer, head), value in np.ndenumerate(s.numpy()):
                    all_scores.append({"model": name, "task": task_name, "method": method,
                                       "layer": layer, "head": head, "score": float(value)})
            for k in args.ks:
                n = LoFiTConfig(k=int(k) if k >= 1 else k).num_heads(dims.total_heads)
                all_pairs.append(overlap_rows(scores, cfg, name, task_name, n).assign(k_setting=k))
            log.lap(f"{name}/{task_name}", start)
            start = time.perf_counter()
    pairs = pd.concat(all_pairs, ignore_index=True)
    files = [write_table(pairs, args.out / "pairs.csv", index=False),
             write_table(pd.DataFrame(all_scores), args.out / "scores.csv", index=False)]
    for k in args.ks:
        fig = figure(pairs[pairs.k_setting == k], k, args.models, args.tasks)
        files += write_figure(fig, args.out / f"jaccard_k{int(round(100 * k)) if k < 1 else int(k)}")
    log.info["method_records"] = records
    log.write(args.out, files)
    off = pairs[pairs.method_i != pairs.method_j]
    print(off[["model", "task", "k", "method_i", "method_j", "jaccard", "expected_random",
               "p_value", "spearman"]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
