"""``lofit-lens`` on the command line: ``run`` (the main job), ``compare``, ``export`` and ``doctor``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
import time
from pathlib import Path
from typing import Optional, Sequence

from lofit_lens.budgets import BUDGETS, budget_help, budget_settings
from lofit_lens.config import (
    LoFiTConfig, add_config_arguments, config_flag_names, config_overrides, parse_k,
)
from lofit_lens.errors import (
    BrokenEnvironmentError, ConfigError, DataWarning, LoFiTLensError, OutputNotWritableError,
    SelectionQualityWarning, TrainingDivergedError,
)

CLI_DEFAULTS = {"max_eval_examples": 200}
"""The one place where ``run`` and ``compare`` default differently from ``LoFiTConfig``: they
evaluate at most 200 test examples (``LoFiTConfig``: all; ``--max-eval-examples 0``: all).
Every other default is the field's (k 0.1, seed 0, epochs 2 3, 64 val rows, official)."""

RUN_SETTINGS = config_flag_names()
"""The ``LoFiTConfig`` settings ``run`` takes as flags (``--epochs`` for both epochs)."""
COMPARE_SETTINGS = tuple(n for n in RUN_SETTINGS if n not in ("seed", "selection_bootstrap"))
"""``compare``'s: it has ``--seeds``, and no selection-quality diagnostic."""

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
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model dtype (default float32; the intervention's A and v train in "
                        "float32 either way, the loss is computed in float32)")
    p.add_argument("--device-map",
                   help="split the model over devices with accelerate: auto | balanced | "
                        "sequential | a JSON object of module -> device (docs/scale.md)")
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
    """The task, with its data read and checked: missing or malformed files, and with
    ``--strict-data`` duplicate rows or train/test overlap, fail here, before minutes go into
    loading a model (without it those give a ``DataWarning`` naming the rows)."""
    from lofit_lens.tasks import get_task
    from lofit_lens.tasks.hygiene import check_data

    task = get_task(args.task, protocol=cfg.protocol, **cfg.extra)
    with warnings.catch_warnings(record=True) as caught:  # said once, as a CLI line
        warnings.simplefilter("always", DataWarning)
        check_data(task, strict=cfg.strict_data)
    for warning in caught:
        print(f"lofit-lens: warning: {warning.message}", file=sys.stderr)
    return task


OUT_BYTES = 16 * 2**20
"""Free space ``run`` wants in ``--out`` before it starts: a run writes about 5 MB
(``heads.html`` embeds plotly.js; the result, predictions and checkpoints are small)."""


def _check_task_options(args) -> None:
    """``--match`` / ``--fold`` only for tasks that take them (a ``ConfigError`` here, not a
    raw ``TypeError`` from the task's constructor)."""
    import inspect

    from lofit_lens.tasks import list_tasks, registry
    from lofit_lens.tasks.file_task import FileTask

    name = str(args.task).lower()
    builtin = name in list_tasks()
    factory = registry._REGISTRY[name] if builtin else FileTask
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    if getattr(args, "match", None) is not None and "match" not in params:
        raise ConfigError(
            f"--match applies to task files only (.jsonl/.json/.csv); the built-in task "
            f"{args.task!r} scores answers its own way: drop --match")
    if getattr(args, "fold", None) is not None and "fold" not in params:
        raise ConfigError(f"--fold applies to truthfulqa only (its two folds); the task "
                          f"{args.task!r} has none: drop --fold")


def _checked_setup(args) -> None:
    """What can be checked in seconds before any data is read or model loaded: the device
    (``DeviceError``), the model name (``ModelNotFoundError``, ``MissingPackageError``, a
    read-only or full model cache: ``OutputNotWritableError``) and the task's options."""
    from lofit_lens.backends.hf import check_device, check_model_name

    _placement(args)  # --device with --device-map, a malformed map
    check_device(args.device)
    if getattr(args, "task", None) is not None:
        _check_task_options(args)
    check_model_name(args.model)


def _check_out(out: Optional[Path]) -> None:
    """``OutputNotWritableError`` now, before the model loads, when ``out`` cannot be
    written (read-only) or its disk lacks ``OUT_BYTES``."""
    from lofit_lens.disk import check_writable

    if out is not None:
        check_writable(out, OUT_BYTES, "choose another --out folder, or free space on its disk")


def _checked_model(args):
    """The model, after the fast doctor checks: a broken environment stops here, before
    any training, with ``BrokenEnvironmentError``."""
    import lofit_lens as ll

    model = ll.load_model(args.model, device=args.device, **_placement(args))
    report = ll.doctor(model, fast=True).raise_if_failed()
    seconds = sum(c.seconds for c in report.checks)
    print(f"lofit-lens: doctor: {len(report.checks)} checks passed in {seconds:.1f} s", file=sys.stderr)
    return model


