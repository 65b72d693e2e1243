"""``lofit-lens`` on the command line: ``run`` (the main job), ``compare``, ``export`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from lofit_lens.budgets import BUDGETS, budget_help, budget_settings
from lofit_lens.config import (
    LoFiTConfig, add_config_arguments, config_flag_names, config_overrides,
)
from lofit_lens.errors import BrokenEnvironmentError, LoFiTLensError, TrainingDivergedError

CLI_DEFAULTS = {"max_eval_examples": 200}
"""The one place where ``run`` and ``compare`` default differently from ``LoFiTConfig``: they
evaluate at most 200 test examples (``LoFiTConfig``: all; ``--max-eval-examples 0``: all).
Every other default is the field's (k 0.1, seed 0, epochs 2 3, 64 val rows, official)."""

RUN_SETTINGS = config_flag_names()
"""The ``LoFiTConfig`` settings ``run`` takes as flags (``--epochs`` for both epochs)."""
COMPARE_SETTINGS = tuple(n for n in RUN_SETTINGS if n != "seed")  # compare: --seeds

EXIT_CODES = ((BrokenEnvironmentError, 3), (TrainingDivergedError, 4), (LoFiTLensError, 2),
              (FileNotFoundError, 2), (ValueError, 2))
"""Exit status per error: bad input (settings, task files, artifacts, an output folder in
use or holding another result) 2, a broken environment 3, a diverged training 4."""


def _add_run_args(p: argparse.ArgumentParser, settings: tuple[str, ...]) -> None:
    p.add_argument("--task", required=True,
                   help="clutrr | mquake | truthfulqa | path to a .jsonl/.csv task file")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded short name (smollm2-135m, gemma3-270m), Hub id or HF folder")
    p.add_argument("--budget", choices=list(BUDGETS),
                   help="set the run's size from lofit_lens.budgets (flags given override "
                        "it): " + budget_help())
    group = p.add_argument_group("settings (LoFiTConfig fields; default: the field's, or "
                                 "the --budget's)")
    add_config_arguments(group, settings, fallbacks=CLI_DEFAULTS)
    p.add_argument("--data-dir", help="folder with the LoFiT splits (default ../shared/datasets/lofit)")
    p.add_argument("--device")
    p.add_argument("--fold", type=int, help="TruthfulQA fold (0 or 1)")
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


def run_settings(args, total_heads: Optional[int] = None) -> dict:
    """The ``LoFiTConfig`` overrides of ``run`` / ``compare``: ``CLI_DEFAULTS``, then the
    ``--budget``'s, then the flags given, and the task options. The paper budget's step-2
    rate for K >= 10% of the heads needs ``total_heads`` when K is a count (before the
    model loads, the K = 3% rate stands in)."""
    names = RUN_SETTINGS if args.command == "run" else COMPARE_SETTINGS
    given = config_overrides(args, names)
    settings = dict(CLI_DEFAULTS)
    if args.budget:
        k = given.get("k", LoFiTConfig.k)
        known = total_heads is not None or (isinstance(k, float) and 0 < k < 1)
        settings.update(budget_settings(args.budget, args.task, k if known else None,
                                        total_heads))
    settings.update(given)
    settings["extra"] = _task_options(args)
    return settings


def run_config(args, total_heads: Optional[int] = None) -> LoFiTConfig:
    """The run's ``LoFiTConfig`` (checked: a bad setting raises ``ConfigError`` here, before
    any data or model is loaded)."""
    return LoFiTConfig(task=args.task, **run_settings(args, total_heads))


def _checked_task(args, cfg: LoFiTConfig):
    """The task, with its training data read: missing or malformed files fail here, before
    minutes go into loading a model."""
    from lofit_lens.tasks import get_task

    task = get_task(args.task, protocol=cfg.protocol, **cfg.extra)
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


ATTACHMENTS = ("metrics.json", "heads.html", "heads.png")
"""Files ``run`` writes beside the result; they are removed with it when it is replaced."""


