"""Studies end to end: storage, statuses, infeasible trials, repeats, resume after kill, interrupts, workers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from studyfiles import write_study
from waiting_model import interrupt_when_waiting, waiting_env, waiting_study

from bptt_harness.cli import main
from bptt_harness.study import open_storage, progress

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "studies"
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"



def load(storage_url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage_url))


def sqlite_url(results: Path, name: str) -> str:
    return f"sqlite:///{results / name / 'study.db'}"


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bptt_harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def records(study: optuna.Study) -> list[dict]:
    return [t.user_attrs["record"] for t in study.get_trials() if "record" in t.user_attrs]


def test_smoke_study_end_to_end(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results"
    assert main(["sweep", str(STUDIES / "smoke.toml"), "--results-dir", str(results), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "[4/4]" in err and "best" in err and "ETA" in err
    study = load(sqlite_url(results, "smoke"), "smoke")
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {(t.params["bptt"], t.params["batch_size"]) for t in trials} == {(4, 8), (4, 16), (12, 8), (12, 16)}
    for t in trials:
        rec = t.user_attrs["record"]
        assert rec["status"] == "ok" and t.user_attrs["constraint"] == [0.0]
        r = rec["result"]
        assert 1.0 < r["val_ppl"] < 30 and r["tokens_per_s"] > 0 and r["steps"] >= 1
        assert len(r["val_curve"]) == 2 and r["train_curve"]
        assert r["probe"]["probe_kind"] == "cpu" and r["probe"]["peak_mem_mib"] > 0
        assert rec["hardware"]["machine_id"] and rec["study"]["name"] == "smoke"
        assert rec["config"]["bptt"] == t.params["bptt"] and rec["config_key"].startswith("bptt=")
        assert t.values == [r["val_ppl"], r["seconds_per_ktok"]]  # named objectives, in trials.csv units
    meta = (results / "smoke" / "study.json").read_text()
    assert '"study_name": "smoke"' in meta
    # A second run finds the study finished and trains nothing more.
    assert main(["sweep", str(STUDIES / "smoke.toml"), "--results-dir", str(results), "--no-report"]) == 0
    assert len(load(sqlite_url(results, "smoke"), "smoke").get_trials()) == 4


def test_oom_and_diverged_are_recorded_as_infeasible(tmp_path: Path) -> None:
    # bs 512 needs far more than the 1 MiB budget; lr 5000 makes AdamW blow the loss up.
    study_file = write_study(tmp_path, "walls", top="max_memory_gib = 0.001",
                             search="bptt = [8]\nbatch_size = [2, 512]\nlr = [0.003, 5000.0]",
                             corpus_tokens=60000, tokens=3000)
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    study = load(sqlite_url(results, "walls"), "walls")
    by_cfg = {(t.params["batch_size"], t.params["lr"]): t for t in study.get_trials()}
    assert len(by_cfg) == 4
    ok = by_cfg[(2, 0.003)]
    assert ok.user_attrs["record"]["status"] == "ok" and ok.user_attrs["constraint"] == [0.0]
    diverged = by_cfg[(2, 5000.0)]
    assert diverged.user_attrs["record"]["status"] == "diverged"
    assert diverged.user_attrs["record"]["result"]["diverged_step"] >= 1
    for cfg in ((512, 0.003), (512, 5000.0)):
        assert by_cfg[cfg].user_attrs["record"]["status"] == "oom"
    for t in (diverged, by_cfg[(512, 0.003)]):
        assert t.state == TrialState.COMPLETE and t.user_attrs["constraint"] == [1.0] and math.isinf(t.value)


def test_repeats_share_a_configuration_with_different_seeds(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "rep", train="repeats = 3", search="bptt = [4]\nbatch_size = [4]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    recs = records(load(sqlite_url(results, "rep"), "rep"))
    assert sorted(r["config"]["repeat"] for r in recs) == [0, 1, 2]
    assert sorted(r["config"]["seed"] for r in recs) == [0, 1, 2]
    assert len({r["config_key"] for r in recs}) == 1
    assert len({r["result"]["val_ppl"] for r in recs}) == 3  # different seeds, different models


def test_canonical_configuration_runs_first(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "canon", sampler="random", top="trials = 1",
                             search="bptt = [20, 35]\nbatch_size = [20, 40]", corpus_tokens=60000, tokens=1000)
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    (only,) = load(sqlite_url(results, "canon"), "canon").get_trials()
    assert only.params == {"bptt": 35, "batch_size": 20}


def test_unexpected_exception_and_timeout_do_not_stop_the_sweep(tmp_path: Path, monkeypatch) -> None:
    import bptt_harness.trainer as trainer

    real = trainer.TrialLoop.run

    def faulty(loop: trainer.TrialLoop) -> None:
        if loop.spec.bptt == 4:
            raise ValueError("injected fault")
        if loop.spec.bptt == 6:
            time.sleep(120)  # hangs: the trial's SIGALRM deadline must end it
        return real(loop)

    monkeypatch.setattr(trainer.TrialLoop, "run", faulty)
    # 2 s: a tiny trial takes a fraction of that; the hung one is ended by its deadline, not by 120 s.
    study_file = write_study(tmp_path, "faults", train="timeout_s = 2", search="bptt = [4, 6, 8]\nbatch_size = [4]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    study = load(sqlite_url(results, "faults"), "faults")
    status = {t.params["bptt"]: (t.state, t.user_attrs["record"]) for t in study.get_trials()}
    assert status[4][0] == TrialState.FAIL and status[4][1]["status"] == "failed"
    assert "injected fault" in status[4][1]["error"]
    assert status[6][0] == TrialState.FAIL and status[6][1]["status"] == "timeout"
    assert status[8][0] == TrialState.COMPLETE and status[8][1]["status"] == "ok"
    assert progress(study).done == 3  # failed and timed-out trials count: they are results, not retried


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _states(url: str, name: str) -> list[TrialState]:
    try:
        return [t.state for t in load(url, name).get_trials()]
    except Exception:  # the study may not exist yet
        return []


def _slow_study(tmp_path: Path, name: str) -> Path:
    # Each trial takes a few seconds, so a signal lands mid-trial.
    return write_study(tmp_path, name, search="bptt = [4, 8, 16]\nbatch_size = [2]", tokens=30000,
                       corpus_tokens=40000)


def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    study_file = _slow_study(tmp_path, "killed")
    results = tmp_path / "results"
    url = sqlite_url(results, "killed")
    args = ["sweep", str(study_file), "--results-dir", str(results), "--no-report"]
    proc = subprocess.Popen([sys.executable, "-m", "bptt_harness", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _states(url, "killed").count(TrialState.COMPLETE) >= 1
                  and TrialState.RUNNING in _states(url, "killed"), 180, "one finished and one running trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: t.params for t in load(url, "killed").get_trials() if t.state == TrialState.COMPLETE}
    assert TrialState.RUNNING in _states(url, "killed")

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    study = load(url, "killed")
    trials = study.get_trials()
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert progress(study).done == 3
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert {t.number: t.params for t in complete if t.number in before} == before  # nothing lost
    assert sorted(t.params["bptt"] for t in complete) == [4, 8, 16]  # each configuration once
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert "record" not in dead.user_attrs
    assert any(t.user_attrs.get("retry_of") == dead.number for t in complete)


def test_sigint_marks_the_trial_and_exits_130(tmp_path: Path) -> None:
    # The second trial waits for the signal (an event this test controls, not a timer), so there is a
    # finished trial to report and a running one to mark, however busy the machine is.
    study_file = waiting_study(write_study(tmp_path, "interrupted", search="bptt = [4, 8, 16]\nbatch_size = [2]"))
    results = tmp_path / "results"
    url = sqlite_url(results, "interrupted")
    args = ["sweep", str(study_file), "--results-dir", str(results)]
    proc = subprocess.Popen([sys.executable, "-m", "bptt_harness", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=waiting_env(tmp_path / "wait"))
    _, err = interrupt_when_waiting(proc, tmp_path / "wait")
    assert proc.returncode == 130
    assert "Resume with: " in err and " -m bptt_harness sweep " in err and "Traceback" not in err
    # The report covers what finished before the interrupt.
    assert (results / "interrupted" / "report.html").is_file()
    assert "bptt" in (results / "interrupted" / "trials.csv").read_text()
    trials = load(url, "interrupted").get_trials()
    assert TrialState.RUNNING not in [t.state for t in trials]
    (marked,) = [t for t in trials if t.user_attrs.get("interrupted")]
    assert marked.state == TrialState.FAIL and "interrupted" in marked.user_attrs["record"]["error"]

    done = run_cli(*args, env=waiting_env(tmp_path / "wait"))  # "sent" is there: no trial waits now
    assert done.returncode == 0, done.stderr
    study = load(url, "interrupted")
    assert progress(study).done == 3
    assert sorted(t.params["bptt"] for t in study.get_trials() if t.state == TrialState.COMPLETE) == [4, 8, 16]


def _check_two_workers(study: optuna.Study, n: int) -> None:
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= n and progress(study).done >= n
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert TrialState.RUNNING not in [t.state for t in trials]
    workers = {t.user_attrs["record"]["worker"] for t in complete}
    assert len(workers) == 2, workers  # both processes did work


def test_two_workers_share_a_journal_file(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "journal2", search="bptt = [4, 8, 12, 16]\nbatch_size = [2]", tokens=8000,
                             corpus_tokens=40000)
    results = tmp_path / "results"
    done = run_cli("sweep", str(study_file), "--results-dir", str(results), "--workers", "2", "--no-report")
    assert done.returncode == 0, done.stderr
    url = f"journal:{(results / 'journal2' / 'journal.log').resolve()}"
    _check_two_workers(load(url, "journal2"), 4)
    assert "[4/4]" in done.stderr


def _postgres_reachable() -> str | None:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres", connect_timeout=3).close()
        return None
    except Exception as e:  # noqa: BLE001
        return f"PostgreSQL on 127.0.0.1:5432 is not reachable: {str(e).strip().splitlines()[0]}"


def test_two_workers_share_postgresql(tmp_path: Path) -> None:
    reason = _postgres_reachable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must run this test)")
        pytest.skip(reason)
    name = f"pg-{uuid.uuid4().hex[:10]}"
    study_file = write_study(tmp_path, name, search="bptt = [4, 8, 12, 16]\nbatch_size = [2]", tokens=8000,
                             corpus_tokens=40000)
    done = run_cli("sweep", str(study_file), "--results-dir", str(tmp_path / "results"), "--workers", "2",
                   "--storage", PG_URL, "--no-report")
    assert done.returncode == 0, done.stderr
    study = load(PG_URL, name)
    try:
        _check_two_workers(study, 4)
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)


def test_worker_joins_an_existing_study(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "joined", search="bptt = [4, 8]\nbatch_size = [2, 4]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--trials", "2", "--no-report"]) == 0
    url = sqlite_url(results, "joined")
    assert main(["worker", "--study-name", "joined", "--storage", url, "--trials", "4", "--quiet"]) == 0
    assert progress(load(url, "joined")).done == 4


def test_worker_names_the_studies_a_storage_holds(tmp_path: Path, capsys) -> None:
    study_file = write_study(tmp_path, "known", search="bptt = [4]\nbatch_size = [2]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    capsys.readouterr()
    assert main(["worker", "--study-name", "unknown", "--storage", sqlite_url(results, "known")]) == 2
    err = capsys.readouterr().err
    assert "study 'unknown' is not in storage" in err and "known" in err and err.count("\n") == 1


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_corrupted_sqlite_is_named_and_left_alone(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "corrupt")
    results = tmp_path / "results"
    db = results / "corrupt" / "study.db"
    db.parent.mkdir(parents=True)
    garbage = os.urandom(4096)
    db.write_bytes(garbage)
    line = _one_line_error(run_cli("sweep", str(study_file), "--results-dir", str(results)))
    assert str(db) in line and "not an SQLite database" in line
    assert db.read_bytes() == garbage


def test_truncated_sqlite_is_named_and_left_alone(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "trunc", search="bptt = [4]\nbatch_size = [2]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    db = results / "trunc" / "study.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    cut = db.read_bytes()
    line = _one_line_error(run_cli("sweep", str(study_file), "--results-dir", str(results)))
    assert "storage sqlite:///" in line
    assert db.read_bytes() == cut


def test_unreachable_postgresql_is_one_line_without_the_password(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "nopg")
    url = "postgresql+psycopg2://alice:hunter2secret@127.0.0.1:1/test"
    result = run_cli("sweep", str(study_file), "--results-dir", str(tmp_path / "results"), "--storage", url)
    line = _one_line_error(result)
    assert "alice:***@127.0.0.1:1" in line
    assert "hunter2secret" not in result.stderr + result.stdout
    assert not (tmp_path / "results" / "nopg" / "study.json").exists()


def test_sqlite_refuses_several_workers(tmp_path: Path, capsys) -> None:
    study_file = write_study(tmp_path, "lite")
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["sweep", str(study_file), "--workers", "2", "--storage", url,
                 "--results-dir", str(tmp_path / "r")]) == 2
    assert "does not take several workers" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_resuming_with_a_changed_budget_is_refused(tmp_path: Path, capsys) -> None:
    study_file = write_study(tmp_path, "drift", search="bptt = [4]\nbatch_size = [2]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    db = results / "drift" / "study.db"
    before = db.read_bytes()
    study_file.write_text(study_file.read_text().replace("tokens = 2000", "tokens = 3000"))
    capsys.readouterr()
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "different study file (changed: train.tokens)" in err and err.count("\n") == 1
    assert db.read_bytes() == before


def test_an_extended_grid_is_picked_up_on_resume(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, "grow", search="bptt = [4]\nbatch_size = [2]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    study_file.write_text(study_file.read_text().replace("bptt = [4]", "bptt = [4, 8]"))
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    trials = load(sqlite_url(results, "grow"), "grow").get_trials()
    assert sorted(t.params["bptt"] for t in trials) == [4, 8]


def test_a_worker_that_finds_the_grid_queue_empty_trains_nothing(tmp_path: Path) -> None:
    """Another worker took the last queued point between our check and Optuna's ask: the extra trial is
    marked spurious, trains nothing, and neither progress nor the report counts it."""
    from bptt_harness.config import load_study
    from bptt_harness.report import generate
    from bptt_harness.study import Objective, prepare

    study_file = write_study(tmp_path, "race", search="bptt = [4]\nbatch_size = [2]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    config = load_study(study_file, results_root=results)
    study, corpus, device = prepare(config, sqlite_url(results, "race"), "cpu")
    study.optimize(Objective(config, corpus, device, {}), n_trials=1)  # the queue is empty now
    extra = study.get_trials()[-1]
    assert extra.state == TrialState.PRUNED and "queue was empty" in extra.user_attrs["spurious"]
    assert "record" not in extra.user_attrs and progress(study).done == 1
    assert len(generate(results / "race").csv.read_text().strip().splitlines()) == 2  # header + 1 trial


def test_a_retry_queued_twice_runs_once(tmp_path: Path) -> None:
    from bptt_harness.study import retry_trial

    study_file = write_study(tmp_path, "twice", search="bptt = [4, 8]\nbatch_size = [2]")
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--trials", "1", "--no-report"]) == 0
    url = sqlite_url(results, "twice")
    study = load(url, "twice")
    dead = study.ask()  # takes the queued grid point, as a worker would, then dies
    study.tell(dead, state=TrialState.FAIL)
    (frozen,) = [t for t in study.get_trials() if t.number == dead.number]
    retry_trial(study, frozen)
    retry_trial(study, frozen)  # a second reaper racing the first
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    study = load(url, "twice")
    runs = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == frozen.number]
    assert len(runs) == 2 and sum("record" in t.user_attrs for t in runs) == 1
    # The duplicate never measures: still queued (the study is complete) or skipped as spurious.
    (dup,) = [t for t in runs if "record" not in t.user_attrs]
    assert dup.state == TrialState.WAITING or dup.user_attrs.get("spurious")
    assert progress(study).done == 2
    from bptt_harness.config import load_study
    from bptt_harness.study import Objective, prepare

    worker = load(url, "twice")
    config = load_study(study_file, results_root=results)
    _, corpus, device = prepare(config, url, "cpu")
    worker.optimize(Objective(config, corpus, device, {}), n_trials=1)  # pops the duplicate
    dup = [t for t in worker.get_trials() if t.number == dup.number][0]
    assert "already queued for retry" in dup.user_attrs["spurious"] and "record" not in dup.user_attrs
