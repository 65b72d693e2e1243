"""The measured effect of the protocol: zero-shot and LoFiT under ``official`` and ``clean``.

    python -m analysis.protocol_effect [--model smollm2-135m] [--seed 0] [--budget protocol]
        [--out analysis_out/protocol_effect]

For each paper task, one LoFiT run per protocol with the same seed, K (10% of the heads) and
budget, and the zero-shot score of the same test examples. ``--budget`` takes any budget of
``lofit_lens.budgets``; the default, ``protocol``, is the quick one with a larger test set
(200 examples, 50 TruthfulQA questions of fold 0): 80 training examples, step 1 for 1 epoch,
step 2 for 3 epochs at lr 5e-2, no validation. Writes ``table.md`` and ``table.csv``;
docs/protocol.md quotes them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

import lofit_lens as ll
from lofit_lens.budgets import BUDGETS, budget_help, budget_settings
from lofit_lens.tasks.base import PROTOCOLS

TASKS = ("clutrr", "mquake", "truthfulqa")
K = 0.1
DEFAULT_BUDGET = "protocol"


def run(model, seed: int, tasks=TASKS, progress: bool = True,
        budget: str = DEFAULT_BUDGET) -> pd.DataFrame:
    rows = []
    total_heads = ll.model_dims(model).total_heads
    for task in tasks:
        for protocol in PROTOCOLS:
            start = time.perf_counter()
            result = ll.lofit(model, task, k=K, seed=seed, protocol=protocol, progress=progress,
                              **budget_settings(budget, task, K, total_heads))
            metric = "exact_match" if "exact_match" in result.metrics["lofit"]["test"] else "mc2"
            for label in ("zero_shot", "lofit"):
                m = result.metrics[label]["test"]
                rows.append({"task": task, "protocol": protocol, "method": label,
                             "metric": metric, "score": 100 * m[metric],
                             **({"mc1": 100 * m["mc1"]} if metric == "mc2" else {}),
                             "n": m["n"], "minutes": round((time.perf_counter() - start) / 60, 1)})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    table = frame.pivot_table(index=["task", "method"], columns="protocol", values="score")
    lines = ["| task | metric | method | official | clean | official - clean | n |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (task, method), row in table.iterrows():
        sub = frame[(frame.task == task) & (frame.method == method)]
        lines.append(f"| {task} | {sub.metric.iloc[0]} | {method} | {row['official']:.1f} | "
                     f"{row['clean']:.1f} | {row['official'] - row['clean']:+.1f} | {sub.n.iloc[0]} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", choices=list(BUDGETS), default=DEFAULT_BUDGET,
                        help=f"lofit_lens.budgets (default {DEFAULT_BUDGET}): " + budget_help())
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--out", default="analysis_out/protocol_effect")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    model = ll.load_model(args.model)
    ll.doctor(model, fast=True).raise_if_failed()
    frame = run(model, args.seed, args.tasks, progress=not args.quiet, budget=args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "table.csv", index=False)
    text = markdown(frame)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
