"""Optuna studies over bptt x batch size: objective, storage, resume, retries, workers.

One Optuna trial = one :func:`harness.trainer.run_trial` under the probe. Its full measurement is
stored as the trial's user attribute ``record`` (see :func:`make_record`), whatever its status:
``oom`` and ``diverged`` trials complete with infinite values and a violated constraint, so TPE and
NSGA-II learn the memory and stability walls; ``pruned`` trials are pruned; ``timeout`` and
``failed`` trials fail. A trial whose worker died (SIGKILL, node lost) or was interrupted is failed
and enqueued again with the same parameters, so a rerun of the same command resumes the study.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import glob
import itertools
import json
import logging
import math
import os
import shlex
import socket
import sqlite3
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.config import ParamSpace, StudyConfig, check_storage_url
from harness.corpus import Corpus, check_fits, load
from harness.errors import HarnessError
from harness.record import (
    INFEASIBLE,
    Hardware,
    LrChoice,
    StudyInfo,
    TrialConfig,
    TrialRecord,
    TrialResult,
    finite_or_none,
    from_dict,
    user_attrs,
)
from harness.spec import ModelConfig, TrialSpec, resolve_budget_tokens
from harness.urls import STORAGE_ENV, engine_url, hides_password, redact, same_storage, scrub

log = logging.getLogger(__name__)

MAX_RETRIES = 2
CANONICAL = {"bptt": 35, "batch_size": 20}
# How long a remote worker may be silent before its RUNNING trial counts as dead (RDB storages).
HEARTBEAT_S, GRACE_S = 10, 60
RACE_POLL_S = 2.0


class TrialFailed(Exception):
    """Raised by the objective so Optuna records FAIL; the sweep goes on (``catch=``)."""


# --------------------------------------------------------------------------- storage

def resolve_storage(config: StudyConfig, cli_storage: str | None, workers: int) -> str:
    """--storage, else the study file's, else the one this study already used, else a default.

    The default is SQLite for one worker and a journal file for several (SQLite's locking does not
    take concurrent writers well). A results folder whose ``study.json`` records another storage is
    refused: following it would silently start the study over somewhere else.
    """
    meta = config.results_dir / "study.json"
    recorded = recorded_storage(config.results_dir)
    if cli_storage is not None:
        check_storage_url(cli_storage)
        chosen = cli_storage
    elif config.storage:
        chosen = config.storage
    elif recorded is not None:
        if hides_password(recorded):
            raise HarnessError(
                f"{meta} records storage {recorded}, whose password is not stored; pass --storage with the "
                f"full URL, or set {STORAGE_ENV} to it (to start over instead, delete {config.results_dir})")
        return _relocated(recorded, config.results_dir)
    elif workers > 1:
        chosen = f"journal:{(config.results_dir / 'journal.log').resolve()}"
    else:
        chosen = config.storage_url
    if recorded is not None and not (same_storage(chosen, recorded)
                                     or same_storage(chosen, _relocated(recorded, config.results_dir))):
        password = " (its password in place of ***)" if hides_password(recorded) else ""
        raise HarnessError(
            f"{meta} records storage {redact(recorded)}, but this run would open {redact(chosen)}; a study "
            f"does not move between storages: pass --storage {redact(recorded)}{password}, or use "
            f"another --results-dir, or delete {config.results_dir} to start over")
    return chosen


def recorded_storage(results_dir: Path) -> str | None:
    """The storage URL (password redacted) that ``study.json`` in ``results_dir`` records, if any."""
    try:
        previous = json.loads((results_dir / "study.json").read_text(encoding="utf-8")).get("storage")
    except (OSError, ValueError, AttributeError):
        return None
    return previous if isinstance(previous, str) and previous.strip() else None


def _relocated(url: str, results_dir: Path) -> str:
    """A results folder that was moved still records its old path: its own copy of the file is the study."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            target = Path(url[len(prefix):])
            local = results_dir / target.name
            if not target.exists() and local.is_file():
                return f"{prefix}{local.resolve()}"
    return url


