"""The verdict at every budget: the best configuration at each checkpoint of the budget (equal tokens)
and at each point of the time grid (equal time), and whether it was still changing at the end.

Every trial validates at ``checkpoints`` fractions of its budget, and with ``time_grid_s`` on a
common time grid, so "would the answer hold with a shorter run?" is read off measurements; "with a
longer one?" can only be answered by whether it was still moving. A change of leader counts only when
the new leader is ahead of the old one beyond the seed noise (:mod:`bptt_harness.seeds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from bptt_harness.report.frame import CURVE, TIME_CURVE, labels
from bptt_harness.report.rank import grid_point
from bptt_harness.seeds import Leaders, leaders, seed_means

MAX_TIME_ROWS = 8


@dataclass
class Leg:
    """The leaders along one axis. ``table``: one row per point ``at`` (a budget fraction, or training
    seconds) with ``best``/``best_ppl``, ``runner``/``runner_ppl``, ``tie`` (the two within the seed
    noise) and ``measured`` (configurations with a value there). ``values``: config_key x at -> ppl."""

    axis: str                       # "tokens" or "time"
    table: pd.DataFrame
    values: pd.DataFrame
    moving: bool = False            # the leader changed between the last two points
    since: float | None = None      # from here on the final leader led (or tied for the lead) throughout
    leaders: dict[float, Leaders] = field(default_factory=dict)  # at -> who led there (bptt_harness.seeds)


@dataclass
class BudgetVerdict:
    tokens: Leg | None = None
    time: Leg | None = None
    sentences: list[str] = field(default_factory=list)


def _fractions(trial: pd.Series) -> list[tuple[float, float]]:
    """(fraction of the budget, loss) for each checkpoint of one trial, snapped to k / checkpoints."""
    curve = [p for p in trial[CURVE] if isinstance(p, dict) and p.get("loss") is not None]
    n = len(curve)
    budget = trial.get("resolved_budget_tokens")
    if budget is None or pd.isna(budget):
        budget = trial.get("budget_tokens")
    out = []
    for i, p in enumerate(curve):
        if budget is not None and pd.notna(budget) and budget > 0 and p.get("tokens") is not None:
            f = p["tokens"] / budget
            f = round(f * n) / n if n else f
        else:
            f = (i + 1) / n
        out.append((f, float(p["loss"])))
    return out


def _point(at: float, groups: dict[str, list[float]]) -> tuple[dict, Leaders]:
    """The leaders at one point, with the seed noise measured at that point."""
    lead = leaders(seed_means(groups))
    means = {k: sum(v) / len(v) for k, v in groups.items()}
    runner = lead.order[1] if len(lead.order) > 1 else None
    return ({"at": at, "best": lead.best, "best_ppl": means[lead.best], "runner": runner,
             "runner_ppl": means[runner] if runner is not None else math.nan,
             "tie": runner is not None and runner in lead.tied, "separated": lead.separated,
             "noise_known": lead.noise_known, "measured": len(lead.order)}, lead)


def _settle(leg: Leg) -> Leg:
    """``moving`` and ``since`` from the leaders at each point."""
    t = leg.table
    if len(t) < 2:
        return leg
    final = t.iloc[-1]["best"]

    def leads(i: int) -> bool:  # the final leader leads at point i, or is not separated from the leader there
        lead = leg.leaders[float(t.iloc[i]["at"])]
        return lead.best == final or final in lead.tied

    leg.moving = not leads(len(t) - 2)
    i = len(t) - 1
    while i > 0 and leads(i - 1):
        i -= 1
    leg.since = float(t.iloc[i]["at"])
    return leg


def _leg(axis: str, rows: list[tuple[str, float, float]]) -> Leg | None:
    """(config_key, at, ppl) of every run -> the leaders along one axis (None without rows)."""
    if not rows:
        return None
    long = pd.DataFrame(rows, columns=["config_key", "at", "ppl"])
    values = long.pivot_table(index="config_key", columns="at", values="ppl", aggfunc="mean")
    points = [_point(float(at), {str(k): list(v) for k, v in by_at.groupby("config_key")["ppl"].agg(list).items()})
              for at, by_at in long.groupby("at")]
    table = pd.DataFrame([row for row, _ in points])
    return _settle(Leg(axis, table, values, leaders={row["at"]: lead for row, lead in points}))


def verdict_by_budget(trials: pd.DataFrame, ranked: pd.DataFrame, equal_time_s: float | None) -> BudgetVerdict:
    """The leaders at every checkpoint fraction and every common time-grid point up to ``equal_time_s``."""
    out = BudgetVerdict()
    if ranked.empty:
        return out
    keys = set(ranked["config_key"])
    ok = trials[(trials["status"] == "ok") & trials["config_key"].isin(keys)]
    names = dict(zip(ranked["config_key"], labels(ranked)))

    rows = [(r["config_key"], f, math.exp(min(loss, 700))) for _, r in ok.iterrows() for f, loss in _fractions(r)]
    out.tokens = _leg("tokens", rows)
    if equal_time_s is not None and TIME_CURVE in ok:
        grid = sorted({p["grid_s"] for c in ok[TIME_CURVE] for p in c
                       if isinstance(p, dict) and p.get("grid_s") is not None and p["grid_s"] <= equal_time_s + 1e-9})
        rows = [(k, g, math.exp(min(p["loss"], 700))) for k, c in zip(ok["config_key"], ok[TIME_CURVE]) for g in grid
                if (p := grid_point(c, g)) is not None]
        out.time = _leg("time", rows)
        if out.time is not None and len(out.time.table) > MAX_TIME_ROWS:  # evenly spaced rows, the last one kept
            step = math.ceil(len(out.time.table) / MAX_TIME_ROWS)
            keep = sorted({*range(len(out.time.table) - 1, -1, -step)})
            out.time.table = out.time.table.iloc[keep].reset_index(drop=True)
    out.sentences = [s for s in (_sentence(out.tokens, names), _sentence(out.time, names)) if s]
    return out


def at_text(leg: Leg, at: float) -> str:
    return f"{at:.0%} of the budget" if leg.axis == "tokens" else f"{at:.3g} s"


def _sentence(leg: Leg | None, names: dict[str, str]) -> str | None:
    if leg is None or leg.table.empty:
        return None
    where = "At equal tokens" if leg.axis == "tokens" else "At equal training time"
    t = leg.table
    if len(t) < 2:
        return f"{where} there is one point only, so it cannot say whether the verdict was still moving."
    last, prev = t.iloc[-1], t.iloc[-2]
    final = names.get(last["best"], last["best"])
    noise = "" if bool(last["noise_known"]) else " (single-seed: no seed noise measured, so every difference counts)"
    if leg.moving:
        span = (f"{prev['at']:.0%} and {last['at']:.0%} of the budget" if leg.axis == "tokens" else
                f"{prev['at']:.3g} s and {last['at']:.3g} s of training")
        return (f"{where} the best changed between {span} "
                f"(from {names.get(prev['best'], prev['best'])} to {final}): a longer run may change it again{noise}.")
    since = leg.since if leg.since is not None else float(last["at"])
    if since == float(t.iloc[0]["at"]):
        return f"{where} {final} led (or tied for the lead) at every point, from {at_text(leg, since)} on{noise}."
    return (f"{where} {final} has led (or tied for the lead) since {at_text(leg, since)}: the verdict was not "
            f"moving at the end{noise}.")
