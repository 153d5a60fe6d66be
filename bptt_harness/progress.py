"""A sweep's progress display: time left, from the trials this process saw finish, a line per finished
trial and checkpoint lines inside a long trial.

rich's own ETA is the bar's speed over its last 30 seconds: with trials of 18-67 s it is blank most of
the time. :class:`Eta` counts down from the mean time of the trials finished here instead (before the
first one finishes, from the running trial's checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from bptt_harness.record import TrialRecord
from bptt_harness.stored import progress


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


class Display:
    """One line per finished trial, plus a live bar on a terminal: n/N, current config, ETA, best, counts.
    Trials expected to take ``checkpoint_after_s`` or more also get a line per validation checkpoint."""

    def __init__(self, total: int, quiet: bool = False, checkpoint_after_s: float = 10.0) -> None:
        self.total, self.quiet, self.checkpoint_after_s = total, quiet, checkpoint_after_s
        self.eta = Eta(total)
        self.params: dict[int, str] = {}
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal and not quiet
        self.started = time.monotonic()
        self.done = 0  # the counter shown: one step per line, never back
        self.bar = None
        if self.live:
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                EtaColumn(self.eta), console=self.console, transient=True)
            self.task = self.bar.add_task("starting", total=total)
            self.bar.start()

    def set_done(self, done: int) -> None:
        self.done = done
        self.eta.done = done
        if self.bar:
            self.bar.update(self.task, completed=done)

    def start(self, trial: Any, params: dict) -> None:
        self.eta.start_trial()
        self.params[trial.number] = fmt_params(params)
        if self.bar:
            self.bar.update(self.task, description=f"trial {trial.number}: {fmt_params(params)}")

    def checkpoint(self, trial: Any, point: dict) -> None:
        """Inside a trial: the ETA learns from it; a long trial prints its validation perplexity so far."""
        self.eta.checkpoint((point["index"] + 1) / point["of"])
        params = self.params.get(trial.number, "")
        if self.bar:
            self.bar.update(self.task, description=f"trial {trial.number}: {params}, checkpoint "
                                                   f"{point['index'] + 1}/{point['of']} val ppl {point['ppl']:.4g}")
        per = self.eta.per_trial()
        if not self.quiet and per is not None and per >= self.checkpoint_after_s:
            self.console.print(checkpoint_line(trial.number, params, point))

    def result(self, trial: Any, record: dict, study: Any = None) -> None:
        """A trial's record is stored (it counts as final from then on, see :mod:`bptt_harness.stored`)."""
        p = progress(trial.study if study is None else study)
        if study is None:  # this process's trial: other machines' workers may have finished trials too
            done = max(self.done + 1, p.done)
        else:  # the pool's lines, one per trial its workers finished, however many finished since the last look
            done = self.done + 1
        self.set_done(done)
        self.eta.finish_trial(done)
        if self.quiet:
            return
        rec = TrialRecord.from_dict(record)
        r = rec.result
        ppl = f"val_ppl {r.val_ppl:.2f}" if r.val_ppl else ""
        tps = f"{r.tokens_per_s:,.0f} tok/s" if r.tokens_per_s else ""
        best = p.best.record if p.best else None
        best_s = f"best {best.result.val_ppl:.2f} ({best.config_key})" if best else "best -"
        left = self.eta.seconds_left()
        eta = fmt_s(left) if left is not None else "?"
        counts = " ".join(f"{k} {v}" for k, v in sorted(p.counts.items()))
        error = f" ({rec.error[:80]})" if rec.status != "ok" and rec.error else ""
        self.console.print(f"[{done}/{self.total}] {rec.config_key}: {rec.status}{error} "
                           f"{ppl} {tps} {r.wall_s:.1f}s | {best_s} | {counts} | ETA {eta}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
