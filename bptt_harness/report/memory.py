"""The memory model: peak memory against tokens per step, the memory wall, and what fits on a card.

For a fixed recurrent model, activations saved for backpropagation and the logits grow linearly in the
longest window times the batch size while parameters, gradients and optimiser state do not; so
``peak = intercept + slope * x`` with ``x = longest window x batch_size`` (``bptt x bs``, or the cap
of variable-length windows x bs) is the model, fitted by least squares. A model family declares its own
terms (``FamilyInfo.memory_terms``: attention without a fused kernel adds ``window² x bs``), and the fit
uses them: ``peak = intercept + sum_j coef_j x_j``.

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

from bptt_harness.report.numbers import num
from bptt_harness.search_keys import SEARCH_KEYS
from bptt_harness.spec import FACTORY, WINDOW_X_BS, MemoryTerm, find_family
from bptt_harness.stats import t_quantile

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
# What a memory law is fitted per: the model, and each searched key that changes its size.
SHAPE = ("model", *(k.name for k in SEARCH_KEYS.values() if k.model_size))
# Statuses whose peak memory is a real measurement of the configuration (an oom trial's is not).
_MEASURED = ("ok", "pruned", "timeout", "diverged")


def t975(dof: int) -> float:
    """The two-sided 95% Student t quantile on ``dof`` degrees of freedom (bptt_harness.stats)."""
    return t_quantile(0.975, dof)


@dataclass(frozen=True)
class MemoryFit:
    """``peak_mem_mib ~ intercept_mib + sum_j coefs[j] * terms[j](window, bs)``; with the one term of a
    recurrent model that is ``intercept_mib + slope_mib * x``, x = longest window x batch size.

    Attributes:
        n_points: points fitted. ``rmse_mib``/``max_err_mib``: residual error (NaN when the fit is
            exact: as many points as coefficients). ``r2``: coefficient of determination.
        slope_mib / slope_se: the coefficient of the first term (window x bs) and its standard error.
        x_min/x_max: the range of window x bs fitted; ``x_mean`` and ``sxx`` (sum of squared deviations
            of it) describe that range.
        shape: the model the fit is for (e.g. ``lstm 2x650``). ``gpu``: GPU memory (torch reserved)
            rather than the counted bytes of a CPU step.
        overhead_mib: memory a card needs outside torch's pool (CUDA context), from NVML where known.
        loo_median_pct / loo_max_pct: leave-one-out error: each point predicted by the fit of the
            others, as a percentage of its measured peak (NaN with too few points).
        source: what was fitted ("profile" cells or "trials").
        terms / coefs: the family's memory terms and their fitted coefficients (MiB per unit).
        xtx_inv: ``(XᵀX)⁻¹`` of the design matrix (intercept first), for the prediction interval.
        bs_ref: the median batch size fitted: where :meth:`predict` reads a law that is not a function of
            tokens per step alone.
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
    terms: tuple[MemoryTerm, ...] = (WINDOW_X_BS,)
    coefs: tuple[float, ...] = ()
    xtx_inv: tuple[tuple[float, ...], ...] = ()
    bs_ref: float = 1.0

    @property
    def linear(self) -> bool:
        """The law is ``intercept + slope x window x bs``: a function of tokens per step alone."""
        return self.terms == (WINDOW_X_BS,)

    def law(self) -> str:
        """The fitted law in MiB, every term the family declared: ``300 + 0.02 × window × bs + 0.0005 ×
        window² × bs`` (window: the longest training window)."""
        parts = [num(self.intercept_mib, 3), *(f"{num(c, 4)} × {t.name}" for t, c in zip(self.terms, self._coefs))]
        return " + ".join(parts).replace("+ -", "− ")

    @property
    def _coefs(self) -> tuple[float, ...]:
        return self.coefs or (self.slope_mib,)

    def predict_at(self, window: float | np.ndarray, bs: float | np.ndarray) -> float | np.ndarray:
        """The law's peak for a longest window and a batch size."""
        w, b = np.asarray(window, dtype=float), np.asarray(bs, dtype=float)
        return self.intercept_mib + sum(c * t.of(w, b) for t, c in zip(self.terms, self._coefs))

    def upper_at(self, window: float, bs: float) -> float:
        """The 95% prediction interval's upper end: wider the further (window, bs) is from the data."""
        pred = float(self.predict_at(window, bs))
        if math.isnan(self.rmse_mib) or not self.xtx_inv:
            return pred
        z = np.array([1.0, *(t.of(float(window), float(bs)) for t in self.terms)])
        dof = self.n_points - len(z)
        return pred + t975(dof) * self.rmse_mib * math.sqrt(1 + float(z @ np.array(self.xtx_inv) @ z))

    def predict(self, x: float | np.ndarray, bs: float | None = None) -> float | np.ndarray:
        """The peak at ``x`` tokens per step (window x bs), at batch size ``bs`` (default ``bs_ref``; a
        linear law does not depend on it)."""
        b = self.bs_ref if bs is None else bs
        return self.predict_at(np.asarray(x, dtype=float) / b, b)

    def upper(self, x: float, bs: float | None = None) -> float:
        b = self.bs_ref if bs is None else bs
        return self.upper_at(x / b, b)

    @property
    def margin_mib(self) -> float:
        """The interval's half-width at the centre of the data (the least it ever is)."""
        return self.upper(self.x_mean) - float(self.predict(self.x_mean)) if not math.isnan(self.x_mean) else 0.0

    def max_window(self, card_mib: float, bs: float) -> float:
        """Largest window whose upper prediction at ``bs``, plus the context outside torch's pool, fits
        ``card_mib`` (inf when the law does not grow with the window)."""
        room = card_mib - self.overhead_mib
        if self.upper_at(0.0, bs) > room:
            return 0.0
        if not any(c > 0 and t.window_power > 0 for t, c in zip(self.terms, self._coefs)):
            return math.inf
        lo, hi = 0.0, 1.0
        while self.upper_at(hi, bs) <= room:   # the interval widens: double until the edge is passed
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.upper_at(mid, bs) <= room else (lo, mid)
        return lo

    def max_tokens_per_step(self, card_mib: float, bs: float | None = None) -> float:
        """Largest x = window x bs that fits ``card_mib`` at batch size ``bs`` (default ``bs_ref``)."""
        b = self.bs_ref if bs is None else bs
        return self.max_window(card_mib, b) * b


