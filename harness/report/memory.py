"""The memory model: peak memory against tokens per step (bptt x batch size), and the memory wall.

For a fixed model, activations saved for backpropagation and the logits grow linearly in
``bptt * batch_size`` while parameters, gradients and optimiser state do not; so
``peak = intercept + slope * bptt * batch_size`` is the model, fitted by least squares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

CARDS_GIB = (16, 24, 40, 80, 141)
SHAPE = ("model", "layers", "nhid", "emsize")
# Statuses whose peak memory is a real measurement of the configuration (an oom trial's is not).
_MEASURED = ("ok", "pruned", "timeout", "diverged")


@dataclass(frozen=True)
class MemoryFit:
    """``peak_mem_mib ~ intercept_mib + slope_mib * tokens_per_step``.

    Attributes:
        n_points: trials used. ``rmse_mib``/``max_err_mib``: residual error (NaN when the fit is
            exact through two points). ``r2``: coefficient of determination.
        slope_se: standard error of the slope. ``x_min``/``x_max``: the tokens-per-step range fitted.
        shape: the model the fit is for (e.g. ``lstm 2x650``). ``gpu``: whether the memory is GPU
            memory (torch reserved) rather than the process's resident set on CPU.
        overhead_mib: memory a card needs outside torch's pool (CUDA context), from NVML where known.
    """

    intercept_mib: float
    slope_mib: float
    n_points: int
    rmse_mib: float
    max_err_mib: float
    r2: float
    slope_se: float
    x_min: float
    x_max: float
    shape: str
    gpu: bool
    overhead_mib: float = 0.0

    def predict(self, tokens_per_step: float | np.ndarray) -> float | np.ndarray:
        return self.intercept_mib + self.slope_mib * np.asarray(tokens_per_step, dtype=float)

    @property
    def margin_mib(self) -> float:
        """Safety margin of the predictions: two residual RMS errors (nothing when unknown)."""
        return 0.0 if math.isnan(self.rmse_mib) else 2.0 * self.rmse_mib

    def max_tokens_per_step(self, card_mib: float) -> float:
        """Largest bptt x bs predicted to fit ``card_mib`` (with the margin and the overhead)."""
        if not self.slope_mib > 0:
            return math.inf
        return (card_mib - self.overhead_mib - self.margin_mib - self.intercept_mib) / self.slope_mib


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Least squares ``y = a + b x`` -> (a, b, rmse, max_abs_err, r2, se_b); NaN errors with 2 points."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    A = np.column_stack([np.ones_like(x), x])
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - (a + b * x)
    n = len(x)
    dof = n - 2
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else math.nan)
    if dof > 0:
        rmse = math.sqrt(ss_res / dof)
        sxx = float(((x - x.mean()) ** 2).sum())
        se_b = rmse / math.sqrt(sxx) if sxx > 0 else math.nan
        max_err = float(np.abs(resid).max())
    else:
        rmse = se_b = max_err = math.nan
    return float(a), float(b), rmse, max_err, r2, se_b


def shape_label(row: pd.Series | dict) -> str:
    m, layers, nhid = row.get("model"), row.get("layers"), row.get("nhid")
    try:
        return f"{m or 'rnn'} {int(layers)}x{int(nhid)}"
    except (TypeError, ValueError):
        return str(m or "model")


def fit_memory(trials: pd.DataFrame) -> list[MemoryFit]:
    """One fit per model shape (most trials first). Needs two distinct ``bptt x bs`` values per shape."""
    d = trials[trials["status"].isin(_MEASURED) & trials["peak_mem_mib"].notna() & trials["tokens_per_step"].notna()]
    if d.empty:
        return []
    keys = [k for k in SHAPE if k in d.columns]
    d = d.assign(**{f"_{k}": d[k].astype(str) for k in keys})
    fits = []
    for _, g in d.groupby([f"_{k}" for k in keys], sort=False, dropna=False):
        if g["tokens_per_step"].nunique() < 2:
            continue
        a, b, rmse, max_err, r2, se_b = fit_linear(g["tokens_per_step"].to_numpy(), g["peak_mem_mib"].to_numpy())
        gpu = bool((g["probe_kind"] == "nvml").any() or g["device"].astype(str).str.startswith("cuda").any())
        overhead = 0.0
        if gpu:
            # What the process holds beyond torch's pool (CUDA context, cuDNN workspaces) as NVML saw it.
            extra = (g["peak_mem_nvml_process_mib"] - g["peak_mem_torch_reserved_mib"]).dropna()
            extra = extra[extra > 0]
            overhead = float(extra.median()) if len(extra) else 0.0
        fits.append(MemoryFit(a, b, len(g), rmse, max_err, r2, se_b, float(g["tokens_per_step"].min()),
                               float(g["tokens_per_step"].max()), shape_label(g.iloc[0]), gpu, overhead))
    fits.sort(key=lambda f: -f.n_points)
    return fits


def card_table(fit: MemoryFit, batch_sizes: list[int], cards_gib: tuple[float, ...] = CARDS_GIB) -> pd.DataFrame:
    """Predicted largest bptt per batch size for each card size (rows: batch size; columns ``<N> GiB``).

    0 means not even bptt 1 is predicted to fit; values are predictions, not measurements.
    """
    rows = []
    for bs in sorted({int(b) for b in batch_sizes if b and b > 0}):
        row: dict[str, object] = {"batch_size": bs}
        for gib in cards_gib:
            x = fit.max_tokens_per_step(gib * 1024.0)
            row[f"{gib:g} GiB"] = None if math.isinf(x) else max(0, int(math.floor(x / bs)))
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class MemoryWall:
    """What was measured at the edge of memory.

    Attributes:
        largest_ok: the ok trial with the largest bptt x bs (a row) or None.
        smallest_oom: the oom trial with the smallest bptt x bs, or None.
        per_batch: per batch size, the largest bptt that ran and the smallest that ran out of memory.
        card_mib: the GPU's memory where known.
    """

    largest_ok: pd.Series | None
    smallest_oom: pd.Series | None
    per_batch: pd.DataFrame
    card_mib: float | None


def memory_wall(trials: pd.DataFrame) -> MemoryWall:
    ok = trials[trials["status"] == "ok"].dropna(subset=["tokens_per_step"])
    oom = trials[trials["status"] == "oom"].dropna(subset=["tokens_per_step"])
    largest = ok.loc[ok["tokens_per_step"].idxmax()] if len(ok) else None
    smallest = oom.loc[oom["tokens_per_step"].idxmin()] if len(oom) else None
    per = pd.DataFrame({
        "max_ok_bptt": ok.groupby("batch_size")["bptt"].max(),
        "min_oom_bptt": oom.groupby("batch_size")["bptt"].min(),
    }).reset_index().rename(columns={"index": "batch_size"}) if len(ok) or len(oom) else \
        pd.DataFrame(columns=["batch_size", "max_ok_bptt", "min_oom_bptt"])
    card = trials["gpu_memory_mib"].dropna()
    return MemoryWall(largest, smallest, per, float(card.iloc[0]) if len(card) else None)
