"""Small statistics helpers for success rates and latencies."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (well behaved at 0% and 100%).

    It always contains the rate itself (no rounding error puts 0/n above 0 or n/n below 1).
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile of ``values`` for q in 0-100, NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float('nan')


def paired_difference(treated: Sequence[bool], control: Sequence[bool],
                      z: float = 1.96) -> tuple[float, float, float]:
    """Difference of two success rates measured on the same episodes (``treated - control``) with its 95% interval.

    Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10), which combines the two Wilson
    intervals with the correlation of the pairs, so a method that fails on the same episodes as the baseline gets a
    narrower interval than two independent samples would. The correlation phi carries the method's continuity
    correction: a positive ``AD - BC`` is reduced by ``N / 2`` (not below 0), a negative one is used as it is.
    """
    x = np.asarray(treated, dtype=bool)
    y = np.asarray(control, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f'paired outcomes differ in length: {x.shape} vs {y.shape}')
    n = x.size
    if n == 0:
        return float('nan'), -1.0, 1.0
    both, only_x, only_y = int(np.sum(x & y)), int(np.sum(x & ~y)), int(np.sum(~x & y))
    neither = n - both - only_x - only_y
    p1, p2 = (both + only_x) / n, (both + only_y) / n
    l1, u1 = wilson_interval(both + only_x, n, z)
    l2, u2 = wilson_interval(both + only_y, n, z)
    denominator = (both + only_x) * (only_y + neither) * (both + only_y) * (only_x + neither)
    phi = 0.0
    if denominator > 0:
        cross = both * neither - only_x * only_y
        phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(denominator)
    delta = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return delta, max(-1.0, delta - math.sqrt(max(below, 0.0))), min(1.0, delta + math.sqrt(max(above, 0.0)))


def median_ratio(numerator: Sequence[float], denominator: Sequence[float], resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``median(numerator) / median(denominator)`` with a 95% percentile-bootstrap interval.

    For example a speedup: baseline latencies over a method's. Each sample is resampled on its own; NaNs when either
    sample is empty.
    """
    a = np.asarray([v for v in numerator if math.isfinite(v)], dtype=np.float64)
    b = np.asarray([v for v in denominator if math.isfinite(v)], dtype=np.float64)
    if a.size == 0 or b.size == 0 or np.median(b) <= 0:
        return float('nan'), float('nan'), float('nan')
    rng = np.random.default_rng(seed)
    ratios = (np.median(rng.choice(a, (resamples, a.size)), axis=1)
              / np.maximum(np.median(rng.choice(b, (resamples, b.size)), axis=1), 1e-12))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(low), float(high)
