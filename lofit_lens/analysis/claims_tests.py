"""The tests of the claims (``claims.replicate_claims``), one function per claim. Each takes
the ``ClaimsData`` and returns its ``ClaimRows``: the claim's rows, and the comparisons
behind them.

* **Tests.** Exact match and MC1: the exact McNemar test (``stats.mcnemar_exact``); MC2: the
  paired permutation test, with the sign test beside it; the paper's one-sided paired
  bootstrap (``stats.paired_bootstrap``) beside every paired test, named as such. Claim 3:
  the band width of the head sets against random sets (``band_test``); claim 4: Jaccard
  within tasks against across tasks, by a permutation of the task labels (``overlap_test``).
  All tests are one-sided, in the claim's direction, and every effect is oriented so that
  > 0 favours the claim.
* **Families.** Holm's correction within each claim's matrix of comparisons (``details``:
  tasks x contrasts x metrics, or the cells of the transfer matrix), and across the
  claim-level rows of one model (``finish_family`` on the claims' rows).
* **Verdicts** (``stats.verdict``): *supported* needs a Holm-corrected p < ``alpha``;
  *underpowered* when the effect points the claimed way but n is below the n that gives 80%
  power at the observed effect at level ``alpha / m`` (m = the family's size, the level at
  which Holm surely rejects); *not supported* otherwise.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from jaxtyping import Float, Int

from lofit_lens import stats
from lofit_lens.analysis.claims_data import ClaimsData, Log
from lofit_lens.intervention import Head

CONTRASTS: dict[str, tuple[str, str]] = {
    "1": ("lofit", "random"), "1b": ("lofit", "iti_heads"),
    "5": ("lofit", "iti"), "5b": ("lofit", "zero_shot"),
}
"""Claim rows that compare two methods: (the claimed winner, the baseline)."""


@dataclass(frozen=True)
class ClaimTestOptions:
    """How the claims are tested: the level, and the resamples of each test."""

    alpha: float = 0.05
    n_bootstrap: int = 2000
    n_permutations: int = 20_000
    n_draws: int = 10_000


class ClaimRows(NamedTuple):
    """One claim's rows (Holm across a model's claims comes later, ``finish_family``) and
    the comparisons behind them (Holm within the claim done)."""

    claims: list[dict[str, Any]]
    details: list[dict[str, Any]]


# ---------------------------------------------------------------------- claim 3: layer bands
def band_width(counts: Int[np.ndarray, "... layer"], k: Optional[int] = None) -> Int[np.ndarray, "..."]:
    """The fewest consecutive layers that hold at least half (``ceil(k / 2)``) of a head set,
    from its per-layer ``counts`` (``k``: their sum). Small = concentrated in a band."""
    counts = np.asarray(counts)
    n_layers = counts.shape[-1]
    need = np.ceil((counts.sum(-1) if k is None else np.full(counts.shape[:-1], k)) / 2)
    cs = np.concatenate([np.zeros(counts.shape[:-1] + (1,)), np.cumsum(counts, -1)], -1)
    width = np.full(counts.shape[:-1], n_layers)
    for w in range(n_layers, 0, -1):
        best = (cs[..., w:] - cs[..., :-w]).max(-1)
        width = np.where(best >= need, w, width)
    return width


def layer_counts(heads: Sequence[Head], n_layers: int) -> Int[np.ndarray, " layer"]:
    return np.bincount([int(l) for l, _ in heads], minlength=n_layers)


def random_band_widths(n_layers: int, n_heads: int, k: int, size: tuple[int, ...],
                       rng: np.random.Generator, chunk: int = 4096) -> Int[np.ndarray, "..."]:
    """``band_width`` of uniformly random ``k``-head sets (``size`` of them), drawn in chunks
    of ``chunk`` sets."""
    total = n_layers * n_heads
    draws = int(np.prod(size))
    widths = []
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        picks = np.argpartition(rng.random((m, total)), k - 1, axis=1)[:, :k] if k < total \
            else np.broadcast_to(np.arange(total), (m, total))
        counts = np.stack([np.bincount(row, minlength=n_layers) for row in picks // n_heads])
        widths.append(band_width(counts, k))
    return np.concatenate(widths).reshape(size)


def band_test(sets: Sequence[Sequence[Head]], n_layers: int, n_heads: int,
              n_draws: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Claim 3 on ``sets`` (head sets of one size): the mean ``band_width`` against the same
    mean over as many random sets (Monte Carlo, ``n_draws``). ``effect``: random expectation
    minus observed (layers; > 0 = more concentrated than chance), bootstrap CI over the sets;
    ``p = (1 + #{null <= observed}) / (1 + n_draws)``."""
    k = len(sets[0])
    if any(len(s) != k for s in sets):
        raise ValueError("band_test needs head sets of one size")
    observed = band_width(np.stack([layer_counts(s, n_layers) for s in sets]), k).astype(float)
    null = random_band_widths(n_layers, n_heads, k, (n_draws, len(sets)),
                              np.random.default_rng(seed)).astype(float)
    expected, sd = float(null.mean()), float(null.std(ddof=1))
    p = (1 + (null.mean(1) <= observed.mean()).sum()) / (1 + n_draws)
    gain = expected - observed
    low, high = stats.bootstrap_ci(gain, seed=seed) if len(gain) > 1 else (float("nan"),) * 2
    return {"n": len(sets), "effect": float(gain.mean()), "ci_low": low, "ci_high": high,
            "p": float(p), "observed": float(observed.mean()), "random": expected,
            "random_sd": sd, "n_needed": stats.paired_mean_n_needed(float(gain.mean()), sd),
            "widths": observed.tolist()}


