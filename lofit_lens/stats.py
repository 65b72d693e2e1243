"""Statistics: confidence intervals, paired tests, multiple-comparison correction, power
and verdicts. The one statistics module of lofit-lens, at core level: ``baselines.compare``'s
tables, the analyses (``transfer``, ``sweeps``) and the claims (``analysis.claims``) all use it.

Every comparison here is *paired*: two methods evaluated on the same test examples. Vectors
``a`` and ``b`` hold one score per example (0/1 for exact match and MC1, a probability for
MC2); ``effect`` is always ``mean(a) - mean(b)``, so a positive effect favours ``a``.

* Intervals: ``wilson_ci`` (a proportion), ``bootstrap_ci`` (a mean over examples: MC2, or
  anything continuous), ``paired_difference_ci`` (Newcombe's method 10 for the difference of
  two paired proportions), ``seed_intervals`` (per seed and pooled over seeds).
* Tests: ``mcnemar_exact`` (exact McNemar: ``scipy.stats.binomtest`` on the discordant pairs),
  ``paired_sign_test`` and ``paired_permutation_test`` (continuous per-example scores),
  ``paired_bootstrap`` (the paper's Fig. 2 test, kept for comparability: it is
  ``paired_bootstrap_p`` (the transfer matrix's marks) with its arguments in claim order).
* ``holm``: Holm's step-down adjusted p-values across the cells of a matrix (one family).
* Power: ``mcnemar_power`` / ``mcnemar_n_needed`` (exact, at the observed discordance),
  ``mcnemar_n_connor`` (Connor 1987's closed form), ``proportions_n_needed`` (two independent
  proportions), ``paired_mean_n_needed`` (a paired mean difference, normal approximation),
  ``n_needed_from_z`` / ``n_needed_from_p`` (any test whose z grows as sqrt(n)).
* ``verdict``: supported / not supported / underpowered, from the corrected p-value, the
  effect's sign and the n needed; ``format_n``, ``format_pct``, ``format_p`` print them.

One-sided alternatives are named as in scipy: ``"greater"`` tests ``a > b``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np
from jaxtyping import Float, Int
from scipy.stats import binom, binomtest, norm

Scores = Union[Float[np.ndarray, " n"], Sequence[float]]
Alternative = Literal["greater", "less", "two-sided"]
ALTERNATIVES = ("greater", "less", "two-sided")

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
UNDERPOWERED = "underpowered"


def _check_alternative(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}: expected one of {ALTERNATIVES}")
    return alternative


def _pair(a: Scores, b: Scores) -> tuple[Float[np.ndarray, " n"], Float[np.ndarray, " n"]]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"A paired test needs two equal, non-empty 1-d vectors; got shapes "
                         f"{a.shape} and {b.shape}")
    return a, b


def _binary(x: Float[np.ndarray, " n"], name: str) -> Int[np.ndarray, " n"]:
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold 0/1 scores (exact match, MC1); use "
                         "paired_permutation_test or paired_sign_test for continuous scores")
    return x.astype(int)


# ---------------------------------------------------------------------- intervals
def z_score(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must lie in (0, 1)")
    return float(norm.ppf(0.5 + confidence / 2))


def wilson_ci(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n`` (no continuity correction).

    ``successes`` may be fractional (a mean over seeds times ``n``). ``n = 0``: (nan, nan)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_ci: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = z_score(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 or n successes the bound is exactly 0 or 1 (the sum leaves a rounding residue)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def bootstrap_ci(values: Scores, confidence: float = 0.95, n_bootstrap: int = 10_000,
                 seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] = lambda x: x.mean(axis=-1),
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean), resampling the
    entries of ``values`` (one per example / question) with replacement.

    ``statistic`` maps a ``(resample, n)`` array to one value per resample."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d vector, got shape {values.shape}")
    z_score(confidence)
    rng = np.random.default_rng(seed)
    draws = statistic(values[rng.integers(0, len(values), size=(n_bootstrap, len(values)))])
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return (float(low), float(high))


def paired_difference_ci(a: Scores, b: Scores, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998) method 10 interval for ``mean(a) - mean(b)`` of two paired 0/1
    vectors: the Wilson intervals of both proportions, combined with the estimated
    correlation phi of the pairs (with Newcombe's n/2 adjustment when phi > 0)."""
    a, b = _pair(a, b)
    a, b = _binary(a, "a"), _binary(b, "b")
    n = len(a)
    both, only_a = int((a & b).sum()), int((a & (1 - b)).sum())
    only_b, neither = int(((1 - a) & b).sum()), int(((1 - a) & (1 - b)).sum())
    p1, p2 = a.mean(), b.mean()
    l1, u1 = wilson_ci(a.sum(), n, confidence)
    l2, u2 = wilson_ci(b.sum(), n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0
    if margins > 0:
        cross = both * neither - only_a * only_b
        adjusted = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
        phi = adjusted / math.sqrt(margins)
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (max(-1.0, lower), min(1.0, upper))


def seed_intervals(per_seed: Mapping[Any, Sequence[float]], continuous: bool = False,
                   n_bootstrap: int = 2000) -> list[dict[str, Any]]:
    """One row per seed, then one ``"pooled"`` over all seeds' examples: ``seed``, ``n``,
    ``score`` (the mean) and its 95% interval ``ci_low`` / ``ci_high`` (``ci``: Wilson for
    0/1 scores; bootstrap over questions when ``continuous``, e.g. MC2)."""
    rows = []
    groups = [(str(s), list(v)) for s, v in per_seed.items()]
    groups.append(("pooled", [x for v in per_seed.values() for x in v]))
    for label, values in groups:
        values = np.asarray(values, float)
        if continuous:
            low, high = bootstrap_ci(values, n_bootstrap=n_bootstrap)
            how = "bootstrap over questions"
        else:
            low, high = wilson_ci(values.sum(), len(values))
            how = "Wilson"
        rows.append({"seed": label, "n": len(values), "score": float(values.mean()),
                     "ci_low": low, "ci_high": high, "ci": how})
    return rows


# ---------------------------------------------------------------------- paired tests
@dataclass(frozen=True)
class PairedTest:
    """One paired comparison: ``effect = mean(a) - mean(b)`` with its 95% interval, the
    p-value under ``alternative``, and the test's own counts in ``details``."""

    test: str
    n: int
    effect: float
    ci_low: float
    ci_high: float
    p: float
    alternative: str
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"test": self.test, "n": self.n, "effect": self.effect, "ci_low": self.ci_low,
                "ci_high": self.ci_high, "p": self.p, "alternative": self.alternative,
                **self.details}


