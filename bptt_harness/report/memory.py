"""The memory model: peak memory against tokens per step, the memory wall, and what fits on a card.

For a fixed model, activations saved for backpropagation and the logits grow linearly in the
longest window times the batch size while parameters, gradients and optimiser state do not; so
``peak = intercept + slope * x`` with ``x = longest window x batch_size`` (``bptt x bs``, or the cap
of variable-length windows x bs) is the model, fitted by least squares.

A prediction for a card is a bet: it uses the 95% prediction interval of the fit (which widens as
``x`` leaves the measured range), the memory the card really offers (less than its nominal size) and
the CUDA context that lives outside torch's pool. The fit is checked by leaving each measured point
out in turn and predicting it from the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Total memory as nvidia-smi reports it, MiB: what a process can address, not the nominal size
# (an "80 GB" H100 offers 81,559 MiB, a "16 GB" T4 15,360). Variants of a card can differ a little.
CARDS_MIB: dict[str, float] = {
    "T4 16GB": 15_360.0,
    "A10G 24GB": 23_028.0,
    "L4 24GB": 23_034.0,
    "A100 40GB": 40_960.0,
    "A100 80GB": 81_920.0,
    "H100 80GB": 81_559.0,
    "H200 141GB": 143_771.0,
}
# A CUDA context with cuDNN and cuBLAS loaded, where the study measured none (MiB).
DEFAULT_CONTEXT_MIB = 500.0
SHAPE = ("model", "layers", "nhid", "emsize")
# Statuses whose peak memory is a real measurement of the configuration (an oom trial's is not).
_MEASURED = ("ok", "pruned", "timeout", "diverged")
# Two-sided 95% Student t quantiles by degrees of freedom; 1.96 beyond the table.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(dof: int) -> float:
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


@dataclass(frozen=True)
class MemoryFit:
    """``peak_mem_mib ~ intercept_mib + slope_mib * x``, x = longest window x batch size.

    Attributes:
        n_points: points fitted. ``rmse_mib``/``max_err_mib``: residual error (NaN when the fit is
            exact through two points). ``r2``: coefficient of determination.
        slope_se: standard error of the slope. ``x_min``/``x_max``: the range fitted; ``x_mean`` and
            ``sxx`` (sum of squared deviations of x) give the prediction interval.
        shape: the model the fit is for (e.g. ``lstm 2x650``). ``gpu``: GPU memory (torch reserved)
            rather than the counted bytes of a CPU step.
        overhead_mib: memory a card needs outside torch's pool (CUDA context), from NVML where known.
        loo_median_pct / loo_max_pct: leave-one-out error: each point predicted by the fit of the
            others, as a percentage of its measured peak (NaN with fewer than 3 points).
        source: what was fitted ("profile" cells or "trials").
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
    x_mean: float = math.nan
    sxx: float = math.nan
    loo_median_pct: float = math.nan
    loo_max_pct: float = math.nan
    source: str = "trials"

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.intercept_mib + self.slope_mib * np.asarray(x, dtype=float)

    def upper(self, x: float) -> float:
        """The 95% prediction interval's upper end at ``x``: wider the further x is from the data."""
        if math.isnan(self.rmse_mib) or math.isnan(self.sxx) or self.sxx <= 0:
            return float(self.predict(x))
        half = t975(self.n_points - 2) * self.rmse_mib * math.sqrt(
            1 + 1 / self.n_points + (x - self.x_mean) ** 2 / self.sxx)
        return float(self.predict(x)) + half

    @property
    def margin_mib(self) -> float:
        """The interval's half-width at the centre of the data (the least it ever is)."""
        return self.upper(self.x_mean) - float(self.predict(self.x_mean)) if not math.isnan(self.x_mean) else 0.0

    def max_tokens_per_step(self, card_mib: float) -> float:
        """Largest x whose upper prediction, plus the context outside torch's pool, fits ``card_mib``."""
        if not self.slope_mib > 0:
            return math.inf
        room = card_mib - self.overhead_mib
        if self.upper(0.0) > room:
            return 0.0
        lo, hi = 0.0, max(1.0, (room - self.intercept_mib) / self.slope_mib)
        while self.upper(hi) <= room:   # the interval widens: the line's own answer is an upper bound
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.upper(mid) <= room else (lo, mid)
        return lo


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


