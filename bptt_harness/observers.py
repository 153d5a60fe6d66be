"""What watches a trial: the :class:`TrialObserver` protocol and the built-in observers.

The trial loop (:class:`bptt_harness.trainer.TrialLoop`) trains; observers measure. The loop calls every
observer at fixed points (the model is built, around the training part, around each step, after each
step, after each validation checkpoint, once training reached its budget, and when the trial is over),
and an observer never changes how the trial trains. Work an observer does on the model (a validation, a
diagnostic) goes inside ``loop.measuring(name)``: the training clock is paused and the probe books its
time and energy under phase ``name``, apart from training's.

A new per-trial measurement is one observer passed to ``run_trial(observers=[...])`` that writes its
record fields in :meth:`TrialObserver.fill`. The built-in ones are observers too: the probe's phases
(:class:`ProbePhases`), the time grid (:class:`TimeGrid`) and the CPU memory counter
(:class:`CpuMemoryCounter`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bptt_harness.interrupt import StopRequest
from bptt_harness.record import ProbeReport, TrialResult

if TYPE_CHECKING:   # the loop imports this module; observers only receive it
    from bptt_harness.trainer import TrialLoop

__all__ = ["TrialObserver", "ProbePhases", "TimeGrid", "CpuMemoryCounter", "StopCheck", "state_elements", "oom_error_type"]


class TrialObserver(Protocol):
    """Something that watches a trial. Subclass it and override what you need (every method does nothing by
    default), or write a class with these methods.

    ``loop`` is the running :class:`bptt_harness.trainer.TrialLoop`: ``loop.model``, ``loop.spec``,
    ``loop.corpus``, ``loop.family``, ``loop.steps``, ``loop.tokens``, ``loop.seconds()``,
    ``loop.evaluate()`` and ``loop.measuring(name)``. Do not keep it after the call (it holds the model,
    whose memory the next trial needs), and never read a tensor back to the host in the per-step methods
    (``around_step``, ``on_step``): the step loop has no host synchronisation.
    """

    def on_start(self, loop: TrialLoop) -> None:
        """The model and its optimiser are built; nothing has trained yet."""
        return None

    def training(self, loop: TrialLoop) -> contextlib.AbstractContextManager[Any] | None:
        """A context around the training part of the trial (the probe's window), or None."""
        return None

    def around_step(self, loop: TrialLoop, seq_len: int) -> contextlib.AbstractContextManager[Any] | None:
        """A context around one step's forward pass and loss (a window of ``seq_len`` rows), or None."""
        return None

    def phase(self, name: str) -> contextlib.AbstractContextManager[Any] | None:
        """A context around work that is not training, named ``name`` (``"eval"`` for validation; a
        diagnostic names its own), or None."""
        return None

    def on_step(self, loop: TrialLoop) -> None:
        """After every optimiser step (and after the checkpoint validation that step triggered, if any)."""
        return None

    def on_validate(self, loop: TrialLoop, point: dict) -> None:
        """After each checkpoint validation; ``point``: step, tokens, seconds, loss, ppl."""
        return None

    def after_training(self, loop: TrialLoop) -> None:
        """Training spent its budget: the final model, still inside the probe's window (measure inside
        ``loop.measuring(name)``), before the test split is evaluated. Not called for a trial that ended
        otherwise (diverged, out of memory, pruned, timed out, failed)."""
        return None

    def fill(self, result: TrialResult) -> None:
        """The trial is over, whatever its status: write what was measured into ``result``."""
        return None


class StopCheck(TrialObserver):
    """Acts on a recorded Ctrl-C or SIGTERM (:mod:`bptt_harness.interrupt`) after every step: a safe point,
    where the :class:`KeyboardInterrupt` it raises ends the trial as interrupted, unlike inside a finalizer."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def on_step(self, loop: TrialLoop) -> None:
        self.stop.check()


# --------------------------------------------------------------------------- the probe's phases

class ProbePhases(TrialObserver):
    """The probe (:class:`bptt_harness.probe.Probe`, or anything with ``__enter__``/``__exit__``, and
    optionally ``phase(name)``, ``mark_trial_start()`` and ``report()``) around the training part; what the
    loop measures apart is booked under its own phase, so training's costs leave it out."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        mark = getattr(probe, "mark_trial_start", None)
        if mark is not None:   # created before the trial builds anything: its memory is counted from here
            mark()

    def training(self, loop: TrialLoop) -> contextlib.AbstractContextManager[Any]:
        return self.probe

    def phase(self, name: str) -> contextlib.AbstractContextManager[Any] | None:
        phase = getattr(self.probe, "phase", None)
        return phase(name) if phase is not None else None

    def fill(self, result: TrialResult) -> None:
        report = getattr(self.probe, "report", None)
        if report is not None:
            measured = report()
            result.probe = measured if isinstance(measured, ProbeReport) else ProbeReport(**measured)


# --------------------------------------------------------------------------- the time grid

class TimeGrid(TrialObserver):
    """A validation point near every multiple of ``grid_s`` training seconds (``[train] time_grid_s``), the
    same grid for every configuration, so that an equal-time comparison reads measurements instead of
    interpolating. It reads validation loss and nothing else: no annealing, divergence check or pruning.
    No point past ``until_s`` (the study's ``RunOptions.time_grid_until_s``)."""

    def __init__(self, grid_s: float, until_s: float | None = None) -> None:
        self.grid_s, self.until_s = grid_s, until_s
        self.next_point = 1
        self.last_end = 0.0   # training seconds at the end of the previous step
        self.curve: list[dict] = []

    def due(self, seconds: float, step_s: float) -> float | None:
        """The grid time to take a point for at a step that ended at ``seconds`` after ``step_s`` seconds,
        or None. A grid time is due at the step end nearest to it: the next step (assumed as long as this
        one) would end further past it than this one ends short of it. A step longer than the grid
        crosses several grid times; the point goes to the nearest, and the others get none."""
        last = math.floor((seconds + step_s / 2) / self.grid_s)
        if last < self.next_point:
            return None
        nearest = min(max(round(seconds / self.grid_s), self.next_point), last)
        self.next_point = last + 1
        if self.until_s is not None and nearest * self.grid_s > self.until_s + 1e-9:
            return None
        return round(nearest * self.grid_s, 9)

    def on_step(self, loop: TrialLoop) -> None:
        now = loop.seconds()
        grid_s = self.due(now, now - self.last_end)
        if grid_s is not None:
            checkpoint = loop.result.val_curve[-1] if loop.result.val_curve else None
            if checkpoint is not None and checkpoint["step"] == loop.steps:   # this step was just validated
                val = checkpoint["loss"]
            else:
                with loop.measuring("eval"):
                    val = loop.evaluate()
            self.curve.append({"grid_s": grid_s, "seconds": round(loop.seconds(), 4), "step": loop.steps,
                               "tokens": loop.tokens, "loss": val, "ppl": math.exp(val) if val < 700 else math.inf})
        self.last_end = loop.seconds()

    def fill(self, result: TrialResult) -> None:
        result.time_curve = self.curve


# --------------------------------------------------------------------------- memory on CPU

def oom_error_type() -> type[Exception]:
    """torch's out-of-memory exception: ``torch.OutOfMemoryError`` from torch 2.5, before that only
    ``torch.cuda.OutOfMemoryError`` (the same class where both exist)."""
    found = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return found if isinstance(found, type) else MemoryError


def state_elements(state: Any) -> int:
    """Elements of the tensors in a model's carried state (nested tuples and lists; None: 0)."""
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, (tuple, list)):
        return sum(state_elements(s) for s in state)
    return 0


