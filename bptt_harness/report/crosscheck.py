"""The profile against the trials: where both measured a (bptt, batch size) cell, do they agree?

The profile (``bptt-harness profile``) times a few steps per cell; the trials train for the whole budget.
Both report throughput and peak training memory, and a reader who sees two numbers for one cell must be
told which is which and whether they disagree beyond the noise. The noise is the trials' own variation
between seeds of one configuration (coefficient of variation pooled over configurations run more than
once, :func:`bptt_harness.seeds.pooled_cv`); the profile measures each cell once, so it is assumed to vary
as much. A cell disagrees when ``|trials / profile - 1|`` exceeds ``Z * cv * sqrt(1 + 1/n)`` (n: the
trials' runs of that cell) and :data:`RESOLUTION`. With no configuration run twice the noise is unknown
and no cell is called either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bptt_harness.report import numbers
from bptt_harness.report.frame import varying_fields
from bptt_harness.seeds import Z, pooled_cv

__all__ = ["DISAGREE", "METRICS", "RESOLUTION", "CrossCheck", "profile_vs_trials"]

# Said once after the cross-checks when any of them disagrees.
DISAGREE = ("The profile measures a few steps per cell, the trials whole runs: the ranking and the verdict use the "
            "trials' numbers.")
RESOLUTION = 0.01  # relative differences below 1% are not counted, whatever the seed noise
# metric -> (what it is in a sentence, unit for differences)
METRICS = {"tokens_per_s": ("throughput (tokens/s)", ""), "peak_mem_mib": ("peak training memory", "MiB")}


@dataclass
class CrossCheck:
    """One metric measured by both the profile and the trials.

    Attributes:
        metric: the column (``tokens_per_s`` or ``peak_mem_mib``).
        cells: per shared cell ``bptt``, ``batch_size``, ``trials`` (mean over ok runs), ``n``, ``profile``,
            ``ratio`` (trials / profile), ``diff`` (trials - profile) and ``beyond`` (True/False, None
            when the noise is unknown).
        noise_cv: the trials' variation between seeds (None: no configuration was run twice).
        sentence: what a reader needs to know, in words.
    """

    metric: str
    cells: pd.DataFrame
    noise_cv: float | None
    sentence: str

    @property
    def n_beyond(self) -> int:
        return int((self.cells["beyond"] == True).sum())  # noqa: E712  (None means unknown, not False)


def _trial_cells(trials: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, float | None]:
    ok = trials[(trials["status"] == "ok") & trials[metric].notna() & trials["bptt"].notna()
                & trials["batch_size"].notna()]
    cv = pooled_cv([list(g.astype(float)) for _, g in ok.groupby("config_key")[metric]])
    cells = ok.groupby(["bptt", "batch_size"])[metric].agg(trials="mean", n="count").reset_index()
    return cells, cv


def _profile_cells(profile: pd.DataFrame, metric: str) -> pd.DataFrame:
    g = profile[(profile["phase"] == "grid") & (profile["status"] == "ok")]
    if metric not in g:
        return pd.DataFrame(columns=["bptt", "batch_size", "profile"])
    return g.groupby(["bptt", "batch_size"])[metric].mean().rename("profile").reset_index().dropna()


def _sentence(metric: str, cells: pd.DataFrame, cv: float | None) -> str:
    what, unit = METRICS[metric]
    n = len(cells)
    r = cells["ratio"]
    span = f"trials / profile {numbers.ratio(r.min())}–{numbers.ratio(r.max())}, median {numbers.ratio(r.median())}"
    if unit:
        d = cells["diff"]
        span += f"; trials − profile {numbers.num(d.median(), 3)} {unit} (median)"
    if cv is None:
        return (f"{what[0].upper()}{what[1:]}: over {n} shared cell(s), {span}. No configuration was run twice, so "
                "the variation between runs is unknown and the difference cannot be judged against it.")
    noise = (f"the trials' {what} varies {numbers.pct(cv)} between seeds" if cv > 0 else
             f"the trials' {what} does not vary between seeds")
    beyond = int((cells["beyond"] == True).sum())  # noqa: E712
    if beyond == 0:
        return (f"{what[0].upper()}{what[1:]}: the profile and the trials agree within the noise on all {n} shared "
                f"cell(s) ({span}; {noise}).")
    return (f"{what[0].upper()}{what[1:]}: the profile and the trials disagree beyond the noise on {beyond} of {n} "
            f"shared cell(s) ({span}; {noise}; differences under {numbers.pct(RESOLUTION)} are not counted).")


def profile_vs_trials(trials: pd.DataFrame, profile: pd.DataFrame | None) -> tuple[list[CrossCheck], str | None]:
    """The cross-checks for the metrics both sources measured, and why none was made (or None)."""
    if profile is None or profile.empty or trials.empty:
        return [], None
    others = [f for f in varying_fields(trials) if f != "lr"]
    if others:
        return [], (f"The trials vary {', '.join(others)}, while the profile measured one model: their numbers are "
                    "not compared cell by cell.")
    out = []
    for metric in METRICS:
        if metric not in trials or metric not in profile:
            continue
        tcells, cv = _trial_cells(trials, metric)
        cells = tcells.merge(_profile_cells(profile, metric), on=["bptt", "batch_size"])
        cells = cells[cells["profile"] > 0]
        if cells.empty:
            continue
        cells = cells.assign(ratio=cells["trials"] / cells["profile"], diff=cells["trials"] - cells["profile"])
        beyond: list[bool | None] = [None] * len(cells)
        if cv is not None:
            tol = np.maximum(Z * cv * np.sqrt(1 + 1 / cells["n"].to_numpy(dtype=float)), RESOLUTION)
            beyond = [bool(b) for b in np.abs(cells["ratio"].to_numpy(dtype=float) - 1) > tol]
        cells = cells.assign(beyond=pd.Series(beyond, index=cells.index, dtype=object)).reset_index(drop=True)
        out.append(CrossCheck(metric, cells, cv, _sentence(metric, cells, cv)))
    return out, None

