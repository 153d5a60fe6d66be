"""Trial records -> one flat pandas DataFrame (``trials.csv``) and per-configuration aggregates.

Pure functions: records in, DataFrames out. Column names carry their units; every column is
documented in :data:`TRIAL_COLUMNS` / :data:`CONFIG_COLUMNS` (and in ``bptt_harness/report/README.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from bptt_harness.record import STATUSES, TrialRecord, flatten, trial_columns
from bptt_harness.search_keys import CELL, SEARCH_KEYS

# name -> meaning (with its unit), in CSV column order: derived from the trial record's schema.
TRIAL_COLUMNS: dict[str, str] = {c.name: c.doc + (f" ({c.unit})" if c.unit else "") for c in trial_columns()}
_KINDS = {c.name: c.kind for c in trial_columns()}
RANK_COLUMNS: dict[str, str] = {
    "place": "position in the ranking; equal places are ties within the measured spread",
    "pareto_rank": "1 = on the Pareto front of (perplexity, cost); 2 = the front once rank 1 is removed, ...",
    "tie": "true when the configuration ties (within spread, on both objectives) with a neighbour",
}
NUMERIC = {name for name, kind in _KINDS.items() if kind in ("int", "float")}
INTEGER = {name for name, kind in _KINDS.items() if kind == "int"}
# Every whole-number column the report writes (CSV and summary.json): the schema's, the per-configuration
# counts and the places of the rankings. The frame holds them as floats (missing values are NaN).
WHOLE = INTEGER | {"n", "n_trials", "n_oom", "n_diverged", "n_other", "pareto_rank", "place", "place_time", "measured",
                   "max_ok_bptt", "min_oom_bptt"}

# Columns averaged per configuration (mean in the column itself, std in <name>_std).
AGG_METRICS = ("val_ppl", "best_val_ppl", "test_ppl", "tokens_per_s", "seconds_per_ktok", "peak_mem_mib",
               "peak_mem_torch_mib", "peak_mem_nvml_mib", "joules_per_ktok", "energy_j", "mean_power_w",
               "eval_energy_j", "eval_peak_mem_mib", "train_s", "eval_s", "wall_s", "steps", "max_grad_norm",
               "clipped_frac")
# What defines a configuration beyond the searched keys (the same for every repeat of it).
CONFIG_BEYOND_SEARCH = ("model", "optimizer")
# Columns that are the same for every repeat of a configuration.
CONFIG_FIELDS = ("config_key", *CELL, "tokens_per_step", *(k for k in SEARCH_KEYS if k not in CELL), "lr_rule",
                 *CONFIG_BEYOND_SEARCH)

CONFIG_COLUMNS: dict[str, str] = {
    **{k: TRIAL_COLUMNS[k] for k in ("study", "machine") if k in TRIAL_COLUMNS},
    **{k: TRIAL_COLUMNS[k] for k in CONFIG_FIELDS},
    "n": "trials of this configuration that finished ok (mean and std are over these)",
    "single_seed": "true when only one seed finished ok: its interval borrows the study's pooled seed noise",
    "val_ppl_se": "standard error of the mean val_ppl over seeds: this configuration's own standard deviation / "
                  "sqrt(n) at n >= 2; at n = 1 the pooled seed noise x val_ppl (borrowed, see noise_from); empty when "
                  "no configuration has two seeds",
    "val_ppl_dof": "degrees of freedom of val_ppl_se: n - 1 for its own noise, the pooled degrees of freedom when borrowed",
    "val_ppl_lo": "low end of the 95% Student t interval of the mean val_ppl (t quantile on val_ppl_dof x val_ppl_se)",
    "val_ppl_hi": "high end of the 95% Student t interval of the mean val_ppl",
    "val_ppl_interval": "the interval's coverage, n and degrees of freedom in words (95% t interval, n=2, df=1)",
    "noise_from": "own: the interval uses this configuration's seeds; otherwise where its noise was borrowed from",
    "seed_noise_cv": "the study's pooled seed noise: standard deviation / mean of val_ppl over seeds, pooled over the "
                     "configurations with two or more (what single-seed configurations borrow)",
    "n_trials": "trials of this configuration, any status",
    "n_oom": "trials that ran out of memory",
    "n_diverged": "trials that diverged",
    "n_other": "trials pruned, timed out or failed",
    "reason": "why the configuration is not ranked, or how some of its repeats failed",
    "timing_note": "why its time-based figures are marked (*): warm-up included in a trial too short to exclude "
                   "it, or timed while other workers shared this CPU; empty when clean",
    **{k: f"mean over ok repeats: {TRIAL_COLUMNS[k]}" for k in AGG_METRICS},
    **{f"{k}_std": f"standard deviation of {k} over ok repeats (empty when n < 2)" for k in AGG_METRICS},
}

# Hidden columns (not written to CSV) start with "_": the validation curves of each trial.
CURVE = "_val_curve"
TIME_CURVE = "_time_curve"
TRAIN_CURVE = "_train_curve"
HIDDEN = (CURVE, TIME_CURVE, TRAIN_CURVE)

def configs_markdown() -> str:
    """The ``configs.csv`` table of ``bptt_harness/report/README.md``."""
    rows = {**RANK_COLUMNS, **CONFIG_COLUMNS}
    return "\n".join(["| column | meaning |", "|---|---|", *(f"| `{k}` | {v} |" for k, v in rows.items())])


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    return None


def record_row(rec: dict) -> dict:
    """One stored record (``trial.user_attrs["record"]``, any schema version) -> one flat row."""
    typed = TrialRecord.from_dict(rec)
    row = flatten(typed)
    row[CURVE] = typed.result.val_curve if isinstance(typed.result.val_curve, list) else []
    row[TIME_CURVE] = typed.result.time_curve if isinstance(typed.result.time_curve, list) else []
    row[TRAIN_CURVE] = typed.result.train_curve if isinstance(typed.result.train_curve, list) else []
    return row


def records_to_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Flatten records into the ``trials.csv`` frame (documented in :data:`TRIAL_COLUMNS`).

    Numbers are floats in the frame (missing values are NaN); :func:`csv_frame` writes the integer
    columns as integers."""
    rows = [record_row(r) for r in records]
    df = pd.DataFrame.from_records(rows, columns=[*TRIAL_COLUMNS, *HIDDEN]) if rows else \
        pd.DataFrame({c: pd.Series(dtype=object) for c in [*TRIAL_COLUMNS, *HIDDEN]})
    # All number columns replaced at once: one by one, each would be a block of its own (a fragmented frame
    # every later step copies).
    numbers = pd.DataFrame({c: pd.to_numeric(df[c].map(_num) if df[c].dtype == object else df[c],
                                             errors="coerce").astype(float) for c in NUMERIC}, index=df.index)
    df = pd.concat([df.drop(columns=list(NUMERIC)), numbers], axis=1)[df.columns]
    missing = df["config_key"].isna()
    if missing.any():
        df.loc[missing, "config_key"] = [_key(b, s) for b, s in zip(df.loc[missing, "bptt"], df.loc[missing, "batch_size"])]
    # The study's config_key mixes in optional fields; make sure it is a plain string column.
    df["config_key"] = df["config_key"].astype(str)
    return df


