"""``compare``: LoFiT and its baselines on one task, one row per method (LoFiT Tables 1-3).

Every (method, seed, fold) run is trained, evaluated on the first eval split and, with
``out``, saved as ``out/runs/<method>[-fold<f>]-seed<s>.{json,safetensors}`` (a store artifact:
the record and the method's intervention, reloadable with ``load_intervention``) before the
next one starts; a later call with the same settings loads those instead of re-running.
TruthfulQA given by name runs folds 0 and 1 (unless ``extra`` fixes a fold); its metrics are
averaged over the folds per seed, then over seeds. ``zero_shot`` runs for the first seed
only (it has no seed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from lofit_lens.checkpoint import PhaseCheckpoint
from lofit_lens.config import NON_RESULT_FIELDS, LoFiTConfig, parse_epochs
from lofit_lens.baselines.base import BaselineOptions, RunContext
from lofit_lens.baselines.methods import SEED_INDEPENDENT, get_method
from lofit_lens.eval.evaluate import example_scores, split_metrics
from lofit_lens.executors import Executor, ExecutorLike, get_executor
from lofit_lens.backends.hooked import model_id
from lofit_lens.intervention import Intervention, rebuild_intervention
from lofit_lens.intervals import bootstrap_ci, wilson_ci
from lofit_lens.store import (
    artifact_exists, folder_lock, jsonable, load_artifact, load_card, save_artifact,
    write_text,
)
from lofit_lens.run_settings import data_settings, eval_data_settings, model_settings
from lofit_lens.training import TaskLike, resolve_run, training_data

RUN_KIND = "compare_run"
COUNTS = ("n", "truncated_prompts")
"""Metrics that count examples rather than score them: not averaged into the table."""
DEFAULT_METHODS = ("zero_shot", "iti", "random", "iti_heads", "lofit")
Cell = dict[str, Any]

logger = logging.getLogger(__name__)


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
    included, evaluation excluded); ``runs``. ``overrides``: ``LoFiTConfig`` fields and
    ``BaselineOptions`` fields (``iti_alpha``, ``lora_rank``, ``lora_lr``, ...).
    With ``out``: also ``compare.csv``, ``compare.md`` and the per-run JSON files.
    ``executor``: ``"local"`` (runs one after another here, the default), ``"ray"`` (each
    run not already in ``out`` a Ray task; this process saves what they return) or an
    ``Executor`` (``lofit_lens.executors``).
    """
    for name in methods:
        get_method(name)
    option_names = {f.name for f in dataclasses.fields(BaselineOptions)}
    options = BaselineOptions(**{n: overrides.pop(n) for n in list(overrides) if n in option_names})
    settings: dict[str, Any] = {"k": k, "max_train_examples": max_train_examples,
                                "max_eval_examples": max_eval_examples, **overrides}
    if epochs is not None:
        select, bias = parse_epochs(epochs)
        settings.update(epochs_select=select, epochs_bias=bias)
    out = Path(out) if out is not None else None
    run_cells = get_executor(executor)
    jobs: list[tuple[RunContext, str, Optional[int]]] = []
    for fold in _folds(task, extra):
        task_extra = dict(extra or {}) | ({} if fold is None else {"fold": fold})
        for seed in seeds:
            task_obj, cfg = resolve_run(task, None, {**settings, "seed": seed, "extra": task_extra})
            if not cfg.eval_splits:
                raise ValueError("compare needs an evaluation split (eval_splits is empty)")
            phases = None if out is None else PhaseCheckpoint(out, lock=False)
            ctx = RunContext(model, task_obj, cfg, options, progress and run_cells.in_process,
                             phases)
            for name in methods:
                if name not in SEED_INDEPENDENT or seed == seeds[0]:
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
    """One run's record, loaded from ``out`` when already there with the same settings.

    With ``out``, each run is a store artifact ``runs/<method>[-fold<f>]-seed<s>.{json,
    safetensors}``: the record as the card, the method's intervention as tensors
    (``load_intervention`` rebuilds it)."""
    if out is None:
        return _run(ctx, name, fold)[0] | {"settings": _settings(ctx)}
    saved = _saved_cell(ctx, name, fold, out)
    if saved is not None:
        return saved
    cell, intervention = _run(ctx, name, fold)
    return _store_cell(ctx, name, fold, out, cell, *_portable(intervention))


def _settings(ctx: RunContext) -> dict[str, Any]:
    """What a run depends on: the model (weights' hash included), the data it trains and is
    evaluated on, the config and the methods' options; worked out once per context."""
    if ctx.settings is None:
        ctx.settings = _work_out_settings(ctx)
    return ctx.settings


def _work_out_settings(ctx: RunContext) -> dict[str, Any]:
    data = {**data_settings(training_data(ctx.task, ctx.cfg)),
            "eval_data": eval_data_settings(ctx.task, ctx.cfg.eval_splits,
                                            ctx.cfg.max_eval_examples)}
    return jsonable({"model": model_id(ctx.model), "model_identity": model_settings(ctx.model),
                     "data": data, "config": ctx.cfg.to_dict(),
                     "options": dataclasses.asdict(ctx.options)})


def _location(ctx: RunContext, name: str, fold: Optional[int], out: Path) -> tuple[Path, str]:
    tag = "" if fold is None else f"-fold{fold}"
    return out / "runs", f"{name}{tag}-seed{ctx.cfg.seed}"


