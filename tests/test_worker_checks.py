"""Workers validate like sweeps, and a pool runs and shows exactly its trials (issue 24, item 6)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from studyfiles import write_study

from bptt_harness.cli import main
from bptt_harness.study import open_storage, progress

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags", [["--threads", "-3"], ["--threads", "0"], ["--host-workers", "-5"],
                                   ["--trials", "0"], ["--trials", "-1"]])
def test_worker_numbers_below_one_are_one_line_errors(flags: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["worker", "--study-name", "x", "--storage", url, *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {flags[0]} {flags[1]}") and ">= 1" in err[0], err
    assert not (tmp_path / "none.db").exists()


def _counters(stderr: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\[(\d+)/\d+\]", stderr, re.M)]


def test_a_pool_runs_exactly_its_trials_and_counts_each_once(tmp_path: Path) -> None:
    study = write_study(tmp_path, "pool", sampler="random", search="bptt = [4, 6, 8, 10, 12, 16]\nbatch_size = [2, 4]")
    results = tmp_path / "results"
    journal = f"journal:{tmp_path / 'journal.log'}"
    args = [sys.executable, "-m", "bptt_harness", "sweep", str(study), "--results-dir", str(results),
            "--workers", "2", "--storage", journal, "--no-report"]
    first = subprocess.run([*args, "--trials", "4"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr
    stored = optuna.load_study(study_name="pool", storage=open_storage(journal))
    assert progress(stored).done == 4
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in stored.get_trials()) == 4
    assert _counters(first.stderr) == [1, 2, 3, 4], first.stderr
    resumed = subprocess.run([*args, "--trials", "5"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert _counters(resumed.stderr) == [5], resumed.stderr  # the trials of the first run are not shown again
