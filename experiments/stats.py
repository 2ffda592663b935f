"""Paired comparisons over seeds: mean, sample std, and a t-based 95% confidence interval of differences.

Every method of a comparison trains with the same seeds, split and data order per seed, so the
difference between two methods is taken seed by seed (paired): the seed-to-seed variation both
share cancels, which a comparison of two means would count twice.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard table values).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    """t_{0.975, df}; the normal 1.96 beyond df = 30 (within 2% there)."""
    if df < 1:
        raise ValueError("a confidence interval needs at least two paired values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1)


def summarize(values: list[float]) -> Summary:
    return Summary(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """a - b over the seeds both finished: mean, 95% CI, and whether the interval excludes 0."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: dict[int, float], b: dict[int, float]) -> PairedDifference | None:
    """a and b map seed -> metric; None with fewer than two common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return PairedDifference(len(d), mean, mean - half, mean + half)
