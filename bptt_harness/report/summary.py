"""``summary.json``: the report's verdict as data, so a CI job or a dashboard reads it without the HTML.

Built from the same :class:`bptt_harness.report.build.Report` as the HTML, field by field: whatever the
advice, the memory model, the wall and the equal-time ranking hold is written, so a field added to them
appears here too. NaN and infinities are written as null.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from bptt_harness.report.build import Report
from bptt_harness.report.frame import WHOLE, label

SCHEMA = 1
# The study's budget as its trials recorded it (trials.csv columns).
BUDGET_COLUMNS = ("budget", "budget_tokens", "budget_epochs", "budget_seconds", "resolved_budget_tokens")
RANKING_COLUMNS = ("place", "config_key", "bptt", "batch_size", "pareto_rank", "tie", "val_ppl", "val_ppl_std", "n")


def plain(obj: Any) -> Any:
    """Dataclasses, frames, series and numpy values -> JSON types; hidden (``_``) columns are dropped."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, pd.DataFrame):
        cols = [c for c in obj.columns if not str(c).startswith("_")]
        return [plain(dict(zip(cols, row))) for row in obj[cols].itertuples(index=False, name=None)]
    if isinstance(obj, pd.Series):
        return plain({k: v for k, v in obj.items() if not str(k).startswith("_")})
    if isinstance(obj, dict):
        return {str(k): _whole(str(k), plain(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return None if pd.isna(obj) else str(obj)


def _whole(key: str, v: Any) -> Any:
    """Whole-number columns as integers (``"bptt": 10``, not ``10.0``: the frame holds numbers as floats)."""
    return int(v) if key in WHOLE and isinstance(v, float) and v.is_integer() else v


def summary(rep: Report) -> dict:
    """The verdict of ``rep``: recommendation (with its n and spread), the answers, memory model, budget."""
    advice = {k: v for k, v in plain(rep.advice).items() if k not in ("findings", "notes")}
    table = rep.ranking.table
    row = table[table["config_key"] == rep.advice.recommended] if rep.advice.recommended is not None else table.iloc[:0]
    recommended = {"label": label(row.iloc[0]), **plain(row.iloc[0]), "cost_column": rep.ranking.cost} \
        if len(row) else None
    budget = {c: plain(rep.trials[c].dropna().mode().iloc[0]) if rep.trials[c].notna().any() else None
              for c in BUDGET_COLUMNS if c in rep.trials}
    counts = rep.trials["status"].value_counts()
    cols = [c for c in (*RANKING_COLUMNS, rep.ranking.cost) if c in table.columns]
    return plain({
        "schema": SCHEMA,
        "study": rep.study_name,
        "generated_at": rep.generated_at,
        "trials": {"total": len(rep.trials), "running": rep.n_running,
                   "by_status": {str(s): int(n) for s, n in counts.items()}},
        "budget": budget,
        "cost": {"column": rep.ranking.cost, "label": rep.ranking.cost_label},
        "recommendation": {**advice, "configuration": recommended},
        "answers": {f.key: {"question": f.title, "answer": f.text} for f in rep.advice.findings},
        "notes": rep.advice.notes,
        "ranking": table[cols].assign(label=[label(r) for _, r in table.iterrows()]) if len(table) else [],
        "memory": {"fits": rep.fits, "cards": rep.cards if rep.cards is not None else [], "wall": rep.wall},
        "equal_time": rep.equal_time,
        "rules_of_thumb": rep.rules,
        # name -> {applies (null: not measured), text, numbers}: what else differs between the ranked configurations.
        "confounds": rep.confounds.as_dict(),
        "bptt_verdict": _bptt(rep),
        "profile_vs_trials": {"checks": rep.crosschecks, "note": rep.crosscheck_note},
    })


def _bptt(rep: Report) -> dict:
    """The bptt verdict's evidence: the controlled slice it compared (empty: none) and that slice's confounds."""
    ev = rep.bptt_evidence
    if ev is None:
        return {"slice": [], "confounds": {}, "conclusive": False}
    piece = ev.slice
    cols = [c for c in (*RANKING_COLUMNS, "val_ppl_lo", "val_ppl_hi", "val_ppl_interval", "steps", "lr") if
            piece is not None and c in piece.columns]
    lead = ev.leaders
    return {"scope": ev.confounds.scope,
            "slice": piece[cols] if piece is not None else [],
            "confounds": ev.confounds.as_dict(),
            "best": lead.best if lead is not None else None,
            "separated": bool(lead.separated) if lead is not None else False,
            "conclusive": piece is not None and not ev.confounds.found() and lead is not None and lead.separated}


def summary_json(rep: Report) -> str:
    return json.dumps(summary(rep), indent=2, allow_nan=False) + "\n"
