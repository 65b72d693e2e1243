"""Confidence intervals of a score: Wilson for a proportion, a percentile bootstrap for a
mean over examples. The core's (``baselines.compare``'s tables) and the analysis layer's
(``analysis.stats`` re-exports them) one implementation."""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
from jaxtyping import Float
from scipy.stats import norm

Scores = Union[Float[np.ndarray, " n"], Sequence[float]]


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
