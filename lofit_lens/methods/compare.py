"""``compare``: LoFiT and its baselines on one task, one row per method (LoFiT Tables 1-3).

Every (method, seed, fold) run is trained and evaluated through the run engine
(``lofit_lens.engine``): with ``out``, its phases are saved in ``out`` as they finish, and a
later call (or ``ll.lofit(checkpoint=out)``, or an analysis with ``cache_dir=out``) with the
same settings reads them back instead of computing them again. Each run's record is also
written to ``out/runs/<method>[-fold<f>]-seed<s>.json`` (``load_intervention`` rebuilds its
intervention).
TruthfulQA given by name runs folds 0 and 1 (unless ``extra`` fixes a fold); its metrics are
averaged over the folds per seed, then over seeds. A seed-independent method (``zero_shot``)
runs for the first seed only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from lofit_lens import engine
from lofit_lens.backends.hooked import model_id
from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.config import LoFiTConfig, parse_epochs
from lofit_lens.errors import ArtifactError, ConfigError
from lofit_lens.eval.evaluate import example_scores
from lofit_lens.executors import Executor, ExecutorLike, get_executor
from lofit_lens.intervention import Intervention, rebuild_intervention
from lofit_lens.methods.base import (
    METHODS, Method, MethodOptions, RunContext, check_methods, get_method, option_keywords,
    register_method, split_options,
)
from lofit_lens.methods.runs import rebuilt, trained_method
from lofit_lens.stats import bootstrap_ci, wilson_ci
from lofit_lens.store import (
    jsonable, load_artifact, load_card, save_artifact, shared_write_lock, write_text,
)
from lofit_lens.training import TaskLike, resolve_run

RUN_KIND = "compare_run"
COUNTS = ("n", "truncated_prompts")
"""Metrics that count examples rather than score them: not averaged into the table."""
DEFAULT_METHODS = ("zero_shot", "iti", "random", "iti_heads", "lofit")
Cell = dict[str, Any]


def compare(
    model,
    task: TaskLike,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0,),
    k: Union[int, float] = 0.1,
    epochs: Union[int, tuple[int, int], None] = None,
    max_train_examples: Optional[int] = None,
    max_eval_examples: Optional[int] = None,
    out: Union[str, Path, None] = None,
    extra: Optional[dict[str, Any]] = None,
    progress: bool = True,
    executor: ExecutorLike = None,
    **overrides,
) -> pd.DataFrame:
    """Run ``methods`` x ``seeds`` (x TruthfulQA folds) and return the table.

    Columns: ``method``; per metric ``<m>`` ("mean ± std" over seeds, in %; the mean alone
    for one seed), ``<m>_mean`` and ``<m>_std`` (fractions; std is NaN for one seed), ``<m>_fold<f>`` (mean over seeds, TruthfulQA); ``params``
    (trainable parameters); ``seconds`` (mean training time per run, ITI probe fitting
    included, evaluation excluded); ``runs``. ``overrides``: ``LoFiTConfig`` fields and the
    methods' options as ``<method>_<field>`` (``iti_alpha``, ``lora_rank``, ``lora_lr``, ...;
    ``methods.base.option_keywords``).
    With ``out``: also ``compare.csv``, ``compare.md`` and the per-run JSON files.
    ``executor``: ``"local"`` (runs one after another here, the default), ``"ray"`` (each
    run a Ray task, its phases saved in ``out`` by the worker; this process writes the
    records) or an ``Executor`` (``lofit_lens.executors``).
    """
    check_methods(methods)
    options, overrides = split_options(overrides)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LoFiTConfig)})
    if unknown:
        raise ConfigError(f"Unknown compare keywords: {', '.join(unknown)} (neither LoFiTConfig "
                          f"fields nor method options: {', '.join(option_keywords())})")
    settings: dict[str, Any] = {"k": k, "max_train_examples": max_train_examples,
                                "max_eval_examples": max_eval_examples, **overrides}
    if epochs is not None:
        select, bias = parse_epochs(epochs)
        settings.update(epochs_select=select, epochs_bias=bias)
    out = Path(out).resolve() if out is not None else None
    run_cells = get_executor(executor)
    jobs: list[tuple[RunContext, str, Optional[int]]] = []
    for fold in _folds(task, extra):
        task_extra = dict(extra or {}) | ({} if fold is None else {"fold": fold})
        for seed in seeds:
            task_obj, cfg = resolve_run(task, None, {**settings, "seed": seed, "extra": task_extra})
            if not cfg.eval_splits:
                raise ValueError("compare needs an evaluation split (eval_splits is empty)")
            phases = None if out is None else PhaseCheckpoint(out)
            ctx = RunContext(model, task_obj, cfg, options, progress and run_cells.in_process,
                             phases)
            for name in methods:
                if not METHODS[name].seed_independent or seed == seeds[0]:
                    jobs.append((ctx, name, fold))
    if run_cells.in_process:
        cells = [_cell(ctx, name, fold, out) for ctx, name, fold in jobs]
    else:
        cells = _remote_cells(run_cells, model, jobs, out, progress)
    frame = summary_table(cells, methods)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "compare.csv", frame.to_csv(index=False))
        title = f"{cells[0]['task']} with {model_id(model)}, k={k}, seeds {list(seeds)}"
        write_text(out / "compare.md", f"# {title}\n\n{markdown_table(frame)}\n\n{NOTE}\n")
    return frame


NOTE = ("Metrics in %, mean ± std over seeds (TruthfulQA: mean over folds 0 and 1 per seed); "
        "params = trainable parameters; seconds = training time per run.")


def _folds(task: TaskLike, extra: Optional[dict[str, Any]]) -> list[Optional[int]]:
    if isinstance(task, str) and task.lower() == "truthfulqa":
        return [extra["fold"]] if extra and "fold" in extra else [0, 1]
    return [None]


def _cell(ctx: RunContext, name: str, fold: Optional[int], out: Optional[Path]) -> Cell:
    """One run's record: the method trained and evaluated through the engine (its phases
    read back from ``out`` when saved there), written to ``out/runs/<stem>.json``."""
    cell = run_record(ctx, name, fold)
    if out is not None:
        _write_record(ctx, name, fold, out, cell)
    return cell


def run_record(ctx: RunContext, name: str, fold: Optional[int]) -> Cell:
    """The method ``name`` trained on ``ctx`` and evaluated on each of its eval splits, both
    through the engine (``methods.runs.trained_method``, ``engine.evaluations``)."""
    trained = trained_method(ctx, name)
    evaluations = engine.evaluations(ctx.model, ctx.task, ctx.cfg, trained, ctx.phases,
                                     ctx.progress, name)
    value = trained.value
    return jsonable({
        "method": name, "task": ctx.task.name, "seed": ctx.cfg.seed, "fold": fold,
        "split": ctx.cfg.eval_splits[0],
        "metrics": {split: e.metrics for split, e in evaluations.items()},
        "params": value["params"], "seconds": value["seconds"],
        "eval_seconds": sum(e.seconds for e in evaluations.values()),
        "heads": value["heads"], "info": value["info"],
        "per_example": {split: example_scores(e.predictions) for split, e in evaluations.items()},
        "settings": {"model": model_id(ctx.model), "config": ctx.cfg.to_dict(),
                     "options": get_method(name).keywords(ctx.options_for(name))},
        "cached": trained.cached and all(e.cached for e in evaluations.values()),
        "trained": None if trained.path is None else trained.path.name,
    })


def _location(ctx: RunContext, name: str, fold: Optional[int], out: Path) -> tuple[Path, str]:
    tag = "" if fold is None else f"-fold{fold}"
    return out / "runs", f"{name}{tag}-seed{ctx.cfg.seed}"


def _write_record(ctx: RunContext, name: str, fold: Optional[int], out: Path, cell: Cell) -> None:
    """``out/runs/<method>[-fold<f>]-seed<s>.json``: the run's record for people and
    ``load_intervention`` (the engine's phases in ``out`` are the cache)."""
    folder, stem = _location(ctx, name, fold, out)
    with shared_write_lock(folder):
        save_artifact(folder, {}, cell, kind=RUN_KIND, name=stem)


@dataclass
class _RunItem:
    """One (method, seed, fold) run as an executor task (``_run_item``)."""

    task: Any
    cfg: LoFiTConfig
    options: dict[str, MethodOptions]
    name: str
    fold: Optional[int]
    phases: Optional[PhaseCheckpoint] = None
    method: Optional[Method] = None
    """The method's record: a method registered in this process only (a notebook, a plug-in
    file) is registered in the worker from it."""


def _run_item(model, item: _RunItem) -> Cell:
    """A run in a worker: its record (its phases go to the shared store; ITI probes are
    fitted once per run, not shared between methods)."""
    if item.method is not None and item.name not in METHODS:
        register_method(item.method)
    ctx = RunContext(model, item.task, item.cfg, item.options, progress=False,
                     phases=item.phases)
    return run_record(ctx, item.name, item.fold)


def _remote_cells(run_cells: Executor, model, jobs, out: Optional[Path],
                  progress: bool) -> list[Cell]:
    """The runs of ``jobs`` computed by ``run_cells``; their records written here."""
    items = [_RunItem(ctx.task, ctx.cfg, ctx.options, name, fold, ctx.phases, METHODS[name])
             for ctx, name, fold in jobs]
    cells = run_cells.map(_run_item, model, items, desc="compare runs", progress=progress)
    if out is not None:
        for (ctx, name, fold), cell in zip(jobs, cells):
            _write_record(ctx, name, fold, out, cell)
    return cells


def load_intervention(card_path: Union[str, Path]) -> Optional[Intervention]:
    """The intervention of a ``compare`` run (``runs/<stem>.json``), rebuilt from the
    engine's phase it names; ``None`` for the plain model (zero-shot). A record written
    before the engine (its intervention saved beside it) loads too."""
    card_path = Path(card_path)
    card = load_card(card_path, kind=RUN_KIND)
    if "trained" not in card and "intervention" in card:  # the intervention beside the card
        tensors, card = load_artifact(card_path.parent, kind=RUN_KIND, card_name=card_path.name)
        saved = card["intervention"]
        return None if saved is None else rebuild_intervention(saved["kind"], saved["spec"], tensors)
    if card.get("trained") is None:
        raise ArtifactError(f"{card_path} names no saved training: the run was made without "
                            f"out=, so nothing of it was saved")
    out = card_path.parent.parent
    tensors, phase = load_artifact(out, kind="phase", name=Path(card["trained"]).stem)
    return rebuilt({**phase["value"], **tensors})


def summary_table(cells: Sequence[Cell], methods: Sequence[str]) -> pd.DataFrame:
    """One row per method from run records (see ``compare`` for the columns).

    95% intervals, ``<m>_ci_low`` / ``<m>_ci_high`` (fractions), of the seed-mean score over
    the test examples (summed over TruthfulQA's folds; the seed spread is ``<m>_std``):
    Wilson for the 0/1 metrics (``exact_match``, ``mc1``), from the run's ``n``; a bootstrap
    over questions for the others (MC2, MC3), from the per-question scores a run keeps under
    ``per_example[split][m]`` (NaN when it kept none). ``frame.attrs["ci"]`` names the
    method per metric."""
    def wilson(p: float, n: int) -> tuple[float, float]:
        return wilson_ci(p * n, n) if n > 0 and np.isfinite(p) else (float("nan"), float("nan"))

    rows, how = [], {}
    for name in methods:
        mine = [c for c in cells if c["method"] == name]
        split = mine[0]["split"]
        names = [m for m, v in mine[0]["metrics"][split].items()
                 if m not in COUNTS and isinstance(v, (int, float))]  # not "match", a mode name
        folds = sorted({c["fold"] for c in mine if c["fold"] is not None})
        row: dict[str, Any] = {"method": name}
        for m in names:
            per_seed: dict[int, list[float]] = {}
            for c in mine:
                per_seed.setdefault(c["seed"], []).append(c["metrics"][split][m])
            values = np.array([np.mean(v) for v in per_seed.values()])
            mean = float(values.mean())
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[m] = f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
            for f in folds:
                row[f"{m}_fold{f}"] = float(np.mean([c["metrics"][split][m] for c in mine
                                                      if c["fold"] == f]))
            by_fold: dict[Any, list[Cell]] = {}
            for c in mine:
                by_fold.setdefault(c["fold"], []).append(c)
            if m in ("exact_match", "mc1"):
                n = sum(int(runs[0]["metrics"][split].get("n", 0)) for runs in by_fold.values())
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = wilson(mean, n)
                how[m] = "Wilson"
            else:
                kept = [[(c.get("per_example") or {}).get(split, {}).get(m) for c in runs]
                        for runs in by_fold.values()]
                if all(v is not None and len(v) for runs in kept for v in runs):
                    # per question: the mean over seeds; the folds' questions side by side
                    questions = np.concatenate([np.mean(np.array(runs, float), axis=0) for runs in kept])
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = bootstrap_ci(questions, n_bootstrap=2000)
                    how[m] = "bootstrap over questions"
                else:
                    row[f"{m}_ci_low"] = row[f"{m}_ci_high"] = float("nan")
                    how.setdefault(m, "none: the runs kept no per-question scores")
        row.update(params=int(mine[0]["params"]), seconds=float(np.mean([c["seconds"] for c in mine])),
                   runs=len(mine))
        rows.append(row)
    frame = pd.DataFrame(rows)
    shown = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    frame = frame[shown + [c for c in frame.columns if c not in shown]]  # method, "mean ± std" first
    frame.attrs["ci"] = how
    return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """The table as Markdown: method, "mean ± std" metrics, per-fold means (%), params,
    seconds (no ``tabulate`` needed), then each metric's 95% interval in % (its method in
    the header: Wilson for 0/1 metrics, bootstrap over questions for MC2/MC3; "-" where the
    runs kept no per-question scores)."""
    shown = [c for c in frame.columns
             if not pd.api.types.is_numeric_dtype(frame[c]) or "_fold" in c]
    shown += ["params", "seconds"]
    intervals = [c[:-len("_ci_low")] for c in frame.columns
                 if c.endswith("_ci_low") and f"{c[:-len('_ci_low')]}_ci_high" in frame.columns]
    how = frame.attrs.get("ci", {})

    def label(metric: str) -> str:
        kind = how.get(metric) or ("Wilson" if metric in ("exact_match", "mc1") else "bootstrap")
        return f"{metric} 95% CI ({'bootstrap' if kind.startswith('bootstrap') else kind.split(':')[0]})"

    def cell(column: str, value: Any) -> str:
        if "_fold" in column:
            return f"{100 * value:.1f}"
        if column == "params":
            return f"{int(value):,}"
        if column == "seconds":
            return f"{value:.1f}"
        return str(value)

    def interval(row, metric: str) -> str:
        low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
        return "-" if not (np.isfinite(low) and np.isfinite(high)) else f"[{100 * low:.1f}, {100 * high:.1f}]"

    header = shown + [label(m) for m in intervals]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([cell(c, row[c]) for c in shown] + [interval(row, m) for m in intervals])
              + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)
