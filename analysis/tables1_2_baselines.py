"""Tables 1/2 of the paper on a small model: 0-shot, ITI, random heads, ITI heads, LoFiT on
TruthfulQA (both folds), MQuAKE and CLUTRR, next to the paper's Llama-2-7B rows.

    python -m analysis.tables1_2_baselines [--model smollm2-135m] [--budget small]
        [--seeds 0] [--out analysis_out/protocol_comparison]

K = 3% of heads as in Table 1. ``--budget`` takes any budget of ``lofit_lens.budgets``:
``small`` (the default; CPU, about 30 minutes for SmolLM2 on 2 cores): epochs (1, 2), at
most 100 training examples, 100 test examples per task (50 questions per TruthfulQA fold).
``paper``: all data, 5 + 5 epochs, Table 6's lambda and learning rates (meant for a GPU).
Every run is cached under ``--out`` (an interrupted run resumes); the combined table goes to
``table.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

import lofit_lens as ll
from analysis.common import default_paper_numbers, paper_numbers
from lofit_lens import model_dims
from lofit_lens.budgets import BUDGETS, budget_help, budget_settings

METHODS = ("zero_shot", "iti", "random", "iti_heads", "lofit")
PAPER_ROWS = {"zero_shot": "0-shot", "iti": "ITI", "lofit": "LoFiT"}
PAPER_TABLE2 = {"random": "Random", "iti_heads": "ITI-heads", "lofit": "LoFiT"}
TASKS = {"truthfulqa": ("mc1", "mc2"), "mquake": ("exact_match",), "clutrr": ("exact_match",)}
K = 0.03
"""Table 1's K: 3% of the heads."""
DEFAULT_BUDGET = "small"


def run(model_name: str, budget: str, seeds: list[int], out: Path,
        tasks: Sequence[str] = tuple(TASKS)) -> tuple[pd.DataFrame, str]:
    """Every method on every task; writes and returns the table (long form) and table.md."""
    model = ll.load_model(model_name)
    total_heads = model_dims(model).total_heads
    rows = []
    for task in tasks:
        metrics = TASKS[task]
        start = time.perf_counter()
        frame = ll.compare(model, task, methods=METHODS, seeds=seeds, k=K, out=out / task,
                        **budget_settings(budget, task, K, total_heads))
        seconds = time.perf_counter() - start
        for _, row in frame.iterrows():
            for metric in metrics:
                rows.append({"task": task, "metric": metric, "method": row["method"],
                             "score": 100 * row[f"{metric}_mean"], "std": 100 * row[f"{metric}_std"],
                             "params": row["params"], "train_seconds": row["seconds"],
                             "task_wall_seconds": seconds})
    table = pd.DataFrame(rows)
    table.to_csv(out / "table.csv", index=False)
    text = markdown(table, model_name, budget, seeds)
    (out / "table.md").write_text(text)
    return table, text


def paper_rows() -> dict[str, dict[str, float]]:
    """Llama-2-7B numbers of Tables 1 and 2 keyed by our method names ({} without the file)."""
    numbers = paper_numbers(default_paper_numbers())
    if numbers is None:
        return {}
    t1, t2 = numbers["table1"], numbers["table2"]
    out: dict[str, dict[str, float]] = {}
    for ours, theirs in PAPER_ROWS.items():
        mc1, mc2, mquake, clutrr, _ = t1["Llama-2-7B"][theirs]
        out[ours] = {"truthfulqa/mc1": mc1, "truthfulqa/mc2": mc2, "mquake/exact_match": mquake,
                     "clutrr/exact_match": clutrr}
    columns = t2["columns"]
    for ours, theirs in PAPER_TABLE2.items():
        i = columns.index(theirs)
        row = out.setdefault(ours, {})
        row.setdefault("truthfulqa/mc1", t2["Llama-2-7B"]["TruthfulQA"][i])
        row.setdefault("mquake/exact_match", t2["Llama-2-7B"]["MQuAKE"][i])
        row.setdefault("clutrr/exact_match", t2["Llama-2-7B"]["CLUTRR"][i])
    return out


def markdown(table: pd.DataFrame, model_name: str, budget: str, seeds: list[int]) -> str:
    columns = [f"{t}/{m}" for t, ms in TASKS.items() for m in ms]
    paper = paper_rows()
    lines = [f"Model {model_name}, budget {budget}, seeds {seeds}. Scores in %.", "",
             "| method | params | " + " | ".join(columns) + " | paper Llama-2-7B (same columns) |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |"]
    for method in METHODS:
        sub = table[table.method == method]
        cells = []
        for col in columns:
            task, metric = col.split("/")
            hit = sub[(sub.task == task) & (sub.metric == metric)]
            cells.append("-" if hit.empty else f"{hit.score.iloc[0]:.1f}"
                         + (f" ± {hit['std'].iloc[0]:.1f}" if len(seeds) > 1 else ""))
        params = sub.params.iloc[0] if not sub.empty else "-"
        theirs = " / ".join(f"{paper.get(method, {}).get(c, '-')}" for c in columns)
        lines.append(f"| {method} | {params} | " + " | ".join(cells) + f" | {theirs} |")
    timing = table.groupby("task").task_wall_seconds.first()
    lines += ["", "Wall time per task (all methods, training and evaluation): "
              + ", ".join(f"{t} {s / 60:.1f} min" for t, s in timing.items())]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", choices=list(BUDGETS), default=DEFAULT_BUDGET,
                        help=f"lofit_lens.budgets (default {DEFAULT_BUDGET}): " + budget_help())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="analysis_out/protocol_comparison")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, text = run(args.model, args.budget, args.seeds, out, args.tasks)
    print(text)
    print(f"wrote {out / 'table.csv'} ({len(table)} rows)")


if __name__ == "__main__":
    main()
