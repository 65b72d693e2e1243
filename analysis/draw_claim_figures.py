"""Fig. 2, 4 and 5 with 95% confidence intervals, from the cells of the claims.

    python -m analysis.draw_claim_figures --models smollm2-135m gemma3-270m \\
        --out analysis_out/claim_figures

The design of ``python -m analysis.run_claims`` (``lofit_lens.analysis.claim_figures``). With the
same ``--cache``, ``--budget``, ``--seeds``, ``--k``, ``--n-test``, ``--protocol``,
``--truthfulqa-fold``, ``--data-dir`` and budget flags (``--max-train-examples``,
``--max-eval-examples``, ``--epochs``), its cells are read back and only the points the
claims do not hold are computed. Cells run one after another in this process
(``--executor`` is not used):

* Fig. 2: v tuned on each ``--tasks`` task with the heads selected on each task of
  ``--sources`` and ``--tasks`` (same seed), or K random heads; each cell against its
  column's same-task cell (exact McNemar, one-sided; Holm across the matrix).
* Fig. 5: v tuned on the top K heads for each fraction of ``--fractions``; Fig. 4: both
  steps on each size of ``--sizes``. Each point against the budget's K / training size
  (exact McNemar, two-sided; Holm across the model's sweep).

Every accuracy is pooled over the seeds' disjoint test subsets with a Wilson 95% interval.
Writes to ``--out``: ``transfer.csv``, ``k_sweep.csv``, ``data_efficiency.csv`` (per seed and
pooled), ``fig2_transfer_<model>``, ``fig5_k_sweep`` and ``fig4_data_efficiency`` (HTML and
PNG), per model under ``<model>/`` as each model finishes, then for all models, and
``run_info.json``.

``--budget claims-quick`` (default): K = 10%, 40 training examples, epochs 1 + 2, 80 test
examples per seed; K = 3, 10, 50% and 16, 40 training examples.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from analysis.run_claims import add_design_arguments, design_options
from analysis.common import RunLog, TASKS, load, parser, write_figure
from lofit_lens import ClaimFigures, claim_figures
from lofit_lens.analysis.claim_figures import FRACTIONS, SIZES
from lofit_lens.analysis.claims_data import DEFAULT_SELECTION_TASKS
from lofit_lens.store import slug

MODULE = "draw_claim_figures"


def build_parser():
    p = add_design_arguments(parser(MODULE, __doc__, k=None, seed=False, out="claim_figures"))
    p.add_argument("--sources", nargs="+", default=list(DEFAULT_SELECTION_TASKS), choices=TASKS,
                   help="tasks whose heads Fig. 2 transfers (--tasks always; default all three)")
    p.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS),
                   help="Fig. 5: shares of heads (default 0.03 0.1 0.5; none: --fractions with "
                        "no value)")
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES),
                   help="Fig. 4: training-set sizes (default 16 40)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log = RunLog(MODULE, args)
    parts, files = [], []
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        part = claim_figures(model, tasks=args.tasks, sources=args.sources,
                             fractions=args.fractions, sizes=args.sizes, **design_options(args))
        log.lap(f"figures {name}", start)
        files += save(part, args.out / slug(name))
        parts.append(part)
        del model
    combined = ClaimFigures.concat(parts)
    files += save(combined, args.out)
    log.info["settings"] = combined.settings
    log.write(args.out, files)
    pooled = combined.transfer[combined.transfer["seed"] == "pooled"]
    print(pooled[["model", "task", "source", "n", "accuracy", "ci_low", "ci_high", "p_holm",
                  "mark"]].to_string(index=False))
    return 0


def save(figures: ClaimFigures, out: Path) -> list[Path]:
    """The tables, then each figure as HTML + PNG (``write_figure``: HTML only, with a warning,
    without a browser for PNG)."""
    files = figures.save(out, formats=())
    for stem, fig in figures.figures().items():
        files += write_figure(fig, out / stem)
    return files


if __name__ == "__main__":
    sys.exit(main())
