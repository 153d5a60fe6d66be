"""The trials of a study as stored: typed records, and the one rule for which trials count as final.

A trial's :data:`Standing` decides everything that counts trials: the sweep's progress, which failed
attempts are run again, the race's standings, the equal-time observation limit, the report and
``bptt-harness trial --from``. The rule:

- a stored record that is not an interrupted attempt is **final**, whatever Optuna's state says (the
  objective stores the record before Optuna marks the trial finished), unless the trial FAILed while its
  record says it finished (its completion was lost: it runs again, see ``record.FAIL_STATUSES``);
- a failed attempt without a final record is **retry** (a resume runs it again), until it was tried
  :data:`MAX_RETRIES` times more: then it is final, as ``failed``;
- a failed attempt that was run again is **superseded** by its retry;
- a trial queued twice by two workers, or asked for an empty grid, is **spurious** (never a measurement);
- the rest is **running** or **waiting**.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from optuna import Study
from optuna.trial import FrozenTrial, TrialState

from bptt_harness.record import FAIL_STATUSES, TrialRecord
from bptt_harness.search_keys import config_key

__all__ = ["INTERRUPTED", "MAX_RETRIES", "RETRIES", "RETRY_OF", "SPURIOUS", "Progress", "Standing", "StoredTrial",
           "final_trials", "progress", "read_trials", "retried_numbers", "standing", "stored_record", "trial_params"]

MAX_RETRIES = 2
# User attributes of a trial that the rule reads.
RETRY_OF = "retry_of"        # on a retry: the number of the failed attempt it runs again
RETRIES = "retries"          # on a retry: how many times the configuration was run again so far
INTERRUPTED = "interrupted"  # on an attempt stopped by Ctrl-C or SIGTERM: its record is not final
SPURIOUS = "spurious"        # on a trial that must not run (why, in words)

Standing = Literal["final", "retry", "superseded", "spurious", "running", "waiting"]


def stored_record(trial: FrozenTrial) -> dict | None:
    """The record dict stored with ``trial`` (a JSON string is parsed), or None."""
    rec = trial.user_attrs.get("record")
    if isinstance(rec, str):
        try:
            rec = json.loads(rec)
        except json.JSONDecodeError:
            return None
    return rec if isinstance(rec, dict) else None


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """Sampled parameters, or the queued ones of a trial that never got to sample them."""
    return trial.params or dict(trial.system_attrs.get("fixed_params", {}))


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the attempts that were queued again."""
    return {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}


def standing(trial: FrozenTrial, retried: set[int]) -> Standing:
    """Where ``trial`` stands (see the module's rule); ``retried``: :func:`retried_numbers` of its study."""
    if trial.user_attrs.get(SPURIOUS):
        return "spurious"
    rec = stored_record(trial)
    # A FAIL trial whose record says it finished otherwise lost its completion (its worker died, or a torn
    # journal was cut back, after the record was stored): it did not finish, and runs again.
    if rec is not None and not trial.user_attrs.get(INTERRUPTED, False) and (
            trial.state != TrialState.FAIL or rec.get("status") in FAIL_STATUSES):
        return "final"
    if trial.state == TrialState.RUNNING:
        return "running"
    if trial.state == TrialState.WAITING:
        return "waiting"
    if trial.state != TrialState.FAIL:
        return "final"  # pruned or complete without a record (an old or foreign trial): read as failed
    if trial.number in retried:
        return "superseded"
    return "final" if int(trial.user_attrs.get(RETRIES, 0)) >= MAX_RETRIES else "retry"


@dataclass(frozen=True)
class StoredTrial:
    """One Optuna trial as stored: its standing and its record.

    Attributes:
        number, state: Optuna's trial number and state name (``COMPLETE``, ``FAIL``, ...).
        standing: see :func:`standing`.
        stored: the record dict as stored, with ``trial_number`` and ``state`` filled in; for a trial that
            stored none (its worker died), status ``failed`` and its configuration from its parameters.
            None for a trial running or waiting without one.
    """

    number: int
    state: str
    standing: Standing
    stored: dict | None

    @cached_property
    def record(self) -> TrialRecord:
        """The typed record (the defaults for a trial that holds none)."""
        return TrialRecord.from_dict(self.stored)


def read_trials(trials: Iterable[FrozenTrial], study_name: str) -> list[StoredTrial]:
    """Every trial with its standing and record (see :class:`StoredTrial`)."""
    trials = list(trials)
    retried = retried_numbers(trials)
    return [StoredTrial(t.number, t.state.name, s, _record_dict(t, study_name, s)) for t in trials
            for s in (standing(t, retried),)]


def final_trials(trials: Iterable[FrozenTrial], study_name: str = "") -> list[StoredTrial]:
    """The trials that count as final (every measurement of the study, failures included)."""
    return [t for t in read_trials(trials, study_name) if t.standing == "final"]


def _record_dict(trial: FrozenTrial, study_name: str, where: Standing) -> dict | None:
    rec = stored_record(trial)
    if rec is None:
        if where in ("running", "waiting"):
            return None
        state = trial.state.name
        error = "worker died (no record)" if state == "FAIL" else f"trial {state.lower()} without a record"
        params = dict(trial_params(trial))
        rec = {"status": "pruned" if state == "PRUNED" else "failed", "error": error,
               "config_key": config_key(params) if params else f"trial={trial.number}", "config": params,
               "result": {}, "study": {"name": study_name},
               "started_at": trial.datetime_start.isoformat() if trial.datetime_start else None,
               "finished_at": trial.datetime_complete.isoformat() if trial.datetime_complete else None}
    elif trial.state == TrialState.FAIL and rec.get("status") not in FAIL_STATUSES:
        rec = {**rec, "status": "failed", "error": f"its completion was never stored (the record said "
                                                   f"{rec.get('status')}); it runs again on resume"}
    else:
        rec = dict(rec)  # with deepcopy=False the record is the storage's own object: new dicts only
    rec["trial_number"] = trial.number
    rec["state"] = trial.state.name
    study = rec.get("study")
    if not isinstance(study, dict):
        rec["study"] = {"name": study_name}
    elif not study.get("name") and study_name:
        rec["study"] = {**study, "name": study_name}
    return rec


@dataclass
class Progress:
    """How far a study is: its final trials, those running and waiting, counts per status, the best."""

    done: int
    running: int
    waiting: int
    counts: dict[str, int]
    best: StoredTrial | None   # the final ok trial of lowest val_ppl


def progress(study: Study) -> Progress:
    """How far the study is: its final trials (see :mod:`bptt_harness.stored`), counts per status, the best."""
    counts: dict[str, int] = {}
    done = running = waiting = 0
    best, best_ppl = None, math.inf
    for t in read_trials(study.get_trials(deepcopy=False), study.study_name):
        if t.standing == "running":
            running += 1
        elif t.standing == "waiting":
            waiting += 1
        elif t.standing == "final":
            done += 1
            rec = t.record
            counts[rec.status] = counts.get(rec.status, 0) + 1
            ppl = rec.result.val_ppl
            if rec.status == "ok" and ppl is not None and ppl < best_ppl:
                best, best_ppl = t, ppl
    return Progress(done, running, waiting, counts, best)
