"""A study never mixes data it did not measure (issue 24, item 3): the corpus's content hash is recorded
with every trial and a resume on different data is refused; a copied results folder uses its own
study.db; after a torn journal is recovered, Optuna and trials.csv tell one truth about the torn trial."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from studyfiles import write_study
from test_storage_damage import REPO, one_line_error, one_trial_done, run_cli

from bptt_harness.cli import main
from bptt_harness.study import open_storage, progress


def _corpus_file(tmp_path: Path, words: int) -> Path:
    lines = [" ".join(f"w{(i * 7 + j) % words}" for j in range(12)) for i in range(900)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_corpus_edited_between_runs_is_refused_and_its_hash_is_in_every_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _corpus_file(tmp_path, words=7)
    study = write_study(tmp_path, "edited", corpus=str(corpus), search="bptt = [4, 8]\nbatch_size = [4]")
    results = tmp_path / "results"
    args = ["sweep", str(study), "--results-dir", str(results)]
    assert main([*args, "--trials", "1"]) == 0
    (row,) = _rows(results / "edited")
    assert len(row["corpus_hash"]) >= 16
    capsys.readouterr()
    before = (results / "edited" / "trials.csv").read_bytes()

    _corpus_file(tmp_path, words=12)  # the same file, other text
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corpus" in err[0] and row["corpus_hash"][:12] in err[0], err
    assert (results / "edited" / "trials.csv").read_bytes() == before  # nothing ran, nothing rewritten

    _corpus_file(tmp_path, words=7)  # the data it measured: the study resumes
    assert main(args) == 0
    assert {r["corpus_hash"] for r in _rows(results / "edited")} == {row["corpus_hash"]}


def test_a_copied_results_folder_uses_its_own_study_db(tmp_path: Path) -> None:
    study_file, folder = one_trial_done(tmp_path, "copied")
    meta = json.loads((folder / "study.json").read_text())
    assert meta["storage"] == "sqlite:///study.db"  # relative to the results folder: it travels with it
    copy_root = tmp_path / "copy"
    shutil.copytree(folder, copy_root / "copied")
    db = copy_root / "copied" / "study.db"
    data = bytearray(db.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096  # the copy is damaged, the original is not
    db.write_bytes(bytes(data))
    line = one_line_error(run_cli("sweep", str(study_file), "--results-dir", str(copy_root)))
    assert str(db) in line and "damaged" in line
    # The undamaged copy of a folder resumes from its own study, not from the original's.
    shutil.rmtree(copy_root)
    shutil.copytree(folder, copy_root / "copied")
    assert run_cli("sweep", str(study_file), "--results-dir", str(copy_root)).returncode == 0
    own = optuna.load_study(study_name="copied", storage=open_storage(f"sqlite:///{db}"))
    original = optuna.load_study(study_name="copied", storage=open_storage(f"sqlite:///{folder / 'study.db'}"))
    def complete(study: optuna.Study) -> int:
        return sum(t.state == TrialState.COMPLETE for t in study.get_trials())

    assert complete(own) == 3 and complete(original) == 1


def _one_truth(folder: Path, journal: Path) -> None:
    """Every trial Optuna failed is failed (or left out as retried) in trials.csv too."""
    study = optuna.load_study(study_name="torn", storage=open_storage(f"journal:{journal}", read_only=True))
    failed = {t.number for t in study.get_trials() if t.state == TrialState.FAIL}
    rows = {int(r["trial_number"]): r for r in _rows(folder)}
    assert failed, "the torn trial must be failed in Optuna"
    for number in failed:
        assert number not in rows or rows[number]["status"] != "ok", rows.get(number)


def test_after_a_torn_journal_is_recovered_the_torn_trial_is_failed_everywhere_and_run_again(
        tmp_path: Path) -> None:
    journal = tmp_path / "store" / "journal.log"
    study_file, folder = one_trial_done(tmp_path, "torn", "--storage", f"journal:{journal}")
    data = journal.read_bytes()
    journal.write_bytes(data[:-25])  # the completion record of the only trial is cut off
    args = ["sweep", str(study_file), "--results-dir", str(folder.parent), "--storage", f"journal:{journal}",
            "--trials", "1"]
    line = one_line_error(run_cli(*args))
    recovery = line.split("recover with: ", 1)[1].split("; then", 1)[0]
    subprocess.run(["bash", "-c", recovery], check=True, cwd=REPO)
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    _one_truth(folder, journal)
    study = optuna.load_study(study_name="torn", storage=open_storage(f"journal:{journal}", read_only=True))
    (torn,) = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert torn.user_attrs["record"]["status"] == "ok"  # what the cut-off record said
    assert any(t.user_attrs.get("retry_of") == torn.number for t in study.get_trials())  # it runs again
    assert progress(study).done == 1  # the trial that ran now; the torn one does not count
