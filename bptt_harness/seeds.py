"""Seed noise: when is a difference in perplexity real?

One rule, used by the racing in the study and by every ranking of the report (at the budget, at equal
time, at each checkpoint): :func:`leaders`. A configuration's mean perplexity over seeds has a
standard error ``s / sqrt(n)`` with ``n - 1`` degrees of freedom, ``s`` its own seeds' standard
deviation when it ran two seeds or more. A configuration measured once has no noise of its own: it
borrows the coefficient of variation pooled over the configurations that have one (with the pooled
degrees of freedom), and says so. With no configuration measured twice the noise is unknown and no
difference is called real or a tie (except an exact one).

The best is "separated" from the others only when Welch's test against each of them rejects at 5%
after Holm's adjustment for the number of comparisons; the others it is not separated from are its
ties. Pure Python, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bptt_harness.stats import COVERAGE, Interval, Welch, holm, t_interval, welch

__all__ = ["ALPHA", "Leaders", "SeedMean", "Z", "adjacent_ties", "cv", "leaders", "mean", "pooled", "pooled_cv", "seed_means"]

ALPHA = 1.0 - COVERAGE   # the level of every test of the verdict
# The profile-against-trials cross-check's tolerance in standard errors (report/crosscheck.py); the
# verdict itself uses t quantiles on the real degrees of freedom (bptt_harness.stats).
Z = 2.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def cv(values: Sequence[float]) -> float | None:
    """Sample standard deviation / mean of one configuration's seeds (None with fewer than two)."""
    if len(values) < 2:
        return None
    m = mean(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / m if m > 0 else None


def pooled(groups: Iterable[Sequence[float]]) -> tuple[float, int, int] | None:
    """(pooled coefficient of variation, its degrees of freedom, configurations it pools) over the
    configurations with >= 2 seeds, weighted by their degrees of freedom (None when none has two)."""
    num = 0.0
    dof = count = 0
    for values in groups:
        c = cv(values)
        if c is not None:
            num += (len(values) - 1) * c * c
            dof += len(values) - 1
            count += 1
    return (math.sqrt(num / dof), dof, count) if dof else None


def pooled_cv(groups: Iterable[Sequence[float]]) -> float | None:
    """The coefficient of variation of :func:`pooled` alone."""
    p = pooled(groups)
    return None if p is None else p[0]


@dataclass(frozen=True)
class SeedMean:
    """One configuration's mean over its seeds and how well it is known.

    ``se``/``dof`` are None when the noise is unknown; ``source`` is ``"own"`` or where the noise was
    borrowed from (``"the pooled seed noise of 3 configurations"``)."""

    estimate: float
    n: int
    se: float | None
    dof: float | None
    source: str = "own"

    def interval(self, coverage: float = COVERAGE) -> Interval:
        return t_interval(self.estimate, self.se, self.dof, self.n, coverage, self.source)


def seed_means(groups: Mapping[str, Sequence[float]]) -> dict[str, SeedMean]:
    """Per configuration: its mean, with its own noise at n >= 2, else the pooled noise, labelled as borrowed."""
    share = pooled(v for v in groups.values())
    out: dict[str, SeedMean] = {}
    for key, values in groups.items():
        if not values:
            continue
        m, n, own = mean(values), len(values), cv(values)
        if own is not None:
            out[key] = SeedMean(m, n, own * m / math.sqrt(n), float(n - 1))
        elif share is not None:
            c, dof, count = share
            out[key] = SeedMean(m, n, c * m / math.sqrt(n), float(dof),
                                f"the pooled seed noise of {count} configuration{'s' if count > 1 else ''}")
        else:
            out[key] = SeedMean(m, n, None, None)
    return out


@dataclass(frozen=True)
class Leaders:
    """Who leads at one point, and whether the lead is real.

    Attributes:
        best: the lowest mean. order: every key, best first.
        tied: the others the best is not separated from (Holm-adjusted Welch p >= ALPHA, or exactly equal).
        separated: the best is separated from every other configuration (all tests reject after Holm).
        noise_known: every comparison had a noise to test against.
        tests: key -> Welch test of (best, key); None where the noise is unknown.
        adjusted: key -> Holm-adjusted p value (missing where untested).
        borrowed: how many of the compared configurations had one seed and borrowed the pooled noise.
    """

    best: str
    order: list[str]
    tied: list[str]
    separated: bool
    noise_known: bool
    tests: dict[str, Welch | None] = field(default_factory=dict)
    adjusted: dict[str, float] = field(default_factory=dict)
    borrowed: int = 0   # compared configurations whose noise is borrowed (single seeds)

    @property
    def comparisons(self) -> int:
        return len(self.order) - 1


def _test(a: SeedMean, b: SeedMean) -> Welch | None:
    """Welch's test of a against b; a side without noise borrows the other's (None: neither has any)."""
    if a.se is None and b.se is None:
        return None
    sa, da = (a.se, a.dof) if a.se is not None and a.dof is not None else (b.se, b.dof)
    sb, db = (b.se, b.dof) if b.se is not None and b.dof is not None else (a.se, a.dof)
    assert sa is not None and sb is not None and da is not None and db is not None
    return welch(a.estimate, sa, da, b.estimate, sb, db)


def leaders(means: Mapping[str, SeedMean], alpha: float = ALPHA, anchor: str | None = None) -> Leaders:
    """The best of ``means`` (non-empty) and the configurations it is not separated from.

    ``anchor`` tests another configuration against all the others instead of the best (``best`` is then
    the anchor: a recommendation that is not the lowest perplexity)."""
    if not means:
        raise ValueError("leaders needs at least one configuration")
    order = sorted(means, key=lambda k: means[k].estimate)
    best = order[0] if anchor is None else anchor
    others = [k for k in order if k != best]
    tests = {k: _test(means[best], means[k]) for k in others}
    testable = [k for k in others if tests[k] is not None]
    adj = dict(zip(testable, holm([t.p for k in testable if (t := tests[k]) is not None])))
    tied = [k for k in others if means[k].estimate == means[best].estimate or (k in adj and adj[k] >= alpha)]
    known = len(testable) == len(others)
    borrowed = sum(1 for m in means.values() if m.se is not None and m.source != "own")
    return Leaders(best, [best, *others], tied, known and not tied and bool(others), known, tests, adj, borrowed)


def adjacent_ties(ordered: Sequence[SeedMean], alpha: float = ALPHA) -> list[bool]:
    """For configurations in ranking order: True at ``i`` when ``i`` is not separated from ``i - 1`` (Welch,
    Holm-adjusted over the ``len - 1`` neighbouring comparisons); without noise only equal means tie."""
    tests = [_test(a, b) for a, b in zip(ordered, ordered[1:])]
    testable = [i for i, t in enumerate(tests) if t is not None]
    adj = dict(zip(testable, holm([t.p for t in tests if t is not None])))
    out = [False]
    for i, (a, b) in enumerate(zip(ordered, ordered[1:])):
        out.append(a.estimate == b.estimate or (i in adj and adj[i] >= alpha))
    return out