def cmd_run(args) -> int:
    import lofit_lens as ll
    from lofit_lens.analysis.plotting import plot_heads, save_figure
    from lofit_lens.backends.hooked import model_dims
    from lofit_lens.result import check_destination, run_identity
    from lofit_lens.store import folder_lock, write_text
    from lofit_lens.training import resolve_run

    cfg = run_config(args)  # bad settings stop here, before any loading
    model_tag = args.model.replace("/", "_")
    out = Path(args.out or f"runs/{Path(args.task).stem}-{model_tag}-s{cfg.seed}")
    task = _checked_task(args, cfg)  # bad data stops here, before any folder is made
    with folder_lock(out):  # a second run on the same folder stops here (OutputLockedError)
        _, planned = resolve_run(task, cfg, {})  # the config lofit() will record
        check_destination(out, run_identity(args.model, planned), args.overwrite)
        start = time.perf_counter()
        model = _checked_model(args)
        load_seconds = time.perf_counter() - start
        cfg = run_config(args, model_dims(model).total_heads)
        result = ll.lofit(model, task, config=cfg, progress=not args.quiet,
                          checkpoint=out / "checkpoint")
        result.timings.load_model = load_seconds
        result.timings.total = time.perf_counter() - start
        result.save(out, overwrite=args.overwrite, attachments=ATTACHMENTS)
        metrics = run_metrics(result)
        write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        try:
            figure_paths = save_figure(plot_heads(result), out / "heads")
        except RuntimeError as err:  # no browser for PNG: the HTML is written, results are safe
            print(f"lofit-lens: warning: {err}", file=sys.stderr)
            figure_paths = [out / "heads.html"]
    print(format_run(result, metrics, out, figure_paths))
    return 0


def cmd_export(args) -> int:
    from lofit_lens.result import LoFiTResult

    result = LoFiTResult.load(args.run_dir)
    folder = result.export(args.model or result.model_id, args.out, source=args.run_dir)
    print(f"lofit-lens: exported {result.model_id} with v on {result.k} heads to {folder} "
          "(loads with transformers' AutoModelForCausalLM.from_pretrained)")
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
        "trainable_parameters": result.history.tune.trainable_parameters,
        "config": result.config.to_dict(),
        "model_id": result.model_id,
        "timings_seconds": {k: round(v, 1) for k, v in result.timings.to_dict().items()},
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
    lines.append(f"  time: {result.timings.total or 0:.0f} s; saved to {out} "
                 f"({', '.join(p.name for p in figures)})")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from lofit_lens.baselines.compare import compare, markdown_table

    from lofit_lens.backends.hooked import model_dims

    cfg = run_config(args)  # bad settings stop here, before any loading
    _checked_task(args, cfg)
    model = _checked_model(args)
    settings = run_settings(args, model_dims(model).total_heads)
    frame = compare(model, args.task, methods=args.methods, seeds=args.seeds, out=args.out,
                    progress=not args.quiet, **{**settings, "k": cfg.k})
    print(markdown_table(frame))  # pandas' to_markdown needs tabulate
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="zero-shot eval, head selection, bias tuning, eval")
    _add_run_args(run, RUN_SETTINGS)
    run.add_argument("--out", help="output folder (default runs/<task>-<model>-s<seed>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a different result already in --out (default: refuse)")
    run.set_defaults(func=cmd_run)
    exp = sub.add_parser("export", help="write a run as a plain Hugging Face model folder")
    exp.add_argument("run_dir", help="a folder written by `lofit-lens run`")
    exp.add_argument("--out", required=True, help="the HF model folder to write")
    exp.add_argument("--model", help="base model (name or HF folder; default: the run's model)")
    exp.set_defaults(func=cmd_export)
    comp = sub.add_parser("compare", help="baselines and LoFiT in one table")
    _add_run_args(comp, COMPARE_SETTINGS)
    comp.add_argument("--methods", nargs="+", default=["zero_shot", "iti", "random", "iti_heads", "lofit"])
    comp.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="seeds of the seeded methods (default 0)")
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
    except (LoFiTLensError, FileNotFoundError, ValueError) as err:  # say what, no traceback
        code = next(code for kind, code in EXIT_CODES if isinstance(err, kind))
        label = "error" if code == 2 else type(err).__name__
        print(f"lofit-lens: {label}: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
