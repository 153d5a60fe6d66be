"""The order of trials: samplers, the grid queue, creating a study, progress, and retrying the trials of dead workers."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import os
import socket
import uuid
import warnings
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from bptt_harness.config import StudyConfig
from bptt_harness.design import union_points
from bptt_harness.errors import HarnessError
from bptt_harness.fileio import pid_alive as _pid_alive
from bptt_harness.record import COST_COLUMNS
from bptt_harness.search_keys import CANONICAL
from bptt_harness.stored import MAX_RETRIES, RETRIES, RETRY_OF, retried_numbers, standing, trial_params
from bptt_harness.urls import redact

log = logging.getLogger(__name__)


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    n = config.n_trials()
    if config.sampler in ("grid", "random"):
        # A grid is run as a queue of enqueued trials (see enqueue_grid), so the sampler is never asked.
        return _ConstrainedRandomSampler(seed=config.seed)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=config.seed, constraints_func=_constraints,
                                             population_size=max(4, min(50, n // 3)))
    return optuna.samplers.TPESampler(seed=config.seed, constraints_func=_constraints,
                                      n_startup_trials=max(3, min(10, n // 3)), multivariate=True)


class _ConstrainedRandomSampler(optuna.samplers.RandomSampler):
    """Optuna's RandomSampler stores no constraints; this one does, as TPE and NSGA-II do, so that
    optuna-dashboard and ``study.best_trial(s)`` show a grid's out-of-memory and diverged trials as infeasible."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        from optuna.samplers._base import _process_constraints_after_trial

        _process_constraints_after_trial(_constraints, study, trial, state)


def grid_points(config: StudyConfig) -> list[tuple[dict[str, Any], int]]:
    """Every (params, repeat) of a grid study, the canonical configuration first: the product of the search
    lists, or every configuration of the study's slices once (a point two slices share runs once)."""
    names = list(config.search)
    if config.slices:
        points = union_points(config.slices)
    else:
        points = [dict(zip(names, values)) for values in itertools.product(*(config.search[k].grid() for k in names))]
    points.sort(key=lambda p: not all(p.get(k) == v for k, v in CANONICAL.items()))
    return [(p, r) for p in points for r in range(config.repeats)]


def enqueue_grid(study: optuna.Study, config: StudyConfig) -> int:
    """Queue every grid point not yet in the study; returns how many were added.

    Optuna's GridSampler mixes badly with enqueued retries (it keys points by trial number), so a
    grid is a queue of fixed trials instead: workers pop them atomically, retries re-queue one, and
    a grid extended in the study file is picked up by the next sweep.
    """
    have = {(_params_key(trial_params(t)), int(t.user_attrs.get("repeat", 0)))
            for t in study.get_trials(deepcopy=False)}
    added = 0
    for params, repeat in grid_points(config):
        if (_params_key(params), repeat) not in have:
            study.enqueue_trial(params, user_attrs={"repeat": repeat})
            added += 1
    return added


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def make_pruner(config: StudyConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.train.checkpoints)
    return optuna.pruners.NopPruner()


def _constraints(trial: FrozenTrial) -> tuple[float, ...]:
    """> 0 means infeasible: out of memory, diverged, or over the study's memory budget."""
    return tuple(trial.user_attrs.get("constraint", (0.0,)))


# Keys a resumed study may change: how it is run, not what a trial measures. A grid may also be
# extended; a sampled search space may not (Optuna cannot change a categorical's choices).
MAY_CHANGE = ("trials", "workers", "device", "description", "storage", "race", "log")


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def metric_names(config: StudyConfig) -> list[str]:
    """The objectives named like their ``trials.csv`` columns, in those units (what optuna-dashboard shows)."""
    return ["val_ppl", COST_COLUMNS[config.cost]][:len(config.objectives)]


def _name_metrics(study: optuna.Study, config: StudyConfig) -> None:
    """Name a new study's objectives. A study that already holds values from before they were named keeps
    its unnamed objectives and their old units (see :func:`cost_value`): one study never mixes units."""
    if study.metric_names is not None or any(t.values for t in study.get_trials(deepcopy=False)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(config))


