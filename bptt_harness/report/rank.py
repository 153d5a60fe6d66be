"""Ranking: non-dominated sorting on (perplexity, cost), ties within the measured spread, equal-time ranking.

All functions are pure and work on the per-configuration frame of
:func:`bptt_harness.report.frame.aggregate_configs` (mean in ``<metric>``, spread in ``<metric>_std``).
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bptt_harness.record import COST_LABELS
from bptt_harness.report.frame import CURVE, TIME_CURVE
from bptt_harness.report.noise import PPL_TOL, table_means
from bptt_harness.seeds import Leaders, SeedMean, adjacent_ties, leaders, seed_means

log = logging.getLogger(__name__)

# Above this many configurations the O(n^2) spread-aware dominance matrix would need too much
# memory; the exact O(n log n) two-objective sort is used instead (spreads then ignored).
MATRIX_LIMIT = 12_000


_BLOCK = 512


def _tolerance(std: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Pairwise tie tolerance for one objective (rows ``lo:hi``): the spread of the difference of two runs.

    ``sqrt(s_i^2 + s_j^2)``; a configuration measured once borrows the other's spread (same noise
    assumed), and two single runs have none (exact comparison).
    """
    s = np.asarray(std, dtype=float)
    if np.isnan(s).all():
        return np.zeros((1, 1))  # no repeats anywhere: exact comparison (broadcasts)
    v = s * s
    vi, vj = v[lo:hi, None], v[None, :]
    total = np.where(np.isnan(vi), vj, vi) + np.where(np.isnan(vj), vi, vj)
    return np.sqrt(np.nan_to_num(total))


def dominance_matrix(values: np.ndarray, stds: np.ndarray | None = None) -> np.ndarray:
    """``D[i, j]`` is True when configuration i dominates j (lower is better on every objective).

    i dominates j when it is not worse than j beyond the spread on any objective and better beyond
    the spread on at least one. With no spreads this is ordinary Pareto dominance.
    """
    v = np.asarray(values, dtype=float)
    n, k = v.shape
    s = np.full_like(v, np.nan) if stds is None else np.asarray(stds, dtype=float)
    out = np.zeros((n, n), dtype=bool)
    # Row blocks keep the float temporaries small (n = 10,000 would need GBs at once).
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        better = np.zeros((hi - lo, n), dtype=bool)
        worse = np.zeros((hi - lo, n), dtype=bool)
        for o in range(k):
            tol = _tolerance(s[:, o], lo, hi)
            diff = v[lo:hi, o][:, None] - v[:, o][None, :]  # v_i - v_j
            better |= diff < -tol
            worse |= diff > tol
        out[lo:hi] = better & ~worse
    return out


