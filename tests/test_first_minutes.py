"""The first five minutes of a new user (issue 23): a fast path first, `make sweep` with its profile, an example
that runs in seconds, study files and output columns described as they are."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from bptt_harness.cli import main
from bptt_harness.config import load_study
from bptt_harness.profile import Profile, write_profile
from bptt_harness.profile_csv import PROFILE_COLUMNS, PROFILE_DOCS, PROFILE_FINGERPRINT, profile_columns_markdown

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_make_sweep_profiles_the_study_once_then_sweeps_it() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "sweep", "STAMP=", "STUDY=studies/smoke.toml"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    runs = [ln for ln in out if "bptt-harness" in ln]
    assert runs == [".venv/bin/bptt-harness profile studies/smoke.toml --if-missing",
                    ".venv/bin/bptt-harness sweep studies/smoke.toml"]


def test_profile_if_missing_keeps_an_existing_map(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study = tmp_path / "smoke.toml"
    study.write_text((REPO / "studies" / "smoke.toml").read_text())
    existing = tmp_path / "results" / "smoke" / "profile.csv"
    existing.parent.mkdir(parents=True)
    existing.write_text("kept\n")
    assert main(["profile", str(study), "--results-dir", str(tmp_path / "results"), "--if-missing"]) == 0
    assert existing.read_text() == "kept\n" and "exists; kept" in capsys.readouterr().err


def test_the_fast_path_comes_before_the_long_ones() -> None:
    install = README[README.index("## Install and run"):README.index("## Read the report")]
    smoke, sweep, tests = (install.index(s) for s in ("bptt-harness sweep studies/smoke.toml", "make sweep", "make test"))
    assert smoke < sweep < tests
    assert "pip install -e ." in install and "already" in install   # into an environment with torch already there


@pytest.mark.usefixtures("one_thread")
def test_the_readme_python_example_trains_a_small_model() -> None:
    block = re.search(r"```python\n(.*?)```", README, flags=re.S)[1]
    assert "run_trial" in block
    first = block[:block.index("paths = ")]   # the part that trains one configuration (the study is the smoke test's)
    scope: dict = {}
    exec(compile(first, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.status == "ok" and result.train_tokens == 20_000 and result.n_params < 20_000


def test_smoke_study_says_what_it_trains() -> None:
    config = load_study(REPO / "studies" / "smoke.toml")
    text = (REPO / "studies" / "smoke.toml").read_text()
    assert config.model.type.upper() in config.description
    others = {"LSTM", "GRU", "TRANSFORMER"} - {config.model.type.upper()}
    assert not any(o in text.upper() for o in others)
    assert f"{config.model.layers} x {config.model.nhid}" in config.description
    assert tomllib.loads(text)["search"] == {"bptt": [4, 12], "batch_size": [8, 16]} and "2x2 grid" in config.description


def test_profile_csv_columns_are_documented_from_one_declaration(tmp_path: Path) -> None:
    path = write_profile(Profile(rows=[], walls={}), tmp_path, {"cpu_model": "x"})
    header = path.read_text().splitlines()[0].split(",")
    assert header == [*PROFILE_COLUMNS, *PROFILE_FINGERPRINT] and set(PROFILE_DOCS) == set(header)
    doc = (REPO / "bptt_harness" / "report" / "README.md").read_text()
    assert profile_columns_markdown() in doc, "run `python scripts/readme_tables.py`"
