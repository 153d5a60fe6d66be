"""Smaller truths (issue 24, item 7): the Python API takes a corpus spec, a short password is hidden by
position, budgets are bounded and unambiguous, a factory that exits or trains nothing is caught, and a
pool's workers stop when the sweep that started them is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from studyfiles import write_study
from waiting_model import waiting_env, waiting_study

from bptt_harness.cli import main
from bptt_harness.errors import HarnessError
from bptt_harness.spec import ModelConfig, TrainConfig, TrialSpec
from bptt_harness.trainer import run_trial
from bptt_harness.urls import scrub

REPO = Path(__file__).resolve().parent.parent


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_run_trial_takes_a_corpus_spec_string(one_thread: None) -> None:
    spec = TrialSpec(bptt=4, batch_size=2, model=ModelConfig(emsize=4, nhid=8, layers=1, dropout=0.0),
                     train=TrainConfig(tokens=200, checkpoints=1, eval_bptt=16, optimizer="adamw", lr=0.01))
    result = run_trial(spec, "synthetic:k=3,vocab=6,noise=2,tokens=4000", "cpu")
    assert result.status == "ok", result.error
    with pytest.raises(HarnessError, match="not a corpus"):
        run_trial(spec, [1, 2, 3], "cpu")  # type: ignore[arg-type]


def test_a_short_password_is_hidden_by_position_not_everywhere() -> None:
    url = "postgresql://u:p@127.0.0.1:notaport/test"
    assert scrub("invalid literal for int(): 'notaport'", url) == "invalid literal for int(): 'notaport'"
    assert scrub(f"could not open {url}", url) == "could not open postgresql://u:***@127.0.0.1:notaport/test"


def test_an_endless_token_budget_and_two_budgets_are_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    endless = write_study(tmp_path, "endless", tokens=10**15)
    assert main(["sweep", str(endless), "--results-dir", str(tmp_path / "r")]) == 2
    assert "passes" in _error(capsys)
    both = write_study(tmp_path, "both", train="epochs = 2")
    assert main(["sweep", str(both), "--results-dir", str(tmp_path / "r")]) == 2
    line = _error(capsys)
    assert "tokens" in line and "epochs" in line
    assert not (tmp_path / "r" / "endless").exists() and not (tmp_path / "r" / "both").exists()


EXITING = '''
import sys
import torch
from torch import nn
from waiting_model import WaitingGRU


class Exits(WaitingGRU):
    def forward(self, x, hidden):
        if torch.is_grad_enabled():
            sys.exit(3)
        return super().forward(x, hidden)


class Weightless(nn.Module):
    def forward(self, x, hidden):
        return torch.zeros(x.numel(), 6), hidden

    def init_hidden(self, bs):
        return torch.zeros(1, bs, 1)


def exits(cfg, ntoken):
    return Exits(cfg, ntoken, waits=False)


def weightless(cfg, ntoken):
    return Weightless()
'''


def test_a_factory_that_exits_fails_its_trial_and_one_without_weights_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "user_models.py").write_text(EXITING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    study = write_study(tmp_path, "exits", search="bptt = [4, 8]\nbatch_size = [2]")
    study.write_text(study.read_text().replace("[model]\n", '[model]\nfactory = "user_models:exits"\n'))
    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "r"), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert err.count("failed (SystemExit(3)") == 2, err  # each trial failed; the sweep went on
    study.write_text(study.read_text().replace("user_models:exits", "user_models:weightless"))
    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "r2"), "--no-report"]) == 2
    assert "no trainable parameters" in _error(capsys)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="workers follow their parent through Linux's PR_SET_PDEATHSIG")
def test_the_workers_of_a_killed_sweep_stop(tmp_path: Path) -> None:
    study = waiting_study(write_study(tmp_path, "orphans", search="bptt = [4, 8, 16, 32]\nbatch_size = [2]"))
    wait = tmp_path / "wait"
    workers: list[int] = []
    proc = subprocess.Popen([sys.executable, "-m", "bptt_harness", "sweep", str(study), "--results-dir",
                             str(tmp_path / "r"), "--workers", "2", "--no-report"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=waiting_env(wait, at=1))
    try:
        deadline = time.monotonic() + 300
        while not (wait / "waiting").exists():  # a worker's trial waits: the workers are running trials
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (wait / "sent").write_text("")
        deadline = time.monotonic() + 120  # bounds a failure only: they stop at their next step
        while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
            assert time.monotonic() < deadline, "the workers outlived their sweep"
            time.sleep(0.2)
    finally:
        for w in workers or _children(proc.pid):
            if _state(w) != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
