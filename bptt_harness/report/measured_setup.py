"""What a set of trials measures, as a short hash, so ``bptt-harness compare`` says what differs between result sets.

The setup of a trial is its study's ``[corpus]``, ``[model]`` and ``[train]`` settings as the study
stored them (defaults filled in; precision is ``amp`` and ``tf32`` there), the revision of its model
family's code (``model_revision``; 1 in records older than the column) and the torch release it ran on.
The configuration itself (bptt, batch size, searched keys) is not part of it: that is ``config_key``.
Two studies with the same setup measure the same thing on whatever machine they ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pandas as pd

from bptt_harness.config import parse_study
from bptt_harness.errors import HarnessError

# [train] keys that do not change what one trial measures: how often it is run, a safety limit, and the
# machine's own memory cap (the card's size plays the same part on a GPU).
NOT_MEASURED = ("seed", "repeats", "timeout_s", "memory_cap_mib")
# A study stored without its study file (not written by `bptt-harness sweep`): what its records say.
RECORD_FIELDS = ("corpus", "vocab_size", "budget", "budget_tokens", "budget_epochs", "budget_seconds", "model",
                 "optimizer")


def study_setup(study_config: dict | None) -> dict | None:
    """The measured settings of a stored study file (``study.user_attrs["study_config"]``), or None."""
    if not isinstance(study_config, dict):
        return None
    try:
        config = parse_study(study_config)
    except HarnessError:  # written by another version: its own keys, as stored
        return {k: study_config.get(k) for k in ("corpus", "model", "train")}
    train = {k: v for k, v in dataclasses.asdict(config.train).items() if k not in NOT_MEASURED}
    return {"corpus": dataclasses.asdict(config.corpus), "model": dataclasses.asdict(config.model), "train": train}


def torch_release(version: Any) -> str:
    """``2.13.0+cu128`` -> ``2.13.0``: a CPU and a CUDA build of one release run the same code."""
    return str(version).split("+")[0] if isinstance(version, str) and version else "unknown"


def revision(value: Any) -> int:
    """A record's ``model_revision``; a record older than the column is revision 1."""
    v = _value(value)
    return v if isinstance(v, int) and not isinstance(v, bool) else 1


def attach_setup(trials: pd.DataFrame, study_config: dict | None) -> tuple[pd.DataFrame, dict[str, dict]]:
    """``trials`` with a ``setup`` column (10 hex digits), and each setup's settings by its hash."""
    base = study_setup(study_config)
    keys, setups = [], {}
    for _, row in trials.iterrows():
        fields = base if base is not None else {"record": {k: _value(row.get(k)) for k in RECORD_FIELDS}}
        setup = {**fields, "model_revision": revision(row.get("model_revision")),
                 "torch": torch_release(row.get("torch_version"))}
        key = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:10]
        setups[key] = setup
        keys.append(key)
    return trials.assign(setup=keys), setups


def _value(v: Any) -> Any:
    if isinstance(v, float):  # the frame holds every number as a float
        return None if v != v else int(v) if v.is_integer() else v
    return v


def differences(a: dict, b: dict, limit: int = 4) -> str:
    """``train.tokens 250000 vs 6000, torch 2.12.0 vs 2.13.0``: what differs between two setups."""
    fa, fb = _flat(a), _flat(b)
    diff = [f"{k} {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(diff[:limit]) + more


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def like_with_like(trials: pd.DataFrame, setups: dict[str, dict], only_matching: bool) -> tuple[pd.DataFrame, list[str]]:
    """With ``only_matching``: the trials that share the first source's setup, and a warning for each setup
    left out (naming what differs). Without it every trial is kept: the comparison names what differs
    between the result sets (:func:`bptt_harness.report.compare.what_differs`) instead of refusing."""
    ref = trials["setup"].iloc[0]
    ref_source = trials["source"].iloc[0]
    other = trials[trials["setup"] != ref]
    if other.empty or not only_matching:
        return trials, []
    warnings = []
    for key, group in other.groupby("setup", sort=False):
        what = differences(setups[ref], setups[key])
        where = ", ".join(dict.fromkeys(group["source"].astype(str)))
        warnings.append(f"left out {len(group)} trial(s) of {where}: they measure something else than "
                        f"{ref_source} ({what})")
    return trials[trials["setup"] == ref], warnings
