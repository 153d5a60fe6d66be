"""Every command that writes fails cleanly, before the work (issue 24, item 4), and storage URLs that
cannot hold a study are refused up front (item 7)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy.exc
from studyfiles import write_study

from bptt_harness.cli import main
from bptt_harness.study import storage_failure


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("shape", ["a file", "under a file"])
def test_profile_into_a_results_folder_it_cannot_write_fails_before_measuring(
        shape: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, "prof")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    results = blocker if shape == "a file" else blocker / "deeper"
    assert main(["profile", str(study), "--results-dir", str(results), "--wall", "no", "--steps", "1"]) == 2
    line = _one_line(capsys)  # nothing measured: no row lines before the error
    assert str(blocker) in line


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "postgresql://", "postgresql://user@host",
                                 "postgresql://user:pw@host:5432/"])
def test_a_storage_that_cannot_hold_a_study_is_refused_before_anything_runs(
        url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, "mem")
    results = tmp_path / "results"
    assert main(["sweep", str(study), "--results-dir", str(results), "--storage", url]) == 2
    line = _one_line(capsys)
    assert "storage" in line and ("memory" in line or "database" in line), line
    assert "pw" not in line.replace(":***@", "")
    assert not (results / "mem").exists()  # nothing written, no study.json


def test_a_bad_storage_from_the_environment_names_the_variable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPTT_HARNESS_STORAGE", "garbage")
    study = write_study(tmp_path, "env")
    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "results")]) == 2
    assert "BPTT_HARNESS_STORAGE" in _one_line(capsys)


@pytest.mark.parametrize(("error", "advice"), [
    (OSError(errno.EACCES, "Permission denied", "/data/disk-full/results/study.json"), "make it writable"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/full/study.json"), "make it writable"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/results/study.json"), "free some space"),
    (OSError(errno.EIO, "Input/output error", "/data/quota-full/study.json"), "disk is full or failing"),
])
def test_the_storage_advice_comes_from_the_error_code_not_the_words_in_a_path(error: OSError, advice: str) -> None:
    failure = storage_failure(error, "sqlite:////data/full/study.db")
    assert failure is not None and advice in str(failure), failure
    others = {"make it writable", "free some space", "disk is full or failing"} - {advice}
    assert not any(o in str(failure) for o in others), failure


def test_a_lost_database_connection_advises_waiting_for_it(tmp_path: Path) -> None:
    class DriverError(Exception):
        pass

    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, DriverError("server closed the connection"))
    try:
        try:
            raise lost
        except sqlalchemy.exc.OperationalError:
            raise UnboundLocalError("cannot access local variable 'updated_state'") from None
    except UnboundLocalError as wrapped:
        wrapped.__context__ = lost
        failure = storage_failure(wrapped, "postgresql://u:secretpw@db.example/test")
    assert failure is not None
    assert "reachable" in str(failure) and "secretpw" not in str(failure) and "db.example/test" in str(failure)
    full = sqlite3.OperationalError("database or disk is full")
    assert storage_failure(ValueError("not storage"), "sqlite:///x.db") is None
    assert storage_failure(full, "sqlite:////tmp/read-only/x.db") is not None
