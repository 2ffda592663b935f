"""Paired differences over seeds and their 95% t-intervals (experiments/stats.py)."""

import math

import pytest

from experiments.stats import paired_difference, summarize, t975


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(4) == 2.776 and t975(30) == 2.042 and t975(100) == 1.96
    with pytest.raises(ValueError):
        t975(0)


def test_paired_difference_cancels_what_the_seeds_share():
    """Seed-to-seed swings of 5 points shared by both methods: the paired interval stays narrow."""
    a = {0: 0.80, 1: 0.85, 2: 0.75, 3: 0.82, 4: 0.78}
    b = {s: v - 0.01 + (0.001 if s % 2 else -0.001) for s, v in a.items()}
    d = paired_difference(a, b)
    assert d.n == 5 and d.mean == pytest.approx(0.0102, abs=1e-9)
    sd = math.sqrt(sum((x - d.mean) ** 2 for x in (0.011, 0.009, 0.011, 0.009, 0.011)) / 4)
    assert d.high - d.mean == pytest.approx(2.776 * sd / math.sqrt(5), rel=1e-6)
    assert d.excludes_zero and d.low > 0.008


def test_paired_difference_uses_common_seeds_only():
    d = paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {1: 0.6, 2: 0.6, 9: 0.1})
    assert d.n == 2 and d.mean == pytest.approx(0.05)
    assert paired_difference({0: 0.5}, {0: 0.4}) is None
    assert not paired_difference({0: 0.5, 1: 0.6}, {0: 0.6, 1: 0.5}).excludes_zero


def test_summary():
    s = summarize([0.8, 0.9])
    assert s.n == 2 and s.mean == pytest.approx(0.85) and s.std == pytest.approx(math.sqrt(0.005))
