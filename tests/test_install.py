"""An install that does what the README says (issue 14, item 4): the Makefile's torch build per machine
(read with ``make -n``, nothing installed), and ``bptt-harness doctor``'s check of the torch build against the
driver."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from bptt_harness.cli import main
from bptt_harness.cuda_check import check_cuda_build, check_installed

REPO = Path(__file__).resolve().parents[1]


def install_commands(tmp_path: Path, *overrides: str) -> str:
    """The commands ``make`` would run to create a fresh venv, with the GPU detection overridden."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-n", "-B", f"{venv}/.installed", f"VENV={venv}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


def torch_install(out: str) -> str:
    """The command that installs torch from an index (after the offline attempt)."""
    lines = [ln for ln in out.splitlines() if "pip install" in ln and "torch==" in ln]
    assert len(lines) == 2 and "--no-index --no-deps" in lines[0], out
    return lines[1]


def test_linux_without_a_gpu_gets_the_cpu_build_from_the_pytorch_index(tmp_path: Path) -> None:
    line = torch_install(install_commands(tmp_path, "TORCH_GPU=", "UNAME=Linux"))
    assert '--index-url "https://download.pytorch.org/whl/cpu" "torch==2.13.0+cpu"' in line


def test_the_gpu_build_is_the_same_version_with_a_named_cuda_variant(tmp_path: Path) -> None:
    cpu = torch_install(install_commands(tmp_path, "TORCH_GPU=", "UNAME=Linux"))
    gpu = torch_install(install_commands(tmp_path, "TORCH_GPU=1", "UNAME=Linux"))
    assert '--index-url "https://download.pytorch.org/whl/cu128" "torch==2.13.0+cu128"' in gpu
    version = re.compile(r"torch==([\d.]+)\+")
    assert version.search(cpu)[1] == version.search(gpu)[1]
    older = torch_install(install_commands(tmp_path, "TORCH_GPU=1", "UNAME=Linux", "TORCH_CUDA=cu126"))
    assert '/whl/cu126" "torch==2.13.0+cu126"' in older


def test_the_index_can_be_overridden_or_left_to_pip(tmp_path: Path) -> None:
    mirror = torch_install(install_commands(tmp_path, "TORCH_GPU=", "UNAME=Linux",
                                            "TORCH_INDEX_URL=https://mirror.example/whl/cpu"))
    assert '--index-url "https://mirror.example/whl/cpu" "torch==2.13.0+cpu"' in mirror
    plain = torch_install(install_commands(tmp_path, "TORCH_GPU=", "UNAME=Linux", "TORCH_INDEX_URL="))
    assert "--index-url" not in plain and plain.rstrip().endswith('"torch==2.13.0"')
    mac = torch_install(install_commands(tmp_path, "UNAME=Darwin"))
    assert "--index-url" not in mac and mac.rstrip().endswith('"torch==2.13.0"')  # PyPI's macOS wheel is CPU


def test_the_dashboard_extra_is_declared_and_installed_by_make(tmp_path: Path) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("optuna-dashboard") for req in extras["dashboard"])
    assert 'pip install -q -e ".[dashboard]"' in install_commands(tmp_path, "TORCH_GPU=")


def test_the_logging_tools_are_extras_that_make_installs_tolerating_failure(tmp_path: Path) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [extras[k][0].split(">")[0] for k in ("tensorboard", "mlflow", "wandb")] == ["tensorboard", "mlflow-skinny",
                                                                                       "wandb"]
    out = install_commands(tmp_path, "TORCH_GPU=")
    assert re.search(r'for tool in tensorboard mlflow wandb; do .* pip install -q -e "\.\[\$tool\]" \|\|', out)


@pytest.mark.parametrize("torch_cuda, driver, driver_cuda, ok, words", [
    (None, None, None, True, "CPU build and there is no NVIDIA driver"),
    (None, "550.54", 12040, False, "rm -rf .venv && make venv"),
    ("12.8", None, None, True, "login node"),
    ("12.8", "570.86", 12080, True, "supports CUDA 12.8: ok"),
    ("12.8", "550.54", 12040, True, "minor-version compatibility"),
    ("12.8", "520.61", 11080, False, "TORCH_CUDA=cu118"),
    ("12.8", "450.80", 11000, False, "update the driver, no PyTorch CUDA build supports a driver this old"),
])
def test_doctor_says_whether_the_torch_build_runs_on_the_driver(torch_cuda: str | None, driver: str | None,
                                                                driver_cuda: int | None, ok: bool, words: str) -> None:
    check = check_cuda_build(torch_cuda, driver, driver_cuda)
    assert check.ok is ok and words in check.message and "\n" not in check.message


def test_doctor_prints_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    check = check_installed()
    assert f"torch build  {'ok' if check.ok else 'PROBLEM'}: {check.message}" in out
