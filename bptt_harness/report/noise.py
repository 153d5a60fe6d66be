"""Per configuration: the standard error and interval of its mean perplexity over seeds.

The rule is :mod:`bptt_harness.seeds` (the racing in the study uses the same one). ``_ppl_tol`` is the
ranking's tie tolerance for perplexity, ``Z`` standard errors: :mod:`bptt_harness.report.rank` combines
two of them as ``sqrt(a^2 + b^2)``, which is ``Z`` standard errors of the difference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bptt_harness.seeds import Z, pooled_cv, standard_error

PPL_TOL = "_ppl_tol"


def ok_ppl(trials: pd.DataFrame) -> dict[str, list[float]]:
    """Validation perplexities of the ok runs, per configuration."""
    ok = trials[(trials["status"] == "ok") & trials["val_ppl"].notna()]
    return {str(k): [float(v) for v in g] for k, g in ok.groupby("config_key", sort=False)["val_ppl"]}


def add_intervals(configs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """``configs`` with ``val_ppl_se``, ``val_ppl_lo``/``_hi`` (mean -/+ Z SE), ``single_seed``,
    ``seed_noise_cv`` and the hidden tie tolerance ``_ppl_tol``."""
    groups = ok_ppl(trials)
    pooled = pooled_cv(groups.values())
    out = configs.copy()
    se = [standard_error(groups[k], pooled) if k in groups else None for k in out["config_key"].astype(str)]
    out["val_ppl_se"] = np.array([np.nan if v is None else v for v in se], dtype=float)
    out["val_ppl_lo"] = out["val_ppl"] - Z * out["val_ppl_se"]
    out["val_ppl_hi"] = out["val_ppl"] + Z * out["val_ppl_se"]
    out[PPL_TOL] = Z * out["val_ppl_se"]
    out["single_seed"] = out["n"] == 1
    out["seed_noise_cv"] = np.nan if pooled is None else pooled
    return out


def interval_text(row: pd.Series) -> str:
    """``n=3, interval 101.2–104.6``, or ``single-seed`` (with the interval the pooled noise gives, if known)."""
    n = int(row.get("n", 0) or 0)
    lo, hi = row.get("val_ppl_lo"), row.get("val_ppl_hi")
    interval = f"interval {lo:.4g}–{hi:.4g}" if pd.notna(lo) and pd.notna(hi) else ""
    if n == 1:
        return "single-seed" + (f", {interval} from the study's seed noise" if interval else "")
    return f"n={n}" + (f", {interval}" if interval else "")
