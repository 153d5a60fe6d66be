"""Small-sample statistics for the verdict: Student t on the real degrees of freedom, Welch's test, Holm.

Seeds are few (n = 1 to 3 per configuration), so a normal quantile (z = 2) would promise far more than
the data hold: at n = 2 (one degree of freedom) a 95% interval is 12.7 standard errors wide, not 4.
Everything here is pure Python (no scipy, which is not a dependency): the t distribution through the
regularised incomplete beta function, accurate to about 1e-10, for any positive (also fractional,
Welch-Satterthwaite) degrees of freedom.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["COVERAGE", "Interval", "Welch", "holm", "t_interval", "t_quantile", "t_sf", "welch"]

COVERAGE = 0.95   # every interval the report prints, and 1 - the level of every test


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_sf(t: float, dof: float) -> float:
    """``P(T > t)`` for Student's t on ``dof`` (> 0) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    if t2 < dof:  # near the centre: P(|T| < t) = I_y(1/2, dof/2), y = t^2 / (dof + t^2), keeps small t exact
        tail = 0.5 * (1.0 - _betainc(0.5, dof / 2.0, t2 / (dof + t2)))
    else:
        tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t2))
    return tail if t >= 0 else 1.0 - tail


def _t_pdf(t: float, dof: float) -> float:
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return math.exp(log_c - (dof + 1) / 2 * math.log1p(t * t / dof))


@functools.lru_cache(maxsize=4096)  # a pure function of two numbers; reports ask for the same few many times
def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t on ``dof`` degrees of freedom (``0 < p < 1``): closed forms at 1 and
    2 degrees of freedom, else Newton's method from the Cornish-Fisher expansion, kept inside a bracket
    (bisection where a step would leave it), to about 1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t quantile p = {p!r} must lie strictly between 0 and 1")
    if dof <= 0:
        raise ValueError(f"t quantile dof = {dof!r} must be positive")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    q = z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
    lo, hi = 0.0, max(2.0 * q, 1.0)
    while t_sf(hi, dof) > 1.0 - p:
        lo, hi = hi, hi * 2.0
    q = min(max(q, lo), hi)
    for _ in range(100):
        excess = (1.0 - p) - t_sf(q, dof)   # > 0: q is above the quantile
        if excess > 0:
            hi = q
        else:
            lo = q
        step = excess / _t_pdf(q, dof)
        if abs(step) <= 1e-13 * max(1.0, q):
            return q - step
        nxt = q - step
        q = nxt if lo < nxt < hi else (lo + hi) / 2.0
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return q


@dataclass(frozen=True)
class Interval:
    """A two-sided t interval around ``estimate``: ``lo``..``hi`` covers the true mean with ``coverage``.

    ``dof`` is None when the standard error is unknown (then ``lo == hi == estimate``); ``source`` says
    where the noise came from (``"own"``: this configuration's seeds; else where it was borrowed from).
    """

    estimate: float
    lo: float
    hi: float
    coverage: float
    n: int
    dof: float | None
    source: str = "own"

    @property
    def known(self) -> bool:
        return self.dof is not None

    def label(self) -> str:
        """``95% t interval, n=2, df=1`` (``, noise borrowed from ...`` when it was), or ``n=1, noise unknown``."""
        if self.dof is None:
            return f"n={self.n}, noise unknown"
        df = f"{self.dof:.0f}" if abs(self.dof - round(self.dof)) < 1e-9 else f"{self.dof:.1f}"
        text = f"{self.coverage:.0%} t interval, n={self.n}, df={df}"
        return text if self.source == "own" else f"{text}, noise borrowed from {self.source}"


def t_interval(estimate: float, se: float | None, dof: float | None, n: int, coverage: float = COVERAGE,
               source: str = "own") -> Interval:
    """``estimate -/+ t_{(1+coverage)/2, dof} x se``; the point itself when the noise is unknown."""
    if se is None or dof is None or not math.isfinite(se) or dof <= 0:
        return Interval(estimate, estimate, estimate, coverage, n, None, source)
    half = t_quantile(0.5 + coverage / 2.0, dof) * se
    return Interval(estimate, estimate - half, estimate + half, coverage, n, dof, source)


@dataclass(frozen=True)
class Welch:
    """Welch's test of two means: difference ``b - a``, its standard error, the Welch-Satterthwaite
    degrees of freedom and the two-sided p value (1.0 when there is no noise to test against)."""

    diff: float
    se: float
    dof: float
    p: float


def welch(mean_a: float, se_a: float, dof_a: float, mean_b: float, se_b: float, dof_b: float) -> Welch:
    """Welch's unequal-variance t test from each mean's standard error and degrees of freedom.

    Taking standard errors (not samples) lets a mean whose noise is borrowed enter with the borrowed
    estimate's degrees of freedom, which is what Welch-Satterthwaite needs."""
    va, vb = se_a * se_a, se_b * se_b
    var = va + vb
    diff = mean_b - mean_a
    if var <= 0:
        return Welch(diff, 0.0, math.inf, 1.0 if diff == 0 else 0.0)
    dof = var * var / ((va * va / dof_a if va else 0.0) + (vb * vb / dof_b if vb else 0.0))
    se = math.sqrt(var)
    return Welch(diff, se, dof, min(1.0, 2.0 * t_sf(abs(diff) / se, dof)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: reject ``i`` at level ``alpha`` when its adjusted p value is below it;
    the family-wise error rate over all the tests is then at most ``alpha``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [1.0] * len(pvalues)
    running = 0.0
    m = len(pvalues)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
