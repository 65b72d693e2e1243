"""lofit_lens.stats against hand computations, scipy and simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest, hypergeom, norm

from lofit_lens import stats
from lofit_lens.analysis.overlap import jaccard_stability
from lofit_lens.stats import paired_bootstrap_p


def pairs(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 0/1 vectors with the given paired counts (a, b)."""
    a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return np.array(a, float), np.array(b, float)


# ---------------------------------------------------------------------- intervals
@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (47, 200), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_ci(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_by_hand():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10), half-width as the formula
    z = norm.ppf(0.975)
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert stats.wilson_ci(8, 10) == pytest.approx((centre - half, centre + half))
    assert stats.wilson_ci(8, 10)[0] == pytest.approx(0.4902, abs=1e-4)  # textbook value
    assert all(math.isnan(x) for x in stats.wilson_ci(0, 0))
    # no success / all successes: the bound is exactly 0 / 1, never a rounding residue above
    assert stats.wilson_ci(0, 12)[0] == 0.0 and stats.wilson_ci(12, 12)[1] == 1.0
    with pytest.raises(ValueError):
        stats.wilson_ci(11, 10)


def test_bootstrap_ci_mean():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.2, size=400)
    low, high = stats.bootstrap_ci(x, n_bootstrap=4000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert low == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * se * 1.96)
    assert high == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * se * 1.96)
    assert stats.bootstrap_ci(np.full(30, 0.7)) == pytest.approx((0.7, 0.7))
    with pytest.raises(ValueError):
        stats.bootstrap_ci([])


def test_newcombe_without_correlation_is_square_and_add_of_wilson():
    # n11 * n00 == n10 * n01, so phi = 0 and method 10 is the square-and-add (MOVER) interval
    a, b = pairs(4, 2, 4, 2)
    assert 4 * 2 - 2 * 4 == 0
    l1, u1 = stats.wilson_ci(a.sum(), len(a))
    l2, u2 = stats.wilson_ci(b.sum(), len(b))
    d = a.mean() - b.mean()
    expected = (d - math.hypot(a.mean() - l1, u2 - b.mean()),
                d + math.hypot(u1 - a.mean(), b.mean() - l2))
    assert stats.paired_difference_ci(a, b) == pytest.approx(expected)


def test_newcombe_covers_and_narrows_with_positive_correlation():
    a, b = pairs(30, 12, 4, 54)
    low, high = stats.paired_difference_ci(a, b)
    assert low < a.mean() - b.mean() < high
    # ignoring the (positive) correlation gives a wider interval
    l1, u1 = stats.wilson_ci(a.sum(), 100)
    l2, u2 = stats.wilson_ci(b.sum(), 100)
    assert high - low < math.hypot(a.mean() - l1, u2 - b.mean()) + math.hypot(u1 - a.mean(), b.mean() - l2)


def test_newcombe_coverage_by_simulation():
    # p10 = 0.15, p01 = 0.05, p11 = 0.3 on n = 80 pairs: true difference 0.10
    rng = np.random.default_rng(0)
    cells = rng.multinomial(80, [0.3, 0.15, 0.05, 0.5], size=400)
    hits = 0
    for n11, n10, n01, n00 in cells:
        low, high = stats.paired_difference_ci(*pairs(n11, n10, n01, n00))
        hits += low <= 0.10 <= high
    assert 0.91 <= hits / 400 <= 0.99


# ---------------------------------------------------------------------- tests
def test_mcnemar_by_hand():
    a, b = pairs(20, 8, 2, 10)
    result = stats.mcnemar_exact(a, b)
    # P(X >= 8), X ~ Binom(10, 1/2) = (45 + 10 + 1) / 1024
    assert result.p == pytest.approx(56 / 1024)
    assert (result.details["n10"], result.details["n01"]) == (8, 2)
    assert result.effect == pytest.approx(6 / 40)
    assert result.ci_low < result.effect < result.ci_high
    assert stats.mcnemar_exact(a, b, "two-sided").p == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar_exact(b, a).p == pytest.approx(1 - 11 / 1024)  # P(X >= 2)
    assert stats.mcnemar_exact(*pairs(5, 0, 0, 5)).p == 1.0  # no discordant pair


def test_mcnemar_refuses_continuous_scores():
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0.2, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        stats.mcnemar_exact([1.0, 0.0], [1.0])


def test_sign_test_by_hand():
    a = np.array([0.9, 0.8, 0.7, 0.6, 0.9, 0.1, 0.5])
    b = np.array([0.1, 0.2, 0.3, 0.5, 0.4, 0.4, 0.5])  # 5 up, 1 down, 1 tie
    result = stats.paired_sign_test(a, b)
    assert result.p == pytest.approx(7 / 64)  # P(X >= 5), X ~ Binom(6, 1/2)
    assert (result.details["n_pos"], result.details["n_neg"]) == (5, 1)
    assert result.effect == pytest.approx((a - b).mean())


