"""Paired comparison of two runs tested on the same tasks (same dataset, eval.seed and eval.num_tasks).

Tasks differ far more from each other than two algorithms differ on one task, so comparing the two means through
their separate CIs wastes most of the information: the per-task differences are what matters. We report the mean
difference with a paired t-test and a percentile bootstrap CI of the mean difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class PairedComparison:
    n: int
    mean_a: float
    mean_b: float
    diff: float            # mean of (a - b) over tasks
    ci95_low: float        # bootstrap percentile CI of the mean difference
    ci95_high: float
    t_statistic: float
    p_value: float         # two-sided paired t-test

    @property
    def significant(self) -> bool:
        """The bootstrap CI excludes zero (and the t-test agrees at 5 %)."""
        return (self.ci95_low > 0 or self.ci95_high < 0) and self.p_value < 0.05

    def as_row(self, prefix: str = "") -> dict:
        return {f"{prefix}n_tasks": self.n, f"{prefix}mean_a": self.mean_a, f"{prefix}mean_b": self.mean_b,
                f"{prefix}diff": self.diff, f"{prefix}diff_ci95_low": self.ci95_low,
                f"{prefix}diff_ci95_high": self.ci95_high, f"{prefix}t": self.t_statistic,
                f"{prefix}p_value": self.p_value, f"{prefix}significant": self.significant}


def paired_comparison(a, b, n_boot: int = 10000, seed: int = 0) -> PairedComparison:
    """Compare per-task values `a` and `b` (same task order). Same seed -> same bootstrap CI."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise UserError(f"a paired comparison needs the same tasks on both sides: got {a.size} and {b.size} values")
    if a.size < 2:
        raise UserError(f"a paired comparison needs at least 2 tasks, got {a.size}")
    d = a - b
    rng = np.random.default_rng(seed)
    # Resample task indices in chunks so that 10,000 x 600 stays small in memory.
    means = np.concatenate([d[rng.integers(0, d.size, size=(min(1000, n_boot - i), d.size))].mean(axis=1)
                            for i in range(0, n_boot, 1000)])
    low, high = np.percentile(means, [2.5, 97.5])
    if np.all(d == d[0]):  # no spread: the t-test is undefined; the difference is exact
        t, p = (math.inf if d[0] != 0 else math.nan), (0.0 if d[0] != 0 else 1.0)
    else:
        result = stats.ttest_rel(a, b)
        t, p = float(result.statistic), float(result.pvalue)
    return PairedComparison(int(d.size), float(a.mean()), float(b.mean()), float(d.mean()), float(low), float(high),
                            t, p)
