"""What else differs between the configurations a verdict compares, besides the knob it names.

A sentence "bptt X is better" is causal only when the compared configurations differ in bptt alone.
:func:`controlled_slice` finds such a slice in the records (same tokens per step, lr, steps, schedule,
model and budget, several bptt values); :func:`detect` names everything else that could explain a
ranking, each with its numbers:

- ``steps``: the configurations took different numbers of optimiser steps and the ranking follows them
  (Spearman rank correlation of steps against perplexity);
- ``lr``: they used different learning rates;
- ``schedule``: some annealed their learning rate and others did not;
- ``data_seen``: with less than one epoch, different batch sizes train on different text;
- ``grid_edge``: the best sits at the edge of the searched values (and which values to try next);
- ``unused_context``: the models use less context than the shortest window tried (from
  ``effective_context_tokens`` when the trials measured it; "not measured" otherwise);
- ``not_settled``: the leader was still changing over the last part of the budget.

A confound that could not be measured has ``applies = None`` and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bptt_harness.report import numbers
from bptt_harness.report.budget import BudgetVerdict, verdict_by_budget
from bptt_harness.report.frame import label, labels
from bptt_harness.report.noise import table_means
from bptt_harness.seeds import Leaders, leaders

__all__ = ["CONTEXT_COLUMN", "CONTROL_FIELDS", "SLICES_COLUMN", "WORDS", "BpttEvidence", "Confound", "Confounds", "annealed", "bptt_evidence",
           "controlled_slice", "detect", "scope_text", "spearman"]

CONTEXT_COLUMN = "effective_context_tokens"
SLICES_COLUMN = "slices"  # the study's named slices a trial belongs to (comma-separated), when it declared any
# What must be equal for two configurations to differ only in bptt (tokens per step fixes the steps at an
# equal token budget; steps are checked as well, as they are what the lr schedule and the optimiser see).
CONTROL_FIELDS = ("tokens_per_step", "lr", "nhid", "emsize", "layers", "dropout", "model", "optimizer",
                  "variable_bptt", "clip")
# Each confound in a few words, for the headline's caution.
WORDS = {"steps": "optimiser steps", "lr": "learning rate", "schedule": "lr schedule", "data_seen": "text seen",
         "grid_edge": "the best is at the edge of the searched values", "unused_context": "context the models use",
         "not_settled": "the leader was still changing at the end"}
STEPS_RHO = -0.8     # a ranking "follows the steps" at this rank correlation or stronger
STEPS_SPREAD = 1.05  # steps "differ" when the most exceeds the fewest by more than 5%


@dataclass(frozen=True)
class Confound:
    """One thing besides the named knob that differs between the compared configurations.

    ``applies``: True (found), None (could not be measured: ``text`` says why)."""

    name: str
    applies: bool | None
    text: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Confounds:
    """The confounds of one comparison: ``scope`` names the configurations compared."""

    scope: str
    items: list[Confound] = field(default_factory=list)

    def found(self) -> list[Confound]:
        return [c for c in self.items if c.applies]

    def names(self) -> list[str]:
        return [c.name for c in self.found()]

    def caution(self) -> str:
        """`` Caution: ...`` for a headline when something besides the searched knobs may explain the ranking."""
        found = self.names()
        if not found:
            return ""
        return (" Caution: the ranking is confounded (" + "; ".join(WORDS.get(n, n) for n in found)
                + "), see “What else differs between the compared configurations?”.")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``name -> {applies, text, numbers...}``: what ``summary.json`` lists under ``confounds``."""
        return {c.name: {"applies": c.applies, "text": c.text, **c.numbers} for c in self.items}


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 2 points or no spread."""
    if len(x) < 2:
        return None
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def annealed(trials: pd.DataFrame) -> pd.Series:
    """Per configuration: the fraction of its ok runs whose learning rate ended below where it started."""
    ok = trials[(trials["status"] == "ok") & trials["final_lr"].notna() & trials["lr"].notna()]
    if ok.empty:
        return pd.Series(dtype=float)
    return (ok["final_lr"] < ok["lr"] * (1 - 1e-9)).groupby(ok["config_key"]).mean()


def _control_keys(table: pd.DataFrame) -> pd.Series:
    """Per row, the fields that must be equal for configurations to differ only in bptt, as one string."""
    cols = [table[f].astype(str) if f in table else pd.Series("", index=table.index) for f in CONTROL_FIELDS]
    steps = table["steps"] if "steps" in table else pd.Series(np.nan, index=table.index)
    cols.append(steps.map(lambda v: f"{float(v):.4g}" if pd.notna(v) else ""))
    return cols[0].str.cat(cols[1:], sep="\x1f", na_rep="")


def _declared(table: pd.DataFrame, trials: pd.DataFrame) -> list[pd.DataFrame]:
    """The study's own slices (the trials' ``slices`` column, when the study declared ``[slices]``)."""
    if SLICES_COLUMN not in trials or trials[SLICES_COLUMN].dropna().astype(str).str.strip().eq("").all():
        return []
    member: dict[str, set[str]] = {}
    for key, names in zip(trials["config_key"].astype(str), trials[SLICES_COLUMN]):
        if isinstance(names, str):
            member.setdefault(key, set()).update(n.strip() for n in names.split(",") if n.strip())
    names = sorted({n for v in member.values() for n in v})
    keys = table["config_key"].astype(str)
    return [table[[name in member.get(k, set()) for k in keys]].assign(_slice=name) for name in names]


def controlled_slice(table: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame | None:
    """The ranked configurations that differ only in bptt, sorted by bptt: a slice the study declared
    (``[slices]``) when it has one that varies bptt, else found in the records (the same tokens per step, lr,
    steps, model and optimiser settings); among several, the one with the most bptt values (ties: the one
    holding the lowest perplexity). None when no group has two bptt values. Whatever still differs inside
    the slice (an lr rule, annealing, ...) is for :func:`detect` to name."""
    if table.empty:
        return None
    groups = [g for g in _declared(table, trials) if g["bptt"].nunique() >= 2]
    if groups:
        best = max(groups, key=lambda g: (g["bptt"].nunique(), -float(g["val_ppl"].min())))
        return best.sort_values("bptt").reset_index(drop=True)
    keyed = table.assign(_ctl=_control_keys(table))
    sizes = keyed.groupby("_ctl", sort=False).agg(values=("bptt", "nunique"), best=("val_ppl", "min"))
    sizes = sizes[sizes["values"] >= 2]
    if sizes.empty:
        return None
    pick = sizes.sort_values(["values", "best"], ascending=[False, True], kind="mergesort").index[0]
    return keyed[keyed["_ctl"] == pick].drop(columns="_ctl").sort_values("bptt").reset_index(drop=True)


def detect(table: pd.DataFrame, trials: pd.DataFrame, all_configs: pd.DataFrame, budget: BudgetVerdict | None,
           scope: str) -> Confounds:
    """The confounds among the configurations of ``table`` (ranked rows, ``val_ppl`` per configuration).

    ``all_configs``: every configuration searched (any status), for the edges of the grid. ``budget``: the
    leaders over the budget of these same configurations."""
    out = Confounds(scope)
    if len(table) < 2:
        return out
    keys = set(table["config_key"])
    runs = trials[trials["config_key"].isin(keys)]
    checks = (_steps(table), _lr(table), _schedule(table, runs), _data_seen(table, runs),
              _grid_edge(table, all_configs), _unused_context(table, runs), _not_settled(budget, table))
    out.items = [c for c in checks if c is not None]
    return out


def _steps(table: pd.DataFrame) -> Confound | None:
    steps = table["steps"].to_numpy(dtype=float) if "steps" in table else np.array([])
    if len(steps) < 2 or np.isnan(steps).any() or steps.min() <= 0 or steps.max() <= steps.min() * STEPS_SPREAD:
        return None
    rho = spearman(steps, table["val_ppl"].to_numpy(dtype=float))
    if rho is None or rho > STEPS_RHO:
        return None
    lo, hi = float(steps.min()), float(steps.max())
    return Confound("steps", True,
                    f"the ranking follows optimiser steps: the compared configurations took {lo:,.0f} to {hi:,.0f} steps "
                    f"(x{hi / lo:.3g}) and the rank correlation of steps with perplexity is {rho:.2f} over {len(steps)} "
                    "configurations (more steps, lower perplexity), so steps, not the window, may explain the order",
                    {"steps_min": lo, "steps_max": hi, "ratio": hi / lo, "spearman": rho, "configurations": len(steps)})


def _lr(table: pd.DataFrame) -> Confound | None:
    if "lr" not in table:
        return None
    lrs = table["lr"].dropna().astype(float).round(12)
    if lrs.nunique() < 2:
        return None
    rule = table["lr_rule"].dropna().astype(str) if "lr_rule" in table else pd.Series(dtype=object)
    how = f" (the {rule.iloc[0]} rule)" if len(rule) and rule.iloc[0] not in ("fixed", "") else ""
    return Confound("lr", True,
                    f"the compared configurations used different learning rates{how}: {numbers.num(lrs.min(), 3)} to "
                    f"{numbers.num(lrs.max(), 3)} ({lrs.nunique()} values), so part of any difference is the lr",
                    {"lr_min": float(lrs.min()), "lr_max": float(lrs.max()), "values": int(lrs.nunique())})


def _schedule(table: pd.DataFrame, runs: pd.DataFrame) -> Confound | None:
    frac = annealed(runs)
    if frac.empty or frac.nunique() < 2:
        return None
    names = [n for k, n in zip(table["config_key"], labels(table)) if frac.get(k, 0) > 0]
    return Confound("schedule", True,
                    f"{len(names)} of {len(frac)} compared configurations annealed their learning rate and the others "
                    f"did not ({', '.join(names[:4])}{' …' if len(names) > 4 else ''})",
                    {"annealed": names, "configurations": int(len(frac))})


def _data_seen(table: pd.DataFrame, runs: pd.DataFrame) -> Confound | None:
    sizes = sorted({int(b) for b in table["batch_size"].dropna()})
    if len(sizes) < 2:
        return None  # one batch size: every window length walks the same columns of the same stream
    epochs = runs["budget_epochs"].dropna() if "budget_epochs" in runs else pd.Series(dtype=float)
    if epochs.empty:
        return Confound("data_seen", None,
                        "not measured: the budget is not declared in epochs, so whether the batch sizes "
                        f"({', '.join(map(str, sizes))}) trained on the same text is not known",
                        {"batch_sizes": sizes})
    e = float(epochs.min())
    if e >= 1:
        return None
    return Confound("data_seen", True,
                    f"the budget is {e:.2g} of an epoch, so batch sizes {', '.join(map(str, sizes))} trained on "
                    "different parts of the text", {"epochs": e, "batch_sizes": sizes})


def _next_values(value: int, edge: str) -> str:
    return f"{max(1, value // 2)} and below" if edge == "lowest" else f"{value * 2} and above"


def _grid_edge(table: pd.DataFrame, all_configs: pd.DataFrame) -> Confound | None:
    best = table.loc[table["val_ppl"].idxmin()]
    found: dict[str, Any] = {}
    texts = []
    knobs = [("bptt", "bptt"), ("batch_size", "batch size")]
    if table["tokens_per_step"].nunique() == 1:
        knobs = knobs[:1]  # at one tokens per step the batch size follows bptt: its edge is bptt's
    for col, word in knobs:
        searched = sorted({int(v) for v in pd.concat([table[col], all_configs[col]]).dropna()})
        compared = sorted({int(v) for v in table[col].dropna()})
        if len(compared) < 2:
            continue
        value = int(best[col])
        edge = "lowest" if value == searched[0] else "highest" if value == searched[-1] else None
        if edge is None or (edge == "lowest" and value <= 1):
            continue
        nxt = _next_values(value, edge)
        found[col] = {"best": value, "edge": edge, "searched": searched, "try": nxt}
        texts.append(f"the best ({label(best)}) has the {edge} {word} searched ({searched[0]} to {searched[-1]}): "
                     f"try {word} {nxt}")
    if not found:
        return None
    return Confound("grid_edge", True, "; ".join(texts), found)


def _unused_context(table: pd.DataFrame, runs: pd.DataFrame) -> Confound | None:
    shortest = int(table["bptt"].min())
    ctx = runs.loc[runs["status"] == "ok", CONTEXT_COLUMN].dropna() if CONTEXT_COLUMN in runs else pd.Series(dtype=float)
    if ctx.empty:
        return Confound("unused_context", None,
                        "not measured: the trials hold no effective_context_tokens, so whether the models use as much "
                        f"context as the shortest window ({shortest} tokens) gives them is unknown",
                        {"shortest_bptt": shortest})
    used = float(ctx.median())
    if used >= shortest:
        return None
    return Confound("unused_context", True,
                    f"the trained models use about {used:.3g} tokens of context (median over {len(ctx)} runs, most "
                    f"{float(ctx.max()):.3g}), less than the shortest window tried (bptt {shortest}): at this budget a "
                    "longer window cannot matter yet",
                    {"context_tokens": used, "context_tokens_max": float(ctx.max()), "shortest_bptt": shortest})


def _not_settled(budget: BudgetVerdict | None, table: pd.DataFrame) -> Confound | None:
    leg = budget.tokens if budget is not None else None
    if leg is None or len(leg.table) < 2:
        return Confound("not_settled", None, "not measured: fewer than two checkpoints, so whether the leader was "
                        "still changing at the end is unknown", {})
    if not leg.moving:
        return None
    names = dict(zip(table["config_key"], labels(table)))
    prev, last = leg.table.iloc[-2], leg.table.iloc[-1]
    return Confound("not_settled", True,
                    f"the leader was still changing at the end of the budget: {names.get(prev['best'], prev['best'])} "
                    f"led at {prev['at']:.0%} of it, {names.get(last['best'], last['best'])} at {last['at']:.0%}, "
                    "beyond the seed noise measured there",
                    {"from": str(prev["best"]), "to": str(last["best"]), "between": [float(prev["at"]), float(last["at"])]})


def scope_text(slice_table: pd.DataFrame | None) -> str:
    """In words, the configurations a bptt verdict compares."""
    if slice_table is None or slice_table.empty:
        return "every ranked configuration"
    r = slice_table.iloc[0]
    name = f"slice {r['_slice']!r}: " if "_slice" in r.index and isinstance(r["_slice"], str) else ""
    lr = f", lr {numbers.num(r['lr'], 3)}" if "lr" in r.index and pd.notna(r["lr"]) else ""
    steps = f", {float(r['steps']):,.0f} steps" if "steps" in r.index and pd.notna(r["steps"]) and \
        math.isfinite(float(r["steps"])) else ""
    return (f"the configurations that differ only in bptt ({name}{int(r['tokens_per_step']):,} tokens per step{lr}{steps}: "
            + ", ".join(label(x) for _, x in slice_table.iterrows()) + ")")


@dataclass
class BpttEvidence:
    """What the bptt verdict may rest on: the controlled slice (None when the study has none), its
    confounds, and who leads inside it (:func:`bptt_harness.seeds.leaders`; None without a slice)."""

    slice: pd.DataFrame | None
    confounds: Confounds
    leaders: Leaders | None = None


def bptt_evidence(table: pd.DataFrame, trials: pd.DataFrame, configs: pd.DataFrame,
                  ranking_confounds: Confounds) -> BpttEvidence:
    """The controlled slice of ``table`` and its own confounds; without a slice, the ranking's confounds."""
    piece = controlled_slice(table, trials)
    if piece is None:
        return BpttEvidence(None, ranking_confounds)
    if "_slice" in piece:   # a declared slice: its configurations, any status
        name = str(piece["_slice"].iloc[0])
        runs = trials[trials[SLICES_COLUMN].astype(str).str.split(",").map(lambda v: name in [x.strip() for x in v])]
        same = configs[configs["config_key"].isin(set(runs["config_key"]))]
    else:
        same = configs[configs["tokens_per_step"] == piece["tokens_per_step"].iloc[0]]
    budget = verdict_by_budget(trials, piece, None)
    conf = detect(piece, trials, same, budget, scope_text(piece))
    lead = leaders(table_means(piece)) if "val_ppl_se" in piece else None
    return BpttEvidence(piece, conf, lead)