def test_permutation_test_exact_by_hand():
    # five positive differences: only the observed sign pattern reaches the sum, p = 1/32
    a, b = np.array([0.5, 0.6, 0.7, 0.8, 0.9]), np.zeros(5)
    assert stats.paired_permutation_test(a, b).p == pytest.approx(1 / 32)
    # d = (1, 2, 3, -1), observed sum 5: s1 + 2 s2 + 3 s3 - s4 >= 5 for the sign patterns
    # (+,+,+,+) = 5, (+,+,+,-) = 7 and (-,+,+,-) = 5 only: p = 3/16
    d = np.array([1.0, 2.0, 3.0, -1.0])
    sums = [sum(s * x for s, x in zip(signs, d)) for signs in itertools.product((1, -1), repeat=4)]
    expected = sum(s >= 5 for s in sums) / 16
    assert expected == pytest.approx(3 / 16)
    assert stats.paired_permutation_test(d, np.zeros(4)).p == pytest.approx(expected)
    assert stats.paired_permutation_test(np.ones(3), np.ones(3)).p == 1.0


def test_permutation_test_monte_carlo_agrees_with_normal_approximation():
    rng = np.random.default_rng(3)
    d = rng.normal(0.1, 1.0, size=200)
    result = stats.paired_permutation_test(d, np.zeros(200), n_permutations=20_000)
    assert result.details["permutations"] == "monte carlo"
    z = d.sum() / math.sqrt((d ** 2).sum())  # the sign-flip statistic's null sd
    assert result.p == pytest.approx(norm.sf(z), abs=0.01)


def test_paired_bootstrap_is_the_papers_with_claim_order():
    a, b = np.ones(20), np.ones(20)
    b[0] = 0  # a beats b on one example of 20: a fails to beat b only if it is never drawn
    assert stats.paired_bootstrap(a, b, n_bootstrap=20_000) == pytest.approx(0.95 ** 20, abs=0.01)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 2, 50).astype(float), rng.integers(0, 2, 50).astype(float)
    assert stats.paired_bootstrap(x, y, 500, 7) == paired_bootstrap_p(y, x, 500, 7)


def test_holm_by_hand():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 -> max(0.06, 0.04)
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    with_nan = stats.holm([0.01, float("nan"), 0.5])
    assert with_nan[0] == pytest.approx(0.02) and math.isnan(with_nan[1])
    assert with_nan[2] == pytest.approx(0.5)
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 capped at 1
    assert stats.holm([0.3, 0.4]) == pytest.approx([0.6, 0.6])  # 0.4 x 1 < 0.6: monotone
    assert stats.holm([0.6, 0.7]).max() <= 1.0


def test_holm_is_at_least_the_raw_p_and_at_most_bonferroni():
    p = np.random.default_rng(5).uniform(size=12)
    adjusted = stats.holm(p)
    assert (adjusted >= p - 1e-12).all() and (adjusted <= np.minimum(1, 12 * p) + 1e-12).all()


# ---------------------------------------------------------------------- head sets
def test_jaccard_stability_by_hand():
    sets = [[(0, 0), (0, 1)], [(0, 0), (1, 1)], [(0, 0), (0, 1)]]
    result = jaccard_stability(sets, n_layers=2, n_heads=4)
    assert result.n_pairs == 3
    assert result.jaccard == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result.expected_random == pytest.approx(2 * 2 / (8 * 2))
    # pair (set 0, set 1) meets in 1 head: P(X >= 1), X ~ Hypergeom(8, 2, 2)
    assert result.p_values[0] == pytest.approx(hypergeom.sf(0, 8, 2, 2))
    assert math.isnan(jaccard_stability(sets[:1], 2, 4).jaccard)


# ---------------------------------------------------------------------- power
def test_mcnemar_power_matches_simulation():
    n, p10, p01 = 60, 0.2, 0.05
    power = stats.mcnemar_power(n, p10, p01)
    rng = np.random.default_rng(0)
    cells = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=3000)
    rejected = np.mean([binomtest(c[0], c[0] + c[1], 0.5, "greater").pvalue <= 0.05
                        if c[0] + c[1] else False for c in cells])
    assert power == pytest.approx(rejected, abs=3 * math.sqrt(power * (1 - power) / 3000) + 0.005)
    two = stats.mcnemar_power(n, p10, p01, alternative="two-sided")
    assert two < power
    assert stats.mcnemar_power(n, 0.1, 0.1) <= 0.05 + 1e-9  # the null: at most alpha


