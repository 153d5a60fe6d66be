"""Where a study lives: resolving, opening and checking its storage (SQLite, journal, PostgreSQL), and study.json."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial

from bptt_harness.config import StudyConfig, check_storage_url
from bptt_harness.errors import HarnessError
from bptt_harness.fileio import write_files_atomic
from bptt_harness.urls import (
    STORAGE_ENV,
    anchored,
    engine_url,
    hides_password,
    redact,
    relative_to_folder,
    same_storage,
    scrub,
)

log = logging.getLogger(__name__)

# How long a remote worker may be silent before its RUNNING trial counts as dead (RDB storages).
HEARTBEAT_S, GRACE_S = 10, 60


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
        return relocated(recorded, config.results_dir)
    elif workers > 1:
        chosen = f"journal:{(config.results_dir / 'journal.log').resolve()}"
    else:
        chosen = config.storage_url
    if recorded is not None and not (same_storage(chosen, recorded)
                                     or same_storage(chosen, relocated(recorded, config.results_dir))):
        password = " (its password in place of ***)" if hides_password(recorded) else ""
        raise HarnessError(
            f"{meta} records storage {redact(recorded)}, but this run would open {redact(chosen)}; a study "
            f"does not move between storages: pass --storage {redact(recorded)}{password}, or use "
            f"another --results-dir, or delete {config.results_dir} to start over")
    return chosen


def recorded_storage(results_dir: Path) -> str | None:
    """The storage URL (password redacted) that ``study.json`` in ``results_dir`` records, if any; a SQLite
    file or journal recorded relative to the folder is the folder's own file."""
    try:
        previous = json.loads((results_dir / "study.json").read_text(encoding="utf-8")).get("storage")
    except (OSError, ValueError, AttributeError):
        return None
    return anchored(previous, results_dir) if isinstance(previous, str) and previous.strip() else None


def relocated(url: str, results_dir: Path) -> str:
    """A results folder that was moved still records its old path: its own copy of the file is the study."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            target = Path(url[len(prefix):])
            local = results_dir / target.name
            if not target.exists() and local.is_file():
                return f"{prefix}{local.resolve()}"
    return url


def open_storage(url: str, *, create: bool = True, read_only: bool = False,
                 on_stale_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.BaseStorage:
    """Open a storage, or fail with one line naming it (password hidden). Never overwrites a bad file.

    The one opener for sweeps, workers and reports. With ``create=False`` (``bptt-harness worker``, which
    joins a study) a storage file must exist: a mistyped path is an error, not a new empty database.
    ``read_only`` (``bptt-harness report``) also reads a journal whose last record was torn: reading it
    cannot make it worse, and the complete records are all there. ``on_stale_trial``: what an RDB storage's
    heartbeat does with a trial whose worker went silent (a sweep queues it again).
    """
    check_storage_url(url)
    shown = redact(url)
    who = "there is no study to read (run 'bptt-harness sweep' first)" if read_only else \
        "a worker joins a study that 'bptt-harness sweep' started"
    if url.startswith("journal:"):
        return _open_journal(Path(url[len("journal:"):]).expanduser(), shown, create and not read_only, who,
                             check_tail=not read_only)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.exists() and (read_only or not create):
            raise HarnessError(f"storage {shown}: '{path}' does not exist; {who}: check the path")
        if read_only:
            _check_sqlite_file(path, shown)
            return _open_rdb(url, shown, on_stale_trial)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Two sweeps creating one database at the same moment would both create its tables.
        with _directory_lock(path.parent):
            _check_sqlite_file(path, shown)
            return _open_rdb(url, shown, on_stale_trial)
    return _open_rdb(url, shown, on_stale_trial)


def _open_rdb(url: str, shown: str,
              on_stale_trial: Callable[[optuna.Study, FrozenTrial], None] | None) -> optuna.storages.BaseStorage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            return optuna.storages.RDBStorage(
                engine_url(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=on_stale_trial,
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors vary; the user needs one line
        raise HarnessError(f"storage {shown}: cannot open it: {first_line(e, url)}") from None


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
    # A problem can span lines ("*** in database main ***\nOn tree page ..."): the error stays one line.
    problems = [" ".join(str(r[0]).split()) for r in rows if r and r[0] != "ok"]
    return f"{len(problems)} problem(s), first: {problems[0][:200]}" if problems else None


def _open_journal(path: Path, shown: str, create: bool, who: str, check_tail: bool = True) -> optuna.storages.BaseStorage:
    if not path.exists():
        if not create:
            raise HarnessError(f"storage {shown}: '{path}' does not exist; {who}: check the path")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise HarnessError(f"storage {shown}: '{path}' is not a file; pass another --storage")
    elif check_tail:
        _check_journal_tail(path, shown)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not a journal
        raise HarnessError(f"storage {shown}: cannot read the journal file: {first_line(e, str(path))}") from None


def _check_journal_tail(path: Path, shown: str) -> None:
    """Refuse a journal whose last record was cut off: Optuna would append after the torn bytes, and
    every later read of the file would fail. Checked under the journal's own lock, so a record that
    another worker is writing right now is not mistaken for a torn one."""
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


def first_line(e: BaseException, url: str) -> str:
    """The root cause's first line (Optuna wraps driver errors), without any password."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    text = str(e).strip()
    return scrub(text.splitlines()[0] if text else type(e).__name__, url)[:300]


