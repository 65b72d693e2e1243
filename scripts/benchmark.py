"""Speed and memory of LoFiT's hot paths on a real model (default: embedded SmolLM2).

    python scripts/benchmark.py [--model smollm2-135m] [--task clutrr] [--repeats 5] [--out bench.json]

Measures, on real task batches (batch 8, the task's own prompts):
- step 1 (A on all heads + L1) and step 2 (v on 10% of heads) forward+backward+AdamW time;
- teacher-forced validation forward time per batch;
- greedy generation throughput (examples/s, batch 16, KV cache, intervention attached);
- peak resident memory of the process.
Medians over ``--repeats`` after one warm-up. Prints a table and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

import lofit_lens as ll
from lofit_lens.hooked import model_dims
from lofit_lens.intervention import HeadIntervention
from lofit_lens.objectives import build_objective
from lofit_lens.run_cache import random_heads
from lofit_lens.training import train_intervention


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model, objective, intervention: HeadIntervention, l1: float):
    """One optimizer step of the library's own loop (one batch: the whole objective)."""
    return lambda: train_intervention(model, intervention, objective, None, epochs=1, lr=1e-3,
                                      l1_lambda=l1, batch_size=len(objective), seed=0,
                                      progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="clutrr")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()

    start = time.perf_counter()
    model = ll.load_model(args.model, device="cpu")
    load_seconds = time.perf_counter() - start
    task = ll.get_task(args.task)
    train = task.training_examples(task.train_examples(seed=0, max_examples=8))
    objective = build_objective(model, train, dpo_beta=0.5)
    rows = list(range(len(objective)))
    dims = model_dims(model)

    select = HeadIntervention(dims, use_bias=False).set_heads(None).init_normal(1e-3)
    heads = random_heads(dims, round(0.1 * dims.total_heads), seed=0)
    tune = HeadIntervention(dims, use_scale=False).set_heads(heads).init_normal(1e-3)

    def validate():
        with torch.no_grad(), tune.attach(model):
            objective.loss(model, rows)

    examples = task.eval_examples("test", args.eval_examples)
    gen_seconds = _median_seconds(lambda: ll.evaluate(model, task, examples, tune, progress=False),
                                  max(1, args.repeats // 2))
    results = {
        "model": args.model, "task": args.task, "batch_size": len(rows),
        "tokens_per_batch": int(sum(len(p) + len(c) for p, c in getattr(objective, "pairs", []))),
        "load_model_seconds": round(load_seconds, 2),
        "step1_select_seconds": round(_median_seconds(_train_step(model, objective, select, 1e-3), args.repeats), 3),
        "step2_bias_seconds": round(_median_seconds(_train_step(model, objective, tune, 0.0), args.repeats), 3),
        "validation_batch_seconds": round(_median_seconds(validate, args.repeats), 3),
        "eval_examples_per_second": round(len(examples) / gen_seconds, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    for key, value in results.items():
        if key != "machine":
            print(f"{key:28s} {value}")
    print(f"{'machine':28s} {results['machine']}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