def fit_terms(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float, float, np.ndarray, np.ndarray]:
    """Least squares ``y = a + X b`` -> (coefficients with the intercept first, rmse, max_abs_err, r2,
    their standard errors, (XᵀX)⁻¹); NaN errors when there are no more points than coefficients."""
    y = np.asarray(y, dtype=float)
    A = np.column_stack([np.ones(len(y)), np.asarray(X, dtype=float).reshape(len(y), -1)])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    dof = len(y) - A.shape[1]
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else math.nan)
    xtx_inv = np.linalg.pinv(A.T @ A)
    if dof > 0:
        rmse = math.sqrt(ss_res / dof)
        se = rmse * np.sqrt(np.clip(np.diag(xtx_inv), 0, None))
        max_err = float(np.abs(resid).max())
    else:
        rmse = max_err = math.nan
        se = np.full(A.shape[1], math.nan)
    return coef, rmse, max_err, r2, se, xtx_inv


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Least squares ``y = a + b x`` -> (a, b, rmse, max_abs_err, r2, se_b); NaN errors with 2 points."""
    x = np.asarray(x, dtype=float)
    coef, rmse, max_err, r2, se, _ = fit_terms(x, y)
    sxx = float(((x - x.mean()) ** 2).sum())
    se_b = float(se[1]) if sxx > 0 else math.nan
    return float(coef[0]), float(coef[1]), rmse, max_err, r2, se_b


def leave_one_out_pct(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|error| of each point predicted by the fit of all the others, in % of its value (``x``: one column
    per term)."""
    y = np.asarray(y, dtype=float)
    X = np.asarray(x, dtype=float).reshape(len(y), -1)
    out = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        A = np.column_stack([np.ones(keep.sum()), X[keep]])
        if np.linalg.matrix_rank(A) < A.shape[1] or y[i] <= 0:
            continue
        coef, *_ = fit_terms(X[keep], y[keep])
        out.append(abs(coef[0] + X[i] @ coef[1:] - y[i]) / y[i] * 100.0)
    return np.array(out)