def pareto_ranks(values: np.ndarray, stds: np.ndarray | None = None) -> np.ndarray:
    """Non-dominated sorting: rank 1 is the Pareto front, rank 2 the front once rank 1 is removed, ...

    Values must be finite (callers put missing costs at +inf before, which is finite-comparable).
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return np.zeros(0, dtype=int)
    if n > MATRIX_LIMIT:
        log.info("%d configurations: exact two-objective sort without spreads", n)
        return pareto_ranks_2d(v)
    dom = dominance_matrix(v, stds)
    dominated_by = dom.sum(axis=0).astype(np.int64)
    ranks = np.zeros(n, dtype=int)
    remaining = np.ones(n, dtype=bool)
    rank = 0
    while remaining.any():
        rank += 1
        front = remaining & (dominated_by == 0)
        if not front.any():
            # Spread-aware dominance is not transitive, so a cycle is possible: close it as one front.
            front = remaining.copy()
        ranks[front] = rank
        remaining &= ~front
        dominated_by -= dom[front].sum(axis=0)
    return ranks


def pareto_ranks_2d(values: np.ndarray) -> np.ndarray:
    """Exact non-dominated sorting of two objectives in O(n log n) (no spreads)."""
    v = np.asarray(values, dtype=float)
    order = np.lexsort((v[:, 1], v[:, 0]))
    ranks = np.zeros(len(v), dtype=int)
    last: list[tuple[float, float]] = []  # per front: the (f1, f2) added last, which has the front's least f2
    last_f2: list[float] = []
    for i in order:
        f1, f2 = v[i]
        # The fronts' last f2 values increase with the front index; find the first front whose last
        # member does not dominate this point.
        k = bisect.bisect_right(last_f2, f2)
        # bisect_right skips fronts whose last f2 <= f2; one with equal f2 and equal f1 is a duplicate
        # (not dominated), so step back over it.
        while k > 0 and last_f2[k - 1] == f2 and last[k - 1][0] == f1:
            k -= 1
        if k == len(last):
            last.append((f1, f2))
            last_f2.append(f2)
        else:
            last[k] = (f1, f2)
            last_f2[k] = f2
        ranks[i] = k + 1
    return ranks


@dataclass
class Ranking:
    """The result of :func:`rank_configs`.

    Attributes:
        table: rankable configurations, best first, with ``pareto_rank`` (1 = front), ``place``
            (equal places are ties within the measured spread on both objectives) and ``tie``.
        infeasible: configurations that never finished ok because of ``oom`` or ``diverged``, with ``reason``.
        unranked: configurations with no ok run for other reasons (pruned, timeout, failed).
        cost: the cost column ranked against; ``cost_label`` says it in words.
        notes: sentences about choices made (a cost that was not measured, spreads ignored, ...).
    """

    table: pd.DataFrame
    infeasible: pd.DataFrame
    unranked: pd.DataFrame
    cost: str
    cost_label: str
    notes: list[str] = field(default_factory=list)


def rank_configs(configs: pd.DataFrame, cost: str = "seconds_per_ktok") -> Ranking:
    """Rank configurations by (``val_ppl``, ``cost``): Pareto rank first, then perplexity, then cost."""
    notes: list[str] = []
    ok = configs[(configs["n"] > 0) & configs["val_ppl"].notna()].copy()
    if cost not in ok.columns or (len(ok) and ok[cost].notna().sum() == 0):
        if cost != "seconds_per_ktok" and len(ok) and ok["seconds_per_ktok"].notna().any():
            notes.append(f"{COST_LABELS.get(cost, cost)} was not measured on this hardware; "
                         "ranked against seconds per 1k tokens instead.")
            cost = "seconds_per_ktok"
    failed = configs[~configs.index.isin(ok.index)].copy()
    is_infeasible = (failed["n_oom"] + failed["n_diverged"]) > 0
    infeasible = failed[is_infeasible].sort_values(["tokens_per_step", "bptt", "batch_size"], na_position="last")
    unranked = failed[~is_infeasible]
    if ok.empty:
        return Ranking(ok.assign(pareto_rank=pd.Series(dtype=int), place=pd.Series(dtype=int),
                                 tie=pd.Series(dtype=bool)), infeasible, unranked, cost,
                       COST_LABELS.get(cost, cost), notes)
    c = ok[cost].to_numpy(dtype=float) if cost in ok.columns else np.full(len(ok), np.nan)
    if np.isnan(c).any() and not np.isnan(c).all():
        notes.append(f"{int(np.isnan(c).sum())} configuration(s) have no {COST_LABELS.get(cost, cost)}; "
                     "they are ranked as the most expensive.")
    c = np.where(np.isnan(c), np.inf, c)
    vals = np.column_stack([ok["val_ppl"].to_numpy(dtype=float), c])
    stds = np.column_stack([ok[_ppl_spread(ok)].to_numpy(dtype=float),
                            ok[f"{cost}_std"].to_numpy(dtype=float) if f"{cost}_std" in ok else np.full(len(ok), np.nan)])
    big_c = np.where(np.isinf(vals[:, 1]), np.finfo(float).max, vals[:, 1])
    vals_f = np.column_stack([vals[:, 0], big_c])
    if len(ok) > MATRIX_LIMIT:
        notes.append(f"{len(ok)} configurations: ranked without the spread-aware ties (too many to compare pairwise).")
    ok["pareto_rank"] = pareto_ranks(vals_f, stds)
    ok["_cost_sort"] = vals_f[:, 1]
    ok = ok.sort_values(["pareto_rank", "val_ppl", "_cost_sort"], kind="mergesort").drop(columns="_cost_sort")
    ok = ok.reset_index(drop=True)
    ok["place"], ok["tie"] = _places(ok, cost)
    return Ranking(ok, infeasible.reset_index(drop=True), unranked.reset_index(drop=True), cost,
                   COST_LABELS.get(cost, cost), notes)


def _ppl_spread(table: pd.DataFrame) -> str:
    """The perplexity tolerance column: the half-width of the 95% t interval (bptt_harness.report.noise), or for a
    frame built without them the standard deviation of the repeats."""
    return PPL_TOL if PPL_TOL in table else "val_ppl_std"


def _within(a: float, b: float, sa: float, sb: float) -> bool:
    sa = sb if math.isnan(sa) else sa
    sb = sa if math.isnan(sb) else sb
    tol = math.sqrt((0 if math.isnan(sa) else sa) ** 2 + (0 if math.isnan(sb) else sb) ** 2)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol


def _places(table: pd.DataFrame, cost: str) -> tuple[list[int], list[bool]]:
    """Places 1, 2, 2, 4, ...: a row shares the place above it when it is in the same front, not separated
    from that row in perplexity by the seed noise (:func:`bptt_harness.seeds.adjacent_ties`) and within the
    spread of repeats in cost (a tie, not a win)."""
    places: list[int] = []
    ties: list[bool] = []
    ppl_tie = _ppl_ties(table)
    cost_v = table[cost].to_numpy(dtype=float) if cost in table else np.full(len(table), np.nan)
    cost_v = np.where(np.isnan(cost_v), np.inf, cost_v)
    cost_s = table[f"{cost}_std"].to_numpy(dtype=float) if f"{cost}_std" in table else np.full(len(table), np.nan)
    ranks = table["pareto_rank"].to_numpy()
    for i in range(len(table)):
        tie = i > 0 and ranks[i] == ranks[i - 1] and ppl_tie[i] and _within(cost_v[i], cost_v[i - 1], cost_s[i], cost_s[i - 1])
        places.append(places[-1] if tie else i + 1)
        ties.append(bool(tie))
    # The row a tie refers to is part of the tie as well.
    for i in range(len(ties) - 1):
        if ties[i + 1]:
            ties[i] = True
    return places, ties


def _ppl_ties(table: pd.DataFrame) -> list[bool]:
    """Per row: its perplexity is not separated from the row above's (False for the first row)."""
    if "val_ppl_se" in table and "val_ppl_dof" in table:
        means = table_means(table)
        return adjacent_ties([means[str(k)] for k in table["config_key"]]) if len(table) else []
    # A frame built without seed intervals: within the spread of repeats.
    p, s = table["val_ppl"].to_numpy(dtype=float), table["val_ppl_std"].to_numpy(dtype=float)
    return [False] + [_within(p[i], p[i - 1], s[i], s[i - 1]) for i in range(1, len(table))]