def leave_one_out_pct(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|error| of each point predicted by the line through all the others, in % of its value."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        if len(np.unique(x[keep])) < 2 or y[i] <= 0:
            continue
        a, b, *_ = fit_linear(x[keep], y[keep])
        out.append(abs(a + b * x[i] - y[i]) / y[i] * 100.0)
    return np.array(out)


def make_fit(x: np.ndarray, y: np.ndarray, shape: str, gpu: bool, overhead: float, source: str) -> MemoryFit:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    a, b, rmse, max_err, r2, se_b = fit_linear(x, y)
    loo = leave_one_out_pct(x, y) if len(x) >= 3 else np.array([])
    return MemoryFit(a, b, len(x), rmse, max_err, r2, se_b, float(x.min()), float(x.max()), shape, gpu, overhead,
                     x_mean=float(x.mean()), sxx=float(((x - x.mean()) ** 2).sum()),
                     loo_median_pct=float(np.median(loo)) if len(loo) else math.nan,
                     loo_max_pct=float(loo.max()) if len(loo) else math.nan, source=source)


def shape_label(row: pd.Series | dict) -> str:
    m, layers, nhid = row.get("model"), row.get("layers"), row.get("nhid")
    try:
        return f"{m or 'rnn'} {int(layers)}x{int(nhid)}"  # None is caught below
    except (TypeError, ValueError):
        return str(m or "model")


def window_x(d: pd.DataFrame) -> pd.Series:
    """The memory model's x: the longest window trained x batch size (bptt x bs for fixed windows)."""
    longest = d["max_window"] if "max_window" in d else pd.Series(np.nan, index=d.index)
    return longest.fillna(d["bptt"]) * d["batch_size"]


def fit_memory(trials: pd.DataFrame, profile: pd.DataFrame | None = None) -> list[MemoryFit]:
    """One fit per model shape (most points first). Needs two distinct x values per shape.

    With a profile (``profile.csv``, one model shape) the study's shape is fitted on its cells,
    which measure training memory alone and span the wall; otherwise on the trials."""
    fits: list[MemoryFit] = []
    overhead = _context_overhead(trials)
    if profile is not None and len(profile):
        p = profile[(profile["phase"] != "eval") & profile["status"].isin(_MEASURED)]
        mem = p["cpu_cap_peak_mib"].fillna(p["peak_mem_mib"]) if "cpu_cap_peak_mib" in p else p["peak_mem_mib"]
        p = p.assign(_y=mem).dropna(subset=["_y"])
        if p["tokens_per_step"].nunique() >= 2:
            gpu = p["device"].astype(str).str.startswith("cuda").any()
            label = shape_label(trials.iloc[0]) if len(trials) else "profiled model"
            fits.append(make_fit(p["tokens_per_step"], p["_y"], label, bool(gpu), overhead if gpu else 0.0,
                                 "profile"))
    d = trials[trials["status"].isin(_MEASURED) & trials["peak_mem_mib"].notna() & trials["bptt"].notna()]
    if not d.empty:
        d = d.assign(_x=window_x(d)).dropna(subset=["_x"])
        keys = [k for k in SHAPE if k in d.columns]
        d = d.assign(**{f"_{k}": d[k].astype(str) for k in keys})
        for _, g in d.groupby([f"_{k}" for k in keys], sort=False, dropna=False):
            if g["_x"].nunique() < 2 or (fits and shape_label(g.iloc[0]) == fits[0].shape):
                continue
            gpu = bool((g["probe_kind"] == "nvml").any() or g["device"].astype(str).str.startswith("cuda").any())
            fits.append(make_fit(g["_x"], g["peak_mem_mib"], shape_label(g.iloc[0]), gpu,
                                 overhead if gpu else 0.0, "trials"))
    fits.sort(key=lambda f: (f.source != "profile", -f.n_points))
    return fits


def profile_points(profile: pd.DataFrame) -> pd.DataFrame:
    """The profile cells a profile fit is made of (as :func:`fit_memory` selects them): ``x`` tokens per
    step, ``y`` training peak MiB, ``text`` the cell; for figures that must draw what was fitted."""
    p = profile[(profile["phase"] != "eval") & profile["status"].isin(_MEASURED)]
    mem = p["cpu_cap_peak_mib"].fillna(p["peak_mem_mib"]) if "cpu_cap_peak_mib" in p else p["peak_mem_mib"]
    p = p.assign(_y=mem).dropna(subset=["_y", "tokens_per_step"])
    return pd.DataFrame({"x": p["tokens_per_step"].astype(float), "y": p["_y"].astype(float),
                         "text": [f"profile bptt {int(b)} × bs {int(s)}" for b, s in zip(p["bptt"], p["batch_size"])]})


def trial_points(trials: pd.DataFrame, shape: str | None = None) -> pd.DataFrame:
    """The trials a trial fit is made of (as :func:`fit_memory` selects them), of one model ``shape`` when
    given: ``x`` longest window x batch size, ``y`` peak MiB, ``text`` the trial's configuration."""
    d = trials[trials["status"].isin(_MEASURED) & trials["peak_mem_mib"].notna() & trials["bptt"].notna()]
    d = d.assign(_x=window_x(d)).dropna(subset=["_x"])
    if shape is not None and len(d):
        d = d[[shape_label(r) == shape for _, r in d.iterrows()]]
    text = [f"trial {'' if pd.isna(n) else int(n)}: bptt {int(b)} × bs {int(s)}"
            for n, b, s in zip(d["trial_number"], d["bptt"], d["batch_size"])]
    return pd.DataFrame({"x": d["_x"].astype(float), "y": d["peak_mem_mib"].astype(float), "text": text})


def _context_overhead(trials: pd.DataFrame) -> float:
    """What the process holds beyond torch's pool (CUDA context, cuDNN workspaces), as NVML saw it."""
    if "peak_mem_nvml_process_mib" not in trials or "peak_mem_torch_reserved_mib" not in trials:
        return DEFAULT_CONTEXT_MIB
    extra = (trials["peak_mem_nvml_process_mib"] - trials["peak_mem_torch_reserved_mib"]).dropna()
    extra = extra[extra > 0]
    return float(extra.median()) if len(extra) else DEFAULT_CONTEXT_MIB


def card_table(fit: MemoryFit, batch_sizes: list[int], cards: dict[str, float] = CARDS_MIB) -> pd.DataFrame:
    """Predicted largest bptt per batch size on each card (rows: batch size; columns: card names).

    0 means not even bptt 1 is predicted to fit; values are predictions, not measurements."""
    rows = []
    for bs in sorted({int(b) for b in batch_sizes if b and b > 0}):
        row: dict[str, object] = {"batch_size": bs}
        for name, mib in cards.items():
            x = fit.max_tokens_per_step(mib)
            row[name] = None if math.isinf(x) else max(0, int(math.floor(x / bs)))
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