def make_fit(x: np.ndarray, y: np.ndarray, shape: str, gpu: bool, overhead: float, source: str,
             terms: tuple[MemoryTerm, ...] = (WINDOW_X_BS,), bs: np.ndarray | None = None) -> MemoryFit:
    """Fit ``y`` on ``x`` (window x bs: one column, for the one-term law) or on the ``terms`` of (window
    ``x / bs``, ``bs``) when ``bs`` is given."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    b = np.ones_like(x) if bs is None else np.asarray(bs, dtype=float)
    X = np.column_stack([t.of(x / b, b) for t in terms]) if bs is not None else x.reshape(-1, 1)
    coef, rmse, max_err, r2, se, xtx_inv = fit_terms(X, y)
    loo = leave_one_out_pct(X, y) if len(x) > X.shape[1] + 1 else np.array([])
    return MemoryFit(float(coef[0]), float(coef[1]), len(x), rmse, max_err, r2, float(se[1]), float(x.min()),
                     float(x.max()), shape, gpu, overhead, x_mean=float(x.mean()), sxx=float(((x - x.mean()) ** 2).sum()),
                     loo_median_pct=float(np.median(loo)) if len(loo) else math.nan,
                     loo_max_pct=float(loo.max()) if len(loo) else math.nan, source=source, terms=tuple(terms),
                     coefs=tuple(float(c) for c in coef[1:]), xtx_inv=tuple(tuple(map(float, r)) for r in xtx_inv),
                     bs_ref=float(np.median(b)) if bs is not None else 1.0)


def shape_label(row: pd.Series | dict) -> str:
    """What the model of a trials.csv row is: its family's shape (``lstm 2x200``), or a factory's
    ``module:function`` and its parameter count."""
    m = row.get("model")
    family = find_family(m)
    if family is not None and family.name == FACTORY:
        n = pd.to_numeric(row.get("n_params"), errors="coerce")
        return f"{m} ({int(n):,} parameters)" if pd.notna(n) and n > 0 else str(m)
    if family is not None:
        return family.describe(row)
    layers, nhid = row.get("layers"), row.get("nhid")
    if layers is None or nhid is None:
        return str(m or "model")
    try:
        return f"{m or 'rnn'} {int(layers)}x{int(nhid)}"
    except (TypeError, ValueError):
        return str(m or "model")


def memory_terms(model: object) -> tuple[MemoryTerm, ...]:
    """The memory law's terms of a stored ``model`` value: its family's, or window x bs for a family this
    process does not know."""
    family = find_family(model)
    return family.memory_terms if family is not None else (WINDOW_X_BS,)


def window_x(d: pd.DataFrame) -> pd.Series:
    """The memory model's x: the longest window trained x batch size (bptt x bs for fixed windows)."""
    longest = d["max_window"] if "max_window" in d else pd.Series(np.nan, index=d.index)
    return longest.fillna(d["bptt"]) * d["batch_size"]


def _fits(x: pd.Series, bs: pd.Series, terms: tuple[MemoryTerm, ...]) -> bool:
    """Points that determine every coefficient (the intercept and one per term): for the one-term law,
    two distinct tokens per step."""
    w, b = x.to_numpy(dtype=float) / bs.to_numpy(dtype=float), bs.to_numpy(dtype=float)
    A = np.column_stack([np.ones(len(w)), *(t.of(w, b) for t in terms)])
    return len(w) > 0 and int(np.linalg.matrix_rank(A)) == A.shape[1]


def fit_memory(trials: pd.DataFrame, profile: pd.DataFrame | None = None) -> list[MemoryFit]:
    """One fit per model shape (most points first), with the terms its family declares. Needs points that
    determine every coefficient (two distinct tokens per step for the one-term law).

    With a profile (``profile.csv``, one model shape) the study's shape is fitted on its cells,
    which measure training memory alone and span the wall; otherwise on the trials."""
    fits: list[MemoryFit] = []
    overhead = _context_overhead(trials)
    if profile is not None and len(profile):
        p = profile[(profile["phase"] != "eval") & profile["status"].isin(_MEASURED)]
        mem = p["peak_mem_mib"]
        p = p.assign(_y=mem).dropna(subset=["_y"])
        terms = memory_terms(trials["model"].iloc[0]) if len(trials) and "model" in trials else (WINDOW_X_BS,)
        if len(p) and _fits(p["tokens_per_step"], p["batch_size"], terms):
            gpu = p["device"].astype(str).str.startswith("cuda").any()
            label = shape_label(trials.iloc[0]) if len(trials) else "profiled model"
            fits.append(make_fit(p["tokens_per_step"], p["_y"], label, bool(gpu), overhead if gpu else 0.0,
                                 "profile", terms, p["batch_size"]))
    d = trials[trials["status"].isin(_MEASURED) & trials["peak_mem_mib"].notna() & trials["bptt"].notna()]
    if not d.empty:
        d = d.assign(_x=window_x(d)).dropna(subset=["_x"])
        keys = [k for k in SHAPE if k in d.columns]
        d = d.assign(**{f"_{k}": d[k].astype(str) for k in keys})
        for _, g in d.groupby([f"_{k}" for k in keys], sort=False, dropna=False):
            terms = memory_terms(g["model"].iloc[0] if "model" in g else None)
            if not _fits(g["_x"], g["batch_size"], terms) or (fits and shape_label(g.iloc[0]) == fits[0].shape):
                continue
            gpu = bool((g["probe_kind"] == "nvml").any() or g["device"].astype(str).str.startswith("cuda").any())
            fits.append(make_fit(g["_x"], g["peak_mem_mib"], shape_label(g.iloc[0]), gpu,
                                 overhead if gpu else 0.0, "trials", terms, g["batch_size"]))
    fits.sort(key=lambda f: (f.source != "profile", -f.n_points))
    return fits


def profile_points(profile: pd.DataFrame) -> pd.DataFrame:
    """The profile cells a profile fit is made of (as :func:`fit_memory` selects them): ``x`` tokens per
    step, ``y`` training peak MiB, ``text`` the cell; for figures that must draw what was fitted."""
    p = profile[(profile["phase"] != "eval") & profile["status"].isin(_MEASURED)]
    mem = p["peak_mem_mib"]
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
            window = fit.max_window(mib, bs)
            row[name] = None if math.isinf(window) else max(0, int(math.floor(window)))
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