def open_storage(url: str, *, create: bool = True) -> optuna.storages.BaseStorage:
    """Open a storage, or fail with one line naming it (password hidden). Never overwrites a bad file.

    With ``create=False`` (``harness worker``, which joins a study) a storage file must exist: a
    mistyped path is an error, not a new empty database.
    """
    check_storage_url(url)
    shown = redact(url)
    if url.startswith("journal:"):
        return _open_journal(Path(url[len("journal:"):]).expanduser(), shown, create)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.exists() and not create:
            raise HarnessError(f"storage {shown}: '{path}' does not exist; a worker joins a study that "
                               "'harness sweep' started: check the path")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Two sweeps creating one database at the same moment would both create its tables.
        with _directory_lock(path.parent):
            _check_sqlite_file(path, shown)
            return _open_rdb(url, shown)
    return _open_rdb(url, shown)


def _open_rdb(url: str, shown: str) -> optuna.storages.BaseStorage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            return optuna.storages.RDBStorage(
                engine_url(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=retry_trial,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors vary; the user needs one line
        raise HarnessError(f"storage {shown}: cannot open it: {_first_line(e, url)}") from None


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: open unguarded, as Optuna alone would
            log.debug("cannot lock %s: %s", directory, e)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_sqlite_file(path: Path, shown: str) -> None:
    """A study.db that exists must be a whole SQLite database; one that does not is a new study."""
    if not path.exists():
        return
    if not path.is_file():
        raise HarnessError(f"storage {shown}: '{path}' is not a file; pass another --storage")
    if path.stat().st_size == 0:
        raise HarnessError(f"storage {shown}: '{path}' is empty (0 bytes), so it is not a study a previous run "
                           "could resume (a run failed while creating it, or the file was truncated); it was left "
                           "as it was: restore it from a backup, or delete it to start the study over")
    with open(path, "rb") as f:
        head = f.read(16)
    if head != b"SQLite format 3\x00":
        raise HarnessError(f"storage {shown}: '{path}' is not an SQLite database (corrupted or another "
                           "file); move it away or pass another --storage")
    problem = _sqlite_damage(path)
    if problem:
        raise HarnessError(f"storage {shown}: '{path}' is damaged ({problem}); it was left as it was: restore it "
                           "from a backup, or move it away to start the study over")


def _sqlite_damage(path: Path) -> str | None:
    """SQLite's own structural check, before Optuna reads or writes anything in the file."""
    try:
        con = sqlite3.connect(path, timeout=60)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    problems = [str(r[0]) for r in rows if r and r[0] != "ok"]
    return f"{len(problems)} problem(s), first: {problems[0][:200]}" if problems else None


def _open_journal(path: Path, shown: str, create: bool) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    if not path.exists():
        if not create:
            raise HarnessError(f"storage {shown}: '{path}' does not exist; a worker joins a study that "
                               "'harness sweep' started: check the path")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise HarnessError(f"storage {shown}: '{path}' is not a file; pass another --storage")
    else:
        _check_journal_tail(path, shown)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a journal
        raise HarnessError(f"storage {shown}: cannot read the journal file: {_first_line(e, str(path))}") from None


def _check_journal_tail(path: Path, shown: str) -> None:
    """Refuse a journal whose last record was cut off: Optuna would append after the torn bytes, and
    every later read of the file would fail. Checked under the journal's own lock, so a record that
    another worker is writing right now is not mistaken for a torn one."""
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        complete = _complete_bytes(path)
    finally:
        lock.release()
    if complete is None:
        return
    backup = path.with_name(path.name + ".torn")
    q = shlex.quote
    raise HarnessError(
        f"storage {shown}: the journal's last record is cut off (a full disk, or a writer killed mid-write); "
        f"the file was left as it was. To resume from its complete records (its first {complete:,} bytes), "
        f"recover with: mv {q(str(path))} {q(str(backup))} && head -c {complete} {q(str(backup))} > "
        f"{q(str(path))}; then rerun the same command")


def _complete_bytes(path: Path, chunk: int = 1 << 16) -> int | None:
    """None when ``path`` ends with a whole line; else the length up to its last newline."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return None
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            pos = start
        return 0


def _first_line(e: BaseException, url: str) -> str:
    """The root cause's first line (Optuna wraps driver errors), without any password."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    text = str(e).strip()
    return scrub(text.splitlines()[0] if text else type(e).__name__, url)[:300]


def storage_failure(e: BaseException, url: str) -> HarnessError | None:
    """One line for a storage or results folder that failed in the middle of a run (a full disk, a
    read-only folder, damage found only now), or None for an error that is not about storage."""
    import sqlalchemy.exc

    if isinstance(e, BrokenPipeError) or not isinstance(
            e, (OSError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)):
        return None
    detail = _first_line(e, url)
    lowered = detail.lower()
    if "full" in lowered or "too large" in lowered or "quota" in lowered:
        advice = "free some space, then rerun the same command"
    elif "i/o error" in lowered:
        advice = "check whether the disk is full or failing, then rerun the same command"
    elif "read-only" in lowered or "readonly" in lowered or "permission" in lowered:
        advice = "make it writable, then rerun the same command"
    else:
        advice = "rerun the same command once it is fixed"
    where = getattr(e, "filename", None)
    what = f"cannot write {where}" if isinstance(e, OSError) and where else f"storage {redact(url)}"
    return HarnessError(f"{what}: {detail}; the trials stored before this are kept: {advice}")


# --------------------------------------------------------------------------- samplers

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
    """Every (params, repeat) of a grid study, the canonical configuration first."""
    names = list(config.search)
    points = [dict(zip(names, values)) for values in itertools.product(*(config.search[k].grid() for k in names))]
    points.sort(key=lambda p: not all(p.get(k) == v for k, v in CANONICAL.items()))
    return [(p, r) for p in points for r in range(config.repeats)]


def enqueue_grid(study: optuna.Study, config: StudyConfig) -> int:
    """Queue every grid point not yet in the study; returns how many were added.

    Optuna's GridSampler mixes badly with enqueued retries (it keys points by trial number), so a
    grid is a queue of fixed trials instead: workers pop them atomically, retries re-queue one, and
    a grid extended in the study file is picked up by the next sweep.
    """
    have = {(_params_key(_trial_params(t)), int(t.user_attrs.get("repeat", 0)))
            for t in study.get_trials(deepcopy=False)}
    added = 0
    for params, repeat in grid_points(config):
        if (_params_key(params), repeat) not in have:
            study.enqueue_trial(params, user_attrs={"repeat": repeat})
            added += 1
    return added


def _params_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def _trial_params(t: FrozenTrial) -> dict[str, Any]:
    """Sampled parameters, or the queued ones of a trial that never got to sample them."""
    return t.params or dict(t.system_attrs.get("fixed_params", {}))


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
MAY_CHANGE = ("trials", "workers", "device", "description", "storage", "race")


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def metric_names(config: StudyConfig) -> list[str]:
    """The objectives named like their ``trials.csv`` columns, in those units (what optuna-dashboard shows)."""
    from harness.report.frame import COST_COLUMNS

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
        may_change = MAY_CHANGE + (("search",) if config.sampler == "grid" else ())
        changed = [k for k in _changed_keys(stored, raw) if k.split(".")[0] not in may_change]
        if changed:
            raise HarnessError(
                f"study {config.name!r} already exists in this storage with a different study file "
                f"(changed: {', '.join(changed[:6])}); its trials would not be comparable. Use a new name, "
                f"or delete {config.results_dir} to start over")
        study.set_user_attr("study_config", raw)  # e.g. an extended search space: workers read this copy
    if stored is None:
        # Stored so `harness worker` on another machine can join with only the storage URL and name.
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


# --------------------------------------------------------------------------- one trial

def suggest(trial: optuna.Trial, search: dict[str, ParamSpace], grid: bool) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, p in search.items():
        if grid and p.kind != "bool":
            # Grid trials arrive with fixed parameters; a range distribution (unlike a categorical one)
            # may widen when the grid is extended in the study file and the study resumed.
            values = p.grid()
            suggest_range = trial.suggest_int if p.kind == "int" else trial.suggest_float
            params[name] = suggest_range(name, min(values), max(values))
        elif grid or p.choices is not None:
            params[name] = trial.suggest_categorical(name, [False, True] if grid else list(p.choices))
        elif p.kind == "int":
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
    return params


def trial_spec(config: StudyConfig, params: dict[str, Any], repeat: int) -> TrialSpec:
    model_keys = {"nhid", "emsize", "layers", "dropout"}
    model: ModelConfig = replace(config.model, **{k: v for k, v in params.items() if k in model_keys})
    train = replace(config.train, seed=config.train.seed + repeat,
                    **{k: v for k, v in params.items() if k in ("lr", "variable_bptt")})
    train = replace(train, lr=config.lr_rule.lr_for(train.lr, params["bptt"], params["batch_size"]))
    return TrialSpec(bptt=params["bptt"], batch_size=params["batch_size"], model=model, train=train)


def config_key(params: dict[str, Any]) -> str:
    order = ["bptt", "batch_size"] + sorted(k for k in params if k not in CANONICAL)
    return ",".join(f"{k}={params[k]}" for k in order if k in params)


def cost_value(result: TrialResult, cost: str, per_ktok: bool = True) -> float | None:
    """The study's cost from a trial's result, in the unit of its ``trials.csv`` column: seconds per 1k
    tokens, training peak memory (MiB) or joules per 1k training tokens. ``per_ktok=False``: per token, the
    unit of studies created before their objectives were named."""
    if cost == "peak_memory":
        return result.probe.peak_mem_mib
    value = result.seconds_per_ktok if cost == "seconds_per_token" else result.joules_per_ktok
    return value if value is None or per_ktok else value / 1000.0


def study_info(config: StudyConfig, corpus: Corpus, host_workers: int = 1) -> StudyInfo:
    t = config.train
    return StudyInfo(name=config.name, corpus=corpus.name, corpus_source=corpus.source,
                     corpus_licence=corpus.licence, vocab_size=corpus.vocab_size, budget=t.budget,
                     budget_tokens=resolve_budget_tokens(t, corpus.train.numel()),
                     budget_epochs=t.epochs if t.budget == "tokens" else None,
                     budget_seconds=t.seconds if t.budget == "seconds" else None,
                     objectives=list(config.objectives), cost=config.cost, host_workers=host_workers,
                     lr_rule_text=config.lr_rule.describe(t.lr),
                     race_max_seeds=config.race.max_seeds if config.race else None,
                     race_trials=config.race.trials if config.race else None)


def make_record(info: StudyInfo, spec: TrialSpec, params: dict, repeat: int, result: TrialResult,
                hardware: dict, started: str, lr_choice: LrChoice | None = None) -> TrialRecord:
    """The stored measurement of one trial; ``harness.report`` reads exactly this."""
    config = TrialConfig(bptt=spec.bptt, batch_size=spec.batch_size, lr=spec.train.lr, nhid=spec.model.nhid,
                         emsize=spec.model.emsize, layers=spec.model.layers, dropout=spec.model.dropout,
                         model=spec.model.factory or spec.model.type, optimizer=spec.train.optimizer,
                         variable_bptt=spec.train.variable_bptt, seed=spec.train.seed, repeat=repeat)
    return TrialRecord(config_key=config_key(params), config=config, status=result.status, error=result.error,
                       result=result, lr_choice=lr_choice or LrChoice(), hardware=from_dict(Hardware, hardware),
                       study=info, started_at=started, finished_at=_now(), worker=worker_id())


def store_record(trial: optuna.Trial, record: TrialRecord) -> dict:
    """Store the record, and its main metrics flat beside it for optuna-dashboard; returns the stored dict."""
    stored = record.to_dict()
    trial.set_user_attr("record", stored)
    for name, value in user_attrs(record).items():
        trial.set_user_attr(name, value)
    return stored


def _now() -> str:
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


def _observe_until(study: optuna.Study, spec: TrialSpec) -> TrialSpec:
    """With a time grid, no points past the latest grid time of the shortest finished run: the equal-time
    comparison never reads later than that (see ``TrainConfig.time_grid_until_s``)."""
    if spec.train.time_grid_s is None:
        return spec
    ends = []
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get("record") or {}
        curve = (rec.get("result") or {}).get("time_curve") or []
        if rec.get("status") == "ok" and curve:
            ends.append(max(p["grid_s"] for p in curve))
    return replace(spec, train=replace(spec.train, time_grid_until_s=min(ends))) if ends else spec


@dataclass
class Objective:
    """The Optuna objective: sample, train under the probe, store the record, return the values."""

    config: StudyConfig
    corpus: Corpus
    device: Any
    hardware: dict
    on_result: Callable[[optuna.Trial, dict], None] | None = None
    on_start: Callable[[optuna.Trial, dict], None] | None = None
    host_workers: int = 1
    warmed: bool = False   # this process has run its untimed warm-up (see harness.trainer.warm_up)
    profile: Any = None    # the study's profile.csv (harness.profile): cells it saw run out of memory are skipped
    # Called at each validation checkpoint with the trial and the point (index, of, tokens, seconds, ppl).
    on_checkpoint: Callable[[optuna.Trial, dict], None] | None = None
    _named: bool | None = None  # whether the study's objectives are named (and so in trials.csv's units)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        from harness.probe import make_probe
        from harness.trainer import run_trial, warm_up

        trial.set_user_attr("worker", worker_id())
        skip = self._spurious(trial)
        if skip:
            # Not a measurement: progress, retries and the report ignore it.
            trial.set_user_attr("spurious", skip)
            raise optuna.TrialPruned(skip)
        params = suggest(trial, self.config.search, self.config.sampler == "grid")
        repeat = int(trial.user_attrs.get("repeat", 0))
        spec = trial_spec(self.config, params, repeat)
        single = len(self.config.objectives) == 1
        if self.on_start:
            self.on_start(trial, params)

        def on_checkpoint(i: int, point: dict) -> bool:
            if self.on_checkpoint:
                self.on_checkpoint(trial, {**point, "index": i, "of": spec.train.checkpoints})
            # Intermediate values in the objective's unit (optuna-dashboard plots them beside it); Optuna
            # takes them only from single-objective studies.
            if not single or not math.isfinite(point["ppl"]):
                return False
            trial.report(point["ppl"], step=i)
            return trial.should_prune()

        info = study_info(self.config, self.corpus, self.host_workers)
        started = _now()
        choice = LrChoice(rule=self.config.lr_rule.rule, rule_lr=spec.train.lr)
        try:
            result = self._known_oom(spec)
            if result is None:
                if not self.warmed:
                    warm_up(spec, self.corpus, self.device)
                    self.warmed = True
                if self.config.lr_rule.rule == "tuned":
                    spec = self._tuned(trial, spec, config_key(params), choice)
                spec = _observe_until(trial.study, spec)
                result = run_trial(spec, self.corpus, self.device, probe=make_probe(self.device),
                                   on_checkpoint=on_checkpoint)
        except KeyboardInterrupt:
            interrupted = TrialResult(status="failed", error="interrupted (SIGINT); retried on resume",
                                      bptt=spec.bptt, batch_size=spec.batch_size, seed=spec.train.seed)
            trial.set_user_attr("interrupted", True)
            store_record(trial, make_record(info, spec, params, repeat, interrupted, self.hardware, started,
                                                     choice))
            raise
        typed = make_record(info, spec, params, repeat, result, self.hardware, started, choice)
        record = store_record(trial, typed)
        if (repeat == 0 and self.config.repeats > 1 and self.config.sampler != "grid"
                and not _has_repeats(trial.study, params)):
            for r in range(1, self.config.repeats):
                trial.study.enqueue_trial(params, user_attrs={"repeat": r})
        if self.on_result:
            self.on_result(trial, record)
        values, constraint = self._values(typed, trial.study)
        # Optuna's constraints API: TPE and NSGA-II learn the memory and stability walls from this.
        trial.set_user_attr("constraint", constraint)
        return values

    def _known_oom(self, spec: TrialSpec) -> TrialResult | None:
        """An ``oom`` result without training when the study's profile shows the cell cannot fit."""
        from harness.profile import PROFILE_CSV, doesnt_fit

        if not doesnt_fit(self.profile, spec.train.memory_cap_mib, spec.bptt, spec.batch_size):
            return None
        return TrialResult(status="oom", bptt=spec.bptt, batch_size=spec.batch_size, seed=spec.train.seed,
                           device=str(self.device),
                           error=f"does not fit: {PROFILE_CSV} ran out of memory at this bptt and batch size or "
                                 "below both, under the same memory cap (not trained)")

    def _tuned(self, trial: optuna.Trial, spec: TrialSpec, key: str, choice: LrChoice) -> TrialSpec:
        """``[lr] rule = "tuned"``: the configuration's lr from its ladder, run by the first trial of the
        configuration and stored with the study, so its repeats reuse it (and its cost is counted once)."""
        from harness.lr import tune

        attr = f"lr_tuned:{key}"
        stored = trial.study.user_attrs.get(attr)
        choice.tune_tokens, choice.tune_s = 0, 0.0
        if stored is None:
            tuned = tune(spec, self.corpus, self.device, self.config.lr_rule)
            stored = finite_or_none({"lr": tuned.lr, "ladder": tuned.ladder})
            trial.study.set_user_attr(attr, stored)
            choice.tune_tokens, choice.tune_s = tuned.tokens, tuned.seconds
        choice.ladder = stored["ladder"]
        return replace(spec, train=replace(spec.train, lr=stored["lr"]))

    def _spurious(self, trial: optuna.Trial) -> str | None:
        """Why this trial must not run: another worker emptied the grid's queue between our check and
        Optuna's ask, or a retry or racing run was queued twice by two workers (the lower number runs)."""
        from harness.race import RACE_KEY

        if self.config.sampler == "grid" and "repeat" not in trial.user_attrs:  # set on every queued point
            return "the grid's queue was empty when this worker asked for a trial"
        race_key = trial.user_attrs.get(RACE_KEY)
        if race_key is not None and any(t.user_attrs.get(RACE_KEY) == race_key and t.number < trial.number
                                        for t in trial.study.get_trials(deepcopy=False)):
            return f"racing run {race_key} was already queued"
        retry_of = trial.user_attrs.get("retry_of")
        if retry_of is not None and any(
                t.user_attrs.get("retry_of") == retry_of and t.number < trial.number
                for t in trial.study.get_trials(deepcopy=False)):
            return f"trial {retry_of} was already queued for retry"
        return None

    def named_metrics(self, study: optuna.Study) -> bool:
        if self._named is None:
            self._named = study.metric_names is not None
        return self._named

    def _values(self, record: TrialRecord, study: optuna.Study) -> tuple[float | tuple[float, ...], list[float]]:
        status, result = record.status, record.result
        if status == "pruned":
            raise optuna.TrialPruned(record.error)
        if status in ("timeout", "failed"):
            raise TrialFailed(record.error)
        budget_mib = self.config.max_memory_gib * 1024 if self.config.max_memory_gib else None
        peak = result.probe.peak_mem_mib
        over = peak - budget_mib if budget_mib and peak and self.device.type == "cuda" else 0.0
        infeasible = status in INFEASIBLE or over > 0
        constraint = [1.0 if status in INFEASIBLE else max(0.0, over)]
        values = [math.inf if status in INFEASIBLE or result.val_ppl is None else result.val_ppl]
        if len(self.config.objectives) > 1:
            cost = cost_value(result, self.config.cost, per_ktok=self.named_metrics(study))
            values.append(math.inf if infeasible or cost is None else cost)
        return (values[0] if len(values) == 1 else tuple(values)), constraint


# --------------------------------------------------------------------------- progress and reaping

@dataclass
class Progress:
    done: int
    running: int
    waiting: int
    counts: dict[str, int]
    best: FrozenTrial | None


def _has_repeats(study: optuna.Study, params: dict[str, Any]) -> bool:
    """Whether repeats 1.. of these parameters are already in the study (e.g. this is a retry)."""
    key = _params_key(params)
    return any(int(t.user_attrs.get("repeat", 0)) > 0 and _params_key(_trial_params(t)) == key
               for t in study.get_trials(deepcopy=False))


def _has_final_record(t: FrozenTrial) -> bool:
    record = t.user_attrs.get("record")
    return record is not None and not t.user_attrs.get("interrupted", False)


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed trial's parameters again (Optuna's heartbeat also calls this for stale trials)."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRIES:
        log.warning("trial %d failed %d times; not retrying it again", trial.number, retries + 1)
        return
    study.enqueue_trial(_trial_params(trial), user_attrs={"retry_of": trial.number, "retries": retries + 1,
                                                  "repeat": trial.user_attrs.get("repeat", 0)})


def _retries_exhausted(t: FrozenTrial) -> bool:
    return int(t.user_attrs.get("retries", 0)) >= MAX_RETRIES


def _retried(trials: list[FrozenTrial]) -> set[int]:
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def progress(study: optuna.Study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    counts: dict[str, int] = {}
    done = running = waiting = 0
    best, best_ppl = None, math.inf
    for t in trials:
        if t.state == TrialState.RUNNING:
            running += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
        elif _has_final_record(t) or (t.state == TrialState.FAIL and t.number not in retried
                                      and _retries_exhausted(t)):
            done += 1
            status = t.user_attrs["record"]["status"] if "record" in t.user_attrs else "failed"
            counts[status] = counts.get(status, 0) + 1
            ppl = (t.user_attrs.get("record") or {}).get("result", {}).get("val_ppl")
            if status == "ok" and ppl is not None and ppl < best_ppl:
                best, best_ppl = t, ppl
    return Progress(done, running, waiting, counts, best)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    retried = _retried(trials)
    enqueued = 0
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried or _has_final_record(t):
            continue
        if _retries_exhausted(t):
            continue
        retry_trial(study, t)
        enqueued += 1
    return enqueued


# --------------------------------------------------------------------------- running

def check_corpus_fits(config: StudyConfig, corpus: Corpus) -> None:
    """Fail before the first trial if the largest window in the search space cannot fit the corpus."""
    check_fits(corpus, _largest(config, "batch_size"), _largest(config, "bptt"), config.train.eval_batch_size)


def _largest(config: StudyConfig, name: str) -> Any:
    """The largest value a trial can get: a grid's (or a stepped range's) largest point, which can lie
    below the range's ``high``; a sampled range's ``high``."""
    space = config.search[name]
    if space.choices is None and (config.sampler == "grid" or space.step is not None):
        return max(space.grid())
    return space.max_value()


def load_corpus(config: StudyConfig) -> Corpus:
    return load(config.corpus, check=lambda corpus: check_corpus_fits(config, corpus))


def check_cost_measurable(config: StudyConfig, device: Any) -> None:
    if config.cost == "joules_per_token" and len(config.objectives) > 1 and device.type != "cuda":
        readable = [p for p in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj") if os.access(p, os.R_OK)]
        if not readable:
            raise HarnessError("objective joules_per_token needs an energy reading, and this CPU-only machine "
                               "has no readable RAPL counter; use seconds_per_token or peak_memory here")


def run_worker(study: optuna.Study, config: StudyConfig, corpus: Corpus, device: Any, n_target: int,
               on_result: Callable[[optuna.Trial, dict], None] | None = None,
               on_start: Callable[[optuna.Trial, dict], None] | None = None, host_workers: int = 1,
               on_checkpoint: Callable[[optuna.Trial, dict], None] | None = None) -> None:
    """Run trials until the study holds ``n_target`` finished ones (counting every worker's).

    ``host_workers``: how many workers run on this host at once (recorded with each trial: on CPU they
    share the machine, so their timings are marked)."""
    from harness.hardware import fingerprint
    from harness.profile import load_profile
    from harness.race import race_round, raced

    objective = Objective(config, corpus, device, fingerprint(device), on_result, on_start, host_workers,
                          profile=load_profile(config.results_dir), on_checkpoint=on_checkpoint)
    while True:
        reap(study)
        p = progress(study)
        target = n_target + (raced(study) if config.race else 0)
        if p.done >= target or (p.waiting == 0 and (p.done + p.running >= target or config.sampler == "grid")):
            # A grid only runs its queue: nothing waiting means nothing left for this worker, unless the
            # race queues another round once every trial so far has finished.
            if config.race is None or p.waiting:
                return
            if p.running:
                time.sleep(RACE_POLL_S)  # another worker's trial may change the standings
                continue
            if p.done < n_target or race_round(study, config.race) == 0:
                return
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)


def write_study_json(config: StudyConfig, storage_url: str) -> None:
    """``results/<study>/study.json``: how ``harness report`` finds this study's storage."""
    directory = config.results_dir
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"study_name": config.name, "storage": redact(storage_url), "objectives": list(config.objectives),
            "cost": config.cost, "sampler": config.sampler, "study_file": str(config.path) if config.path else None,
            "description": config.description}
    from harness.fileio import write_files_atomic

    write_files_atomic({directory / "study.json": json.dumps(meta, indent=2)})


def stored_train_tokens(config: StudyConfig, storage_url: str) -> int | None:
    """The token budget an existing study in this storage was started with (None: no such study)."""
    try:
        storage = open_storage(storage_url)
        if config.name not in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
            return None
        stored = optuna.load_study(study_name=config.name, storage=storage).user_attrs.get("study_config") or {}
    except HarnessError:
        return None
    tokens = (stored.get("train") or {}).get("tokens")
    return int(tokens) if isinstance(tokens, int) else None


def plan_budget(config: StudyConfig, storage_url: str, max_seconds: float) -> tuple[StudyConfig, int, bool]:
    """``--max-seconds``: the study with the token budget that fits that limit, from its profile.

    A study already started keeps the budget it was planned with (its trials must stay comparable).
    Returns (config, tokens, whether they were planned now)."""
    from harness.profile import cells, doesnt_fit, load_profile, plan_tokens

    stored = stored_train_tokens(config, storage_url)
    if stored is not None:
        tokens, planned = stored, False
    else:
        df = load_profile(config.results_dir)
        fit = [c for c in cells(config) if not doesnt_fit(df, config.train.memory_cap_mib, *c)]
        tokens = plan_tokens(df, fit, max_seconds, config.train.checkpoints, config.repeats)
        planned = True
    train = replace(config.train, budget="tokens", tokens=tokens, epochs=None)
    raw = {**config.raw, "train": {**(config.raw.get("train") or {}), "budget": "tokens", "tokens": tokens}}
    raw["train"].pop("epochs", None)
    return replace(config, train=train, raw=raw), tokens, planned


def prepare(config: StudyConfig, storage_url: str, device_name: str | None) -> tuple[optuna.Study, Corpus, Any]:
    """Everything that can fail on bad input, before a single trial runs."""
    from harness.hardware import resolve_device

    device = resolve_device(device_name or config.device)
    check_cost_measurable(config, device)
    corpus = load_corpus(config)
    from harness.model import check_model

    check_model(config.model, corpus.vocab_size)  # a user's model factory: one line now, not a failed trial later
    study = create_study(config, open_storage(storage_url))
    if config.sampler == "grid":
        enqueue_grid(study, config)
    write_study_json(config, storage_url)
    return study, corpus, device


def config_from_storage(study_name: str, storage_url: str) -> tuple[StudyConfig, optuna.Study]:
    """For ``harness worker``: the study file as stored by whoever created the study."""
    from harness.config import parse_study

    storage = open_storage(storage_url, create=False)
    try:
        summaries = optuna.get_all_study_summaries(storage)
    except Exception as e:  # noqa: BLE001
        raise HarnessError(f"storage {redact(storage_url)}: cannot list studies: {_first_line(e, storage_url)}") from None
    names = [s.study_name for s in summaries]
    if study_name not in names:
        raise HarnessError(f"study {study_name!r} is not in storage {redact(storage_url)}; it holds: "
                           f"{', '.join(names) or 'no studies'} (start it with harness sweep first)")
    raw = optuna.load_study(study_name=study_name, storage=storage).user_attrs.get("study_config")
    if raw is None:
        raise HarnessError(f"study {study_name!r} was not created by harness sweep (no stored study file)")
    config = parse_study(raw)
    return config, create_study(config, storage)

