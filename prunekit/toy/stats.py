"""Uncertainty of accuracy figures: bootstrap intervals and paired comparisons on the same questions.

Every recipe of ``prunekit eval`` answers the same questions, so two recipes are compared pair-wise
(question by question): a paired bootstrap interval of the accuracy difference and McNemar's exact
test on the questions where exactly one of them is right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _resample_index(n: int, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """``[resamples, n]`` question indices drawn with replacement (one set shared by every figure of a run)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval over the finite samples (a ratio is undefined on a resample whose reference is 0)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def accuracy_interval(correct: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` (``[n]`` bool)."""
    index = _resample_index(len(correct), seed)
    return _interval(correct.astype(float)[index].mean(axis=1))


def retention_interval(correct: np.ndarray, reference: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of accuracy / reference accuracy, both resampled on the same questions."""
    index = _resample_index(len(correct), seed)
    ours = correct.astype(float)[index].mean(axis=1)
    base = reference.astype(float)[index].mean(axis=1)
    return _interval(ours / np.where(base > 0, base, np.nan))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of ``a_only`` successes in ``a_only + b_only`` at 1/2."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class PairedComparison:
    """``a`` against ``b`` on the same questions."""

    a: str
    b: str
    difference: float  # accuracy of a - accuracy of b
    interval: tuple[float, float]  # paired bootstrap 95% interval of the difference
    a_only: int  # questions only a answers right
    b_only: int
    p_value: float  # McNemar's exact test

    @property
    def verdict(self) -> str:
        """``a > b``, ``a < b`` (significant at 5%, the interval excluding 0 too) or ``a ~ b``."""
        if self.p_value < 0.05 and self.interval[0] > 0:
            return f"{self.a} > {self.b}"
        if self.p_value < 0.05 and self.interval[1] < 0:
            return f"{self.a} < {self.b}"
        return f"{self.a} ~ {self.b}"


def compare(a: str, correct_a: np.ndarray, b: str, correct_b: np.ndarray, seed: int = 0) -> PairedComparison:
    """Paired comparison of two recipes' per-question correctness (``[n]`` bool each, same questions)."""
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"paired comparison needs the same questions: {correct_a.shape} vs {correct_b.shape}")
    diff = correct_a.astype(float) - correct_b.astype(float)  # [n] in {-1, 0, 1}
    index = _resample_index(len(diff), seed)
    return PairedComparison(
        a=a, b=b, difference=float(diff.mean()), interval=_interval(diff[index].mean(axis=1)),
        a_only=int((diff > 0).sum()), b_only=int((diff < 0).sum()),
        p_value=mcnemar_exact(int((diff > 0).sum()), int((diff < 0).sum())),
    )
