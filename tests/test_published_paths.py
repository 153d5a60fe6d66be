"""A published results folder names no path of the machine that wrote it (issue 23): study.json records a storage
inside the folder relative to it, and the folder still reports and resumes wherever it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from studyfiles import write_study

from bptt_harness.cli import main
from bptt_harness.urls import relative_to_folder as relative_to_results

pytestmark = pytest.mark.usefixtures("one_thread")


def test_relative_inside_the_folder_only(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "x"
    assert relative_to_results(f"sqlite:///{folder / 'study.db'}", folder) == "sqlite:///study.db"
    assert relative_to_results(f"journal:{folder / 'j' / 'journal.log'}", folder) == "journal:j/journal.log"
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    assert relative_to_results(elsewhere, folder) == elsewhere
    assert relative_to_results("postgresql://u@h/db", folder) == "postgresql://u@h/db"


def test_study_json_is_relative_and_the_folder_travels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = write_study(tmp_path, tokens=640)
    results = tmp_path / "results"
    assert main(["sweep", str(study), "--results-dir", str(results), "--no-report"]) == 0
    meta = json.loads((results / "tiny" / "study.json").read_text())
    assert meta["storage"] == "sqlite:///study.db"
    # resumed in place: the same study, nothing more to train
    assert main(["sweep", str(study), "--results-dir", str(results), "--no-report"]) == 0
    # copied elsewhere and reported from another folder, with a study.db in the working folder as a decoy
    moved = tmp_path / "published" / "tiny"
    shutil.copytree(results / "tiny", moved)
    shutil.rmtree(results)
    work = tmp_path / "work"
    work.mkdir()
    (work / "study.db").write_bytes(b"not a database")
    monkeypatch.chdir(work)
    assert main(["report", str(moved)]) == 0
    html = (moved / "report.html").read_text()
    assert "study.db in this results folder" in html and str(tmp_path) not in html


def test_a_folder_reported_elsewhere_keeps_its_profile_and_hides_its_path(tmp_path: Path) -> None:
    study = write_study(tmp_path, tokens=640)
    results = tmp_path / "results"
    assert main(["profile", str(study), "--results-dir", str(results), "--steps", "1"]) == 0
    assert main(["sweep", str(study), "--results-dir", str(results), "--no-report"]) == 0
    assert main(["report", str(results / "tiny"), "--out", str(tmp_path / "elsewhere")]) == 0
    html = (tmp_path / "elsewhere" / "report.html").read_text()
    assert "The profile: a few timed steps per cell" in html
    assert "study.db in the results folder tiny (SQLite)" in html and str(tmp_path) not in html
