"""Progress that keeps time (issue 14, item 6): an ETA that stays on between trials longer than rich's
30 s speed window, and a line per checkpoint inside long trials."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from rich.progress import Progress, TimeRemainingColumn

from bptt_harness.progress import Display, Eta, EtaColumn


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_eta_counts_down_from_the_mean_trial_time() -> None:
    clock = Clock()
    eta = Eta(total=10, clock=clock)
    assert eta.seconds_left() is None  # nothing to go on yet
    for done in (1, 2):
        eta.start_trial()
        clock.t += 40.0
        eta.finish_trial(done)
    assert eta.seconds_left() == pytest.approx(8 * 40.0)
    clock.t += 25.0
    assert eta.seconds_left() == pytest.approx(8 * 40.0 - 25.0)
    clock.t += 1e6
    assert eta.seconds_left() == 0.0  # a late trial never makes it negative


def test_before_the_first_trial_ends_its_checkpoints_give_the_estimate() -> None:
    clock = Clock()
    eta = Eta(total=4, clock=clock)
    eta.start_trial()
    clock.t += 20.0
    eta.checkpoint(0.5)  # half-way after 20 s: a trial takes about 40 s
    assert eta.per_trial() == pytest.approx(40.0)
    assert eta.seconds_left() == pytest.approx(4 * 40.0 - 20.0)


def test_the_bar_shows_an_eta_where_rich_shows_none() -> None:
    clock = Clock()
    eta = Eta(total=10, clock=clock)
    ours, rich_own = EtaColumn(eta), TimeRemainingColumn()
    with Progress(ours, rich_own, get_time=clock, auto_refresh=False, disable=True) as bar:
        task = bar.add_task("sweep", total=10)
        for done in (1, 2):  # trials of 40 s: longer than rich's 30 s speed window
            eta.start_trial()
            clock.t += 40.0
            bar.update(task, completed=done)
            eta.finish_trial(done)
        clock.t += 10.0
        t = bar.tasks[0]
        assert str(rich_own.render(t)) == "-:--:--"  # the blank this fixes
        assert str(ours.render(t)) == "ETA 5m10s"   # 8 trials x 40 s, 10 s already gone


def _trial_display(after_s: float) -> tuple[Display, Clock, SimpleNamespace]:
    display = Display(5, checkpoint_after_s=after_s)
    clock = Clock()
    display.eta.clock = clock
    trial = SimpleNamespace(number=3)
    display.start(trial, {"bptt": 35, "batch_size": 5})
    return display, clock, trial


def test_a_long_trial_prints_its_checkpoints(capsys: pytest.CaptureFixture[str]) -> None:
    display, clock, trial = _trial_display(after_s=10.0)
    clock.t += 12.0
    display.checkpoint(trial, {"index": 0, "of": 3, "tokens": 83_334, "seconds": 11.5, "ppl": 150.234})
    err = capsys.readouterr().err
    assert "trial 3 (bptt=35 batch_size=5): checkpoint 1/3, 83,334 tokens, 11.5 s, val ppl 150.2" in err
    assert display.eta.per_trial() == pytest.approx(36.0)


def test_a_short_trial_prints_no_checkpoint_lines(capsys: pytest.CaptureFixture[str]) -> None:
    display, clock, trial = _trial_display(after_s=10.0)
    clock.t += 1.0
    display.checkpoint(trial, {"index": 0, "of": 3, "tokens": 100, "seconds": 0.9, "ppl": 9.0})
    assert capsys.readouterr().err == ""
