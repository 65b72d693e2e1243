"""``lofit-lens`` on the command line: ``run`` (the main job), ``compare`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from lofit_lens.errors import BrokenEnvironmentError


def k_value(value: str):
    """``--k 27`` is a count, ``--k 0.1`` a fraction of all heads."""
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True,
                   help="clutrr | mquake | truthfulqa | path to a .jsonl/.csv task file")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded short name (smollm2-135m, gemma3-270m), Hub id or HF folder")
    p.add_argument("--k", type=k_value, default=0.1, help="heads: a count, or a fraction of all heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, nargs="+", metavar="N",
                   help="epochs for both steps, or two numbers: step 1, step 2 (default 2 3)")
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--max-val-examples", type=int, default=64,
                   help="val rows for the per-epoch validation loss (0 = none)")
    p.add_argument("--max-eval-examples", type=int, default=200,
                   help="test examples evaluated (default 200; 0 = all)")
    p.add_argument("--data-dir", help="folder with the LoFiT splits (default ../shared/datasets/lofit)")
    p.add_argument("--device")
    p.add_argument("--fold", type=int, help="TruthfulQA fold (0 or 1)")
    p.add_argument("--protocol", choices=("official", "clean"), default="official",
                   help="official: the authors' code point by point (default); clean: their "
                        "quirks removed (docs/protocol.md)")
    p.add_argument("--match", choices=("normalized", "exact", "prefix"),
                   help="answer matching for a task file (default normalized)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _task_options(args) -> dict:
    extra = {}
    if args.data_dir:
        extra["data_dir"] = args.data_dir
    if getattr(args, "fold", None) is not None:
        extra["fold"] = args.fold
    if getattr(args, "match", None) is not None:
        extra["match"] = args.match
    return extra


def _epochs(args):
    if not args.epochs:
        return None
    return args.epochs[0] if len(args.epochs) == 1 else tuple(args.epochs[:2])


def _checked_task(args):
    """The task, with its training data read: missing or malformed files fail here, before
    minutes go into loading a model."""
    from lofit_lens.tasks import get_task

    task = get_task(args.task, protocol=args.protocol, **_task_options(args))
    task.examples("train")
    return task


def _checked_model(args):
    """The model, after the fast doctor checks: a broken environment stops here, before
    any training, with ``BrokenEnvironmentError``."""
    import lofit_lens as ll

    model = ll.load_model(args.model, device=args.device)
    report = ll.doctor(model, fast=True).raise_if_failed()
    seconds = sum(c.seconds for c in report.checks)
    print(f"lofit-lens: doctor: {len(report.checks)} checks passed in {seconds:.1f} s", file=sys.stderr)
    return model


def cmd_doctor(args) -> int:
    import lofit_lens as ll

    report = ll.doctor(ll.load_model(args.model, device=args.device), fast=args.fast)
    print(report)
    return 0 if report.ok else 1


def cmd_run(args) -> int:
    import lofit_lens as ll
    from lofit_lens.plotting import plot_heads, save_figure

    out = Path(args.out or f"runs/{Path(args.task).stem}-{args.model.replace('/', '_')}-s{args.seed}")
    task = _checked_task(args)
    start = time.perf_counter()
    model = _checked_model(args)
    load_seconds = time.perf_counter() - start
    result = ll.lofit(
        model, task, k=args.k, seed=args.seed, epochs=_epochs(args), protocol=args.protocol,
        max_train_examples=args.max_train_examples, max_val_examples=args.max_val_examples,
        max_eval_examples=args.max_eval_examples or None,
        extra=_task_options(args), progress=not args.quiet, checkpoint=out / "checkpoint",
    )
    result.timings["load_model"] = load_seconds
    result.timings["total"] = time.perf_counter() - start
    result.save(out)
    metrics = run_metrics(result)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        figure_paths = save_figure(plot_heads(result), out / "heads")
    except RuntimeError as err:  # no browser for PNG: the HTML is written, results are safe
        print(f"lofit-lens: warning: {err}", file=sys.stderr)
        figure_paths = [out / "heads.html"]
    print(format_run(result, metrics, out, figure_paths))
    return 0


def run_metrics(result) -> dict:
    """``metrics.json``: zero-shot vs LoFiT on the first eval split, plus everything else."""
    split = result.config.eval_splits[0]
    return {
        "zero_shot": result.metrics.get("zero_shot", {}).get(split),
        "lofit": result.metrics.get("lofit", {}).get(split),
        "split": split,
        "protocol": result.config.protocol,
        "match": (result.metrics.get("lofit", {}).get(split) or {}).get("match"),
        "per_split": result.metrics,
        "k": result.k,
        "selected_heads": [f"L{l}H{h}" for l, h in result.selected_heads],
        "trainable_parameters": result.history["tune"].get("trainable_parameters"),
        "config": result.config.to_dict(),
        "model_id": result.model_id,
        "timings_seconds": {k: round(v, 1) for k, v in result.timings.items()},
        "versions": result.versions,
    }


def format_run(result, metrics: dict, out: Path, figures: Sequence[Path]) -> str:
    lines = [f"LoFiT on {result.config.task} with {result.model_id} (k={result.k}, seed={result.seed}, "
             f"protocol={result.config.protocol})"]
    for label in ("zero_shot", "lofit"):
        m = metrics.get(label)
        if m:
            scores = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
            lines.append(f"  {label:9s} {metrics['split']}: {scores}")
    lines.append(f"  heads: {', '.join(metrics['selected_heads'][:12])}"
                 + (" ..." if result.k > 12 else ""))
    lines.append(f"  time: {result.timings.get('total', 0):.0f} s; saved to {out} "
                 f"({', '.join(p.name for p in figures)})")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from lofit_lens.baselines.compare import compare, markdown_table

    _checked_task(args)
    model = _checked_model(args)
    frame = compare(model, args.task, methods=args.methods, seeds=args.seeds, k=args.k,
                    epochs=_epochs(args), max_train_examples=args.max_train_examples,
                    max_val_examples=args.max_val_examples,
                    max_eval_examples=args.max_eval_examples or None, out=args.out,
                    extra=_task_options(args), progress=not args.quiet, protocol=args.protocol)
    print(markdown_table(frame))  # pandas' to_markdown needs tabulate
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="zero-shot eval, head selection, bias tuning, eval")
    _add_run_args(run)
    run.add_argument("--out", help="output folder (default runs/<task>-<model>-s<seed>)")
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser("compare", help="baselines and LoFiT in one table")
    _add_run_args(comp)
    comp.add_argument("--methods", nargs="+", default=["zero_shot", "iti", "random", "iti_heads", "lofit"])
    comp.add_argument("--seeds", type=int, nargs="+", default=[0])
    comp.add_argument("--out", help="folder for the CSV/Markdown table and per-run results")
    comp.set_defaults(func=cmd_compare)
    doc = sub.add_parser("doctor", help="check that this environment computes correct results")
    doc.add_argument("--model", default="smollm2-135m",
                     help="embedded short name, Hub id or HF folder to check with")
    doc.add_argument("--device")
    doc.add_argument("--fast", action="store_true",
                     help="skip the comparison with plain HF generate (loads the model twice)")
    doc.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: say what, no traceback
        print(f"lofit-lens: error: {err}", file=sys.stderr)
        return 2
    except BrokenEnvironmentError as err:
        print(f"lofit-lens: {type(err).__name__}: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