def mcnemar_exact(a: Scores, b: Scores, alternative: Alternative = "greater",
                  confidence: float = 0.95) -> PairedTest:
    """Exact McNemar test of paired 0/1 outcomes: ``binomtest`` of ``n10`` (a right, b
    wrong) among the ``n10 + n01`` discordant pairs, against 1/2. ``effect``: the difference
    in accuracy ``(n10 - n01) / n`` with Newcombe's interval. No discordant pair: p = 1."""
    _check_alternative(alternative)
    a, b = _pair(a, b)
    ai, bi = _binary(a, "a"), _binary(b, "b")
    n10, n01 = int((ai & (1 - bi)).sum()), int(((1 - ai) & bi).sum())
    discordant = n10 + n01
    p = binomtest(n10, discordant, 0.5, alternative=alternative).pvalue if discordant else 1.0
    low, high = paired_difference_ci(a, b, confidence)
    return PairedTest("exact McNemar", len(a), float(a.mean() - b.mean()), low, high, float(p),
                      alternative, {"n10": n10, "n01": n01, "acc_a": float(a.mean()),
                                    "acc_b": float(b.mean())})


def paired_sign_test(a: Scores, b: Scores, alternative: Alternative = "greater",
                     confidence: float = 0.95, n_bootstrap: int = 10_000,
                     seed: int = 0) -> PairedTest:
    """Sign test of paired continuous scores: ``binomtest`` of the positive differences among
    the non-zero ones. ``effect``: the mean difference, with a bootstrap interval over
    examples. (On 0/1 scores it is the exact McNemar test.)"""
    _check_alternative(alternative)
    a, b = _pair(a, b)
    d = a - b
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(pos, pos + neg, 0.5, alternative=alternative).pvalue if pos + neg else 1.0
    low, high = bootstrap_ci(d, confidence, n_bootstrap, seed)
    return PairedTest("sign test", len(a), float(d.mean()), low, high, float(p), alternative,
                      {"n_pos": pos, "n_neg": neg, "mean_a": float(a.mean()),
                       "mean_b": float(b.mean())})


