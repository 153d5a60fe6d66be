"""The forum's rules of thumb, checked against this study's data.

The advice this tool exists to test comes as three rules:

* memory: a ``(bptt, bs)`` minibatch must fit, so on out-of-memory reduce bptt or bs;
* stability: if training is unstable (loss to NaN), reduce bptt: gradients have fewer steps to explode through;
* speed: if training is too slow, reduce bptt: the RNN's time loop cannot be parallelised.

Each check is a pure function of the trials frame (``trials.csv``) and the profile frame (``profile.csv``)
that returns a :class:`RuleCheck`: a verdict, the sentences that give it with their numbers, and the rows
behind them. Shapes are compared at equal tokens per step (``bptt x bs``) and only where they differ in
nothing else that matters to the rule (:data:`STEP_WORK` for memory and speed, :data:`TRAINING` for
stability); where the study has no such comparison the verdict is ``not tested`` and the text says why.
Intervals are 95% with Student t quantiles on the real degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from bptt_harness.report import numbers
from bptt_harness.report.memory import MemoryFit
from bptt_harness.spec import RECORDED_MODEL_KEYS
from bptt_harness.stats import t_quantile

__all__ = ["MEMORY_SAME", "SPEED_SAME", "SPEED_WORK", "STEP_WORK", "TRAINING", "VERDICTS", "RuleCheck", "RulesOfThumb", "Verdict",
           "check_memory", "check_rules", "check_speed", "check_stability", "confounded", "equal_step_groups",
           "interval", "stratified_p", "within_slope"]

Verdict = Literal["holds", "does not hold", "inconclusive", "not tested"]
VERDICTS: tuple[Verdict, ...] = ("holds", "does not hold", "inconclusive", "not tested")

# What decides the work and the memory of one training step besides its shape. lr and clip do not (a step
# computes the same whatever its lr, and the norm is computed with clipping off too), so memory and speed
# compare shapes across them; the machine does, so results of two machines are never compared. The model's
# keys are the ones every trial record keeps (a Transformer's heads and memory, the AWD-LSTM's dropouts).
STEP_WORK = ("model", *RECORDED_MODEL_KEYS, "optimizer", "variable_bptt", "device", "machine_id")
# What decides whether a run diverges besides its shape: everything above, the lr and the clip.
TRAINING = (*STEP_WORK, "lr", "clip")
# What decides a step's speed besides its work: the C allocator (bptt_harness/allocator.py; up to 20% on a CPU).
SPEED_WORK = (*STEP_WORK, "malloc")
# Reducing bptt and reducing bs "free the same memory per token" when their slopes differ by at most this.
MEMORY_SAME = 0.10
# Speed: "the same" when the interval lies within this of equal; "slower" or "faster" only beyond the noise and
# by more than this (a few percent would not make anyone change bptt).
SPEED_SAME = 0.10
ALPHA = 0.05  # one-sided level of the stability test
# Statuses whose peak memory measures the configuration (memory.py's rule), and runs that say something
# about stability (an oom, pruned, timed-out or failed run never reached its end or its edge).
_MEASURED = ("ok", "pruned", "timeout", "diverged")
_RAN = ("ok", "diverged")
_FIT = ("ok", "diverged")  # profile attempts that ran a step


@dataclass(frozen=True)
class RuleCheck:
    """One rule, checked.

    Attributes:
        key: ``memory``, ``stability`` or ``speed``.
        title: the rule in a few words. ``claim``: the rule as the forum gives it.
        verdict: ``holds``, ``does not hold``, ``inconclusive`` (measured, but within the noise or both
            ways) or ``not tested`` (the study's design cannot see it; ``text`` says why).
        text: the sentences of the verdict, computed from the data, with their numbers.
        numbers: the numbers behind the sentences, by name (for ``summary.json``).
        table: the rows compared (equal tokens per step groups), for the report's table.
    """

    key: str
    title: str
    claim: str
    verdict: Verdict
    text: str
    numbers: dict = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class RulesOfThumb:
    memory: RuleCheck
    stability: RuleCheck
    speed: RuleCheck

    def checks(self) -> list[RuleCheck]:
        return [self.memory, self.stability, self.speed]


MEMORY_CLAIM = "A (bptt, bs) minibatch must fit in memory, so on out-of-memory reduce bptt or bs."
STABILITY_CLAIM = ("If training is unstable (loss shooting off to NaN), reduce bptt: gradients have fewer steps "
                   "to explode through.")
SPEED_CLAIM = "If training is too slow, reduce bptt: the RNN's time loop cannot be parallelised."


def check_rules(trials: pd.DataFrame, profile: pd.DataFrame | None = None,
                fits: Sequence[MemoryFit] = ()) -> RulesOfThumb:
    """The three rules, checked on one study's trials (and its profile and memory model, when it has them)."""
    return RulesOfThumb(check_memory(trials, profile, fits), check_stability(trials), check_speed(trials, profile))


# --------------------------------------------------------------------------- shared helpers

def _num(v: float, digits: int = 3) -> str:
    """A number for a sentence (the report's rules, bptt_harness.report.numbers): ``0.512``, ``4.27``, ``13,851``."""
    return numbers.num(v, digits, missing="n/a")


def _shape(bptt: float, bs: float) -> str:
    return f"bptt {int(bptt)} × bs {int(bs)}"


def _present(df: pd.DataFrame, fields: Sequence[str]) -> list[str]:
    return [f for f in fields if f in df.columns]


def _keyed(df: pd.DataFrame, fields: Sequence[str]) -> pd.Series:
    """One string per row naming its values of ``fields`` (missing values included), for grouping."""
    cols = _present(df, fields)
    if not cols or df.empty:
        return pd.Series("", index=df.index, dtype=object)
    return pd.Series(["\x1f".join(map(str, row)) for row in df[cols].itertuples(index=False, name=None)],
                     index=df.index, dtype=object)


def equal_step_groups(df: pd.DataFrame, fields: Sequence[str]) -> list[pd.DataFrame]:
    """Rows that share tokens per step and every one of ``fields``, with at least two bptt values: the
    comparisons where only the shape differs. Largest tokens per step last."""
    if df.empty:
        return []
    d = df.assign(_g=_keyed(df, fields))
    out = [g.drop(columns="_g") for _, g in d.groupby(["tokens_per_step", "_g"], sort=True) if g["bptt"].nunique() >= 2]
    return out


def confounded(df: pd.DataFrame, fields: Sequence[str]) -> str:
    """Why the study has no equal-tokens-per-step comparison: none shares bptt x bs, or those that do also
    differ in (named) fields."""
    pairs = [g for _, g in df.groupby("tokens_per_step") if g["bptt"].nunique() >= 2] if len(df) else []
    if not pairs:
        return "no two shapes in the study share tokens per step (bptt × bs)"
    differ = sorted({f for g in pairs for f in _present(g, fields) if g[f].map(str).nunique() > 1})
    return (f"the {len(pairs)} group(s) of shapes at equal tokens per step also differ in "
            + ", ".join(differ) + (" (the lr rule gives each shape its own lr)" if "lr" in differ else ""))


def within_slope(x: np.ndarray, y: np.ndarray, group: np.ndarray) -> tuple[float, float, int, int]:
    """Least squares slope of ``y`` on ``x`` within groups (each group its own intercept) ->
    (slope, standard error, degrees of freedom, points). NaN slope when no group varies in x; NaN
    standard error without residual degrees of freedom."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    frame = pd.DataFrame({"x": x, "y": y, "g": np.asarray(group).astype(str)})
    frame = frame[frame.groupby("g")["x"].transform("nunique") >= 2]
    if frame.empty:
        return math.nan, math.nan, 0, 0
    xd = frame["x"] - frame.groupby("g")["x"].transform("mean")
    yd = frame["y"] - frame.groupby("g")["y"].transform("mean")
    sxx = float((xd * xd).sum())
    slope = float((xd * yd).sum()) / sxx
    dof = len(frame) - frame["g"].nunique() - 1
    resid = yd - slope * xd
    se = math.sqrt(float((resid * resid).sum()) / dof / sxx) if dof > 0 else math.nan
    return slope, se, dof, len(frame)


def interval(estimate: float, se: float, dof: int, comparisons: int = 1) -> tuple[float, float]:
    """The 95% interval (t quantile on ``dof``), widened for ``comparisons`` made at once (Bonferroni, so
    that all of them hold together with 95%); the point itself when there is no standard error."""
    if not math.isfinite(se) or dof < 1:
        return estimate, estimate
    half = t_quantile(1 - 0.025 / comparisons, dof) * se
    return estimate - half, estimate + half


def _device(trials: pd.DataFrame) -> str:
    """``this CPU (Intel Xeon)`` / ``this GPU (NVIDIA H100)``: where the trials ran, in words."""
    gpu = trials["gpu_name"].dropna().astype(str) if "gpu_name" in trials else pd.Series(dtype=object)
    gpu = gpu[gpu != ""]
    if len(gpu):
        return f"this GPU ({gpu.iloc[0]})"
    cpu = trials["cpu_model"].dropna().astype(str) if "cpu_model" in trials else pd.Series(dtype=object)
    return f"this CPU ({cpu.iloc[0]})" if len(cpu) else "this CPU"


def _on_gpu(trials: pd.DataFrame) -> bool:
    return bool("device" in trials and trials["device"].astype(str).str.startswith("cuda").any())


# --------------------------------------------------------------------------- memory

def _memory_points(trials: pd.DataFrame, profile: pd.DataFrame | None) -> tuple[pd.DataFrame, str]:
    """Peak memory per shape of one model: the profile's cells when it has a map (they measure training
    memory alone), else the trials of the model shape with the most shapes."""
    if profile is not None and len(profile):
        p = profile[(profile["phase"] != "eval") & profile["status"].isin(_FIT)]
        mem = p["peak_mem_mib"]
        p = p.assign(peak_mem_mib=mem).dropna(subset=["peak_mem_mib"])
        if p["bptt"].nunique() >= 2 or p["batch_size"].nunique() >= 2:
            pts = p.groupby(["bptt", "batch_size"], as_index=False)["peak_mem_mib"].mean()
            return pts.assign(tokens_per_step=pts["bptt"] * pts["batch_size"]), "the profile"
    d = trials[trials["status"].isin(_MEASURED) & trials["peak_mem_mib"].notna() & trials["bptt"].notna()]
    if d.empty:
        return pd.DataFrame(columns=["bptt", "batch_size", "peak_mem_mib", "tokens_per_step"]), "the trials"
    d = d.assign(_g=_keyed(d, STEP_WORK))
    best = max(d.groupby("_g"), key=lambda kv: kv[1][["bptt", "batch_size"]].drop_duplicates().shape[0])[1]
    pts = best.groupby(["bptt", "batch_size"], as_index=False)["peak_mem_mib"].mean()
    return pts.assign(tokens_per_step=pts["bptt"] * pts["batch_size"]), "the trials"


def _frees(slope: float, se: float, dof: int) -> str:
    """``yes`` when reducing the knob frees memory beyond the fit's noise, ``no`` when it does not, else
    ``unclear`` (the two knobs' intervals hold together: 2 comparisons)."""
    lo, hi = interval(slope, se, dof, comparisons=2)
    return "yes" if lo > 0 else "no" if hi <= 0 else "unclear"


def check_memory(trials: pd.DataFrame, profile: pd.DataFrame | None = None,
                 fits: Sequence[MemoryFit] = ()) -> RuleCheck:
    """How peak memory grows with bptt (at fixed bs) and with bs (at fixed bptt), per token of bptt x bs,
    and whether the two free the same memory per token."""
    title = "Memory: on out-of-memory, reduce bptt or batch size"
    pts, source = _memory_points(trials, profile)
    x, y = pts["tokens_per_step"].to_numpy(float), pts["peak_mem_mib"].to_numpy(float)
    s_t, se_t, dof_t, n_t = within_slope(x, y, pts["batch_size"].to_numpy())   # bptt varies within a bs
    s_b, se_b, dof_b, n_b = within_slope(x, y, pts["bptt"].to_numpy())         # bs varies within a bptt
    numbers: dict = {"source": source, "shapes": len(pts),
                     "mib_per_ktok_bptt": s_t * 1000, "mib_per_ktok_bptt_se": se_t * 1000, "dof_bptt": dof_t,
                     "mib_per_ktok_bs": s_b * 1000, "mib_per_ktok_bs_se": se_b * 1000, "dof_bs": dof_b}
    groups = equal_step_groups(pts, ())
    spread = [float(g["peak_mem_mib"].max() / g["peak_mem_mib"].min() - 1) for g in groups]
    numbers.update(equal_step_groups=len(groups), equal_step_max_diff_pct=max(spread) * 100 if spread else None)
    table = pd.concat(groups, ignore_index=True) if groups else pts.iloc[:0]
    if fits:
        numbers.update(model_mib_per_ktok=fits[0].slope_mib * 1000, model_r2=fits[0].r2, model_source=fits[0].source)
    if not n_t or not n_b:
        missing = " nor ".join(w for w, n in (("in bptt alone", n_t), ("in the batch size alone", n_b)) if not n)
        text = (f"Not tested: no two shapes with a peak memory measured in {source} differ {missing}, so the two knobs "
                "cannot be compared.")
        if n_t or n_b:
            s, se, dof = (s_t, se_t, dof_t) if n_t else (s_b, se_b, dof_b)
            text += (f" Reducing {'bptt' if n_t else 'the batch size'} frees {_num(s * 1000)}{_pm(s * 1000, se * 1000, dof)} "
                     "MiB per 1,000 tokens of bptt × bs.")
        return RuleCheck("memory", title, MEMORY_CLAIM, "not tested", text, numbers, table)
    free_t, free_b = _frees(s_t, se_t, dof_t), _frees(s_b, se_b, dof_b)
    ratio = s_t / s_b if s_b > 0 and s_t > 0 else math.nan
    same = bool(math.isfinite(ratio) and abs(ratio - 1) <= MEMORY_SAME)
    numbers.update(bptt_frees=free_t, bs_frees=free_b, ratio_bptt_to_bs=ratio, same_per_token=same)
    per = (f"reducing bptt frees {_num(s_t * 1000)}{_pm(s_t * 1000, se_t * 1000, dof_t)} MiB per 1,000 tokens of bptt × bs "
           f"and reducing the batch size {_num(s_b * 1000)}{_pm(s_b * 1000, se_b * 1000, dof_b)}")
    where = f" (from {len(pts)} shapes in {source}; intervals of 95% for the two together)"
    if free_t == "yes" and free_b == "yes":
        verdict: Verdict = "holds"
        text = f"Holds: peak memory grows with both knobs, so reducing either frees memory: {per}{where}."
    elif "no" in (free_t, free_b):
        verdict = "does not hold"
        which = " and ".join(k for k, f in (("bptt", free_t), ("the batch size", free_b)) if f == "no")
        text = f"Does not hold: reducing {which} frees no memory here: {per}{where}."
    else:
        verdict = "inconclusive"
        which = " and ".join(k for k, f in (("bptt", free_t), ("the batch size", free_b)) if f == "unclear")
        text = f"Inconclusive: what reducing {which} frees is within the noise of the measurements: {per}{where}."
    if math.isfinite(ratio):
        text += (f" Per token the two free the same memory (ratio {_num(ratio)}, within {MEMORY_SAME:.0%})." if same else
                 f" Per token they do not free the same memory: bptt frees {_num(ratio)}× what the batch size frees.")
    if spread:
        text += (f" At equal tokens per step the shapes' peaks differ by at most {max(spread):.1%} "
                 f"({len(groups)} group(s) of shapes).")
    if fits:
        f = fits[0]
        text += (f" The memory model (peak ≈ a + b × the longest window × bs, fitted on {f.n_points} "
                 f"{'profiled cells' if f.source == 'profile' else 'trials'}) has b = {_num(f.slope_mib * 1000)} MiB per "
                 f"1,000 tokens" + (f", R² {f.r2:.3f}." if math.isfinite(f.r2) else "."))
    return RuleCheck("memory", title, MEMORY_CLAIM, verdict, text, numbers, table)


def _pm(v: float, se: float, dof: int) -> str:
    lo, hi = interval(v, se, dof, comparisons=2)
    return f" ± {_num((hi - lo) / 2, 2)}" if hi > lo else ""


# --------------------------------------------------------------------------- stability

def stratified_p(tables: Sequence[tuple[int, int, int, int]]) -> tuple[float, float]:
    """Exact conditional test over groups of (diverged long, runs long, diverged short, runs short):
    under "bptt does not matter" each group's divergences fall on its runs at random (hypergeometric), so the
    total of long-window divergences has a known distribution -> (P(total >= observed), P(total <= observed))."""
    dist = np.array([1.0])
    observed = 0
    for d_long, n_long, d_short, n_short in tables:
        k_all, n_all = d_long + d_short, n_long + n_short
        probs = np.array([math.comb(n_long, k) * math.comb(n_short, k_all - k) for k in range(min(k_all, n_long) + 1)],
                         dtype=float) / math.comb(n_all, k_all)
        dist = np.convolve(dist, probs)
        observed += d_long
    return float(dist[observed:].sum()), float(dist[:observed + 1].sum())


def _runs(trials: pd.DataFrame) -> pd.DataFrame:
    """The runs that say something about stability (ok or diverged), with ``_div`` (1: diverged), ``_bad``
    (1: diverged, or finished with a validation perplexity above a uniform guess, which the trainer's guard let
    through) and the largest gradient norm of the runs that finished sound (a blown-up run's is its blow-up)."""
    d = trials[trials["status"].isin(_RAN) & trials["bptt"].notna() & trials["batch_size"].notna()]
    vocab = pd.to_numeric(d["vocab_size"], errors="coerce") if "vocab_size" in d else pd.Series(np.nan, index=d.index)
    worse = (d["status"] == "ok") & (d["val_ppl"] > vocab)
    div = d["status"] == "diverged"
    return d.assign(_div=div.astype(int), _bad=(div | worse).astype(int), _worse=worse.astype(int),
                    max_grad_norm_ok=d["max_grad_norm"].where((d["status"] == "ok") & ~worse))


@dataclass(frozen=True)
class _Edges:
    """Groups of shapes at equal tokens per step, lr and clip, counted under one reading of "unstable"."""

    rows: list[pd.DataFrame]   # per group: one row per shape (runs, unstable runs)
    up: int                    # groups where the longest window was unstable more often than the shortest
    down: int                  # ... less often
    all_bad: int               # groups where every run was unstable
    edge: int                  # groups with stable and unstable runs
    p_up: float                # exact test: as many long-window failures or more, if bptt did not matter
    p_down: float              # ... as few or fewer


def _edges(groups: list[pd.DataFrame], col: str) -> _Edges:
    rows, tables = [], []
    for g in groups:
        per = g.groupby(["bptt", "batch_size"], as_index=False).agg(runs=(col, "size"), unstable=(col, "sum"))
        rows.append(per)
        short, long_ = per.iloc[0], per.iloc[-1]
        tables.append((int(long_["unstable"]), int(long_["runs"]), int(short["unstable"]), int(short["runs"])))
    p_up, p_down = stratified_p(tables)
    return _Edges(rows, sum(1 for a, n, b, m in tables if a / n > b / m), sum(1 for a, n, b, m in tables if a / n < b / m),
                  sum(1 for r in rows if r["unstable"].sum() == r["runs"].sum()),
                  sum(1 for r in rows if 0 < r["unstable"].sum() < r["runs"].sum()), p_up, p_down)


def _clip_text(v: object) -> str:
    try:
        c = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "clip unknown"
    return "clipping off" if c == 0 else "clip " + _num(c) if math.isfinite(c) else "clip unknown"


def _boundaries(runs: pd.DataFrame, group: pd.DataFrame) -> str:
    """Per shape of the group (its other settings, every lr): diverged runs of all runs at each lr."""
    fields = [f for f in _present(runs, TRAINING) if f != "lr"]
    key = _keyed(group.iloc[:1], fields).iloc[0]
    same = runs[(_keyed(runs, fields) == key) & (runs["tokens_per_step"] == group["tokens_per_step"].iloc[0])]
    parts = []
    for (b, bs), g in same.groupby(["bptt", "batch_size"]):
        by_lr = g.groupby("lr", dropna=False)["_div"].agg(["sum", "count"])
        parts.append(f"{_shape(b, bs)} " + ", ".join(f"{int(r['sum'])}/{int(r['count'])} at lr {_num(lr)}"
                                                    for lr, r in by_lr.iterrows()))
    return "; ".join(parts)


def _grad_norm(runs: pd.DataFrame) -> tuple[str, dict]:
    """How the largest gradient norm before clipping grows with bptt, at equal tokens per step, lr and
    clip, over the runs that finished sound: ln(norm) = c_group + k ln(bptt)."""
    ok = runs[runs["max_grad_norm_ok"] > 0]
    groups = equal_step_groups(ok, TRAINING)
    if not groups:
        return "", {}
    d = pd.concat([g.assign(_grp=i) for i, g in enumerate(groups)], ignore_index=True)
    k, se, dof, n = within_slope(np.log(d["bptt"]), np.log(d["max_grad_norm_ok"]), d["_grp"].to_numpy())
    lo, hi = interval(k, se, dof)
    has = dof >= 1 and math.isfinite(se)
    ratios = [float(g.loc[g["bptt"] == g["bptt"].max(), "max_grad_norm_ok"].median()
                    / g.loc[g["bptt"] == g["bptt"].min(), "max_grad_norm_ok"].median()) for g in groups]
    spans = [float(g["bptt"].max() / g["bptt"].min()) for g in groups]
    left = int(runs["_worse"].sum())
    text = (f" The largest gradient norm before clipping grows as bptt^{k:.2f} at equal tokens per step, lr and clip "
            f"({n} finished runs in {len(groups)} group(s)"
            + (f", leaving out {left} that ended worse than a uniform guess" if left else "")
            + (f"; 95% interval {lo:.2f} to {hi:.2f} from the runs' scatter about one common exponent, {dof} degree(s) "
               "of freedom" if has else "; no run beyond one per shape and group, so no interval")
            + f"): the longest window's norm is {_num(float(np.median(ratios)))}× the shortest's (median over groups, "
            f"for {_num(float(np.median(spans)))}× the window).")
    return text, {"grad_norm_exponent": k, "grad_norm_exponent_lo": lo if has else None,
                  "grad_norm_exponent_hi": hi if has else None, "grad_norm_dof": dof, "grad_norm_runs": n,
                  "grad_norm_groups": len(groups), "grad_norm_ratio_median": float(np.median(ratios))}


def _counts(e: _Edges, n_groups: int, what: str) -> str:
    return (f"in {n_groups} group(s) of shapes at equal tokens per step, lr and clip, the longest window {what} more "
            f"often than the shortest in {e.up}, less often in {e.down}, and every shape {what} in {e.all_bad} (an exact "
            f"test over the groups, seeds included: if bptt did not matter, as many long-window failures or more would "
            f"come with p = {e.p_up:.2g}, as few or fewer with p = {e.p_down:.2g})")


def check_stability(trials: pd.DataFrame) -> RuleCheck:
    """Whether, at equal tokens per step, lr and clip, longer windows diverge where shorter ones finish
    (an exact test over the groups, seeds included), and how the gradient norm grows with bptt."""
    title = "Stability: if training diverges, reduce bptt"
    runs = _runs(trials)
    n_div = int(runs["_div"].sum())
    groups = equal_step_groups(runs, TRAINING)
    grad_text, numbers = _grad_norm(runs)
    numbers.update(runs=len(runs), diverged=n_div, groups=len(groups))
    notes = _stability_notes(trials, runs) if n_div else ""
    rows = []
    for g in groups:
        per = g.groupby(["bptt", "batch_size"], as_index=False).agg(
            runs=("_div", "size"), diverged=("_div", "sum"), worse_than_uniform=("_worse", "sum"),
            max_grad_norm_ok=("max_grad_norm_ok", "median"))
        first = g.iloc[0]
        rows.append(per.assign(tokens_per_step=first["tokens_per_step"], lr=first.get("lr"), clip=first.get("clip")))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if len(table):
        order = [c for c in ("tokens_per_step", "clip", "lr", "bptt") if table[c].notna().any()]
        table = table.sort_values(order, kind="mergesort", ignore_index=True)
    if n_div == 0:
        text = (f"Not tested: none of the {len(runs)} runs diverged, so the study never reached the edge that bptt "
                "would move (a study that crosses it: studies/stability.toml).")
        return RuleCheck("stability", title, STABILITY_CLAIM, "not tested", text + grad_text + notes, numbers, table)
    if not groups:
        text = (f"Not tested: {n_div} of {len(runs)} runs diverged, but " + confounded(runs, TRAINING)
                + ", so no comparison differs only in the shape.")
        return RuleCheck("stability", title, STABILITY_CLAIM, "not tested", text + grad_text + notes, numbers, table)
    if not any(int(r["diverged"].sum()) for r in rows):
        text = (f"Not tested: {n_div} of {len(runs)} runs diverged, none of them in a group of shapes at equal tokens "
                "per step, lr and clip, so no comparison differs only in the shape.")
        return RuleCheck("stability", title, STABILITY_CLAIM, "not tested", text + grad_text + notes, numbers, table)
    e = _edges(groups, "_div")
    numbers.update(edge_groups=e.edge, longer_diverged_more=e.up, shorter_diverged_more=e.down,
                   all_diverged=e.all_bad, p_longer_diverges_more=e.p_up, p_shorter_diverges_more=e.p_down)
    counts = _counts(e, len(groups), "diverged")
    if e.p_up < ALPHA and e.up > e.down:
        verdict: Verdict = "holds"
        text = f"Holds: at equal tokens per step and lr, longer windows diverged where shorter ones finished: {counts}."
    elif e.p_down < ALPHA and e.down > e.up:
        verdict = "does not hold"
        text = f"Does not hold: at equal tokens per step and lr, longer windows were the more stable: {counts}."
    elif not e.edge:
        verdict = "does not hold"
        text = (f"Does not hold at this study's lr resolution: at equal tokens per step and lr, reducing bptt never "
                f"turned a diverging run into a finished one: {counts}.")
    else:
        verdict = "inconclusive"
        text = f"Inconclusive: the differences are within what chance gives: {counts}."
    worse = int(runs["_worse"].sum())
    if worse:
        strict = _edges(groups, "_bad")
        numbers.update(p_longer_unstable_more_strict=strict.p_up, p_shorter_unstable_more_strict=strict.p_down)
        text += (f" Counting as unstable also the {worse} run(s) that finished with a validation perplexity above a "
                 f"uniform guess (the trainer's divergence guard let them through): {_counts(strict, len(groups), 'failed')}.")
    diverging = [i for i, r in enumerate(rows) if 0 < r["diverged"].sum() < r["runs"].sum()] or \
        [i for i, r in enumerate(rows) if r["diverged"].sum()]
    g = groups[max(diverging, key=lambda i: len(rows[i]))]
    clip = f", {_clip_text(g['clip'].iloc[0])}" if "clip" in g else ""
    text += (f" Where the edge lies at {int(g['tokens_per_step'].iloc[0]):,} tokens per step{clip}, diverged runs of "
             f"all runs: {_boundaries(runs, g)}.")
    return RuleCheck("stability", title, STABILITY_CLAIM, verdict, text + grad_text + notes, numbers, table)


def _stability_notes(trials: pd.DataFrame, runs: pd.DataFrame) -> str:
    """What the verdict must be read with: seeds, clipping arms, a time budget."""
    parts = []
    reps = runs.groupby("config_key")["_div"].agg(["size", "sum"])
    multi = reps[reps["size"] >= 2]
    if len(multi):
        split = int(((multi["sum"] > 0) & (multi["sum"] < multi["size"])).sum())
        parts.append(f"{len(multi)} configuration(s) ran with 2 or more seeds; "
                     + (f"{split} of them diverged with some seeds and not others, so near the edge divergence is "
                        "partly chance." if split else "each of them either always or never diverged."))
    elif len(runs):
        parts.append("Every configuration ran with one seed, so each comparison rests on one run per shape.")
    if "clip" in runs and runs["clip"].nunique() > 1:
        per = runs.groupby("clip")[["_div", "_worse"]].agg(["size", "sum"])
        parts.append("By clipping arm: " + ", ".join(
            f"{_clip_text(c)}: {int(r[('_div', 'sum')])} of {int(r[('_div', 'size')])} runs diverged"
            + (f" and {int(r[('_worse', 'sum')])} more ended worse than a uniform guess" if r[("_worse", "sum")] else "")
            for c, r in per.iterrows()) + ".")
    if "budget" in trials and (trials["budget"].astype(str) == "seconds").any():
        parts.append("The budget is in seconds, so shapes at equal tokens per step took different numbers of steps: "
                     "a confound of every comparison above.")
    return (" " + " ".join(parts)) if parts else ""


# --------------------------------------------------------------------------- speed

def _pooled_cv(values: pd.DataFrame, key: str, col: str) -> tuple[float, int]:
    """Coefficient of variation of ``col`` over repeats of one ``key``, pooled over keys with >= 2 repeats
    -> (cv, degrees of freedom); NaN and 0 without repeats."""
    num_ = dof = 0.0
    for _, v in values.groupby(key)[col]:
        v = v.dropna()
        if len(v) >= 2 and v.mean() > 0:
            num_ += (len(v) - 1) * (v.std(ddof=1) / v.mean()) ** 2
            dof += len(v) - 1
    return (math.sqrt(num_ / dof), int(dof)) if dof else (math.nan, 0)


def _speed_groups(df: pd.DataFrame, fields: Sequence[str], cv: float, dof: int, source: str) -> pd.DataFrame:
    """Per group at equal tokens per step: the longest window's tokens/s over the shortest's, with its
    interval from the timing noise (``cv``; 95% for all the groups together), and the call: ``same`` when the
    interval lies within :data:`SPEED_SAME` of equal, ``slower`` or ``faster`` when it excludes equal and the
    ratio itself is more than :data:`SPEED_SAME` off, else ``unclear``."""
    rows = []
    groups = equal_step_groups(df, fields)
    for g in groups:
        per = g.groupby(["bptt", "batch_size"], as_index=False).agg(tokens_per_s=("tokens_per_s", "mean"),
                                                                    n=("tokens_per_s", "size"))
        short, long_ = per.iloc[0], per.iloc[-1]
        ratio = float(long_["tokens_per_s"] / short["tokens_per_s"])
        se = cv * math.sqrt(1 / long_["n"] + 1 / short["n"]) if math.isfinite(cv) else math.nan
        lo, hi = interval(math.log(ratio), se, dof, comparisons=len(groups))
        margin = -math.log(1 - SPEED_SAME)
        call = ("unknown" if not math.isfinite(se) or dof < 1 else "same" if max(-lo, hi) <= margin
                else "slower" if hi < 0 and math.log(ratio) < -margin else "faster" if lo > 0 and math.log(ratio) > margin
                else "unclear")
        rows.append({"source": source, "tokens_per_step": int(g["tokens_per_step"].iloc[0]),
                     "short": _shape(short["bptt"], short["batch_size"]), "long": _shape(long_["bptt"], long_["batch_size"]),
                     "short_tokens_per_s": float(short["tokens_per_s"]), "long_tokens_per_s": float(long_["tokens_per_s"]),
                     "ratio": ratio, "ratio_lo": math.exp(lo) if hi > lo else None,
                     "ratio_hi": math.exp(hi) if hi > lo else None, "call": call,
                     # the shapes were not run at the same set of lrs (a rule gave each its own)
                     "lr_differs": bool("lr" in g and g.groupby("bptt")["lr"].agg(frozenset).nunique() > 1)})
    return pd.DataFrame(rows)


def _ratio_text(r: pd.Series, with_interval: bool = True) -> str:
    iv = f" (interval {_num(r['ratio_lo'])}–{_num(r['ratio_hi'])})" if with_interval and \
        r["ratio_lo"] is not None and pd.notna(r["ratio_lo"]) else ""
    return f"{r['long']} ran at {_num(r['ratio'])}× the tokens/s of {r['short']}{iv}"


def check_speed(trials: pd.DataFrame, profile: pd.DataFrame | None = None) -> RuleCheck:
    """Tokens/s against bptt at equal tokens per step, from the trials (timing noise from seed repeats)
    and from the profile (one timing per cell)."""
    title = "Speed: if training is too slow, reduce bptt"
    ok = trials[(trials["status"] == "ok") & (trials["tokens_per_s"] > 0)]
    # Repeats of one shape time the same work whatever their seed, lr or clip.
    cv, dof = _pooled_cv(ok.assign(_shape=_keyed(ok, ("bptt", "batch_size", *SPEED_WORK))), "_shape", "tokens_per_s")
    t = _speed_groups(ok, SPEED_WORK, cv, dof, "trials")
    p = pd.DataFrame()
    if profile is not None and len(profile):
        cells = profile[(profile["phase"] == "grid") & profile["status"].isin(_FIT) & (profile["tokens_per_s"] > 0)]
        cells = cells.assign(tokens_per_step=cells["bptt"] * cells["batch_size"])
        p = _speed_groups(cells, (), cv, dof, "profile")   # one model and one machine by construction
    table = pd.concat([t, p], ignore_index=True)
    where = _device(trials)
    numbers: dict = {"device": where, "timing_cv": cv if math.isfinite(cv) else None, "timing_dof": dof,
                     "groups_trials": len(t), "groups_profile": len(p)}
    expect = ("On a GPU a long window with a small batch should be slower per token" if _on_gpu(trials)
              else "On a CPU the time loop is not what limits a step, so it may not be")
    if t.empty and p.empty:
        why = confounded(ok, SPEED_WORK) if len(ok) else "no trial finished"
        text = f"Not tested: {why}, and the study has no profile with such shapes, so tokens/s cannot be compared at equal tokens per step."
        return RuleCheck("speed", title, SPEED_CLAIM, "not tested", text, numbers, table)
    main, source = (t, "the trials") if len(t) else (p, "the profile")
    calls = main["call"].value_counts()
    slower, faster, same = (int(calls.get(c, 0)) for c in ("slower", "faster", "same"))
    numbers.update(source=source, slower=slower, faster=faster, same=same,
                   ratios=[float(r) for r in main["ratio"]])
    listed = "; ".join(f"at {int(r['tokens_per_step']):,} tokens per step {_ratio_text(r)}" for _, r in main.iterrows())
    noise = (f"timing noise {cv:.1%} per run from {dof} degree(s) of freedom of repeated shapes; the intervals hold "
             f"together with 95% over the {len(main)} group(s)"
             + (", borrowed from the trials" if source == "the profile" else "")) if math.isfinite(cv) else ""
    if not math.isfinite(cv):
        verdict: Verdict = "inconclusive"
        text = (f"Inconclusive: on {where}, {listed} ({source}); no shape was timed twice, so the timing noise is "
                "unknown and no difference can be called real.")
    elif slower and not faster:
        verdict = "holds"
        text = (f"Holds on {where}: at equal tokens per step the longer window is more than {SPEED_SAME:.0%} slower per "
                f"token, beyond the noise, in {slower} of {len(main)} group(s): {listed} ({source}; {noise}).")
    elif faster and not slower:
        verdict = "does not hold"
        text = (f"Does not hold on {where}: at equal tokens per step the longer window is more than {SPEED_SAME:.0%} "
                f"faster per token, beyond the noise, in {faster} of {len(main)} group(s): {listed} ({source}; {noise}).")
    elif same == len(main):
        verdict = "does not hold"
        text = (f"Does not hold on {where}: at equal tokens per step reducing bptt changes tokens/s by less than "
                f"{SPEED_SAME:.0%}: {listed} ({source}; {noise}).")
    else:
        verdict = "inconclusive"
        how = "go both ways" if slower and faster else "are within the timing noise"
        text = f"Inconclusive on {where}: the differences {how}: {listed} ({source}; {noise})."
    text += f" ({expect}.)"
    if len(t) and len(p):
        agree = sum(1 for _, r in t.iterrows()
                    for _, q in p[p["tokens_per_step"] == r["tokens_per_step"]].iterrows()
                    if (q["ratio"] < 1) == (r["ratio"] < 1))
        text += (f" The profile's timings point the same way in {agree} of {len(t)} group(s) "
                 f"({'; '.join(_ratio_text(q, False) for _, q in p.iterrows())}; one timing per cell).")
        numbers["profile_agrees"] = agree
    if len(t) and t["lr_differs"].any():
        text += " Some shapes compared differ in lr, which does not change the work of a step."
    shared = ok[ok["host_workers"].fillna(1) > 1] if "host_workers" in ok else ok.iloc[:0]
    if len(shared):
        text += f" {len(shared)} of {len(ok)} run(s) were timed while other workers shared this machine."
    return RuleCheck("speed", title, SPEED_CLAIM, verdict, text, numbers, table)