def test_mcnemar_n_by_hand_and_exact():
    # Connor: pd = 0.25, delta = 0.15:
    # (1.6449 * 0.5 + 0.8416 * sqrt(0.2275))^2 / 0.0225 = (0.8224 + 0.4014)^2 / 0.0225 = 66.6
    za, zb = norm.isf(0.05), norm.ppf(0.8)
    by_hand = math.ceil((za * 0.5 + zb * math.sqrt(0.2275)) ** 2 / 0.0225)
    assert stats.mcnemar_n_connor(0.2, 0.05) == by_hand == 67
    n = stats.mcnemar_n_needed(0.2, 0.05)
    assert stats.mcnemar_power(int(n), 0.2, 0.05) >= 0.8
    assert stats.mcnemar_power(int(n) - 1, 0.2, 0.05) < 0.8
    assert 0.7 * by_hand < n < 1.4 * by_hand
    assert stats.mcnemar_n_needed(0.05, 0.2) == math.inf  # effect against the claim
    assert stats.mcnemar_n_needed(0.1, 0.1) == math.inf


def test_proportions_and_paired_mean_n_by_hand():
    # p1 = 0.6, p2 = 0.4: (1.6449 sqrt(0.5) + 0.8416 sqrt(0.48))^2 / 0.04 = 76.2 -> 77
    assert stats.proportions_n_needed(0.6, 0.4) == 77
    assert stats.proportions_n_needed(0.4, 0.6) == math.inf
    # (1.6449 + 0.8416)^2 * (0.2 / 0.05)^2 = 98.9 -> 99
    assert stats.paired_mean_n_needed(0.05, 0.2) == 99
    # z-scaling: a test at n = 100 with p = 0.05 (z = 1.645) needs 100 (2.486 / 1.645)^2 = 228.4
    assert stats.n_needed_from_p(100, 0.05) == 229
    assert stats.n_needed_from_p(100, 0.6) == math.inf


def test_verdict_follows_corrected_p_and_power():
    assert stats.verdict(0.1, 0.01, 100, 50) == "supported"
    assert stats.verdict(0.1, 0.2, 100, 400) == "underpowered (n ≈ 400 needed)"
    assert stats.verdict(-0.1, 0.01, 100, math.inf) == "not supported"
    assert stats.verdict(0.1, 0.2, 500, 400) == "not supported"  # had the power
    assert stats.verdict(0.0, 1.0, 100, math.inf) == "not supported"


# ---------------------------------------------------------------------- compare's intervals
def test_summary_table_intervals():
    from lofit_lens.methods.compare import markdown_table, summary_table

    cells = [{"method": "lofit", "split": "test", "fold": None, "seed": s, "params": 512,
              "seconds": 1.0, "metrics": {"test": {"exact_match": v, "n": 10}}}
             for s, v in ((0, 0.2), (1, 0.4))]
    row = summary_table(cells, ["lofit"]).iloc[0]
    # Wilson of the seed mean (0.3) over the 10 test examples (the same examples per seed)
    assert (row["exact_match_ci_low"], row["exact_match_ci_high"]) == pytest.approx(
        stats.wilson_ci(3, 10))
    # MC: MC1 by Wilson over both folds' questions; MC2 by a bootstrap over questions of the
    # per-question mean over seeds, when the runs kept per-question scores
    mc2 = {0: {0: [0.2, 0.4, 0.6], 1: [0.4, 0.6, 0.8]}, 1: {0: [0.5, 0.5], 1: [0.7, 0.9]}}
    mc = [{"method": "lofit", "split": "test", "fold": f, "seed": s, "params": 8, "seconds": 1.0,
           "metrics": {"test": {"mc1": 0.5, "mc2": float(np.mean(mc2[f][s])), "n": len(mc2[f][s])}},
           "per_example": {"test": {"mc2": mc2[f][s]}}} for f in (0, 1) for s in (0, 1)]
    frame = summary_table(mc, ["lofit"])
    row = frame.iloc[0]
    assert (row["mc1_ci_low"], row["mc1_ci_high"]) == pytest.approx(stats.wilson_ci(2.5, 5))
    questions = np.array([0.3, 0.5, 0.7, 0.6, 0.7])
    assert (row["mc2_ci_low"], row["mc2_ci_high"]) == pytest.approx(
        stats.bootstrap_ci(questions, n_bootstrap=2000, seed=0))
    assert frame.attrs["ci"] == {"mc1": "Wilson", "mc2": "bootstrap over questions"}
    text = markdown_table(frame)
    assert "| method | mc1 | mc2 | mc1_fold0 | mc1_fold1 | mc2_fold0 | mc2_fold1 | params | seconds |" \
        " mc1 95% CI (Wilson) | mc2 95% CI (bootstrap) |" in text
    # without per-question scores: no MC2 interval, said so
    for c in mc:
        del c["per_example"]
    frame = summary_table(mc, ["lofit"])
    assert np.isnan(frame.iloc[0]["mc2_ci_low"]) and "none" in frame.attrs["ci"]["mc2"]
    assert "| [" in markdown_table(frame) and "| - |" in markdown_table(frame)