# ---------------------------------------------------------------------- claim 4: overlap
def _jaccard_matrix(sets: Sequence[Sequence[Head]]) -> Float[np.ndarray, "s s"]:
    frozen = [frozenset(map(tuple, s)) for s in sets]
    return np.array([[len(a & b) / min(len(a), len(b)) for b in frozen] for a in frozen])


def _within_minus_across(jac: Float[np.ndarray, "s s"], labels: Int[np.ndarray, " s"],
                         distinct: Optional[Int[np.ndarray, " s"]] = None) -> float:
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(jac, dtype=bool), 1)
    within = same & upper
    if distinct is not None:  # bootstrap: a seed drawn twice is not a pair of seeds
        within &= distinct[:, None] != distinct[None, :]
    across = ~same & upper
    if not within.any() or not across.any():
        return float("nan")
    return float(jac[within].mean() - jac[across].mean())


def _labelings(group_sizes: Sequence[int]) -> Int[np.ndarray, "assignment s"]:
    """Every assignment of group labels to ``sum(group_sizes)`` items with those sizes."""
    n = sum(group_sizes)
    out: list[list[int]] = []

    def fill(labels: list[int], free: list[int], g: int) -> None:
        if g == len(group_sizes):
            out.append(labels.copy())
            return
        for chosen in itertools.combinations(free, group_sizes[g]):
            for i in chosen:
                labels[i] = g
            fill(labels, [i for i in free if i not in chosen], g + 1)

    fill([0] * n, list(range(n)), 0)
    return np.array(out)


