"""prunekit eval's statistics against references computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.toy import stats


def test_the_bootstrap_interval_matches_the_binomial_normal_approximation():
    rng = np.random.default_rng(0)
    correct = rng.random(500) < 0.8  # [500] bool
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(correct))  # Wald interval's half width
    low, high = stats.accuracy_interval(correct, seed=1)
    assert low < p < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40))
def test_mcnemar_exact_equals_a_two_sided_binomial_test(a_only, b_only):
    scipy_stats = pytest.importorskip("scipy.stats")
    n = a_only + b_only
    expected = 1.0 if n == 0 else scipy_stats.binomtest(a_only, n, 0.5, alternative="two-sided").pvalue
    assert stats.mcnemar_exact(a_only, b_only) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_paired_comparison_counts_discordant_questions_and_calls_clear_differences():
    a = np.array([True] * 60 + [False] * 40)
    b = np.array([True] * 30 + [False] * 70)
    c = stats.compare("a", a, "b", b)
    assert (c.a_only, c.b_only) == (30, 0) and c.difference == pytest.approx(0.3)
    assert c.interval[0] > 0 and c.p_value < 1e-8 and c.verdict == "a > b"
    same = stats.compare("a", a, "a2", a.copy())
    assert same.p_value == 1.0 and same.verdict == "a ~ a2"
    flipped = stats.compare("b", b, "a", a)
    assert flipped.verdict == "b < a"


def test_retention_is_resampled_on_the_same_questions_as_its_reference():
    reference = np.array([True] * 90 + [False] * 10)
    low, high = stats.retention_interval(reference.copy(), reference, seed=3)
    assert low == high == 1.0  # a recipe that answers exactly as the reference: no spread at all
