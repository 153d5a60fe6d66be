"""Nothing is silently lost (issue 15): a torn journal is never made worse; an empty, damaged, full or
read-only study.db is one line and exit 2 with nothing overwritten; a mistyped worker storage creates
nothing; two sweeps creating one database at the same moment both work."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import studyfiles

REPO = Path(__file__).resolve().parent.parent

REPORT_FILES = ("trials.csv", "configs.csv", "report.html", "study.json")


def write_study(tmp_path: Path, name: str) -> Path:
    return studyfiles.write_study(tmp_path, name, search="bptt = [4, 6, 8]\nbatch_size = [2]")


def run_cli(*args: str, timeout: float = 240, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bptt_harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, preexec_fn=preexec_fn)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def error_after_progress(result: subprocess.CompletedProcess) -> str:
    """A failure in the middle of a sweep: its progress lines, then one error line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert errors == [lines[-1]], result.stderr
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_trial_done(tmp_path: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """A study with one of its three trials finished and its report written, as a previous run leaves it."""
    study_file = write_study(tmp_path, name)
    results = tmp_path / "results"
    done = run_cli("sweep", str(study_file), "--results-dir", str(results), "--trials", "1", *extra)
    assert done.returncode == 0, done.stderr
    assert all((results / name / f).is_file() for f in REPORT_FILES)
    return study_file, results / name


# --------------------------------------------------------------------------- torn journal

def test_a_torn_journal_is_kept_byte_identical_and_the_message_says_how_to_recover(tmp_path: Path) -> None:
    journal = tmp_path / "store" / "journal.log"
    study_file, folder = one_trial_done(tmp_path, "torn", "--storage", f"journal:{journal}")
    data = journal.read_bytes()
    assert data.endswith(b"\n")
    journal.write_bytes(data[:-25])  # the disk filled in the middle of the last record
    torn = journal.read_bytes()
    before = snapshot(folder)
    args = ["sweep", str(study_file), "--results-dir", str(folder.parent), "--storage", f"journal:{journal}"]
    for _ in range(2):  # the documented rerun, twice: it must not append after the torn record
        line = one_line_error(run_cli(*args))
        assert str(journal) in line and "cut off" in line
        assert journal.read_bytes() == torn
        assert snapshot(folder) == before
    worker = run_cli("worker", "--study-name", "torn", "--storage", f"journal:{journal}")
    one_line_error(worker)
    assert journal.read_bytes() == torn
    # The report only reads: it still works from the complete records.
    report = run_cli("report", str(folder))
    assert report.returncode == 0, report.stderr
    assert journal.read_bytes() == torn
    # Following the message's recovery keeps the torn file and resumes from the complete records.
    recovery = line.split("recover with: ", 1)[1].split("; then", 1)[0]
    subprocess.run(["bash", "-c", recovery], check=True, cwd=REPO)
    assert any(p.read_bytes() == torn for p in journal.parent.iterdir() if p != journal)  # the backup
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "[3/3]" in resumed.stderr


# --------------------------------------------------------------------------- damaged study.db

def test_an_empty_study_db_left_by_a_previous_run_is_not_a_new_study(tmp_path: Path) -> None:
    study_file, folder = one_trial_done(tmp_path, "empty")
    (folder / "study.db").write_bytes(b"")
    before = snapshot(folder)
    line = one_line_error(run_cli("sweep", str(study_file), "--results-dir", str(folder.parent)))
    assert str(folder / "study.db") in line and "empty" in line
    assert snapshot(folder) == before


def test_a_study_db_corrupted_mid_file_is_one_line_and_left_alone(tmp_path: Path) -> None:
    study_file, folder = one_trial_done(tmp_path, "midfile")
    db = folder / "study.db"
    with sqlite3.connect(db) as con:
        pages = [row[0] for row in con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name IN ('trials', 'trial_user_attributes')")]
    con.close()
    assert len(pages) == 2
    data = bytearray(db.read_bytes())
    page = 4096
    # Garbage over the trials' pages in the middle of the file; the header and the schema are intact,
    # so opening works and the damage shows only when trials are read or written.
    for number in pages:
        offset = (number - 1) * page
        data[offset:offset + page] = bytes((i * 37 + 11) % 251 for i in range(page))
    db.write_bytes(bytes(data))
    before = snapshot(folder)
    line = one_line_error(run_cli("sweep", str(study_file), "--results-dir", str(folder.parent)))
    assert str(db) in line
    assert snapshot(folder) == before


def _limit_file_size(limit: int):
    def preexec() -> None:
        # A full disk, for this process only: writes past `limit` bytes fail with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_during_a_sweep_is_one_line_and_keeps_the_previous_report(tmp_path: Path) -> None:
    study_file, folder = one_trial_done(tmp_path, "nospace")  # no "full" in the path: the advice is from the error
    db = folder / "study.db"
    report = {f: (folder / f).read_bytes() for f in ("trials.csv", "configs.csv", "report.html")}
    result = run_cli("sweep", str(study_file), "--results-dir", str(folder.parent),
                     preexec_fn=_limit_file_size(db.stat().st_size))
    line = error_after_progress(result)
    assert str(db) in line and ("free some space" in line or "disk is full or failing" in line), line
    assert {f: (folder / f).read_bytes() for f in report} == report
    # What was stored before the disk filled is intact: the same command resumes once there is room.
    resumed = run_cli("sweep", str(study_file), "--results-dir", str(folder.parent), "--no-report")
    assert resumed.returncode == 0, resumed.stderr
    assert "[3/3]" in resumed.stderr


def _without_root_file_powers() -> None:
    """Root ignores file permissions; drop the capabilities that let it, for this child process."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _read_only_runner():
    if os.geteuid() != 0:
        return None
    probe = subprocess.run([sys.executable, "-c", "import os; open('/proc/self/status')"],
                           preexec_fn=_without_root_file_powers, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without CAP_SETPCAP: cannot make a folder read-only for the test")
    return _without_root_file_powers


def test_a_read_only_results_folder_is_one_line(tmp_path: Path) -> None:
    preexec = _read_only_runner()
    study_file, folder = one_trial_done(tmp_path, "readonly")
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)
    try:
        before = snapshot(folder)
        line = one_line_error(run_cli("sweep", str(study_file), "--results-dir", str(folder.parent),
                                      preexec_fn=preexec))
        assert str(folder) in line
        assert snapshot(folder) == before
    finally:
        folder.chmod(0o755)


# --------------------------------------------------------------------------- workers and races

@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_worker_with_a_mistyped_storage_path_creates_nothing(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "no-such-dir" / ("study.db" if kind == "sqlite" else "journal.log")
    url = f"sqlite:///{missing}" if kind == "sqlite" else f"journal:{missing}"
    line = one_line_error(run_cli("worker", "--study-name", "x", "--storage", url))
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "no-such-dir").exists()


RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sqlalchemy.dialects.sqlite.base import SQLiteDialect
    from bptt_harness.errors import HarnessError
    from bptt_harness.study import open_storage

    # Widen the window between "is there a table?" and "CREATE TABLE", where two processes collide.
    real = SQLiteDialect.has_table
    def slow_has_table(self, *args, **kwargs):
        found = real(self, *args, **kwargs)
        time.sleep(0.3)
        return found
    SQLiteDialect.has_table = slow_has_table
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    try:
        open_storage("sqlite:///" + sys.argv[1])
    except HarnessError as e:
        print("error:", e)
        sys.exit(2)
""")


def test_two_sweeps_creating_one_database_at_the_same_moment_both_open_it(tmp_path: Path) -> None:
    db, go = tmp_path / "results" / "s" / "study.db", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(db), str(go)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    time.sleep(2.0)  # both imported and waiting
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
