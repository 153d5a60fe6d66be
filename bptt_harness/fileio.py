"""Atomic file writes: every file the harness writes (reports, study.json, profile.csv, the corpus cache)
is written whole or not at all, by one writer (passwords: :mod:`bptt_harness.urls`)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from bptt_harness.errors import HarnessError

# A temporary older than this is left over from a killed writer, wherever it ran.
STALE_TEMP_S = 3600


def _temp_prefix(path: Path) -> str:
    """``.report.html.<host>-<pid>.``: a later write can tell a dead writer's leftover from a live one's."""
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` that a killed writer left: those of a process that is gone on
    this host, and any older than :data:`STALE_TEMP_S`. A live writer's (here or elsewhere) are kept."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(?P<host>.+)-(?P<pid>\d+)\.)?[^.]+\.tmp$")
    host, now = socket.gethostname(), time.time()
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None:
            continue
        try:
            dead = m["host"] == host and not pid_alive(int(m["pid"]))
            if dead or now - p.lstat().st_mtime > STALE_TEMP_S:
                p.unlink()
                removed.append(p)
        except OSError:
            continue  # gone already, or not ours to remove: it never blocks a report
    return removed


def _write_all(f, data: bytes) -> None:
    # A separate function so tests can simulate a full disk at the moment of writing.
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files_atomic(files: Mapping[Path, str | bytes]) -> None:
    """Write every file or none: all temporaries first, then one ``os.replace`` each.

    A failure while writing (a full disk, a read-only folder) removes the temporaries and raises a
    one-line :class:`HarnessError`; the previous versions of all files stay as they were.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(path)
                data = content.encode("utf-8") if isinstance(content, str) else content
                fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
                temps.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    # mkstemp makes 0600 files; a report is as readable as any file the user creates.
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
                    _write_all(f, data)
            except OSError as e:
                reason = e.strerror or str(e)
                raise HarnessError(f"cannot write {path}: {reason}; the previous version was left as it was") from None
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise HarnessError(f"cannot write {path}: {e.strerror or e}; "
                                   "the previous version was left as it was") from None
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def check_writable_dir(directory: Path, option: str = "--results-dir") -> None:
    """Create ``directory`` if needed and write (and remove) a file in it: a command that writes its results
    at the end checks this first, so a folder it cannot write is one line before the work, not after."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        raise HarnessError(f"results folder {str(directory)!r} cannot be written ({e.strerror or type(e).__name__}); "
                           f"pass a {option} that is a folder you can write to") from None