def create_study(config: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    directions: list[Literal["minimize", "maximize"]] = ["minimize"] * len(config.objectives)
    study = optuna.create_study(study_name=config.name, storage=storage, directions=directions,
                                sampler=make_sampler(config), pruner=make_pruner(config), load_if_exists=True)
    raw = json.loads(json.dumps(config.raw, default=str))
    if isinstance(raw.get("storage"), str):
        raw["storage"] = redact(raw["storage"])  # a study file's password is not copied into the storage
    stored = study.user_attrs.get("study_config")
    if stored is not None and stored != raw:
        # A grid's points may be added (in [search] or [slices]); a slice's lr may not change, since its
        # finished trials were trained at the old one.
        may_change = MAY_CHANGE + (("search", "slices") if config.sampler == "grid" else ())
        changed = [k for k in _changed_keys(stored, raw)
                   if k.split(".")[0] not in may_change or (k.startswith("slices.") and k.endswith(".lr"))]
        if changed:
            raise HarnessError(
                f"study {config.name!r} already exists in this storage with a different study file "
                f"(changed: {', '.join(changed[:6])}); its trials would not be comparable. Use a new name, "
                f"or delete {config.results_dir} to start over")
        study.set_user_attr("study_config", raw)  # e.g. an extended search space: workers read this copy
    if stored is None:
        # Stored so `bptt-harness worker` on another machine can join with only the storage URL and name.
        study.set_user_attr("study_config", raw)
        if config.sampler != "grid" and all(
                p.contains(CANONICAL[k]) for k, p in config.search.items() if k in CANONICAL):
            # The canonical configuration first: every report has the reference point.
            study.enqueue_trial(dict(CANONICAL), skip_if_exists=True)
    elif study.directions != [optuna.study.StudyDirection.MINIMIZE] * len(config.objectives):
        raise HarnessError(f"study {config.name!r} already exists in this storage with other objectives; "
                           "use another name or storage")
    _name_metrics(study, config)
    return study



def has_repeats(study: optuna.Study, params: dict[str, Any]) -> bool:
    """Whether repeats 1.. of these parameters are already in the study (e.g. this is a retry)."""
    key = _params_key(params)
    return any(int(t.user_attrs.get("repeat", 0)) > 0 and _params_key(trial_params(t)) == key
               for t in study.get_trials(deepcopy=False))


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed trial's parameters again (Optuna's heartbeat also calls this for stale trials)."""
    retries = int(trial.user_attrs.get(RETRIES, 0))
    if retries >= MAX_RETRIES:
        log.warning("trial %d failed %d times; not retrying it again", trial.number, retries + 1)
        return
    study.enqueue_trial(trial_params(trial), user_attrs={RETRY_OF: trial.number, RETRIES: retries + 1,
                                                         "repeat": trial.user_attrs.get("repeat", 0)})


def reap(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker on this host is gone, then enqueue each dead or interrupted trial
    once more (up to MAX_RETRIES times). Returns how many trials were enqueued again.

    Remote workers' dead trials are failed by the RDB storage's heartbeat instead.
    """
    try:
        # Remote workers: RUNNING trials whose heartbeat stopped (RDB storages; retry_trial re-queues them).
        optuna.storages.fail_stale_trials(study)
    except Exception as e:  # noqa: BLE001 - storages without heartbeats; a failed check must not stop a sweep
        log.debug("stale-trial check skipped: %s", e)
    storage = study._storage  # noqa: SLF001 - Optuna exposes no public call to fail another process's trial
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_is_dead(str(t.user_attrs.get("worker", ""))):
            log.warning("trial %d: its worker (%s) is gone; marking it failed", t.number, t.user_attrs["worker"])
            try:
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001
            except RuntimeError:  # another process got there first
                pass
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    enqueued = 0
    for t in trials:
        if standing(t, retried) == "retry":
            retry_trial(study, t)
            enqueued += 1
    return enqueued




def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@functools.cache
def _process_token() -> str:
    return uuid.uuid4().hex[:8]


def worker_id() -> str:
    """``host:pid:token``; the token tells a restarted container that reuses a pid from the dead worker."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_token()}"


def _worker_is_dead(worker: str) -> bool:
    """Only provable for workers on this host: the process is gone, or its pid is now ours."""
    host, pid, token = (worker.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return token != _process_token()  # we run no trial while reaping, so that trial is not ours
    return not _pid_alive(int(pid))
