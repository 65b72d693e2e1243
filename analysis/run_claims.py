"""The paper's claims as tested hypotheses, per model: docs/claims.md's tables.

    python -m analysis.run_claims --models smollm2-135m gemma3-270m --budget claims-quick \\
        --out analysis_out/claims

For each model (``lofit_lens.analysis.claims.replicate_claims``): LoFiT's head selection on
every task of ``--tasks`` and ``--selection-tasks`` for every seed of ``--seeds``; on every
``--tasks`` task and seed, bias tuning on LoFiT's heads, random heads, ITI's heads and each
other task's heads, ITI and 0-shot, each evaluated on the seed's own random test subset (the
seeds' subsets are disjoint). Then the five claims are tested (exact McNemar for exact match
and MC1, a paired permutation test for MC2, the paper's paired bootstrap beside them; Holm
within each claim's matrix and across a model's claims; the n needed for 80% power).

Writes to ``--out``: ``<model>/{claims,details,accuracy,selections,stability}.csv`` and
``<model>/claims.md`` after each model (so a finished model's report survives a later
interruption), then ``claims.csv``, ``details.csv``, ``accuracy.csv``, ``selections.csv``,
``stability.csv`` and ``claims.md`` of all models, and ``run_info.json``.

``--budget claims-quick`` (default; ``lofit_lens.budgets``): K = 10%, 40 training examples,
epochs 1 + 2, 80 test examples per seed (3 seeds: 240 per task), for a 2-core CPU.
``--budget claims-paper``: the paper's K = 3% and protocol, the whole test split cut into one
subset per seed, for a GPU. Every cell is cached under ``--cache`` (shared with the figure
modules): rerunning the command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence, Union

from analysis.common import RunLog, TASKS, load, parser
from lofit_lens import ClaimsReport, replicate_claims
from lofit_lens.analysis.claims_data import DEFAULT_SELECTION_TASKS, DEFAULT_TASKS
from lofit_lens.config import config_overrides
from lofit_lens.store import slug

MODULE = "run_claims"
BUDGET_FLAGS = ("max_train_examples", "max_eval_examples", "epochs")


def _k(text: str) -> Union[int, float]:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def add_design_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The claims' design: budget claims-quick, the seeds, K and the test subset size."""
    p.set_defaults(budget="claims-quick", tasks=list(DEFAULT_TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="default 0 1 2; the claims need at least 2, and 3 or more for the claims "
                        "about head selection")
    p.add_argument("--k", type=_k, help="heads: a count or a share (default: the budget's)")
    p.add_argument("--n-test", type=int,
                   help="test examples per seed (default: the budget's max_eval_examples; the "
                        "seeds' subsets are disjoint)")
    return p


def design_options(args) -> dict:
    """``replicate_claims`` / ``claim_figures`` keywords from the command line: the budget and
    its overrides, seeds, K, test size, and each task's data options."""
    task_overrides = {}
    more = [*getattr(args, "selection_tasks", []), *getattr(args, "sources", [])]
    for task in dict.fromkeys([*args.tasks, *more]):
        extra = {"data_dir": args.data_dir} if args.data_dir else {}
        if task == "truthfulqa":
            extra["fold"] = args.truthfulqa_fold
        if extra:
            task_overrides[task] = {"extra": extra}
    return {"budget": args.budget, "seeds": args.seeds, "cache_dir": args.cache, "k": args.k,
            "n_test": args.n_test, "task_overrides": task_overrides,
            "progress": not args.quiet, "log": lambda message: print(message, flush=True),
            **config_overrides(args, BUDGET_FLAGS), "protocol": args.protocol}


def build_parser() -> argparse.ArgumentParser:
    p = add_design_arguments(parser(MODULE, __doc__, k=None, seed=False, out="claims"))
    p.add_argument("--selection-only", action="store_true",
                   help="head selections only (claims 3 and 4): no task is evaluated")
    p.add_argument("--selection-tasks", nargs="+", default=list(DEFAULT_SELECTION_TASKS),
                   choices=TASKS, help="tasks whose head sets claims 3 and 4 compare (selection "
                                       "only; --tasks are always included; default all three)")
    p.add_argument("--beyond", nargs="+", default=[], metavar="METHOD",
                   help="methods beyond the paper's (e.g. jola reft repe) run on the same seeds "
                        "and test subsets and compared with LoFiT (two-sided paired tests)")
    p.add_argument("--no-transfer", dest="transfer", action="store_false",
                   help="skip claim 2's transfer cells (v tuned on another task's heads): "
                        "claim 2 is not tested, and each task and seed needs one tuning less "
                        "per other task")
    p.add_argument("--n-permutations", type=int, default=20_000)
    p.add_argument("--n-bootstrap", type=int, default=2000)
    return p


def run(args) -> ClaimsReport:
    log = RunLog(MODULE, args)
    reports, files = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        start = time.perf_counter()
        model = load(name, args)
        log.lap(f"load {name}", start)
        start = time.perf_counter()
        report = replicate_claims(
            model, tasks=[] if args.selection_only else args.tasks,
            selection_tasks=args.selection_tasks, n_bootstrap=args.n_bootstrap,
            n_permutations=args.n_permutations, beyond=args.beyond,
            transfer=args.transfer, **design_options(args))
        log.lap(f"claims {name}", start)
        files += report.save(args.out / slug(name))
        reports.append(report)
        del model
    combined = ClaimsReport.concat(reports)
    files += combined.save(args.out)
    log.info["settings"] = combined.settings
    log.write(args.out, files)
    return combined


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print(report.claims[["claim", "model", "contrast", "n", "effect", "p", "p_holm", "verdict"]]
          .to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