def _placement(args) -> dict:
    """``load_model``'s dtype and device map from ``--dtype`` / ``--device-map`` (only those
    given, so a plain ``load_model(name, device=...)`` stays what it was)."""
    import torch

    extra = {}
    if getattr(args, "dtype", "float32") != "float32":
        extra["dtype"] = getattr(torch, args.dtype)
    device_map = getattr(args, "device_map", None)
    if device_map:
        try:
            extra["device_map"] = json.loads(device_map) if device_map.lstrip().startswith("{") \
                else device_map
        except json.JSONDecodeError as err:
            raise ConfigError(f"--device-map {device_map!r} is not valid JSON ({err}); give "
                              "auto, balanced, sequential or a JSON object") from None
        if args.device:
            raise ConfigError("--device and --device-map exclude each other: a device map "
                              "places every module itself; drop one of them")
    return extra


def cmd_doctor(args) -> int:
    import lofit_lens as ll

    _checked_setup(args)
    report = ll.doctor(ll.load_model(args.model, device=args.device, **_placement(args)),
                       fast=args.fast)
    print(report)
    return 0 if report.ok else 1


ATTACHMENTS = ("metrics.json", "heads.html", "heads.png")
"""Files ``run`` writes beside the result; they are removed with it when it is replaced."""


def _launch(args, argv: Sequence[str]) -> int:
    """``--num-processes N``: this same command in N processes under torchrun (what
    ``accelerate launch --num_processes N -m lofit_lens.cli run ...`` does too); returns the
    launcher's exit status."""
    import subprocess

    rest, skip = [], False
    for arg in argv:  # the command without --num-processes
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            rest.append(arg)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_processes)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.num_processes}", "-m", "lofit_lens.cli", *rest]
    print(f"lofit-lens: {args.num_processes} processes: {' '.join(command[1:])}", file=sys.stderr)
    return subprocess.call(command, env=env)


def _cmd_run_worker(args) -> int:
    """A data-parallel process of rank > 0: it trains its shard of every batch with rank 0
    and writes nothing (rank 0 evaluates, checkpoints and saves). It resumes from the phases
    rank 0's checkpoint held at the start, so both skip the same finished steps."""
    import dataclasses
    import shutil
    import tempfile

    import lofit_lens as ll
    from lofit_lens.backends.hooked import model_dims

    cfg = run_config(args)
    model_tag = args.model.replace("/", "_")
    out = Path(args.out or f"runs/{Path(args.task).stem}-{model_tag}-s{cfg.seed}")
    task = _checked_task(args, cfg)
    model = _checked_model(args)
    cfg = dataclasses.replace(run_config(args, model_dims(model).total_heads), eval_splits=())
    with tempfile.TemporaryDirectory(prefix="lofit-lens-rank-") as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        if (out / "checkpoint").is_dir():  # a read-only view: its own writes stay in scratch
            shutil.copytree(out / "checkpoint", checkpoint,
                            ignore=shutil.ignore_patterns("*.lock", "*.partial"))
        ll.lofit(model, task, config=cfg, zero_shot=False, progress=False, checkpoint=checkpoint)
    return 0


def cmd_run(args) -> int:
    from lofit_lens import distributed

    if getattr(args, "num_processes", 1) > 1 and not distributed.launched():
        return _launch(args, sys.argv[1:] if args.argv is None else args.argv)
    if distributed.init_from_env():  # started by accelerate launch / torchrun
        args.device = args.device or distributed.process_device()
        try:
            code = _cmd_run(args) if distributed.is_main() else _cmd_run_worker(args)
        except BaseException:
            distributed.shutdown(finished=False)
            raise
        distributed.shutdown()
        return code
    return _cmd_run(args)