def overlap_test(sets: Mapping[tuple[str, int], Sequence[Head]], max_exact: int = 50_000,
                 n_permutations: int = 20_000, n_bootstrap: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Claim 4: mean Jaccard (the paper's ``|Ti & Tj| / K``) of pairs of seeds of one task
    minus that of pairs from different tasks, against a permutation of the task labels
    (exact over all labelings when there are at most ``max_exact``; p counts the observed
    labeling). CI: bootstrap over seeds within each task. ``n``: seeds per task."""
    keys = list(sets)
    tasks = list(dict.fromkeys(t for t, _ in keys))
    labels = np.array([tasks.index(t) for t, _ in keys])
    jac = _jaccard_matrix([sets[key] for key in keys])
    observed = _within_minus_across(jac, labels)
    sizes = [int((labels == g).sum()) for g in range(len(tasks))]
    count = math.factorial(len(keys)) // math.prod(math.factorial(s) for s in sizes)
    if count <= max_exact:
        perms, method = _labelings(sizes), "exact"
    else:
        rng = np.random.default_rng(seed)
        perms, method = np.array([rng.permutation(labels) for _ in range(n_permutations)]), "monte carlo"
    null = np.array([_within_minus_across(jac, p) for p in perms])
    hits = (null >= observed - 1e-12).sum()
    p = hits / len(null) if method == "exact" else (1 + hits) / (1 + len(null))
    rng = np.random.default_rng(seed)
    by_task = {t: [i for i, (tt, _) in enumerate(keys) if tt == t] for t in tasks}
    boot = []
    for _ in range(n_bootstrap):
        idx = [i for t in tasks for i in rng.choice(by_task[t], size=len(by_task[t]))]
        idx = np.array(idx)
        boot.append(_within_minus_across(jac[np.ix_(idx, idx)], labels[idx], idx))
    boot = np.array(boot)
    boot = boot[np.isfinite(boot)]
    low, high = (np.quantile(boot, [0.025, 0.975]) if len(boot) else (np.nan, np.nan))
    n_seeds = min(sizes)
    sd = float(null.std(ddof=1)) if len(null) > 1 else float("nan")
    z = (observed - float(null.mean())) / sd if sd and np.isfinite(sd) and sd > 0 else float("nan")
    n_needed = stats.n_needed_from_z(n_seeds, z)
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones_like(jac, dtype=bool), 1)
    return {"n": n_seeds, "effect": observed, "ci_low": float(low), "ci_high": float(high),
            "p": float(p), "permutations": f"{method} ({len(null)})",
            "within": float(jac[same & upper].mean()), "across": float(jac[~same & upper].mean()),
            "z": z, "n_needed_z": n_needed,
            # the statistic ignores which task is which: the most extreme value is shared by
            # the relabelings of one partition (T! of them for T tasks of equal size)
            "min_p": float((null >= null.max() - 1e-12).mean()) if method == "exact" else
            1 / (1 + len(null))}


# ---------------------------------------------------------------------- paired rows
def _paired_row(a: Sequence[float], b: Sequence[float], metric: str, n_bootstrap: int,
                n_permutations: int, alternative: str = "greater") -> dict[str, Any]:
    """The paired test of ``a`` beating ``b`` (one-sided; ``alternative="two-sided"``: of
    ``a`` differing from ``b``): exact McNemar for 0/1 scores, the paired permutation test
    (sign test beside it) for MC2; the paper's bootstrap beside both."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if metric == "mc2":
        result = stats.paired_permutation_test(a, b, alternative, n_permutations=n_permutations)
        sign = stats.paired_sign_test(a, b)
        d = a - b
        n_needed = stats.paired_mean_n_needed(result.effect, float(d.std(ddof=1)) if len(d) > 1 else 0.0)
        row = {**result.row(), "p_sign_test": sign.p, "n_needed": n_needed,
               "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else float("nan")}
    else:
        result = stats.mcnemar_exact(a, b, alternative)
        n = len(a)
        p10, p01 = result.details["n10"] / n, result.details["n01"] / n
        row = {**result.row(), "p10": p10, "p01": p01,
               "n_needed": stats.mcnemar_n_needed(p10, p01)}
    row.update(metric=metric, unit="examples",
               p_bootstrap_paper=stats.paired_bootstrap(a, b, n_bootstrap))
    return row


def _needed_at(row: Mapping[str, Any], alpha: float) -> float:
    """The row's n needed at level ``alpha`` (one-sided, 80% power)."""
    if row["test"] == "exact McNemar":
        return stats.mcnemar_n_needed(row["p10"], row["p01"], alpha)
    if row["test"] == "paired permutation":
        return stats.paired_mean_n_needed(row["effect"], row.get("sd_diff", 0.0), alpha)
    if row["test"].startswith("band width"):
        return stats.paired_mean_n_needed(row["effect"], row["random_sd"], alpha)
    if row["test"].startswith("label permutation"):
        return stats.n_needed_from_z(row["n"], row.get("z", float("nan")), alpha)
    return float("nan")


def finish_family(rows: list[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm across ``rows`` (one family), then each row's n needed at ``alpha / m`` and its
    verdict."""
    adjusted = stats.holm([r["p"] for r in rows])
    m = int(np.isfinite([r["p"] for r in rows]).sum())
    for row, p_holm in zip(rows, adjusted):
        row["p_holm"] = float(p_holm)
        row["family_size"] = m
        row["n_needed_holm"] = _needed_at(row, alpha / max(m, 1))
        row["verdict"] = stats.verdict(row["effect"], p_holm, row["n"], row["n_needed_holm"], alpha)
    return rows


def _band_row(res: Mapping[str, Any]) -> dict[str, Any]:
    return {"test": "band width vs random sets, Monte Carlo", "metric": "half-mass band (layers)",
            "n": res["n"], "unit": "head sets", "effect": res["effect"], "ci_low": res["ci_low"],
            "ci_high": res["ci_high"], "p": res["p"], "random_sd": res["random_sd"],
            "n_needed": res["n_needed"], "p_bootstrap_paper": float("nan"),
            "note": f"observed {res['observed']:.2f} layers, random {res['random']:.2f}"}


# ---------------------------------------------------------------------- one test per claim
def _method_contrasts(data: ClaimsData, claim: str, keys: Sequence[str],
                      options: ClaimTestOptions) -> ClaimRows:
    """Claims 1 and 5: each contrast of ``keys`` (``CONTRASTS``) per task and metric
    (details), and on the examples of all tasks pooled (the claim's rows)."""
    if not data.tasks:
        return ClaimRows([], [])
    family = []
    for key in keys:
        winner, baseline = CONTRASTS[key]
        for task_name in data.tasks:
            metrics = ["correct"] + (["mc2"] if "mc2" in data.scores[winner, task_name, data.seeds[0]] else [])
            for metric in metrics:
                row = _paired_row(data.pooled(winner, task_name, metric),
                                  data.pooled(baseline, task_name, metric),
                                  data.metric_name(task_name, metric), options.n_bootstrap,
                                  options.n_permutations)
                family.append({**row, **data.tag(claim),
                               "contrast": f"{winner} > {baseline} on {data.labels[task_name]}"})
    rows = []
    for key in keys:
        winner, baseline = CONTRASTS[key]
        a = [x for t in data.tasks for x in data.pooled(winner, t)]
        b = [x for t in data.tasks for x in data.pooled(baseline, t)]
        row = _paired_row(a, b, "+".join(sorted({data.metric_name(t, "correct") for t in data.tasks})),
                          options.n_bootstrap, options.n_permutations)
        rows.append({**row, **data.tag(claim),
                     "contrast": f"{winner} > {baseline}, pooled over "
                                 f"{', '.join(data.labels[t] for t in data.tasks)}"})
    return ClaimRows(rows, finish_family(family, options.alpha))


def claim_1(data: ClaimsData, options: ClaimTestOptions, log: Log) -> ClaimRows:
    """Table 2: bias tuning on LoFiT's heads beats random heads, and ITI's heads."""
    return _method_contrasts(data, "1", ("1", "1b"), options)


def claim_5(data: ClaimsData, options: ClaimTestOptions, log: Log) -> ClaimRows:
    """Table 1: LoFiT beats ITI, and beats 0-shot."""
    return _method_contrasts(data, "5", ("5", "5b"), options)


def claim_2(data: ClaimsData, options: ClaimTestOptions, log: Log) -> ClaimRows:
    """Fig. 2: same-task heads beat heads transferred from another task: per cell of the
    transfer matrix (details), and per example against the mean of the other tasks' heads."""
    if not any(data.sources.values()):
        if len(data.tasks) == 1:
            log("claim 2 needs at least two evaluated tasks: not tested")
        return ClaimRows([], [])
    labels, family = data.labels, []
    for target in data.tasks:
        for source in data.sources[target]:
            row = _paired_row(data.pooled("lofit", target), data.pooled(f"heads:{source}", target),
                              data.metric_name(target, "correct"), options.n_bootstrap,
                              options.n_permutations)
            family.append({**row, **data.tag("2"),
                           "contrast": f"{labels[target]} heads > {labels[source]} heads "
                                       f"on {labels[target]}"})
    same, transferred = [], []
    for target in [t for t in data.tasks if data.sources[t]]:
        same += data.pooled("lofit", target)
        transferred += list(np.mean([data.pooled(f"heads:{s}", target)
                                     for s in data.sources[target]], 0))
    result = stats.paired_permutation_test(same, transferred, n_permutations=options.n_permutations)
    d = np.asarray(same) - np.asarray(transferred)
    row = {**result.row(), **data.tag("2"),
           "metric": "+".join(sorted({data.metric_name(t, "correct") for t in data.tasks})),
           "unit": "examples", "sd_diff": float(d.std(ddof=1)),
           "p_bootstrap_paper": stats.paired_bootstrap(same, transferred, options.n_bootstrap),
           "contrast": "same-task heads > mean of other tasks' heads, per example",
           "n_needed": stats.paired_mean_n_needed(result.effect, float(d.std(ddof=1)))}
    return ClaimRows([row], finish_family(family, options.alpha))


def claim_3(data: ClaimsData, options: ClaimTestOptions, log: Log) -> ClaimRows:
    """Fig. 3: the head sets concentrate in a band of layers: each task's seeds (details),
    and every head set (the claim's row), against random sets of the same size."""
    dims, family = data.dims, []
    for task_name in data.selection_tasks:
        res = band_test([data.heads[task_name, s] for s in data.seeds], dims.n_layers,
                        dims.n_heads, options.n_draws)
        family.append({**_band_row(res), **data.tag("3"),
                       "contrast": f"{data.labels[task_name]} head sets narrower than random"})
    res = band_test([data.heads[key] for key in data.runs], dims.n_layers, dims.n_heads,
                    options.n_draws)
    row = {**_band_row(res), **data.tag("3"),
           "contrast": f"all {len(data.runs)} head sets ({len(data.selection_tasks)} tasks x "
                       f"{len(data.seeds)} seeds) narrower than random"}
    return ClaimRows([row], finish_family(family, options.alpha))


def claim_4(data: ClaimsData, options: ClaimTestOptions, log: Log) -> ClaimRows:
    """Fig. 6: head sets overlap more across seeds of one task than across tasks (needs two
    selection tasks)."""
    if len(data.selection_tasks) < 2:
        return ClaimRows([], [])
    res = overlap_test({key: data.heads[key] for key in data.runs},
                       n_permutations=options.n_permutations, n_bootstrap=options.n_bootstrap)
    row = {**data.tag("4"),
           "contrast": f"Jaccard across seeds > across tasks ({len(data.selection_tasks)} tasks)",
           "test": f"label permutation, {res['permutations']}", "metric": "jaccard (|Ti&Tj|/K)",
           "n": res["n"], "unit": "seeds per task", "effect": res["effect"],
           "ci_low": res["ci_low"], "ci_high": res["ci_high"], "p": res["p"], "z": res["z"],
           "n_needed": res["n_needed_z"], "p_bootstrap_paper": float("nan"),
           "note": f"within {res['within']:.3f}, across {res['across']:.3f}, "
                   f"min attainable p {res['min_p']:.4f}"}
    return ClaimRows([row], [])


def beyond_lofit(data: ClaimsData, options: ClaimTestOptions) -> list[dict[str, Any]]:
    """LoFiT against each method of ``data.beyond`` (JoLA, ReFT, RepE, ...), paired on the
    same examples, two-sided (the paper claims no order among them): per task, and on the
    examples of all tasks pooled; Holm across the rows. Effects are LoFiT minus the method."""
    rows = []
    for method in data.beyond:
        for task_name in data.tasks:
            row = _paired_row(data.pooled("lofit", task_name), data.pooled(method, task_name),
                              data.metric_name(task_name, "correct"), options.n_bootstrap,
                              options.n_permutations, "two-sided")
            rows.append({**row, **data.tag("beyond"),
                         "contrast": f"lofit vs {method} on {data.labels[task_name]}"})
        if len(data.tasks) > 1:
            a = [x for t in data.tasks for x in data.pooled("lofit", t)]
            b = [x for t in data.tasks for x in data.pooled(method, t)]
            metric = "+".join(sorted({data.metric_name(t, "correct") for t in data.tasks}))
            row = _paired_row(a, b, metric, options.n_bootstrap, options.n_permutations, "two-sided")
            rows.append({**row, **data.tag("beyond"), "contrast": f"lofit vs {method}, pooled over "
                         f"{', '.join(data.labels[t] for t in data.tasks)}"})
    return finish_family(rows, options.alpha) if rows else []


CLAIM_TESTS: tuple[Callable[[ClaimsData, ClaimTestOptions, Log], ClaimRows], ...] = (
    claim_1, claim_5, claim_2, claim_3, claim_4)
"""Every claim's test, in the order of the report's rows."""