def paired_permutation_test(a: Scores, b: Scores, alternative: Alternative = "greater",
                            n_permutations: int = 20_000, seed: int = 0,
                            confidence: float = 0.95, n_bootstrap: int = 10_000) -> PairedTest:
    """Paired permutation (sign-flip) test of the mean difference: under the null each
    difference is as likely with either sign. Exact (all ``2^m`` sign patterns of the ``m``
    non-zero differences, the observed one included) when ``2^m <= n_permutations``; else
    Monte Carlo with ``p = (1 + #{T* >= T}) / (1 + n_permutations)``. ``effect``: the mean
    difference, with a bootstrap interval over examples."""
    _check_alternative(alternative)
    a, b = _pair(a, b)
    d = a - b
    nz = d[d != 0]
    observed = d.sum()
    tol = 1e-12 * max(1.0, np.abs(d).sum())
    if len(nz) == 0:
        p, method = 1.0, "exact"
    else:
        if 2 ** len(nz) <= n_permutations:
            signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(nz))))
            method = "exact"
        else:
            signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_permutations, len(nz)))
            method = "monte carlo"
        sums = signs @ nz
        if alternative == "greater":
            hits = (sums >= observed - tol).sum()
        elif alternative == "less":
            hits = (sums <= observed + tol).sum()
        else:
            hits = (np.abs(sums) >= abs(observed) - tol).sum()
        p = hits / len(sums) if method == "exact" else (1 + hits) / (1 + len(sums))
    low, high = bootstrap_ci(d, confidence, n_bootstrap, seed)
    return PairedTest("paired permutation", len(a), float(d.mean()), low, high, float(p),
                      alternative, {"permutations": method, "mean_a": float(a.mean()),
                                    "mean_b": float(b.mean())})


def paired_bootstrap_p(cell: Float[np.ndarray, " n"], reference: Float[np.ndarray, " n"],
                       n_bootstrap: int = 1000, seed: int = 0) -> float:
    """One-sided paired bootstrap: resample example indices; p = share of resamples whose
    cell mean is >= the reference mean (small p: the cell is reliably worse)."""
    cell, reference = np.asarray(cell, dtype=float), np.asarray(reference, dtype=float)
    if cell.shape != reference.shape or cell.ndim != 1 or len(cell) == 0:
        raise ValueError(f"Paired bootstrap needs two equal 1-d vectors, got {cell.shape} "
                         f"and {reference.shape}")
    idx = np.random.default_rng(seed).integers(0, len(cell), size=(n_bootstrap, len(cell)))
    return float(((cell[idx] - reference[idx]).mean(axis=1) >= 0).mean())


def paired_bootstrap(a: Scores, b: Scores, n_bootstrap: int = 1000, seed: int = 0) -> float:
    """The paper's test (Fig. 2), kept for comparability: a one-sided paired bootstrap over
    examples; p = share of resamples in which ``a`` does not beat ``b``
    (``mean(a - b) <= 0``). It is ``paired_bootstrap_p(b, a)``. Not an exact test:
    with no discordant pair it gives p = 1, with all pairs favouring ``a`` it gives 0."""
    a, b = _pair(a, b)
    return paired_bootstrap_p(b, a, n_bootstrap, seed)


# ---------------------------------------------------------------------- multiplicity
def holm(p_values: Sequence[float]) -> Float[np.ndarray, " m"]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order. NaN
    entries (no test) stay NaN and do not count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------------- power
