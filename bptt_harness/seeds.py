"""Seed noise: when is a difference in perplexity real?

One rule, used by the racing in the study and by the report's ranking: a configuration's mean
perplexity over seeds has a standard error ``sigma / sqrt(n)``, and two configurations tie when
their means differ by at most ``Z`` standard errors of the difference. ``sigma`` is relative to the
mean (perplexity noise grows with perplexity): the coefficient of variation over seeds pooled over
every configuration run with two seeds or more, or a configuration's own when that is larger. A
configuration measured once borrows the pooled value; with no configuration measured twice the noise
is unknown and nothing is a tie unless equal. Pure Python, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Z = 2.0  # standard errors: about a 95% interval for a normal mean


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def cv(values: Sequence[float]) -> float | None:
    """Sample standard deviation / mean of one configuration's seeds (None with fewer than two)."""
    if len(values) < 2:
        return None
    m = mean(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / m if m > 0 else None


def pooled_cv(groups: Iterable[Sequence[float]]) -> float | None:
    """The study's seed noise: coefficients of variation pooled over configurations with >= 2 seeds,
    weighted by their degrees of freedom (None when no configuration has two)."""
    num = dof = 0.0
    for values in groups:
        c = cv(values)
        if c is not None:
            num += (len(values) - 1) * c * c
            dof += len(values) - 1
    return math.sqrt(num / dof) if dof else None


def standard_error(values: Sequence[float], pooled: float | None) -> float | None:
    """Standard error of the mean of ``values`` (None when the noise is unknown)."""
    known = [c for c in (cv(values), pooled) if c is not None]
    return max(known) * mean(values) / math.sqrt(len(values)) if known else None


def tied(mean_a: float, se_a: float | None, mean_b: float, se_b: float | None) -> bool:
    """True when the two means differ by at most ``Z`` standard errors of their difference."""
    if se_a is None and se_b is None:
        return mean_a == mean_b
    se = math.sqrt((se_a if se_a is not None else se_b) ** 2 + (se_b if se_b is not None else se_a) ** 2)
    return abs(mean_a - mean_b) <= Z * se
