"""Time left in a sweep, from the trials this process saw finish, and checkpoint lines inside a long trial.

rich's own ETA is the bar's speed over its last 30 seconds: with trials of 18-67 s it is blank most of
the time. :class:`Eta` counts down from the mean time of the trials finished here instead (before the
first one finishes, from the running trial's checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.progress import ProgressColumn, Task
from rich.text import Text


@dataclass
class Eta:
    """Seconds left, for ``total`` trials of which some are done; ``clock`` is ``time.monotonic``."""

    total: int
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    finished: int = 0                  # trials that finished in this process
    last_finish: float | None = None
    done: int = 0                      # trials done in the study (any process)
    trial_started: float | None = None
    trial_fraction: float = 0.0        # of the running trial, from its checkpoints

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def start_trial(self) -> None:
        self.trial_started, self.trial_fraction = self.clock(), 0.0

    def checkpoint(self, fraction: float) -> None:
        self.trial_fraction = max(0.0, min(1.0, fraction))

    def finish_trial(self, done: int) -> None:
        self.finished += 1
        self.done = done
        self.last_finish = self.clock()
        self.trial_started, self.trial_fraction = None, 0.0

    def per_trial(self) -> float | None:
        """Mean seconds per trial: over the trials finished here, else from the running trial's checkpoints."""
        if self.finished and self.last_finish is not None:
            return (self.last_finish - self.started) / self.finished
        if self.trial_started is not None and self.trial_fraction > 0:
            return (self.clock() - self.trial_started) / self.trial_fraction
        return None

    def seconds_left(self) -> float | None:
        per = self.per_trial()
        if per is None:
            return None
        # Counted down from the last finish (or, before one, from the running trial's start).
        anchor = self.last_finish if self.last_finish is not None else self.trial_started
        return max(0.0, max(0, self.total - self.done) * per - (self.clock() - (anchor or self.started)))


class EtaColumn(ProgressColumn):
    """The bar's ETA from an :class:`Eta`: counts down between trials instead of going blank."""

    max_refresh = 0.5

    def __init__(self, eta: Eta) -> None:
        super().__init__()
        self.eta = eta

    def render(self, task: Task) -> Text:
        left = self.eta.seconds_left()
        return Text("ETA " + (fmt_s(left) if left is not None else "estimating"), style="progress.remaining")


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def checkpoint_line(number: int, params: str, point: dict) -> str:
    """``  trial 3 (bptt=35 batch_size=5): checkpoint 2/3, 166,667 tokens, 24.1 s, val ppl 150.2``."""
    return (f"  trial {number} ({params}): checkpoint {point['index'] + 1}/{point['of']}, {point['tokens']:,} "
            f"tokens, {point['seconds']:.1f} s, val ppl {point['ppl']:.4g}")