def _z_alpha(alpha: float, alternative: str) -> float:
    _check_alternative(alternative)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: must lie in (0, 1)")
    return float(norm.isf(alpha / 2 if alternative == "two-sided" else alpha))


def _critical_high(d: Int[np.ndarray, " m"], level: float) -> Int[np.ndarray, " m"]:
    """Smallest x with P(X >= x) <= level for X ~ Binom(d, 1/2) (d + 1 when none)."""
    c = binom.ppf(1 - level, d, 0.5).astype(int) + 1
    # guard the float edge: step down while P(X >= c - 1) <= level still holds
    for _ in range(2):
        lower_ok = (c - 1 >= 0) & (binom.sf(c - 2, d, 0.5) <= level)
        c = np.where(lower_ok, c - 1, c)
    return c


def mcnemar_power(n: int, p10: float, p01: float, alpha: float = 0.05,
                  alternative: Alternative = "greater") -> float:
    """Exact power of ``mcnemar_exact`` on ``n`` pairs whose discordant cells have
    probabilities ``p10`` (a right, b wrong) and ``p01``: the number of discordant pairs is
    Binom(n, p10 + p01), and given it the test rejects as the binomial test would."""
    _z_alpha(alpha, alternative)
    if n <= 0:
        return 0.0
    pd = p10 + p01
    if not 0 <= p10 <= 1 or not 0 <= p01 <= 1 or pd > 1:
        raise ValueError(f"p10={p10}, p01={p01}: not probabilities of disjoint cells")
    if pd == 0:
        return 0.0
    q = p10 / pd
    d = np.arange(n + 1)
    weights = binom.pmf(d, n, pd)
    if alternative == "two-sided":
        c = _critical_high(d, alpha / 2)
        reject = binom.sf(c - 1, d, q) + binom.cdf(d - c, d, q)
        reject = np.where(d - c >= c, 1.0, reject)  # overlapping tails (tiny d never reject)
    else:
        c = _critical_high(d, alpha)
        reject = binom.sf(c - 1, d, q) if alternative == "greater" else binom.cdf(d - c, d, q)
    return float(np.clip((weights * reject).sum(), 0.0, 1.0))


def mcnemar_n_connor(p10: float, p01: float, alpha: float = 0.05, power: float = 0.8,
                     alternative: Alternative = "greater") -> float:
    """Connor's (1987) normal-approximation sample size for McNemar's test:
    ``n = (z_a sqrt(pd) + z_b sqrt(pd - delta^2))^2 / delta^2``, ``pd = p10 + p01``,
    ``delta = p10 - p01``; inf when the effect is zero or against the alternative."""
    delta, pd = p10 - p01, p10 + p01
    if delta == 0 or (alternative == "greater" and delta < 0) or (alternative == "less" and delta > 0):
        return float("inf")
    za, zb = _z_alpha(alpha, alternative), float(norm.ppf(power))
    return math.ceil((za * math.sqrt(pd) + zb * math.sqrt(max(0.0, pd - delta * delta))) ** 2
                     / delta ** 2)