# --- equal wall time ---------------------------------------------------------------------------

@dataclass
class EqualTime:
    """Ranking by perplexity at the same training time for every configuration.

    Attributes:
        seconds: the latest training time every ranked configuration reached (``None`` if no curves): on
            the study's time grid, the latest grid time every run has a point for.
        table: config rows with ``ppl_at_time`` (mean over repeats), ``ppl_at_time_std`` and ``place_time``;
            a configuration with no point at that time is not measured (NaN, no place, listed last).
        best_budget / best_time: config keys of the best configuration at the study's budget and at
            equal time.
        disagree: the budget's best is separated from the best at equal time (not one of its ties).
        spearman: rank correlation of the two perplexity orders (None with fewer than 3 configurations).
        comparable: the budget's best has a checkpoint by ``seconds``; when False nothing can be said.
        on_grid: the values are validation points of the time grid; else interpolated between checkpoints.
        max_offset_s: on the grid, the largest distance between a point's training time and its grid time.
        leaders: who leads at that time and whom the lead is separated from, with the seed noise measured
            there (:func:`bptt_harness.seeds.leaders`). means: each configuration's mean and noise there.
    """

    seconds: float | None
    table: pd.DataFrame
    best_budget: str | None = None
    best_time: str | None = None
    disagree: bool = False
    spearman: float | None = None
    comparable: bool = True
    on_grid: bool = False
    max_offset_s: float | None = None
    leaders: Leaders | None = None
    means: dict[str, SeedMean] = field(default_factory=dict)


def ppl_at(curve: list[dict], seconds: float) -> float:
    """Validation perplexity at ``seconds`` of training: the loss is interpolated linearly between
    the two checkpoints around it; NaN before the first checkpoint (nothing was measured yet)."""
    pts = sorted((float(p["seconds"]), float(p["loss"])) for p in curve
                 if isinstance(p, dict) and p.get("seconds") is not None and p.get("loss") is not None
                 and math.isfinite(p["loss"]))
    if not pts or seconds < pts[0][0] - 1e-9:
        return math.nan
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if s0 <= seconds <= s1:
            loss = l0 if s1 == s0 else l0 + (l1 - l0) * (seconds - s0) / (s1 - s0)
            return math.exp(min(loss, 700))
    if seconds >= pts[-1][0] - 1e-9:
        # Past the last checkpoint only if seconds is (numerically) the last one.
        return math.exp(min(pts[-1][1], 700)) if seconds - pts[-1][0] <= 1e-6 * max(1.0, seconds) else math.nan
    return math.nan


def grid_point(curve: list[dict], grid_s: float) -> dict | None:
    """The time-grid point of ``curve`` taken for ``grid_s`` (None: this run has none there)."""
    for p in curve if isinstance(curve, list) else []:
        if isinstance(p, dict) and p.get("grid_s") is not None and abs(p["grid_s"] - grid_s) <= 1e-9 * max(1, grid_s):
            loss = p.get("loss")
            return p if loss is not None and math.isfinite(loss) else None
    return None