def _storage_cause(e: BaseException) -> BaseException | None:
    """The storage or file error behind ``e``, or None. A database that went away mid-trial reaches the
    caller as Optuna's own error raised while it handled the driver's (e.g. ``UnboundLocalError:
    'updated_state'``), so the whole chain (causes and contexts) is searched."""

    kinds = (OSError, sqlite3.Error, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BrokenPipeError):
            return None
        if isinstance(current, kinds):
            return current
        current = current.__cause__ or current.__context__
    return None


_ERRNO_KINDS = {errno.ENOSPC: "space", errno.EDQUOT: "space", errno.EFBIG: "space", errno.EIO: "disk",
                errno.EROFS: "writable", errno.EACCES: "writable", errno.EPERM: "writable"}


def _failure_kind(e: BaseException) -> str | None:
    """What went wrong, from the error codes in ``e``'s chain (an OSError's errno, SQLite's result code,
    a database connection that failed), never from its text: a folder named ``full`` is not a full disk."""

    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _ERRNO_KINDS:
            return _ERRNO_KINDS[current.errno]
        name = getattr(current, "sqlite_errorname", None) or ""
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return "space" if name == "SQLITE_FULL" else "disk"
        if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN")):
            return "writable"
        if isinstance(current, sqlalchemy.exc.OperationalError) and not name and not isinstance(
                current.orig, sqlite3.Error):
            return "reachable"  # a database server's connection (PostgreSQL) failed or was lost
        current = current.__cause__ or current.__context__
    return None


def storage_failure(e: BaseException, url: str) -> HarnessError | None:
    """One line for a storage or results folder that failed in the middle of a run (a full disk, a
    read-only folder, damage found only now), or None for an error that is not about storage."""
    found = _storage_cause(e)
    if found is None:
        return None
    e = found
    detail = first_line(e, url)
    advice = {"space": "free some space, then rerun the same command",
              "disk": "check whether the disk is full or failing, then rerun the same command",
              "writable": "make it writable, then rerun the same command",
              "reachable": "rerun the same command once the database is reachable again"}.get(
        _failure_kind(e) or "", "rerun the same command once it is fixed")
    where = getattr(e, "filename", None)
    what = f"cannot write {where}" if isinstance(e, OSError) and where else f"storage {redact(url)}"
    return HarnessError(f"{what}: {detail}; the trials stored before this are kept: {advice}")




def write_study_json(config: StudyConfig, storage_url: str) -> None:
    """``results/<study>/study.json``: how ``bptt-harness report`` finds this study's storage."""
    directory = config.results_dir
    directory.mkdir(parents=True, exist_ok=True)
    # A storage file inside the results folder is recorded relative to it: a copy of the folder uses its own.
    meta = {"study_name": config.name, "storage": relative_to_folder(redact(storage_url) or "", directory), "objectives": list(config.objectives),
            "cost": config.cost, "sampler": config.sampler, "study_file": str(config.path) if config.path else None,
            "description": config.description}
    write_files_atomic({directory / "study.json": json.dumps(meta, indent=2)})