def _saved_cell(ctx: RunContext, name: str, fold: Optional[int], out: Path) -> Optional[Cell]:
    """The run saved in ``out`` (checked to have the same settings), or ``None``."""
    folder, stem = _location(ctx, name, fold, out)
    if not artifact_exists(folder, name=stem):
        return None
    cell = load_card(folder / f"{stem}.json", kind=RUN_KIND)
    saved, current = cell.get("settings") or {}, _settings(ctx)
    if not same_settings(saved, current):
        changed = sorted(k for k in {**saved, **current} if saved.get(k) != current.get(k))
        logger.warning("%s.json was computed with other settings (%s changed): computing it "
                       "again", folder / stem, ", ".join(changed))
        return None
    load_artifact(folder, kind=RUN_KIND, name=stem)  # the tensors and companions checked too
    return cell


def _portable(intervention: Optional[Intervention]) -> tuple[Optional[dict[str, Any]], dict]:
    """An intervention as its saved form (kind and spec, tensors on the CPU): what a Ray task
    returns and what ``_store_cell`` writes."""
    if intervention is None:
        return None, {}
    return ({"kind": intervention.kind, "spec": intervention.spec()},
            {k: v.detach().cpu() for k, v in intervention.state_tensors().items()})


def _store_cell(ctx: RunContext, name: str, fold: Optional[int], out: Path, cell: Cell,
                intervention: Optional[dict[str, Any]], tensors: dict) -> Cell:
    folder, stem = _location(ctx, name, fold, out)
    cell = jsonable(cell | {"settings": _settings(ctx), "intervention": intervention})
    with folder_lock(out):
        save_artifact(folder, tensors, cell, kind=RUN_KIND, name=stem)
    return cell


@dataclass
class _RunItem:
    """One (method, seed, fold) run as an executor task (``_run_item``)."""

    task: Any
    cfg: LoFiTConfig
    options: BaselineOptions
    name: str
    fold: Optional[int]
    phases: Optional[PhaseCheckpoint] = None


def _run_item(model, item: _RunItem) -> tuple[Cell, Optional[dict[str, Any]], dict]:
    """A run in a worker: its record and its intervention in saved form (the caller saves
    it, under ``out``'s lock; only a head selection goes to the shared phase store)."""
    ctx = RunContext(model, item.task, item.cfg, item.options, progress=False,
                     phases=item.phases)
    cell, intervention = _run(ctx, item.name, item.fold)
    return (cell, *_portable(intervention))


def _remote_cells(run_cells: Executor, model, jobs, out: Optional[Path],
                  progress: bool) -> list[Cell]:
    """The runs of ``jobs``: those saved in ``out`` read here, the rest computed by
    ``run_cells`` (ITI probes are then fitted once per run, not shared between methods) and
    saved here as they would be locally."""
    cells: list[Optional[Cell]] = [None if out is None else _saved_cell(ctx, name, fold, out)
                                   for ctx, name, fold in jobs]
    todo = [i for i, cell in enumerate(cells) if cell is None]
    items = [_RunItem(jobs[i][0].task, jobs[i][0].cfg, jobs[i][0].options, jobs[i][1], jobs[i][2],
                      jobs[i][0].phases) for i in todo]
    for i, (cell, intervention, tensors) in zip(
            todo, run_cells.map(_run_item, model, items, desc="compare runs", progress=progress)):
        ctx, name, fold = jobs[i]
        cells[i] = (cell | {"settings": _settings(ctx)} if out is None
                    else _store_cell(ctx, name, fold, out, cell, intervention, tensors))
    return cells  # type: ignore[return-value]


def same_settings(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a saved run's settings are the current ones, up to the config fields that do
    not change results (``config.NON_RESULT_FIELDS``) and config or option fields added
    since (read at their defaults), so folders written by earlier versions keep resuming."""
    def normal(settings: dict[str, Any]) -> dict[str, Any]:
        try:
            config = LoFiTConfig.from_dict(settings.get("config", {})).to_dict()
        except (TypeError, ValueError):
            return settings
        config = {k: v for k, v in config.items() if k not in NON_RESULT_FIELDS}
        options = {**dataclasses.asdict(BaselineOptions()), **settings.get("options", {})}
        return jsonable({**settings, "config": config, "options": options})

    return normal(saved) == normal(current)


def load_intervention(card_path: Union[str, Path]) -> Optional[Intervention]:
    """The intervention a ``compare`` run saved (``runs/<stem>.json``); ``None`` for the
    plain model (zero-shot)."""
    card_path = Path(card_path)
    tensors, card = load_artifact(card_path.parent, kind=RUN_KIND, card_name=card_path.name,
                                  required=("intervention",))
    saved = card["intervention"]
    return None if saved is None else rebuild_intervention(saved["kind"], saved["spec"], tensors)


def _run(ctx: RunContext, name: str, fold: Optional[int]) -> tuple[Cell, Optional[Intervention]]:
    probes_fitted_before = ctx.probe_seconds
    start = time.perf_counter()
    run = get_method(name)(ctx)
    seconds = time.perf_counter() - start
    if run.info.get("uses_probes") and probes_fitted_before is not None:
        seconds += probes_fitted_before  # probes were shared from an earlier method
    start = time.perf_counter()
    metrics, predictions = split_metrics(ctx.model, ctx.task, ctx.cfg.eval_splits,
                                         ctx.cfg.max_eval_examples, run.intervention,
                                         ctx.cfg.eval_batch_size, ctx.progress, label=name,
                                         max_batch_tokens=ctx.cfg.eval_batch_tokens)
    return {
        "method": name, "task": ctx.task.name, "seed": ctx.cfg.seed, "fold": fold,
        "split": ctx.cfg.eval_splits[0], "metrics": metrics, "params": run.params,
        "seconds": seconds, "eval_seconds": time.perf_counter() - start,
        "heads": None if run.heads is None else [list(h) for h in run.heads], "info": run.info,
        "per_example": {split: example_scores(rows) for split, rows in predictions.items()},
    }, run.intervention


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
