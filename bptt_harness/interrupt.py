"""Stopping a sweep on Ctrl-C or SIGTERM without ever losing the signal.

Python runs a signal handler in the main thread between two bytecodes, wherever that is: inside a
finalizer that ``gc.collect()`` runs while a trial's memory is released, a weakref callback, a logging
handler. An exception raised there is printed as ``Exception ignored in ...`` and discarded, and the
sweep would go on as if nothing had been sent. So the handler installed here only records the signal,
and the sweep acts on it at safe points (after every training step, between trials, in the worker
pool's watch loop, when the last trial is over) by raising :class:`KeyboardInterrupt` there, where it
takes the ordinary path: the running trial is marked and run again on resume, and the command exits 130.
A second signal raises at once, so a step that hangs can still be stopped; the first is still acted on
at the next safe point if that raise is lost too.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

__all__ = ["StopRequest", "deferred_signals", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Whether a stop signal arrived (its number), and the check that acts on it at a safe point."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise :class:`KeyboardInterrupt` if a stop signal arrived; call only where raising is safe."""
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(self.signum).name)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record the first signal; raise on a repeated one."""
        if self.signum is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def deferred_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, ``signals`` are recorded in the yielded :class:`StopRequest` instead of raising
    wherever they land; the previous handlers are put back afterwards. Leaving the block normally with a
    signal recorded raises :class:`KeyboardInterrupt` (the block's end is a safe point too)."""
    stop = StopRequest()
    previous = {s: signal.signal(s, stop.handle) for s in signals}
    try:
        yield stop
        stop.check()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