def mcnemar_n_needed(p10: float, p01: float, alpha: float = 0.05, power: float = 0.8,
                     alternative: Alternative = "greater", exact_up_to: int = 20_000) -> float:
    """The n (pairs) at which the exact McNemar test reaches ``power`` at the observed
    discordance: a bisection on ``mcnemar_power`` (nearly monotone in n; the exact test's
    saw-tooth can make a few smaller n reach it too), bracketed by Connor's approximation.
    Beyond ``exact_up_to`` pairs, Connor's approximation itself. inf when the effect is zero
    or against ``alternative``."""
    approx = mcnemar_n_connor(p10, p01, alpha, power, alternative)
    if not math.isfinite(approx) or approx > exact_up_to:
        return float(approx)
    lo, hi = max(0, int(approx) // 2), max(8, 2 * int(approx))
    while mcnemar_power(hi, p10, p01, alpha, alternative) < power:
        lo, hi = hi, hi * 2
    while lo > 0 and mcnemar_power(lo, p10, p01, alpha, alternative) >= power:
        hi, lo = lo, lo // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mcnemar_power(mid, p10, p01, alpha, alternative) >= power:
            hi = mid
        else:
            lo = mid
    return float(hi)


def proportions_n_needed(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8,
                         alternative: Alternative = "greater") -> float:
    """Examples per group to tell two *independent* proportions apart (normal approximation,
    pooled variance under the null, no continuity correction):
    ``n = (z_a sqrt(2 pbar qbar) + z_b sqrt(p1 q1 + p2 q2))^2 / (p1 - p2)^2``."""
    delta = p1 - p2
    if delta == 0 or (alternative == "greater" and delta < 0) or (alternative == "less" and delta > 0):
        return float("inf")
    za, zb = _z_alpha(alpha, alternative), float(norm.ppf(power))
    pbar = (p1 + p2) / 2
    return float(math.ceil((za * math.sqrt(2 * pbar * (1 - pbar))
                            + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / delta ** 2))


def paired_mean_n_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                         alternative: Alternative = "greater") -> float:
    """Pairs needed to detect a mean paired difference ``effect`` whose per-pair standard
    deviation is ``sd`` (normal approximation of the sign-flip permutation / paired t test):
    ``n = ((z_a + z_b) sd / effect)^2``."""
    if effect == 0 or (alternative == "greater" and effect < 0) or (alternative == "less" and effect > 0):
        return float("inf")
    if sd <= 0:
        return 1.0
    za, zb = _z_alpha(alpha, alternative), float(norm.ppf(power))
    return float(math.ceil(((za + zb) * sd / abs(effect)) ** 2))


def n_needed_from_z(n: float, z: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """For a one-sided test whose z-statistic grows as sqrt(n): the n at which an effect
    observed with statistic ``z`` at ``n`` would reach ``power``: ``n * ((z_a + z_b) / z)^2``.
    inf when ``z`` is not positive."""
    if not (math.isfinite(z) and z > 0):
        return float("inf")
    za, zb = _z_alpha(alpha, "greater"), float(norm.ppf(power))
    return float(math.ceil(n * ((za + zb) / z) ** 2))


def n_needed_from_p(n: float, p: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """``n_needed_from_z`` with the z of the observed one-sided p (``z = isf(p)``); inf when
    p >= 1/2."""
    return n_needed_from_z(n, float(norm.isf(min(max(p, 1e-300), 1.0))), alpha, power)


# ---------------------------------------------------------------------- verdicts
def verdict(effect: float, p_adjusted: float, n: float, n_needed: float,
            alpha: float = 0.05) -> str:
    """``supported``: corrected p < alpha with the effect in the claimed direction (> 0).
    ``underpowered (n ≈ N needed)``: the effect points the claimed way, the corrected p
    does not pass, and ``n`` is below the ``n_needed`` for 80% power at the observed effect.
    ``not supported``: anything else (no effect, the effect against the claim, or a test
    that had the power and still did not pass)."""
    if not (np.isfinite(effect) and np.isfinite(p_adjusted)):
        return NOT_SUPPORTED
    if effect > 0 and p_adjusted < alpha:
        return SUPPORTED
    if effect > 0 and math.isfinite(n_needed) and n_needed > n:
        return f"{UNDERPOWERED} (n ≈ {format_n(n_needed)} needed)"
    return NOT_SUPPORTED


def format_n(n: float) -> str:
    if not math.isfinite(n):
        return "∞"
    return f"{int(n):,}" if n < 1e6 else f"{n:.1e}"


def format_pct(x: float) -> str:
    """A proportion as a percentage with one decimal (``-`` when undefined)."""
    return "-" if not np.isfinite(x) else f"{100 * x:.1f}"


def format_p(x: float) -> str:
    """A p-value: two significant digits, scientific below 0.001 (``-`` when undefined)."""
    if not np.isfinite(x):
        return "-"
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"