class CpuMemoryCounter(TrialObserver):
    """Counts what a training step keeps alive on CPU and, with a cap, raises the real OOM type past it.

    CPU has no allocator statistics like CUDA's, and RSS is blurred by malloc's reuse, so we count
    bytes exactly: static (parameters, gradients, optimiser state) plus the activations autograd saves.
    Saved activations are counted on a window longer than any counted before (and every window under a
    cap): the same shape holds the same bytes, and a Python hook per saved tensor costs about 1% of a
    CPU step.
    """

    def __init__(self, cap_bytes: int | None, static_bytes: int = 0, param_ptrs: Iterable[int] = ()) -> None:
        self.cap, self.static = cap_bytes, static_bytes
        # Autograd saves the weights too; they are already in ``static``, so never count them twice.
        self.param_ptrs = set(param_ptrs)
        self.saved = 0
        self.seen: set[int] = set(self.param_ptrs)
        self.peak = static_bytes
        # The longest window and largest carried state counted so far: a step with neither larger holds no
        # more memory (a Transformer's carried memory grows over its first windows).
        self.counted = (0, 0)
        self.started = False

    def on_start(self, loop: TrialLoop) -> None:
        params = list(loop.model.parameters())
        weights = sum(p.numel() * p.element_size() for p in params)
        # weights + gradients (+ AdamW's two moments)
        self.static = weights * (4 if loop.spec.train.optimizer == "adamw" else 2)
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.peak = max(self.peak, self.static)
        self.started = True

    def around_step(self, loop: TrialLoop, seq_len: int) -> contextlib.AbstractContextManager[Any] | None:
        size = (seq_len, state_elements(loop.state))
        if self.cap is None and size[0] <= self.counted[0] and size[1] <= self.counted[1]:
            return None
        self.step_start()
        self.counted = (max(self.counted[0], size[0]), max(self.counted[1], size[1]))
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def step_start(self) -> None:
        self.saved, self.seen = 0, set(self.param_ptrs)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.saved += storage.nbytes()
            total = self.static + self.saved
            self.peak = max(self.peak, total)
            if self.cap is not None and total > self.cap:
                raise oom_error_type()(
                    f"CPU memory budget exceeded: step needs more than {total / 2**20:.1f} MiB, "
                    f"cap is {self.cap / 2**20:.1f} MiB")
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def fill(self, result: TrialResult) -> None:
        # Counted on CPU: exact, whatever ran before; it replaces the probe's resident-set estimate.
        if self.started:
            result.probe.peak_mem_mib = self.peak / 2**20