def _grid_end(curve: list[dict]) -> float:
    return max((p["grid_s"] for p in curve if isinstance(p, dict) and p.get("grid_s") is not None), default=math.nan)


def equal_time_ranking(trials: pd.DataFrame, ranked: pd.DataFrame) -> EqualTime:
    """Rank the configurations of ``ranked`` by their perplexity at the latest time all reached.

    With a time grid the comparison time is the latest grid time every run has a point for, and each
    configuration is read from its points there; without one, its checkpoints are interpolated. A
    configuration with nothing measured at that time gets no place."""
    keys = set(ranked["config_key"]) if len(ranked) else set()
    ok = trials[(trials["status"] == "ok") & trials["config_key"].isin(keys)]
    grid_ends = ok[TIME_CURVE].map(_grid_end) if TIME_CURVE in ok else pd.Series(math.nan, index=ok.index)
    on_grid = bool(grid_ends.notna().any())
    ends = grid_ends if on_grid else ok[CURVE].map(
        lambda c: max((p.get("seconds") or 0.0 for p in c if isinstance(p, dict)), default=math.nan))
    ok = ok.assign(_end=ends)[ends.notna() & (ends > 0)]
    empty = ranked.iloc[0:0].assign(ppl_at_time=pd.Series(dtype=float), ppl_at_time_std=pd.Series(dtype=float),
                                    place_time=pd.Series(dtype=float))
    if ok.empty or ok["config_key"].nunique() < 1:
        return EqualTime(None, empty)
    # Per configuration the latest time all its repeats reached; then the earliest over configurations.
    t_star = float(ok.groupby("config_key")["_end"].min().min())
    offset = None
    if on_grid:
        points = [grid_point(c, t_star) for c in ok[TIME_CURVE]]
        values = [math.exp(min(p["loss"], 700)) if p else math.nan for p in points]
        offsets = [abs(p["seconds"] - t_star) for p in points if p and p.get("seconds") is not None]
        offset = max(offsets) if offsets else None
    else:
        values = [ppl_at(c, t_star) for c in ok[CURVE]]
    at = ok.assign(_p=values).groupby("config_key")["_p"].agg(["mean", "std", "count"])
    # The seed noise measured at this time point, not the budget's (the two differ: early in training
    # seeds disagree more).
    groups = {str(k): [float(v) for v in g.dropna()] for k, g in ok.assign(_p=values).groupby("config_key")["_p"]}
    means = seed_means({k: v for k, v in groups.items() if v})
    table = ranked[["config_key", "bptt", "batch_size", "tokens_per_step", "val_ppl", "val_ppl_std", "place"]].copy()
    table["ppl_at_time"] = table["config_key"].map(at["mean"])
    table["ppl_at_time_std"] = table["config_key"].map(at["std"])
    table["ppl_at_time_interval"] = [means[k].interval().label() if k in means else None
                                     for k in table["config_key"].astype(str)]
    table = table.sort_values(["ppl_at_time", "val_ppl"], na_position="last", kind="mergesort").reset_index(drop=True)
    measured = [str(k) for k, v in zip(table["config_key"], table["ppl_at_time"]) if pd.notna(v) and str(k) in means]
    tie = dict(zip(measured, adjacent_ties([means[k] for k in measured])))
    places: list[float] = []
    for i, key in enumerate(table["config_key"].astype(str)):
        if key not in tie:
            places.append(math.nan)  # not measured at that time: never ranked
            continue
        places.append(places[-1] if i > 0 and tie[key] else i + 1)
    table["place_time"] = places
    if not measured:
        return EqualTime(t_star, table)
    lead = leaders({k: means[k] for k in measured})
    b_budget = ranked.loc[ranked["val_ppl"].idxmin()]
    key_budget = str(b_budget["config_key"])
    comparable = key_budget in means
    # Not a disagreement if, at equal time, the budget's best is tied with the time's best; and no
    # verdict at all if the budget's best had not been evaluated yet by then.
    disagree = comparable and key_budget != lead.best and key_budget not in lead.tied
    both = table.dropna(subset=["ppl_at_time", "val_ppl"])
    rho = None
    if len(both) >= 3:
        rho = float(both["ppl_at_time"].rank().corr(both["val_ppl"].rank()))
        rho = None if math.isnan(rho) else rho
    return EqualTime(t_star, table, key_budget, lead.best, bool(disagree), rho, comparable, on_grid, offset, lead,
                     {k: means[k] for k in measured})
