"""The hint and the help say what works (issue 24, item 5): the resume hint is the command as it was
invoked; what ``trial --from`` and ``compare`` advise, they accept; study-file errors print what to type."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from studyfiles import write_study
from synthetic import synthetic_records, write_optuna_study
from test_leaks import drop_study, require_postgres

from bptt_harness import study_cli
from bptt_harness.cli import main
from bptt_harness.progress import Display
from bptt_harness.study_cli import invoked_as


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def test_the_resume_hint_is_the_command_as_it_was_invoked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, "hint", search="bptt = [4, 8]\nbatch_size = [4]")
    monkeypatch.chdir(tmp_path)
    tool = tmp_path / ".venv" / "bin" / "bptt-harness"  # the README's form: the tool is not on PATH
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(tool), "sweep", str(study)])
    calls = [0]
    start = Display.start

    def second_start(self: Display, trial: optuna.Trial, params: dict) -> None:
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        start(self, trial, params)

    monkeypatch.setattr(Display, "start", second_start)
    assert main(["sweep", str(study), "--no-report"]) == 130
    assert f"Resume with: .venv/bin/bptt-harness sweep {study}" in capsys.readouterr().err


def test_invoked_as_gives_what_the_user_can_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    on_path = tmp_path / "bin" / "bptt-harness"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{on_path.parent}:/usr/bin:/bin")
    assert invoked_as(str(on_path)) == ["bptt-harness"]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert invoked_as(str(on_path)) == ["bin/bptt-harness"]
    package_main = Path(study_cli.__file__).parent / "__main__.py"
    assert invoked_as(str(package_main))[1:] == ["-m", "bptt_harness"]
    assert invoked_as("/usr/lib/python3/site-packages/pytest/__main__.py") == ["bptt-harness"]


def test_trial_from_a_storage_with_several_studies_takes_the_study_name_it_asks_for(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for name in ("alpha", "beta"):
        study = write_study(tmp_path, name, search="bptt = [4]\nbatch_size = [4]")
        assert main(["sweep", str(study), "--results-dir", str(tmp_path / "results"), "--storage", url,
                     "--no-report"]) == 0
    capsys.readouterr()
    args = ["trial", "--from", url, "--config", "bptt=4,batch_size=4", "--json"]
    assert main(args) == 2
    assert "--study-name" in _error(capsys)
    assert main([*args, "--study-name", "beta"]) == 0


def test_a_study_file_range_error_prints_the_table_to_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, "braces", search='bptt = "4,8"\nbatch_size = [4]')
    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "results")]) == 2
    line = _error(capsys)
    assert "{ low = .., high = .." in line and "{{" not in line, line


def test_compare_takes_one_storage_url_per_password_protected_source(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_postgres()
    names = [f"cmp_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    # Two storages that are not the same (their URLs differ), each shown with its password hidden.
    urls = [f"postgresql://postgres:pw{i}secret@127.0.0.1:5432/test?application_name=run{i}" for i in range(2)]
    folders = []
    try:
        for name, url in zip(names, urls):
            records = synthetic_records(bptts=(35, 70), batch_sizes=(20,), repeats=1, study=name)
            write_optuna_study(records, url.replace("postgresql://", "postgresql+psycopg2://"), name)
            folder = tmp_path / name
            folder.mkdir()
            hidden = url.replace(url.split(":")[2].split("@")[0], "***")
            (folder / "study.json").write_text(f'{{"study_name": "{name}", "storage": "{hidden}"}}')
            folders.append(str(folder))
        assert main(["compare", *folders, "--out", str(tmp_path / "out")]) == 2
        assert "--storage" in _error(capsys)
        assert main(["compare", *folders, "--out", str(tmp_path / "out"), "--storage", urls[0],
                     "--storage", urls[1]]) == 0
        out = capsys.readouterr()
        assert "secret" not in out.out + out.err
    finally:
        for name in names:
            drop_study(name)
