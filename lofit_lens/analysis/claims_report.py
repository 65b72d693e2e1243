"""The report of the claims (``claims.replicate_claims``): ``ClaimsReport``, its tables
(claims, details, accuracy, selections, stability, settings) and their Markdown."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from lofit_lens import stats
from lofit_lens.analysis.claims_data import METHODS, ClaimsData
from lofit_lens.analysis.claims_tests import band_width, layer_counts
from lofit_lens.analysis.overlap import jaccard_stability, pair_overlap
from lofit_lens.run_settings import EVAL_SPLIT

COLUMNS = ["claim", "model", "contrast", "test", "metric", "n", "seeds", "effect", "ci_low",
           "ci_high", "p", "p_holm", "verdict", "n_needed", "n_needed_holm", "unit",
           "p_bootstrap_paper", "family_size", "note"]
"""The columns of ``ClaimsReport.claims`` and ``.details``."""


@dataclass
class ClaimsReport:
    """The tested claims of one or more models.

    ``claims``: one row per claim, model and contrast (``COLUMNS``; Holm across the rows of
    a model); ``details``: the comparisons behind each row (per task, per transfer cell, per
    metric; Holm within each claim and model); ``accuracy``: every method on every task,
    pooled over seeds and per seed, with 95% intervals (Wilson for 0/1 scores, bootstrap over
    questions for MC2); ``selections``: every head set, with its band width; ``stability``:
    Jaccard across seeds of each task's head sets beside its random expectation;
    ``settings`` and ``seconds`` (wall time per model)."""

    claims: pd.DataFrame
    details: pd.DataFrame
    accuracy: pd.DataFrame
    selections: pd.DataFrame
    stability: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def concat(cls, reports: Sequence["ClaimsReport"]) -> "ClaimsReport":
        frames = {f: pd.concat([getattr(r, f) for r in reports], ignore_index=True)
                  for f in ("claims", "details", "accuracy", "selections", "stability")}
        return cls(**frames, settings={k: v for r in reports for k, v in r.settings.items()},
                   seconds={k: v for r in reports for k, v in r.seconds.items()})

    def markdown(self) -> str:
        """The report's tables as Markdown (claims, power, details, accuracy, stability)."""
        return render_markdown(self)

    def save(self, out: Union[str, Path]) -> list[Path]:
        """``claims.csv``, ``details.csv``, ``accuracy.csv``, ``selections.csv``,
        ``stability.csv`` and ``claims.md`` under ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in ("claims", "details", "accuracy", "selections", "stability"):
            path = out / f"{name}.csv"
            getattr(self, name).to_csv(path, index=False)
            paths.append(path)
        path = out / "claims.md"
        path.write_text(self.markdown())
        return paths + [path]


# ---------------------------------------------------------------------- the tables
def claims_report(data: ClaimsData, claims: list[dict[str, Any]], details: list[dict[str, Any]],
                  alpha: float, n_bootstrap: int) -> ClaimsReport:
    """The report of one model: the tested rows (``claims``, ``details``) as frames of
    ``COLUMNS``, and the accuracy, selections, stability and settings of ``data``."""
    return ClaimsReport(_frame(claims), _frame(details), accuracy_frame(data, n_bootstrap),
                        selections_frame(data), stability_frame(data), run_settings(data, alpha))


def accuracy_frame(data: ClaimsData, n_bootstrap: int) -> pd.DataFrame:
    """Every method on every evaluated task and metric, per seed and pooled, with 95%
    intervals (``stats.seed_intervals``)."""
    labels, seeds, accuracy = data.labels, data.seeds, []
    for task_name in data.tasks:
        methods = {m: m for m in [*METHODS, *data.beyond]} | {
            f"heads:{s}": f"heads:{labels[s]}" for s in data.sources[task_name]}
        for method, shown in methods.items():  # a task file is shown by its name, not its path
            for metric in data.scores[method, task_name, seeds[0]]:
                accuracy += _accuracy_rows(data.model, labels[task_name], shown,
                                           data.metric_name(task_name, metric),
                                           {s: data.scores[method, task_name, s][metric] for s in seeds},
                                           n_bootstrap)
    return pd.DataFrame(accuracy)


def selections_frame(data: ClaimsData) -> pd.DataFrame:
    """Every head set, with its band width and the mean and spread of its layers."""
    n_layers, selections = data.dims.n_layers, []
    for (task_name, seed), hs in data.heads.items():
        counts = layer_counts(hs, n_layers)
        layers = np.array([l for l, _ in hs])
        quality = data.quality[task_name, seed]
        selections.append({"model": data.model, "task": data.labels[task_name], "seed": seed,
                           "k": len(hs), "band_width": int(band_width(counts, len(hs))),
                           "layer_mean": float(layers.mean()), "layer_sd": float(layers.std()),
                           "n_layers": n_layers, "verdict": quality.verdict,
                           "movement": quality.movement, "gap_ratio": quality.gap_ratio,
                           "stability": quality.stability,
                           "stability_chance": quality.stability_chance,
                           "heads": " ".join(f"{l}.{h}" for l, h in sorted(hs))})
    return pd.DataFrame(selections)


def stability_frame(data: ClaimsData) -> pd.DataFrame:
    """Jaccard across the seeds of each selection task's head sets, then across each pair of
    tasks (same seed), each beside its random expectation."""
    dims, heads, labels, seeds = data.dims, data.heads, data.labels, data.seeds
    keys = {"seeds": data.seed_text, "k": data.n_heads}
    stability = []
    for task_name in data.selection_tasks:
        st = jaccard_stability([heads[task_name, s] for s in seeds], dims.n_layers, dims.n_heads)
        stability.append({"model": data.model, "task": labels[task_name], **keys, **st.row()})
    for a, b in itertools.combinations(data.selection_tasks, 2):
        cross = [pair_overlap(heads[a, s], heads[b, s], dims.n_layers, dims.n_heads) for s in seeds]
        stability.append({"model": data.model, "task": f"{labels[a]} vs {labels[b]} (same seed)",
                          **keys, "n_sets": 2 * len(seeds), "n_pairs": len(cross),
                          "jaccard": float(np.mean([c["jaccard_paper"] for c in cross])),
                          "jaccard_min": float(min(c["jaccard_paper"] for c in cross)),
                          "jaccard_max": float(max(c["jaccard_paper"] for c in cross)),
                          "iou": float(np.mean([c["iou"] for c in cross])),
                          "jaccard_random": float(np.mean([c["expected_random"] for c in cross])),
                          "p_max": float(max(c["p_value"] for c in cross))})
    return pd.DataFrame(stability)


def run_settings(data: ClaimsData, alpha: float) -> dict[str, Any]:
    """``{model: its settings}``: budget, tasks, seeds, K, test and training sizes, epochs,
    learning rate, protocol, the tests' level and ITI's alpha."""
    runs, seeds, labels = data.runs, data.seeds, data.labels
    first = runs[data.selection_tasks[0], seeds[0]][1]  # the first of ``tasks`` when any
    return {data.model: {
        "budget": data.budget, "tasks": [labels[t] for t in data.tasks],
        "selection_tasks": [labels[t] for t in data.selection_tasks], "seeds": seeds,
        "k": data.n_heads, "k_setting": first.k, "total_heads": data.dims.total_heads,
        "n_test_per_seed": {labels[t]: len(runs[t, seeds[0]][0].eval_examples(EVAL_SPLIT, runs[t, seeds[0]][1].max_eval_examples)) for t in data.tasks},
        "n_train": {labels[t]: runs[t, seeds[0]][1].max_train_examples
                    for t in data.selection_tasks},
        "epochs": [first.epochs_select, first.epochs_bias], "lr_bias": first.lr_bias,
        "protocol": first.protocol, "alpha": alpha, "iti_alpha": data.options.alpha,
        "transfer": any(data.sources.values())}}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = np.nan if column != "note" else ""
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


def _accuracy_rows(model_name: str, task: str, method: str, metric: str,
                   per_seed: Mapping[int, Sequence[float]], n_bootstrap: int) -> list[dict]:
    return [{"model": model_name, "task": task, "method": method, "metric": metric, **row}
            for row in stats.seed_intervals(per_seed, metric == "mc2", n_bootstrap)]


# ---------------------------------------------------------------------- markdown
def _effect(row: Mapping[str, Any]) -> str:
    scale = 100 if row["unit"] == "examples" else 1
    fmt = (lambda v: f"{scale * v:+.1f}") if scale == 100 else (lambda v: f"{v:+.2f}")
    if not np.isfinite(row["effect"]):
        return "-"
    ci = (f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
          if np.isfinite(row["ci_low"]) else "")
    return fmt(row["effect"]) + ci


def claims_table(frame: pd.DataFrame) -> str:
    """Markdown of ``claims`` or ``details`` rows: effect in points (paired examples) or in
    layers / Jaccard, 95% CI, p, Holm p, verdict, n needed."""
    if frame.empty:
        return "(none)"
    header = ["claim", "model", "contrast", "test", "n", "seeds", "effect [95% CI]", "p",
              "p (Holm)", "paired bootstrap p (paper's)", "verdict", "n needed (α=0.05 / α/m)"]
    return _markdown(header, (
        [r["claim"], r["model"], r["contrast"], r["test"], f"{int(r['n'])} {r['unit']}",
         r["seeds"], _effect(r), stats.format_p(r["p"]), stats.format_p(r["p_holm"]),
         stats.format_p(r["p_bootstrap_paper"]), r["verdict"],
         f"{stats.format_n(r['n_needed'])} / {stats.format_n(r['n_needed_holm'])}"]
        for _, r in frame.iterrows()))


def _markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: ``header``, then one line per row of ``rows``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def accuracy_table(frame: pd.DataFrame) -> str:
    """Markdown of the pooled accuracy rows: score and 95% interval in %, n, the interval's
    method."""
    if frame.empty:
        return "(no task evaluated)"
    pooled = frame[frame["seed"] == "pooled"]
    pct = stats.format_pct

    def row(r) -> list[Any]:
        seeds = frame[(frame["model"] == r["model"]) & (frame["task"] == r["task"])
                      & (frame["method"] == r["method"]) & (frame["metric"] == r["metric"])
                      & (frame["seed"] != "pooled")]
        return [r["model"], r["task"], r["method"], r["metric"], r["n"],
                f"{pct(r['score'])} [{pct(r['ci_low'])}, {pct(r['ci_high'])}]",
                " / ".join(pct(s) for s in seeds["score"]), r["ci"]]

    return _markdown(["model", "task", "method", "metric", "n", "score [95% CI]", "per seed",
                      "interval"], (row(r) for _, r in pooled.iterrows()))


def stability_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    return _markdown(
        ["model", "head sets", "K", "pairs", "Jaccard mean [min, max]", "random expectation",
         "max pairwise p (hypergeometric)"],
        ([r["model"], r["task"], r["k"], r["n_pairs"],
          f"{r['jaccard']:.2f} [{r['jaccard_min']:.2f}, {r['jaccard_max']:.2f}]",
          f"{r['jaccard_random']:.3f}", stats.format_p(r["p_max"])] for _, r in frame.iterrows()))


def quality_table(frame: pd.DataFrame) -> str:
    """Each selection's diagnostic (``selection_quality``; stability against the other seeds)."""
    if frame.empty or "verdict" not in frame:
        return "(none)"

    def num(x: Any, f: str) -> str:
        return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, f)
    return _markdown(
        ["model", "task", "seed", "K", "verdict", "movement ‖A−A0‖/‖A0‖", "K/K+1 gap ratio",
         "Jaccard with other seeds (chance)"],
        ([r["model"], r["task"], r["seed"], r["k"], r["verdict"], num(r["movement"], ".3g"),
          num(r["gap_ratio"], ".2f"),
          f"{num(r['stability'], '.2f')} ({num(r['stability_chance'], '.2f')})"]
         for _, r in frame.iterrows()))


def render_markdown(report: ClaimsReport) -> str:
    parts = ["## Claims (one row per claim, model and contrast; Holm across the rows of a model)",
             "", claims_table(report.claims), "",
             "Effects: paired examples in accuracy points (a - b), head sets in layers (random "
             "minus observed half-mass band) or Jaccard (within minus across); > 0 favours the "
             "claim. Tests are one-sided in the claim's direction.", "",
             "## Comparisons behind each claim (Holm within each claim and model)", "",
             claims_table(report.details), "",
             "## Accuracy (pooled over the seeds' disjoint test subsets)", "",
             accuracy_table(report.accuracy), "",
             "## Head-set stability across seeds, and overlap across tasks", "",
             stability_table(report.stability), "",
             "## Selection quality (docs/gotchas.md: reading the diagnostic)", "",
             quality_table(report.selections), "",
             "## Settings", ""]
    for model, settings in report.settings.items():
        parts.append(f"- {model}: " + ", ".join(f"{k}={v}" for k, v in settings.items())
                     + f"; wall time {report.seconds.get(model, float('nan')) / 60:.1f} min, "
                     f"CPU time {report.seconds.get(f'{model} cpu', float('nan')) / 60:.1f} min")
    return "\n".join(parts) + "\n"
