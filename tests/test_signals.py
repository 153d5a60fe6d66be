"""A Ctrl-C or SIGTERM ends a sweep with exit 130 and the resume hint wherever it lands (issue 24, item 1).

Each case sends the signal from inside the sweep at a point the test controls (no timer): inside a
finalizer that ``gc.collect()`` runs while memory is released (where Python discards an exception), in
a training step, while the result line is printed, and between trials.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from studyfiles import write_study

from bptt_harness import progress as progress_display
from bptt_harness import trainer
from bptt_harness.cli import main
from bptt_harness.interrupt import StopRequest, deferred_signals
from bptt_harness.study import open_storage, progress


class _SignalsWhenCollected:
    """Garbage in a reference cycle whose finalizer sends ``signum`` to this process: the handler then
    runs inside ``gc.collect()``, as a real Ctrl-C does when it arrives during memory release."""

    def __init__(self, signum: int) -> None:
        self.signum, self.cycle = signum, self

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):  # bytecodes after the kill: the handler runs here, inside the finalizer
            pass


def _at_nth_call(n: int, action: Callable[[], None], original: Callable[..., Any]) -> Callable[..., Any]:
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            action()
        return original(*args, **kwargs)

    return wrapped


def _in_gc(signum: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def plant() -> None:
        _SignalsWhenCollected(signum)  # unreachable at once: only gc.collect() finalizes it

    monkeypatch.setattr(gc, "collect", _at_nth_call(3, plant, gc.collect))


def _kill(signum: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), signum)


POINTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "SIGINT in a finalizer during memory release": lambda mp: _in_gc(signal.SIGINT, mp),
    "SIGTERM in a finalizer during memory release": lambda mp: _in_gc(signal.SIGTERM, mp),
    "SIGINT in a training step": lambda mp: mp.setattr(
        trainer.TrialLoop, "step", _at_nth_call(5, _kill(signal.SIGINT), trainer.TrialLoop.step)),
    "SIGTERM while the result line is printed": lambda mp: mp.setattr(
        progress_display.Display, "result", _at_nth_call(1, _kill(signal.SIGTERM), progress_display.Display.result)),
    "SIGINT between trials": lambda mp: mp.setattr(
        progress_display.Display, "start", _at_nth_call(2, _kill(signal.SIGINT), progress_display.Display.start)),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_signal_anywhere_ends_the_sweep_with_130_and_the_rerun_resumes(
        point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, "signalled", search="bptt = [4, 8, 16]\nbatch_size = [4]")
    results = tmp_path / "results"
    args = ["sweep", str(study), "--results-dir", str(results), "--no-report"]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with monkeypatch.context() as mp:
        POINTS[point](mp)
        code = main(args)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "Resume with:" in err and "Exception ignored" not in err and "Traceback" not in err, err
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the process's handlers as they were
    url = f"sqlite:///{results / 'signalled' / 'study.db'}"
    stored = optuna.load_study(study_name="signalled", storage=open_storage(url))
    assert progress(stored).done < 3
    assert TrialState.RUNNING not in [t.state for t in stored.get_trials()]
    assert main(args) == 0
    assert progress(optuna.load_study(study_name="signalled", storage=open_storage(url))).done == 3


def test_stop_request_acts_only_at_a_check() -> None:
    with pytest.raises(KeyboardInterrupt), deferred_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT  # recorded, nothing raised yet
        with pytest.raises(KeyboardInterrupt):
            stop.check()
    quiet = StopRequest()
    quiet.check()  # no signal: nothing happens


def test_a_second_signal_raises_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
