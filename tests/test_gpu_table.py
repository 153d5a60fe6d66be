"""benchmarks/gpu_table.py (make gpu-table) over package features: a tiny CPU rehearsal end to end.

The script is run as a user runs it (its own process); what it is made of (bptt-harness profile, the sweep's
--max-seconds plan, the report) is tested in the package's own tests.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_table.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-table") / "out"
    return out, run("--allow-cpu", "--tiny", "--out", str(out), "--max-seconds", "120")


def test_the_rehearsal_publishes_profile_trials_report_and_fingerprint(rehearsal) -> None:
    out, done = rehearsal
    assert done.returncode == 0, done.stderr[-2000:]
    dest = out / "gpu-table-tiny"
    for name in ("profile.csv", "trials.csv", "configs.csv", "report.html", "study.db", "fingerprint.json"):
        assert (dest / name).is_file(), name
    assert not (out / "_work").exists()  # nothing half-done left beside the published files
    trials = list(csv.DictReader(open(dest / "trials.csv")))
    assert len(trials) == 4 and {r["status"] for r in trials} <= {"ok", "oom"}
    assert len({r["train_tokens"] for r in trials if r["status"] == "ok"}) == 1  # one planned budget
    assert json.loads((dest / "fingerprint.json").read_text())["machine_id"] == trials[0]["machine_id"]


def test_the_rehearsal_maps_the_memory_wall_per_bptt(rehearsal) -> None:
    out, _ = rehearsal
    profile = list(csv.DictReader(open(out / "gpu-table-tiny" / "profile.csv")))
    for bptt in ("4", "12"):
        wall = [r for r in profile if r["bptt"] == bptt and r["phase"] == "wall"]
        assert any(r["status"] == "oom" for r in wall) and any(r["status"] == "ok" for r in wall), bptt


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_refuses_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    done = run("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "no CUDA GPU is visible" in done.stderr
    assert not (tmp_path / "out").exists()
