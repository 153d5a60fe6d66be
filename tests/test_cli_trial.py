"""``bptt-harness trial``: one JSON object with --json, a readable summary without, one-line errors (issue 3)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bptt_harness.cli import main

REPO = Path(__file__).resolve().parents[1]
CORPUS = "synthetic:k=4,vocab=8,noise=4,tokens=5000"
# A tiny, fast trial; the probe is left out (it has its own tests).
TRIAL = ["trial", "--corpus", CORPUS, "--bptt", "8", "--batch-size", "4", "--emsize", "8", "--nhid", "8",
         "--layers", "1", "--dropout", "0", "--optimizer", "adamw", "--lr", "0.01", "--tokens", "2000",
         "--checkpoints", "2", "--device", "cpu", "--no-probe"]


def test_trial_json_prints_one_object_with_the_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TRIAL, "--json"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1  # one line, one object
    result = json.loads(out)
    assert result["status"] == "ok" and result["error"] is None
    assert (result["bptt"], result["batch_size"], result["device"]) == (8, 4, "cpu")
    assert result["steps"] == math.ceil(2000 / (8 * 4)) and result["train_tokens"] == 2000
    assert 1 < result["val_ppl"] < 22 and result["tokens_per_s"] > 0
    assert len(result["val_curve"]) == 2
    # --no-probe: no telemetry measured or invented; the trainer's own count of a CPU step's bytes remains.
    assert all(v is None for k, v in result["probe"].items() if k != "peak_mem_mib")
    assert result["probe"]["peak_mem_mib"] > 0
    assert err == ""  # no progress lines in JSON mode


def test_trial_without_json_prints_a_readable_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(TRIAL) == 0
    out, err = capsys.readouterr()
    rows = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert rows["status"] == "ok" and rows["steps"] == "63"
    assert float(rows["val_ppl"]) > 1 and float(rows["tokens_per_s"]) > 0
    assert "train_curve" not in rows and "val_curve" not in rows
    assert "trial: lstm 1x8 on synthetic-k4" in err
    assert "checkpoint 1/2" in err and "checkpoint 2/2" in err


def test_a_trial_that_diverges_prints_its_result_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TRIAL, "--optimizer", "sgd", "--lr", "10000", "--tokens", "20000", "--json"]
    assert main(args) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "diverged" and result["diverged_step"] >= 1


@pytest.mark.parametrize("flag, value, message", [
    ("--bptt", "0", "bptt=0 must be an integer >= 1"),
    ("--batch-size", "-2", "batch_size=-2 must be an integer >= 1"),
    ("--lr", "0", "train lr=0.0 is invalid"),
    ("--nhid", "0", "model nhid=0 must be an integer >= 1"),
    ("--corpus", "/no/such/corpus.txt", "does not exist"),
    ("--corpus", "synthetic:k=1", "need k >= 2"),
])
def test_bad_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], corpus_cache: Path, flag: str,
                                          value: str, message: str) -> None:
    assert main([*TRIAL, flag, value]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not corpus_cache.exists()


def test_cuda_without_a_gpu_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    assert main([*TRIAL, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no CUDA GPU" in err


def test_unparseable_argument_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*TRIAL, "--bptt", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--bptt" in err


def test_installed_entry_point_prints_only_json_on_stdout(corpus_cache: Path) -> None:
    env = {**os.environ, "BPTT_HARNESS_CACHE": str(corpus_cache)}
    proc = subprocess.run([sys.executable, "-m", "bptt_harness", *TRIAL, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "ok"
    assert "Traceback" not in proc.stderr
