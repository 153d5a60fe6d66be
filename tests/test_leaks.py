"""Nothing leaks (issue 15): passwords in storage URLs, whatever their characters and wherever they are
given, never reach stdout, stderr, logs, results files or worker command lines; the README's
``postgresql://`` form opens; the resume hint after Ctrl-C resumes; a rerun never silently switches
to another storage."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import studyfiles
from optuna.trial import TrialState
from waiting_model import interrupt_when_waiting, waiting_env, waiting_study

from bptt_harness.cli import main

REPO = Path(__file__).resolve().parent.parent
PG = "127.0.0.1:5432/test"


# Every password carries marker tokens Kq9Za, Kq9Zb, Kq9Zc around its special characters, so a
# redactor that leaks any piece of it (the part before an '@', after a ':' ...) is caught.
MARKER = re.compile(r"Kq9Z[abc]")
PASSWORDS = {
    "slash": "Kq9Za/Kq9Zb",
    "at-and-colon": "Kq9Za@Kq9Zb:Kq9Zc",
    "space": "Kq9Za Kq9Zb",
    "percent-escape": "Kq9Za%40Kq9Zb",
    "colon": "Kq9Za:Kq9Zb",
}


def url_forms(password: str, port: str = "5432", db: str = "test") -> dict[str, str]:
    return {
        "userinfo": f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/{db}",
        "userinfo-readme-form": f"postgresql://postgres:{password}@127.0.0.1:{port}/{db}",
        "query": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{db}?password={password}",
        "query-passwd": f"postgresql://postgres@127.0.0.1:{port}/{db}?sslmode=disable&passwd={password}",
    }


def write_study(tmp_path: Path, name: str, **kw: object) -> Path:
    return studyfiles.write_study(tmp_path, name, **{"search": "bptt = [4]\nbatch_size = [2]", **kw})  # type: ignore[arg-type]


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bptt_harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def one_line_error(code: int, err: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def require_postgres() -> None:
    """Skip where the local server is not running, except in CI, which must run these tests."""
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres", connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001
        reason = f"PostgreSQL on 127.0.0.1:5432 is not reachable: {str(e).strip().splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must run this test)")
        pytest.skip(reason)


def drop_study(name: str) -> None:
    storage = optuna.storages.RDBStorage(f"postgresql+psycopg2://postgres@{PG}")
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass


def assert_no_marker(where: str, text: str) -> None:
    found = MARKER.findall(text)
    assert not found, f"password pieces {found} in {where}: {text[:2000]}"


def assert_results_clean(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            assert_no_marker(str(p), p.read_bytes().decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------- one redactor

@pytest.mark.parametrize("password", list(PASSWORDS.values()), ids=list(PASSWORDS))
@pytest.mark.parametrize("form", ["userinfo", "userinfo-readme-form", "query", "query-passwd"])
def test_the_redactor_hides_every_password_form(password: str, form: str) -> None:
    from bptt_harness.config import redact

    url = url_forms(password)[form]
    shown = redact(url)
    assert_no_marker("redact()", shown)
    assert "127.0.0.1:5432/test" in shown and "***" in shown  # still says which storage it is


def test_the_redactor_leaves_urls_without_passwords_alone() -> None:
    from bptt_harness.config import redact

    for url in ("sqlite:////tmp/a@b:c/study.db", "journal:/tmp/x:y@z/journal.log",
                "postgresql://postgres@127.0.0.1:5432/test", "postgresql://h/db?sslmode=require"):
        assert redact(url) == url


def test_error_text_is_scrubbed_of_every_encoding_of_the_password() -> None:
    from bptt_harness.urls import scrub

    url = url_forms("Kq9Za@Kq9Zb:Kq9Zc")["userinfo"]
    text = ("could not connect: password Kq9Za@Kq9Zb:Kq9Zc rejected, tried Kq9Za%40Kq9Zb%3AKq9Zc and "
            "postgresql://bob:Kq9Za@Kq9Zb@h/db (dsn: user=bob password=Kq9Za)")
    assert_no_marker("scrub()", scrub(text, url))


def test_there_is_one_redactor() -> None:
    """No module but bptt_harness/urls.py defines a password redactor or its own URL password pattern."""
    offenders = []
    for path in (REPO / "bptt_harness").rglob("*.py"):
        if path.name == "urls.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (r"def (redact\w*|scrub|url_password)\(", r":\*\*\*@", r"\[\^@"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("case", [("slash", "userinfo"), ("at-and-colon", "userinfo-readme-form"),
                                  ("space", "userinfo"), ("percent-escape", "userinfo"),
                                  ("colon", "query"), ("at-and-colon", "query")],
                         ids=lambda c: "-".join(c))
def test_passwords_never_leak_from_sweep_report_and_errors(case: tuple[str, str], tmp_path: Path, capsys,
                                                             caplog) -> None:
    require_postgres()
    caplog.set_level(logging.DEBUG)
    password, form = PASSWORDS[case[0]], case[1]
    url = url_forms(password)[form]
    name = f"leak-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    study_file = write_study(tmp_path, name, top='description = "leak check"')
    try:
        assert main(["-v", "sweep", str(study_file), "--results-dir", str(results), "--storage", url]) == 0
        assert main(["report", str(results / name), "--storage", url]) == 0
        # The error paths: a server that does not answer, a study that is not there.
        unreachable = url_forms(password, port="1")[form]
        assert main(["sweep", str(study_file), "--results-dir", str(tmp_path / "r2"), "--storage", unreachable]) == 2
        assert main(["worker", "--study-name", "no-such-study", "--storage", url]) == 2
        assert main(["report", str(results / name), "--study-name", "nope", "--storage", url]) == 2
    finally:
        drop_study(name)
    out = capsys.readouterr()
    assert_no_marker("stdout", out.out)
    assert_no_marker("stderr", out.err)
    assert_no_marker("logs", caplog.text)
    assert_results_clean(tmp_path)
    stored = json.loads((results / name / "study.json").read_text())["storage"]
    assert "***" in stored and "127.0.0.1:5432/test" in stored


def _worker_cmdlines(parent: int) -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError, IndexError):
            continue
    return lines


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker command lines from /proc")
def test_worker_command_lines_hold_no_password(tmp_path: Path) -> None:
    require_postgres()
    name = f"leakw-{uuid.uuid4().hex[:8]}"
    url = url_forms(PASSWORDS["at-and-colon"])["userinfo-readme-form"]
    study_file = write_study(tmp_path, name, search="bptt = [4, 8, 12, 16]\nbatch_size = [2]", tokens=6000,
                             corpus_tokens=40000)
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "bptt_harness", "sweep", str(study_file), "--results-dir", str(results),
                             "--workers", "2", "--storage", url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        while proc.poll() is None:
            seen += [c for c in _worker_cmdlines(proc.pid) if " worker" in c and c not in seen]
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        drop_study(name)
    assert proc.returncode == 0, err
    assert len(seen) >= 2, seen  # both workers were looked at
    for cmd in seen:
        assert_no_marker("a worker's command line", cmd)
        assert "127.0.0.1" not in cmd  # the URL travels outside the command line
    assert_no_marker("stdout", out)
    assert_no_marker("stderr", err)
    assert_results_clean(tmp_path)


def test_a_password_in_the_study_file_is_not_copied_into_the_storage(tmp_path: Path, capsys) -> None:
    require_postgres()
    name = f"leakf-{uuid.uuid4().hex[:8]}"
    url = url_forms(PASSWORDS["at-and-colon"])["userinfo-readme-form"]
    study_file = write_study(tmp_path, name, top=f'storage = "{url}"', search="bptt = [4, 8]\nbatch_size = [2]")
    results = tmp_path / "results"
    try:
        assert main(["sweep", str(study_file), "--results-dir", str(results), "--trials", "1"]) == 0
        stored = optuna.load_study(study_name=name, storage=f"postgresql+psycopg2://postgres@{PG}")
        assert_no_marker("the stored study file", json.dumps(stored.user_attrs))
        # A worker rebuilds the study from that stored copy and still runs.
        assert main(["worker", "--study-name", name, "--storage", url, "--quiet"]) == 0
    finally:
        drop_study(name)
    out = capsys.readouterr()
    assert_no_marker("output", out.out + out.err)
    assert_results_clean(results)


def test_a_traceback_never_shows_the_password(tmp_path: Path, capsys, monkeypatch) -> None:
    import bptt_harness.study.sweep

    url = url_forms(PASSWORDS["space"])["userinfo"]

    def bug(*args, **kwargs):
        raise RuntimeError(f"unexpected failure while opening {url}")

    monkeypatch.setattr(bptt_harness.study.sweep, "prepare", bug)
    study_file = write_study(tmp_path, "bug")
    assert main(["sweep", str(study_file), "--results-dir", str(tmp_path / "r"), "--storage", url]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "unexpected failure while opening" in err
    assert_no_marker("a traceback", err)


# --------------------------------------------------------------------------- the README's URL form

def test_the_readme_postgresql_url_form_opens_the_same_study_as_the_psycopg2_form(tmp_path: Path) -> None:
    require_postgres()
    name = f"form-{uuid.uuid4().hex[:8]}"
    study_file = write_study(tmp_path, name, search="bptt = [4, 8]\nbatch_size = [2]")
    results = tmp_path / "results"
    readme_form, driver_form = f"postgresql://postgres@{PG}", f"postgresql+psycopg2://postgres@{PG}"
    try:
        first = run_cli("sweep", str(study_file), "--results-dir", str(results), "--storage", readme_form,
                        "--trials", "1", "--no-report")
        assert first.returncode == 0, first.stderr
        # Both spellings are the same storage: the study resumes, it does not start over or refuse.
        second = run_cli("sweep", str(study_file), "--results-dir", str(results), "--storage", driver_form)
        assert second.returncode == 0, second.stderr
        assert "(1 already done)" in second.stderr
        again = run_cli("report", str(results / name), "--storage", readme_form)
        assert again.returncode == 0, again.stderr
        study = optuna.load_study(study_name=name, storage=driver_form)
        assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 2
    finally:
        drop_study(name)


# --------------------------------------------------------------------------- the resume hint

def _states(storage: str, name: str) -> list[TrialState]:
    from bptt_harness.study import open_storage

    try:
        return [t.state for t in optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials()]
    except Exception:  # noqa: BLE001 - the study may not exist yet
        return []


def _interrupt_mid_trial(args: list[str], wait: Path) -> str:
    """Start ``bptt-harness sweep ARGS`` (a study of :func:`waiting_study`), Ctrl-C it while its second trial
    waits for the signal (an event, not a timer), return its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "bptt_harness", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=waiting_env(wait))
    _, err = interrupt_when_waiting(proc, wait)
    assert proc.returncode == 130, err
    return err


