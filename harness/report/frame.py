"""Trial records -> one flat pandas DataFrame (``trials.csv``) and per-configuration aggregates.

Pure functions: records in, DataFrames out. Column names carry their units; every column is
documented in :data:`TRIAL_COLUMNS` / :data:`CONFIG_COLUMNS` (and in ``harness/report/README.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

STATUSES = ("ok", "diverged", "oom", "pruned", "timeout", "failed")
INFEASIBLE = ("oom", "diverged")

# name -> meaning. The order is the CSV column order.
TRIAL_COLUMNS: dict[str, str] = {
    "study": "Optuna study name",
    "trial_number": "Optuna trial number",
    "state": "Optuna trial state (COMPLETE, PRUNED, FAIL)",
    "config_key": "the configuration, identical for repeats of it (e.g. bptt=35,batch_size=20)",
    "bptt": "truncated-BPTT window length (tokens)",
    "batch_size": "batch size (columns of the token matrix)",
    "tokens_per_step": "bptt x batch_size: tokens in one optimiser step",
    "lr": "learning rate",
    "nhid": "hidden units per layer",
    "emsize": "embedding size",
    "layers": "recurrent layers",
    "dropout": "dropout probability",
    "model": "lstm or gru",
    "optimizer": "sgd or adamw",
    "variable_bptt": "variable-length windows (AWD-LSTM style)",
    "seed": "random seed of the trial",
    "repeat": "repeat index of the configuration (0 for the first run)",
    "status": "ok, diverged, oom, pruned, timeout or failed",
    "error": "why the trial did not finish ok (empty when ok)",
    "diverged_step": "optimiser step at which the trial diverged",
    "val_loss": "final validation cross-entropy (nats per token)",
    "val_ppl": "final validation perplexity",
    "best_val_ppl": "best validation perplexity over the checkpoints",
    "test_ppl": "test perplexity (when evaluated)",
    "train_tokens": "training tokens processed",
    "steps": "optimiser steps taken",
    "tokens_per_s": "training throughput, tokens per second (warm-up excluded)",
    "seconds_per_ktok": "training seconds per 1,000 tokens (1000 / tokens_per_s)",
    "train_s": "training seconds (evaluation excluded)",
    "eval_s": "evaluation seconds",
    "wall_s": "wall-clock seconds of the whole trial",
    "max_grad_norm": "largest gradient norm before clipping",
    "clipped_frac": "fraction of steps whose gradient was clipped",
    "n_params": "model parameters",
    "flops_per_token": "estimated training FLOPs per token",
    "achieved_flops_per_s": "tokens_per_s x flops_per_token",
    "final_lr": "learning rate at the end (after annealing)",
    "peak_mem_mib": "THE peak memory, MiB: torch reserved on CUDA, peak resident set on CPU",
    "peak_mem_torch_mib": "torch max_memory_allocated, MiB",
    "peak_mem_torch_reserved_mib": "torch max_memory_reserved, MiB",
    "peak_mem_nvml_mib": "peak device memory used (NVML, whole GPU), MiB",
    "peak_mem_nvml_process_mib": "peak device memory of this process (NVML), MiB",
    "idle_mem_nvml_mib": "device memory used before the trial (NVML), MiB",
    "peak_rss_mib": "peak resident set size of the process, MiB",
    "energy_j": "energy used during the training phase (including its periodic validation checkpoints), joules",
    "joules_per_ktok": "energy per 1,000 training tokens, joules",
    "energy_source": "how energy was measured (e.g. NVML total-energy counter)",
    "mean_power_w": "mean GPU power, watts",
    "max_power_w": "largest GPU power sample, watts",
    "mean_util_pct": "mean GPU utilisation, percent",
    "mean_sm_clock_mhz": "mean SM clock, MHz",
    "max_temp_c": "highest GPU temperature, degrees C",
    "cpu_util_pct": "process CPU utilisation, percent of one core",
    "probe_kind": "nvml (GPU telemetry) or cpu (process probe)",
    "probe_fallback_reason": "why the NVML probe was not used",
    "device": "torch device of the trial",
    "gpu_name": "GPU model (empty on CPU)",
    "gpu_memory_mib": "GPU memory, MiB",
    "gpu_count": "GPUs visible",
    "driver_version": "NVIDIA driver",
    "cuda_version": "CUDA version of torch",
    "torch_version": "torch version",
    "cpu_model": "CPU model",
    "cpu_cores": "CPU cores",
    "hostname": "host the trial ran on",
    "machine_id": "stable hardware fingerprint of that host",
    "corpus": "corpus name",
    "budget": "tokens or seconds: what every trial was given the same amount of",
    "budget_tokens": "training-token budget",
    "budget_seconds": "training-time budget, seconds",
    "cost": "the study's cost objective (seconds_per_token, peak_memory or joules_per_token)",
    "worker": "host:pid of the worker that ran the trial",
    "started_at": "start time, ISO 8601",
    "finished_at": "end time, ISO 8601",
}

# Columns averaged per configuration (mean in the column itself, std in <name>_std).
AGG_METRICS = ("val_ppl", "best_val_ppl", "test_ppl", "tokens_per_s", "seconds_per_ktok", "peak_mem_mib",
               "peak_mem_torch_mib", "peak_mem_nvml_mib", "joules_per_ktok", "energy_j", "mean_power_w",
               "train_s", "wall_s", "steps", "max_grad_norm", "clipped_frac")
# Columns that are the same for every repeat of a configuration.
CONFIG_FIELDS = ("config_key", "bptt", "batch_size", "tokens_per_step", "lr", "nhid", "emsize", "layers",
                 "dropout", "model", "optimizer", "variable_bptt")

CONFIG_COLUMNS: dict[str, str] = {
    **{k: TRIAL_COLUMNS[k] for k in ("study", "machine") if k in TRIAL_COLUMNS},
    **{k: TRIAL_COLUMNS[k] for k in CONFIG_FIELDS},
    "n": "trials of this configuration that finished ok (mean and std are over these)",
    "n_trials": "trials of this configuration, any status",
    "n_oom": "trials that ran out of memory",
    "n_diverged": "trials that diverged",
    "n_other": "trials pruned, timed out or failed",
    "reason": "why the configuration is not ranked, or how some of its repeats failed",
    **{k: f"mean over ok repeats: {TRIAL_COLUMNS[k]}" for k in AGG_METRICS},
    **{f"{k}_std": f"standard deviation of {k} over ok repeats (empty when n < 2)" for k in AGG_METRICS},
}

NUMERIC = {"trial_number", "bptt", "batch_size", "tokens_per_step", "lr", "nhid", "emsize", "layers", "dropout",
           "seed", "repeat", "diverged_step", "val_loss", "val_ppl", "best_val_ppl", "test_ppl", "train_tokens",
           "steps", "tokens_per_s", "seconds_per_ktok", "train_s", "eval_s", "wall_s", "max_grad_norm",
           "clipped_frac", "n_params", "flops_per_token", "achieved_flops_per_s", "final_lr", "peak_mem_mib",
           "peak_mem_torch_mib", "peak_mem_torch_reserved_mib", "peak_mem_nvml_mib", "peak_mem_nvml_process_mib",
           "idle_mem_nvml_mib", "peak_rss_mib", "energy_j", "joules_per_ktok", "mean_power_w", "max_power_w",
           "mean_util_pct", "mean_sm_clock_mhz", "max_temp_c", "cpu_util_pct", "gpu_memory_mib", "gpu_count",
           "cpu_cores", "budget_tokens", "budget_seconds"}

# Hidden columns (not written to CSV) start with "_": the validation curve of each trial.
CURVE = "_val_curve"

# The study's cost objective -> the column that measures it (lower is better).
COST_COLUMNS = {"seconds_per_token": "seconds_per_ktok", "peak_memory": "peak_mem_mib",
                "joules_per_token": "joules_per_ktok"}
COST_LABELS = {"seconds_per_ktok": "seconds per 1k tokens", "peak_mem_mib": "peak memory (MiB)",
               "joules_per_ktok": "joules per 1k tokens"}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    return None


def _d(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def record_row(rec: dict) -> dict:
    """One record (see the study's ``trial.user_attrs["record"]``) -> one flat row."""
    cfg, res, hw, st = _d(rec.get("config")), _d(rec.get("result")), _d(rec.get("hardware")), _d(rec.get("study"))
    probe = _d(res.get("probe"))
    status = rec.get("status") or res.get("status") or "failed"
    if status not in STATUSES:
        status = "failed"
    row: dict[str, Any] = {
        "study": st.get("name"),
        "trial_number": rec.get("_trial_number"),
        "state": rec.get("_state"),
        "config_key": rec.get("config_key"),
        "bptt": cfg.get("bptt", res.get("bptt")),
        "batch_size": cfg.get("batch_size", res.get("batch_size")),
    }
    for k in ("lr", "nhid", "emsize", "layers", "dropout", "model", "optimizer", "variable_bptt", "seed", "repeat"):
        row[k] = cfg.get(k)
    if row["seed"] is None:
        row["seed"] = res.get("seed")
    row["status"] = status
    row["error"] = rec.get("error") or res.get("error")
    for k in ("diverged_step", "val_loss", "val_ppl", "best_val_ppl", "test_ppl", "train_tokens", "steps",
              "tokens_per_s", "train_s", "eval_s", "wall_s", "max_grad_norm", "clipped_frac", "n_params",
              "flops_per_token", "final_lr", "device"):
        row[k] = res.get(k)
    row["achieved_flops_per_s"] = res.get("achieved_flops")
    for k in ("peak_mem_mib", "peak_mem_torch_mib", "peak_mem_torch_reserved_mib", "peak_mem_nvml_mib",
              "peak_mem_nvml_process_mib", "idle_mem_nvml_mib", "peak_rss_mib", "energy_j", "energy_source",
              "mean_power_w", "max_power_w", "mean_util_pct", "mean_sm_clock_mhz", "max_temp_c", "cpu_util_pct",
              "probe_kind", "probe_fallback_reason"):
        row[k] = probe.get(k)
    for k in ("gpu_name", "gpu_memory_mib", "gpu_count", "driver_version", "cuda_version", "torch_version",
              "cpu_model", "cpu_cores", "hostname", "machine_id"):
        row[k] = hw.get(k)
    row["corpus"] = st.get("corpus")
    for k in ("budget", "budget_tokens", "budget_seconds", "cost"):
        row[k] = st.get(k)
    for k in ("worker", "started_at", "finished_at"):
        row[k] = rec.get(k)
    curve = res.get("val_curve")
    row[CURVE] = curve if isinstance(curve, list) else []
    return row


def records_to_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Flatten records into the ``trials.csv`` frame (documented in :data:`TRIAL_COLUMNS`)."""
    rows = [record_row(r) for r in records]
    df = pd.DataFrame.from_records(rows, columns=[*TRIAL_COLUMNS, CURVE]) if rows else \
        pd.DataFrame({c: pd.Series(dtype=object) for c in [*TRIAL_COLUMNS, CURVE]})
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c].map(_num) if df[c].dtype == object else df[c], errors="coerce").astype(float)
    # Derived columns: the per-token costs, in units a person can read.
    tps = df["tokens_per_s"].where(df["tokens_per_s"] > 0)
    df["seconds_per_ktok"] = 1000.0 / tps
    toks = df["train_tokens"].where(df["train_tokens"] > 0)
    df["joules_per_ktok"] = df["energy_j"] * 1000.0 / toks
    df["tokens_per_step"] = df["bptt"] * df["batch_size"]
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
    """The frame as written to CSV: hidden (``_``) columns dropped."""
    return df[[c for c in df.columns if not str(c).startswith("_")]]


def aggregate_configs(df: pd.DataFrame, by: tuple[str, ...] = ("config_key",)) -> pd.DataFrame:
    """One row per configuration: mean and std of :data:`AGG_METRICS` over its ok repeats, counts per status.

    ``by`` adds grouping keys (``("machine", "config_key")`` for a GPU comparison).
    """
    by = list(by)
    if df.empty:
        return pd.DataFrame(columns=[*by, *CONFIG_COLUMNS])
    keyed = df.assign(_k=df[by].astype(str).agg("\x1f".join, axis=1) if len(by) > 1 else df[by[0]].astype(str))
    first = keyed.groupby("_k", sort=False).first()
    fields = [c for c in dict.fromkeys([*by, "study", *CONFIG_FIELDS]) if c in df.columns]
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
    out = out.reset_index(drop=True)
    for c in ("n_trials", "n", "n_oom", "n_diverged", "n_other"):
        out[c] = out[c].astype(int)
    return out


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
    for c in ("lr", "nhid", "emsize", "layers", "dropout", "model", "optimizer", "variable_bptt"):
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
