"""Trials frame -> everything a report shows (a :class:`Report`), computed once for HTML, console and CSV."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import pandas as pd

from bptt_harness.record import COST_COLUMNS
from bptt_harness.report.advice import Advice, advise
from bptt_harness.report.budget import BudgetVerdict, verdict_by_budget
from bptt_harness.report.confounds import BpttEvidence, Confounds, bptt_evidence, detect
from bptt_harness.report.crosscheck import CrossCheck, profile_vs_trials
from bptt_harness.report.frame import aggregate_configs
from bptt_harness.report.memory import MemoryFit, MemoryWall, card_table, fit_memory, memory_wall
from bptt_harness.report.noise import add_intervals
from bptt_harness.report.rank import EqualTime, Ranking, equal_time_ranking, rank_configs
from bptt_harness.report.rules import RulesOfThumb, check_rules


@dataclass
class Report:
    study_name: str
    trials: pd.DataFrame
    configs: pd.DataFrame
    ranking: Ranking
    equal_time: EqualTime
    fits: list[MemoryFit]
    cards: pd.DataFrame | None
    wall: MemoryWall
    advice: Advice
    storage_display: str | None = None
    info: dict = field(default_factory=dict)
    n_running: int = 0
    generated_at: str = ""
    budget: BudgetVerdict = field(default_factory=BudgetVerdict)
    profile: pd.DataFrame | None = None   # the study's profile.csv (bptt-harness profile), when it has one
    crosschecks: list[CrossCheck] = field(default_factory=list)  # the profile against the trials, per metric
    crosscheck_note: str | None = None    # why the two were not compared, when they were not
    rules: RulesOfThumb | None = None     # the forum's rules of thumb, checked (report/rules.py)
    confounds: Confounds = field(default_factory=lambda: Confounds("every ranked configuration"))
    bptt_evidence: BpttEvidence | None = None  # the controlled bptt slice and its confounds (report/confounds.py)
    diagnostics: dict | None = None       # bptt-harness diagnose's diagnostics.json, when the study has one


def study_cost(trials: pd.DataFrame, info: dict | None = None) -> str:
    """The cost column to rank against: the study's declared cost, else seconds per token."""
    declared = (info or {}).get("cost")
    if not declared and "cost" in trials and trials["cost"].notna().any():
        declared = trials["cost"].dropna().astype(str).mode().iloc[0]
    return COST_COLUMNS.get(str(declared), "seconds_per_ktok")


def build(trials: pd.DataFrame, *, study_name: str, storage_display: str | None = None, info: dict | None = None,
          n_running: int = 0, profile: pd.DataFrame | None = None, diagnostics: dict | None = None) -> Report:
    info = dict(info or {})
    configs = add_intervals(aggregate_configs(trials), trials)
    ranking = rank_configs(configs, study_cost(trials, info))
    et = equal_time_ranking(trials, ranking.table)
    by_budget = verdict_by_budget(trials, ranking.table, et.seconds)
    fits = fit_memory(trials, profile)
    wall = memory_wall(trials)
    cards = None
    if fits and fits[0].gpu and fits[0].slope_mib > 0:
        cards = card_table(fits[0], list(trials["batch_size"].dropna().unique()))
    confounds = detect(ranking.table, trials, configs, by_budget, "every ranked configuration")
    evidence = bptt_evidence(ranking.table, trials, configs, confounds)
    adv = advise(trials, configs, ranking, et, fits, wall, n_running, by_budget, confounds, evidence)
    checks, note = profile_vs_trials(trials, profile)
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Report(study_name, trials, configs, ranking, et, fits, cards, wall, adv, storage_display, info,
                  n_running, now, by_budget, profile, checks, note,
                  check_rules(trials, profile, fits), confounds, evidence, diagnostics)