def _hint(err: str) -> list[str]:
    """The resume command: the command as invoked (here ``python -m bptt_harness``), then ``sweep ...``."""
    m = re.search(r"Resume with: (.*? sweep .*?)(?: \(|$)", err, re.M)
    assert m, err
    return shlex.split(m.group(1))


def _run_hint(hint: list[str], wait: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Exactly the command the hint gives, from where the sweep ran ("sent" is there: no trial waits)."""
    return subprocess.run(hint, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**waiting_env(wait), **(env or {})})


def test_the_resume_hint_names_the_storage_and_results_folder_and_resumes(tmp_path: Path) -> None:
    name = "hinted"
    study_file = waiting_study(write_study(tmp_path, name, search="bptt = [4, 8, 16]\nbatch_size = [2]"))
    results = tmp_path / "elsewhere"
    journal = f"journal:{tmp_path / 'store' / 'j.log'}"
    wait = tmp_path / "wait"
    err = _interrupt_mid_trial(["sweep", str(study_file), "--results-dir", str(results), "--storage", journal,
                                "--no-report"], wait)
    hint = _hint(err)
    assert hint[1:4] == ["-m", "bptt_harness", "sweep"] and "--results-dir" in hint and "--storage" in hint, hint
    done = _run_hint(hint, wait)  # exactly what it says
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stderr and not (results / name / "study.db").exists()
    assert _states(journal, name).count(TrialState.COMPLETE) == 3


def test_the_resume_hint_of_a_postgresql_study_says_where_the_password_comes_from(tmp_path: Path) -> None:
    require_postgres()
    name = f"hintpg-{uuid.uuid4().hex[:8]}"
    password = PASSWORDS["at-and-colon"]
    url = url_forms(password)["userinfo-readme-form"]
    study_file = waiting_study(write_study(tmp_path, name, search="bptt = [4, 8, 16]\nbatch_size = [2]"))
    results = tmp_path / "med"
    wait = tmp_path / "wait"
    try:
        err = _interrupt_mid_trial(["sweep", str(study_file), "--results-dir", str(results), "--storage", url,
                                    "--no-report"], wait)
        assert_no_marker("stderr", err)
        line = next(ln for ln in err.splitlines() if "Resume with:" in ln)
        assert "BPTT_HARNESS_STORAGE" in line and "***" in line
        hint = _hint(err)
        assert "--results-dir" in hint and "--storage" in hint
        # The plain command, without the storage, must refuse rather than start a new SQLite study.
        meta = (results / name / "study.json").read_bytes()
        plain = run_cli("sweep", str(study_file), "--results-dir", str(results))
        line = one_line_error(plain.returncode, plain.stderr)
        assert "postgresql://postgres:***@127.0.0.1:5432/test" in line and "BPTT_HARNESS_STORAGE" in line
        assert (results / name / "study.json").read_bytes() == meta and not (results / name / "study.db").exists()
        # The hint with the password supplied as it says: the URL in the environment, --storage left out.
        i = hint.index("--storage")
        without = hint[:i] + hint[i + 2:]
        done = _run_hint(without, wait, env={"BPTT_HARNESS_STORAGE": url})
        assert done.returncode == 0, done.stderr
        assert "already done" in done.stderr
        assert _states(url, name).count(TrialState.COMPLETE) == 3
        assert_no_marker("stderr", done.stderr + done.stdout)
        # The report of the folder takes the password from the same place.
        report = run_cli("report", str(results / name), env={"BPTT_HARNESS_STORAGE": url})
        assert report.returncode == 0, report.stderr
        assert_no_marker("report output", report.stdout + report.stderr)
    finally:
        drop_study(name)
    assert_results_clean(tmp_path)


def test_a_rerun_that_would_open_another_storage_is_refused(tmp_path: Path) -> None:
    name = "moved"
    study_file = write_study(tmp_path, name, search="bptt = [4, 8]\nbatch_size = [2]")
    results = tmp_path / "results"
    journal = f"journal:{tmp_path / 'j.log'}"
    first = run_cli("sweep", str(study_file), "--results-dir", str(results), "--storage", journal, "--trials", "1")
    assert first.returncode == 0, first.stderr
    folder = results / name
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = tmp_path / "other.db"
    refused = run_cli("sweep", str(study_file), "--results-dir", str(results), "--storage", f"sqlite:///{other}")
    line = one_line_error(refused.returncode, refused.stderr)
    assert str(tmp_path / "j.log") in line and str(other) in line
    assert not other.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # The recorded storage in another spelling (a relative path) is the same storage, not another one.
    rel = os.path.relpath(tmp_path / "j.log", REPO)
    same = run_cli("sweep", str(study_file), "--results-dir", str(results), "--storage", f"journal:{rel}",
                   "--no-report")
    assert same.returncode == 0, same.stderr