def _cmd_run(args) -> int:
    import lofit_lens as ll
    from lofit_lens.backends.hooked import model_dims
    from lofit_lens.result import check_destination, run_identity
    from lofit_lens.store import folder_lock, write_text
    from lofit_lens.tasks.hygiene import check_data
    from lofit_lens.training import resolve_run

    cfg = run_config(args)  # bad settings stop here, before any loading
    _checked_setup(args)  # device, model name, task options: seconds, before any loading
    model_tag = args.model.replace("/", "_")
    out = Path(args.out or f"runs/{Path(args.task).stem}-{model_tag}-s{cfg.seed}")
    _check_out(out)  # a read-only or full --out stops here, not after training
    task = _checked_task(args, cfg)  # bad data stops here, before any folder is made
    with _cleaned_on_failure(out), folder_lock(out):  # a second run on it: OutputLockedError
        _, planned = resolve_run(task, cfg, {})  # the config lofit() will record
        check_destination(out, run_identity(args.model, planned), args.overwrite)
        start = time.perf_counter()
        model = _checked_model(args)
        load_seconds = time.perf_counter() - start
        cfg = run_config(args, model_dims(model).total_heads)
        with warnings.catch_warnings():  # said once, as a CLI line, at the end
            warnings.simplefilter("ignore", SelectionQualityWarning)
            result = ll.lofit(model, task, config=cfg, progress=not args.quiet,
                              checkpoint=out / "checkpoint")
        result.timings.load_model = load_seconds
        result.timings.total = time.perf_counter() - start
        result.save(out, overwrite=args.overwrite, attachments=ATTACHMENTS)
        metrics = run_metrics(result, data_checks=check_data(task))
        write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        try:
            from lofit_lens.analysis.plotting import plot_heads, save_figure

            figure_paths = save_figure(plot_heads(result), out / "heads")
        except ImportError as err:  # no plotly (a bare GPU image): the results are saved
            print(f"lofit-lens: warning: no heatmap ({err})", file=sys.stderr)
            figure_paths = []
        except RuntimeError as err:  # no browser for PNG: the HTML is written, results are safe
            print(f"lofit-lens: warning: {err}", file=sys.stderr)
            figure_paths = [out / "heads.html"]
        except OutputNotWritableError as err:  # a full disk: no truncated page is left
            raise OutputNotWritableError(f"{err}. The result and metrics.json are saved in "
                                         f"{out}; only the heatmap is missing") from err
    print(format_run(result, metrics, out, figure_paths))
    quality = result.selection_quality
    if quality is not None and quality.verdict == "noise":
        print(f"lofit-lens: warning: {quality.message()}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _cleaned_on_failure(out: Path):
    """On a failure in the body, remove the lock file this run made in ``out`` and, if the
    run made ``out`` itself, ``out`` too, when the run wrote nothing else there (finished
    phases' checkpoints stay, for a resume; files that were there stay)."""
    from lofit_lens.store import LOCK_NAME, remove_unused_folder

    made_folder, made_lock = not out.exists(), not (out / LOCK_NAME).exists()
    existing = set() if made_folder or not out.is_dir() else {p.name for p in out.iterdir()}
    try:
        yield
    except BaseException:
        if made_lock:
            remove_unused_folder(out, remove_folder=made_folder, existing=existing)
        raise


def cmd_export(args) -> int:
    from lofit_lens.result import LoFiTResult

    result = LoFiTResult.load(args.run_dir)
    base = args.model or result.model_id
    folder = result.export(base, args.out, source=args.run_dir, overwrite=args.overwrite,
                           allow_other_model=args.allow_other_model)
    onto = "" if base == result.model_id else f" onto {base}"
    print(f"lofit-lens: exported the run on {result.model_id}{onto} with v on {result.k} heads "
          f"to {folder} (loads with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0


def run_metrics(result, data_checks: Optional[dict] = None) -> dict:
    """``metrics.json``: zero-shot vs LoFiT on the first eval split, plus everything else;
    ``data_checks``: the task data's counts of duplicate rows and train/val and train/test
    overlap (``tasks.hygiene.check_data``)."""
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
        "data_checks": data_checks,
        "config": result.config.to_dict(),
        "model_id": result.model_id,
        "timings_seconds": {k: round(v, 1) for k, v in result.timings.to_dict().items()},
        "peak_cuda_memory_gib": peak_cuda_memory_gib(),
        "versions": result.versions,
        "selection_quality": None if result.selection_quality is None
        else result.selection_quality.to_dict(),
    }


def peak_cuda_memory_gib() -> Optional[float]:
    """The most CUDA memory this process allocated (``None`` without CUDA)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


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
    quality = result.selection_quality
    if quality is not None:
        lines.append(f"  selection: {quality.summary()}")
        if quality.verdict == "weak":
            lines.append(f"    ({quality.reason}; to be sure: {quality.advice})")
    lines.append(f"  time: {result.timings.total or 0:.0f} s; saved to {out} "
                 f"({', '.join(p.name for p in figures)})")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    from lofit_lens.methods.base import check_methods, option_keywords
    from lofit_lens.methods.compare import compare, markdown_table

    from lofit_lens.backends.hooked import model_dims

    cfg = run_config(args)  # bad settings stop here, before any loading
    check_methods(args.methods)  # an unknown method: named before the model loads
    _checked_setup(args)
    _check_out(Path(args.out) if args.out else None)
    _checked_task(args, cfg)
    model = _checked_model(args)
    settings = run_settings(args, model_dims(model).total_heads)
    options = {name: tuple(value) if isinstance(value, list) else value
               for name in option_keywords() if (value := getattr(args, name, None)) is not None}
    frame = compare(model, args.task, methods=args.methods, seeds=args.seeds, out=args.out,
                    progress=not args.quiet, **{**settings, "k": cfg.k}, **options)
    print(markdown_table(frame))  # pandas' to_markdown needs tabulate
    return 0


def _option_argument(hint) -> dict:
    """argparse ``type`` (and ``nargs``) for a method option's annotation: ``int``, ``float``,
    ``Optional[...]`` of them, ``Union[int, float]`` (a count or a share, read as ``--k``) and
    ``tuple[int, ...]`` (one or more numbers)."""
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(args) == 1 and typing.get_origin(args[0]) is tuple:
        return {"type": typing.get_args(args[0])[0], "nargs": "+"}
    if set(args) == {int, float}:
        return {"type": parse_k}
    return {"type": args[0]}


def _add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """A ``--<method>-<field>`` flag per field of every registered method's options, one
    group per method (help: the field's; default: ``None``, i.e. the field's default)."""
    import dataclasses
    import typing

    from lofit_lens.methods import METHODS

    for method in METHODS.values():
        fields = dataclasses.fields(method.options)
        if not fields:
            continue
        group = parser.add_argument_group(f"{method.name} options ({method.options.__name__})",
                                          method.doc)
        hints = typing.get_type_hints(method.options)
        for f in fields:
            dest = f"{method.name}_{f.name}"
            group.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None,
                               help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"),
                               **_option_argument(hints[f.name]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofit-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="zero-shot eval, head selection, bias tuning, eval")
    _add_run_args(run, RUN_SETTINGS)
    run.add_argument("--out", help="output folder (default runs/<task>-<model>-s<seed>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a different result already in --out (default: refuse)")
    run.add_argument("--num-processes", type=int, default=1, metavar="N",
                     help="data-parallel training in N processes (one per GPU; CPU processes "
                          "over gloo without GPUs), started with torchrun; the same as "
                          "`accelerate launch --num_processes N -m lofit_lens.cli run ...`. "
                          "Rank 0 evaluates and writes (docs/scale.md)")
    run.set_defaults(func=cmd_run)
    exp = sub.add_parser("export", help="write a run as a plain Hugging Face model folder")
    exp.add_argument("run_dir", help="a folder written by `lofit-lens run`")
    exp.add_argument("--out", required=True, help="the HF model folder to write")
    exp.add_argument("--model", help="base model (name or HF folder; default: the run's model). "
                     "It must have the run's head shape, and the run's weights unless "
                     "--allow-other-model")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace a non-empty --out as a whole, removing its old files "
                          "(default: refuse)")
    exp.add_argument("--allow-other-model", action="store_true",
                     help="fold the run into a base model whose weights differ from the ones "
                          "it was trained on (same head shape only)")
    exp.set_defaults(func=cmd_export)
    comp = sub.add_parser("compare", help="baselines and LoFiT in one table")
    _add_run_args(comp, COMPARE_SETTINGS)
    comp.add_argument("--methods", nargs="+", default=["zero_shot", "iti", "random", "iti_heads", "lofit"])
    comp.add_argument("--seeds", type=int, nargs="+", default=[0],
                      help="seeds of the seeded methods (default 0)")
    comp.add_argument("--out", help="folder for the CSV/Markdown table and per-run results")
    _add_option_arguments(comp)
    comp.set_defaults(func=cmd_compare)
    doc = sub.add_parser("doctor", help="check that this environment computes correct results")
    doc.add_argument("--model", default="smollm2-135m",
                     help="embedded short name, Hub id or HF folder to check with")
    doc.add_argument("--device")
    doc.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="model dtype: each check's tolerance follows it")
    doc.add_argument("--fast", action="store_true",
                     help="skip the comparison with plain HF generate (loads the model twice)")
    doc.set_defaults(func=cmd_doctor)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a record comes (``main`` may run more
    than once in a process, under a stderr that is swapped between runs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_phases() -> None:
    """Phases and epochs (``logging`` at INFO) on stderr, with or without progress bars."""
    logger = logging.getLogger("lofit_lens")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("lofit-lens: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # PyTorch's OpenMP threads spin-wait: with another process on the same cores a step is
    # 4-5x slower. Read when torch loads, so first: importing lofit_lens and this module
    # does not load torch (tests/test_package.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = build_parser().parse_args(argv)
    _log_phases()
    args.argv = None if argv is None else list(argv)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("lofit_lens")]):  # lines above the bars
            return args.func(args)
    except (LoFiTLensError, FileNotFoundError, ValueError) as err:  # say what, no traceback
        code = next(code for kind, code in EXIT_CODES if isinstance(err, kind))
        label = "error" if code == 2 else type(err).__name__
        print(f"lofit-lens: {label}: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