def _key(bptt: float, bs: float) -> str:
    if pd.isna(bptt) or pd.isna(bs):
        return "unknown"
    return f"bptt={int(bptt)},batch_size={int(bs)}"


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The frame as written to CSV: hidden (``_``) columns dropped, integer columns as integers
    (``35``, not ``35.0``; empty where missing)."""
    out = df[[c for c in df.columns if not str(c).startswith("_")]].copy()
    for c in WHOLE:
        if c in out.columns and pd.api.types.is_numeric_dtype(out[c]):
            values = out[c].round()
            if ((values - out[c]).abs().fillna(0) < 1e-9).all():
                out[c] = values.astype("Int64")
    return out


def aggregate_configs(df: pd.DataFrame, by: tuple[str, ...] = ("config_key",)) -> pd.DataFrame:
    """One row per configuration: mean and std of :data:`AGG_METRICS` over its ok repeats, counts per status.

    ``by`` adds grouping keys (``("machine", "config_key")`` for a GPU comparison).
    """
    keys = list(by)
    if df.empty:
        return pd.DataFrame(columns=[*keys, *CONFIG_COLUMNS])
    keyed = df.assign(_k=df[keys].astype(str).agg("\x1f".join, axis=1) if len(keys) > 1 else df[keys[0]].astype(str))
    first = keyed.groupby("_k", sort=False).first()
    fields = [c for c in dict.fromkeys([*keys, "study", *CONFIG_FIELDS]) if c in df.columns]
    out = first[fields].copy()
    counts = pd.crosstab(keyed["_k"], keyed["status"]).reindex(columns=list(STATUSES), fill_value=0)
    out["n_trials"] = counts.sum(axis=1)
    out["n"] = counts["ok"]
    out["n_oom"] = counts["oom"]
    out["n_diverged"] = counts["diverged"]
    out["n_other"] = counts[["pruned", "timeout", "failed"]].sum(axis=1)
    ok = keyed[keyed["status"] == "ok"]
    metrics = [m for m in AGG_METRICS if m in df.columns]
    if len(ok):
        grouped = ok.groupby("_k", sort=False)[metrics]
        means, stds = grouped.mean(), grouped.std(ddof=1)
        out[metrics] = means.reindex(out.index)
        out[[f"{m}_std" for m in metrics]] = stds.reindex(out.index).to_numpy()
    else:
        for m in metrics:
            out[m] = np.nan
            out[f"{m}_std"] = np.nan
    out["reason"] = _reasons(keyed, counts).reindex(out.index)
    out["timing_note"] = _timing_notes(ok).reindex(out.index).fillna("")
    out = out.reset_index(drop=True)
    for c in ("n_trials", "n", "n_oom", "n_diverged", "n_other"):
        out[c] = out[c].astype(int)
    return out


def _timing_notes(ok: pd.DataFrame) -> pd.Series:
    """Per configuration: why its throughput is not a clean measurement, or nothing."""
    def note(g: pd.DataFrame) -> str:
        parts = []
        warm = g["timing_includes_warmup"].astype(str).str.lower() == "true" if "timing_includes_warmup" in g else None
        if warm is not None and warm.any():
            parts.append(f"{int(warm.sum())} of {len(g)} runs too short to exclude the warm-up from tokens/s")
        shared = (g["host_workers"].fillna(1) > 1) & (g["device"].astype(str) == "cpu") if "host_workers" in g else None
        if shared is not None and shared.any():
            parts.append(f"{int(shared.sum())} of {len(g)} runs timed while {int(g['host_workers'].max())} workers "
                         "shared this CPU")
        return "; ".join(parts)

    if ok.empty:
        return pd.Series(dtype=object)
    return ok.groupby("_k", sort=False).apply(note, include_groups=False)


def _reasons(keyed: pd.DataFrame, counts: pd.DataFrame) -> pd.Series:
    """A short reason per configuration: the first error of each failing status, with its share."""
    bad = keyed[keyed["status"] != "ok"]
    if bad.empty:
        return pd.Series("", index=counts.index, dtype=object)
    f = bad.groupby(["_k", "status"], sort=False).agg(error=("error", "first"), step=("diverged_step", "min"),
                                                      n=("status", "size")).reset_index()
    total = f["_k"].map(counts.sum(axis=1))
    text = f["status"].astype(str)
    text = text + np.where(f["n"] == total, "", " in " + f["n"].astype(str) + "/" + total.astype(str) + " runs")
    has_step = (f["status"] == "diverged") & f["step"].notna()
    text = text + np.where(has_step, " at step " + f["step"].fillna(0).astype(int).astype(str), "")
    err = f["error"].astype(object).where(f["error"].notna(), "").astype(str).str.split("\n").str[0].str[:160]
    text = text + np.where(err != "", ": " + err, "")
    out = pd.Series(text.to_numpy(dtype=object), index=f["_k"]).groupby(level=0, sort=False).agg("; ".join)
    return out.reindex(counts.index).fillna("")


def varying_fields(df: pd.DataFrame) -> list[str]:
    """Configuration fields beyond bptt and batch size that take more than one value in this study."""
    out = []
    # Under an lr rule the lr follows the shape: it is not an axis of its own.
    ruled = "lr_rule" in df.columns and (df["lr_rule"].dropna().astype(str) != "fixed").any()
    for c in (*(k for k in SEARCH_KEYS if k not in CELL), *CONFIG_BEYOND_SEARCH):
        if c == "lr" and ruled:
            continue
        if c in df.columns and df[c].dropna().astype(str).nunique() > 1:
            out.append(c)
    return out


def labels(df: pd.DataFrame, extra: Iterable[str] = ()) -> list[str]:
    """:func:`label` for every row, without building a Series per row (reports have up to 10^4 rows)."""
    cols = ["bptt", "batch_size", "config_key", *extra]
    present = {c: (df[c].tolist() if c in df.columns else [None] * len(df)) for c in cols}
    return [label(dict(zip(cols, vals)), extra) for vals in zip(*present.values())]


def label(row: Any, extra: Iterable[str] = ()) -> str:
    """A readable name for a configuration row: ``bptt 70 x bs 20`` (+ the fields that vary)."""
    try:
        text = f"bptt {int(row['bptt'])} × bs {int(row['batch_size'])}"
    except (TypeError, ValueError):
        return str(row.get("config_key", "?"))
    for f in extra:
        v = row.get(f)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        text += f", {f} {v:g}" if isinstance(v, float) else f", {f} {v}"
    return text
