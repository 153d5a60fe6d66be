"""Per configuration: the standard error and t interval of its mean perplexity over seeds.

The rule is :mod:`bptt_harness.seeds` (the racing in the study uses the same one). ``_ppl_tol`` is the
ranking's tie tolerance for perplexity, the half-width of the configuration's interval:
:mod:`bptt_harness.report.rank` combines two of them as ``sqrt(a^2 + b^2)`` in the Pareto sort (an
approximation, used only to order fronts); every "separated" or "tie" claim of the verdict comes from
:func:`bptt_harness.seeds.leaders` on :func:`table_means`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bptt_harness.seeds import SeedMean, pooled_cv, seed_means
from bptt_harness.stats import COVERAGE

__all__ = ["PPL_TOL", "add_intervals", "interval_text", "ok_ppl", "table_means"]

PPL_TOL = "_ppl_tol"


def ok_ppl(trials: pd.DataFrame) -> dict[str, list[float]]:
    """Validation perplexities of the ok runs, per configuration."""
    ok = trials[(trials["status"] == "ok") & trials["val_ppl"].notna()]
    return {str(k): [float(v) for v in g] for k, g in ok.groupby("config_key", sort=False)["val_ppl"]}


def add_intervals(configs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """``configs`` with ``val_ppl_se``, ``val_ppl_dof``, ``val_ppl_lo``/``_hi`` (the 95% t interval),
    ``noise_from``, ``val_ppl_interval`` (its label), ``single_seed``, ``seed_noise_cv`` and ``_ppl_tol``."""
    groups = ok_ppl(trials)
    means, share = seed_means(groups), pooled_cv(groups.values())
    out = configs.copy()
    keys = out["config_key"].astype(str)
    got = [means.get(k) for k in keys]
    intervals = [m.interval() if m is not None else None for m in got]
    out["val_ppl_se"] = np.array([np.nan if m is None or m.se is None else m.se for m in got], dtype=float)
    out["val_ppl_dof"] = np.array([np.nan if m is None or m.dof is None else m.dof for m in got], dtype=float)
    out["val_ppl_lo"] = [np.nan if i is None or not i.known else i.lo for i in intervals]
    out["val_ppl_hi"] = [np.nan if i is None or not i.known else i.hi for i in intervals]
    out["noise_from"] = [None if m is None or m.se is None else m.source for m in got]
    out["val_ppl_interval"] = [None if i is None else i.label() for i in intervals]
    out[PPL_TOL] = out["val_ppl_hi"] - out["val_ppl"]
    out["single_seed"] = out["n"] == 1
    out["seed_noise_cv"] = np.nan if share is None else share
    return out


def table_means(table: pd.DataFrame) -> dict[str, SeedMean]:
    """The :class:`SeedMean` of every row of a frame built by :func:`add_intervals` (its ranking table); a
    frame without those columns gives means whose noise is unknown."""
    out: dict[str, SeedMean] = {}
    missing = pd.Series(np.nan, index=table.index)
    cols = [table[c] if c in table else missing for c in ("n", "val_ppl_se", "val_ppl_dof", "noise_from")]
    for key, m, n, se, dof, src in zip(table["config_key"].astype(str), table["val_ppl"], *cols):
        if pd.isna(m):
            continue
        known = pd.notna(se) and pd.notna(dof)
        out[key] = SeedMean(float(m), int(n) if pd.notna(n) else 1, float(se) if known else None, float(dof) if known else None,
                            str(src) if known and isinstance(src, str) else "own")
    return out


def interval_text(row: pd.Series) -> str:
    """``n=3, 95% t interval 101.2–104.6 (df=2)``, or ``single-seed`` with the borrowed interval, if any."""
    n = int(row.get("n", 0) or 0)
    lo, hi = row.get("val_ppl_lo"), row.get("val_ppl_hi")
    dof = row.get("val_ppl_dof")
    if not (pd.notna(lo) and pd.notna(hi)):
        return "single-seed" if n == 1 else f"n={n}"
    interval = f"{COVERAGE:.0%} t interval {lo:.4g}–{hi:.4g}, df={dof:.0f}"
    if n == 1:
        return f"single-seed, {interval}, noise borrowed from {row.get('noise_from')}"
    return f"n={n}, {interval}"
