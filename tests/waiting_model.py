"""A test fixture: a model factory whose trial waits for the test's signal, so a test interrupts a sweep
on an event it controls (never on a timer that a busy machine can outrun).

``waiting_gru`` builds a small GRU. When ``HARNESS_TEST_WAIT_DIR`` is set, the first training step of the
``HARNESS_TEST_WAIT_AT`` th model this process builds (default 3: the pre-check's model, the first trial's,
then the second trial's) writes ``waiting`` in that folder and waits until the test writes ``sent`` there
(after sending its signal); then the step goes on, so the signal is acted on wherever the sweep acts on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bptt_harness.spec import ModelConfig

WAIT_DIR, WAIT_AT = "HARNESS_TEST_WAIT_DIR", "HARNESS_TEST_WAIT_AT"
_built = [0]


class WaitingGRU(nn.Module):
    def __init__(self, cfg: ModelConfig, ntoken: int, waits: bool) -> None:
        super().__init__()
        self.nhid, self.waits = cfg.nhid, waits
        self.emb = nn.Embedding(ntoken, cfg.emsize)
        self.rnn = nn.GRU(cfg.emsize, cfg.nhid)
        self.out = nn.Linear(cfg.nhid, ntoken)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.waits and self.training and torch.is_grad_enabled():  # a training step, not a check
            self.waits = False
            folder = Path(os.environ[WAIT_DIR])
            (folder / "waiting").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not (folder / "sent").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        y, hidden = self.rnn(self.emb(x), hidden)
        return self.out(y).view(-1, self.out.out_features), hidden

    def init_hidden(self, bs: int) -> torch.Tensor:
        return torch.zeros(1, bs, self.nhid, device=self.out.weight.device)


def waiting_gru(cfg: ModelConfig, ntoken: int) -> nn.Module:
    _built[0] += 1
    waits = WAIT_DIR in os.environ and _built[0] == int(os.environ.get(WAIT_AT, "3"))
    return WaitingGRU(cfg, ntoken, waits)


def waiting_study(path: Path) -> Path:
    """The study file at ``path`` with its model built by :func:`waiting_gru`."""
    text = path.read_text()
    path.write_text(text.replace("[model]\n", '[model]\nfactory = "waiting_model:waiting_gru"\n', 1))
    return path


def release_when_waiting(proc: subprocess.Popen[str], folder: Path, action: Callable[[], None],
                         limit_s: float = 300) -> tuple[str, str]:
    """Once ``proc``'s trial waits (see :func:`waiting_gru`), do ``action`` (send a signal, take the database
    away), let the trial go on, and return ``proc``'s (stdout, stderr). ``limit_s`` only bounds a test that
    went wrong."""
    deadline = time.monotonic() + limit_s
    try:
        while not (folder / "waiting").exists():
            if proc.poll() is not None:
                raise AssertionError(f"the sweep ended before its trial waited: {proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("the trial never waited")
            time.sleep(0.05)
        action()
        (folder / "sent").write_text("")
        return proc.communicate(timeout=limit_s)
    finally:
        if proc.poll() is None:
            proc.kill()


def interrupt_when_waiting(proc: subprocess.Popen[str], folder: Path, signum: int = signal.SIGINT) -> tuple[str, str]:
    """:func:`release_when_waiting` with ``signum`` sent to ``proc``."""
    return release_when_waiting(proc, folder, lambda: proc.send_signal(signum))


def waiting_env(folder: Path, at: int = 3) -> dict[str, str]:
    """The environment for a sweep whose ``at``-th built model waits in ``folder``; this folder importable."""
    folder.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, WAIT_DIR: str(folder), WAIT_AT: str(at), "PYTHONPATH": path}
