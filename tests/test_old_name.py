"""The package was renamed from ``harness`` to ``bptt_harness`` (command ``bptt-harness``): result folders
written under the old name still report, and nothing named ``harness`` is importable any more."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "published" / "cpu-intel-r-xeon-r-processor" / "default"


def test_a_result_folder_written_by_the_old_name_still_reports(tmp_path: Path) -> None:
    folder = tmp_path / "default"
    shutil.copytree(PUBLISHED, folder)
    proc = subprocess.run([sys.executable, "-m", "bptt_harness", "report", str(folder)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 14  # the 14 trials the old name stored


def test_the_old_import_name_is_gone() -> None:
    assert importlib.util.find_spec("bptt_harness") is not None
    assert importlib.util.find_spec("harness") is None
    assert shutil.which("harness", path=str(Path(sys.executable).parent)) is None
    assert shutil.which("bptt-harness", path=str(Path(sys.executable).parent)) is not None
