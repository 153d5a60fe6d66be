"""One trial: build a model, train it with truncated BPTT under a declared budget, evaluate it.

:class:`TrialLoop` reads like the canonical example (``batchify``, windows, ``repackage_hidden``, forward,
loss, backward, clip, step); the parts around it are small named pieces, each tested alone:
:class:`Budget` (exactly how many tokens, when to validate), :class:`DivergenceGuard` (when a loss means
the trial blew up), :class:`_Meter` (device-side accumulators: the step loop never reads a value back to
the host) and :class:`TrainClock` (training seconds without validation, warm-up excluded from
throughput). The model comes from its family (:func:`bptt_harness.model.family_of`), which also says how
it is evaluated. What watches the trial (the probe's phases, the time grid, the CPU memory counter, a
user's own measurement) is an observer (:mod:`bptt_harness.observers`). Every way a trial can end (ok,
diverged, oom, pruned, timeout, failed) is a :class:`TrialResult`, never an exception for the caller,
and a trial leaves the process's RNG states and backend flags as it found them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bptt_harness import allocator
from bptt_harness.batching import VariableBptt, batchify, epoch_windows, get_batch
from bptt_harness.corpus import Corpus, check_fits
from bptt_harness.corpus import load as load_corpus
from bptt_harness.errors import HarnessError
from bptt_harness.hardware import resolve_device
from bptt_harness.model import count_params, family_of, repackage_hidden
from bptt_harness.observers import CpuMemoryCounter, ProbePhases, TimeGrid, TrialObserver, oom_error_type
from bptt_harness.record import TrialResult, derive
from bptt_harness.spec import CorpusSpec, ModelConfig, RunOptions, TrainConfig, TrialSpec, resolve_budget_tokens

__all__ = ["ModelConfig", "TrainConfig", "TrialSpec", "RunOptions", "TrialResult", "TrialLoop", "TrialObserver",
           "Budget", "DivergenceGuard", "TrainClock", "run_trial", "is_oom", "release_memory", "resolve_device",
           "tf32_flags", "WARM_UP_STEPS"]

log = logging.getLogger(__name__)

# A model has "learned" once its best training loss is this far below a uniform guess; from then on a
# loss this far above the uniform guess is a blow-up, even if it stays finite.
LEARNED_NATS = 1.0
ABOVE_UNIFORM_NATS = 0.5
# Untimed steps before a process's first trial (RunOptions.warm_up_steps): enough for the allocator, the
# thread pools and cuDNN's first kernels.
WARM_UP_STEPS = 3


class Diverged(Exception):
    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step = step


class TrialTimeout(Exception):
    pass


class Pruned(Exception):
    pass


# The study passes a callback that gets each checkpoint and answers "prune this trial?".
CheckpointCallback = Callable[[int, dict], bool]

_OOM_MARKERS = ("out of memory", "can't allocate memory", "CUDNN_STATUS_ALLOC_FAILED",
                "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (oom_error_type(), MemoryError)) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MARKERS))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- budget and checkpoints

@dataclass
class Budget:
    """How long a trial trains and when it validates.

    A token budget is exact: :meth:`cut` shortens the last window so that the trial trains on exactly
    ``tokens`` target tokens, whatever its shape. Checkpoint ``k`` of ``n`` is due when progress
    reaches ``k / n``; the last is the end of the budget. (The time grid is an observer:
    :class:`bptt_harness.observers.TimeGrid`.)
    """

    tokens: int | None          # exact target tokens, or None for a time budget
    seconds: float | None
    checkpoints: int
    next_checkpoint: int = 1
    anneal_at: tuple[float, ...] = ()   # fractions of the budget that divide the lr (TrainConfig.anneal_at)
    next_anneal: int = 0

    @classmethod
    def of(cls, t: TrainConfig, train_split_tokens: int) -> Budget:
        tokens = resolve_budget_tokens(t, train_split_tokens)
        return cls(tokens=tokens, seconds=t.seconds if tokens is None else None, checkpoints=t.checkpoints,
                   anneal_at=t.anneal_at or ())

    def cut(self, seq_len: int, bs: int, tokens_done: int) -> tuple[int, int | None]:
        """-> (rows to run, targets to keep or None for all) for a window of ``seq_len`` rows."""
        if self.tokens is None:
            return seq_len, None
        left = self.tokens - tokens_done
        if seq_len * bs <= left:
            return seq_len, None
        # The last window: whole rows, then the first columns of one more row (targets are row-major).
        return math.ceil(left / bs), left

    def progress(self, tokens: int, seconds: float) -> float:
        if self.tokens is not None:
            return tokens / self.tokens
        return seconds / self.seconds if self.seconds else 1.0

    def checkpoint_due(self, progress: float) -> bool:
        """True when progress has reached the next checkpoint; moves past every checkpoint reached (a
        step can cross several when there are fewer steps than checkpoints)."""
        due = False
        while self.next_checkpoint <= self.checkpoints and progress >= self.next_checkpoint / self.checkpoints:
            self.next_checkpoint += 1
            due = True
        return due

    def anneals_due(self, progress: float) -> int:
        """How many of the ``anneal_at`` fractions progress has just passed (a step can pass several)."""
        start = self.next_anneal
        while self.next_anneal < len(self.anneal_at) and progress >= self.anneal_at[self.next_anneal]:
            self.next_anneal += 1
        return self.next_anneal - start

    @property
    def done(self) -> bool:
        return self.next_checkpoint > self.checkpoints


# --------------------------------------------------------------------------- divergence

@dataclass
class DivergenceGuard:
    """Decides when a loss means the trial blew up.

    * a non-finite loss or gradient norm (the meter records the first such step);
    * a training loss above ``spike_factor`` x its running minimum;
    * once the model had learned (its best training loss ``LEARNED_NATS`` below a uniform guess), a
      training or validation loss ``ABOVE_UNIFORM_NATS`` above the uniform guess: a finite blow-up that
      the spike rule misses when the best loss is a few nats (3 x 4.5 nats is far worse than uniform);
    * a validation loss that is not finite, or above ``spike_factor`` x the uniform guess (a huge
      learning rate blows up in the first steps, before anything was learned).
    """

    vocab_size: int
    spike_factor: float
    running_min: float = math.inf

    @property
    def uniform(self) -> float:
        return math.log(self.vocab_size)

    @property
    def learned(self) -> bool:
        return self.running_min < self.uniform - LEARNED_NATS

    def check_train(self, mean: float, first_bad: int, step: int) -> None:
        if first_bad >= 0:
            raise Diverged(first_bad, f"non-finite loss or gradient norm at step {first_bad}")
        if mean > self.spike_factor * min(self.running_min, self.uniform):
            raise Diverged(step, f"loss {mean:.3g} at step {step} is above {self.spike_factor:g} x its running "
                                 f"minimum {min(self.running_min, self.uniform):.3g}")
        self._above_uniform("loss", mean, step)
        self.running_min = min(self.running_min, mean)

    def check_val(self, val: float, step: int) -> None:
        if not math.isfinite(val) or val > self.spike_factor * self.uniform:
            raise Diverged(step, f"validation loss {val:.4g} at step {step} is not finite or above "
                                 f"{self.spike_factor:g} x that of a uniform guess ({self.uniform:.3g})")
        self._above_uniform("validation loss", val, step)

    def _above_uniform(self, what: str, loss: float, step: int) -> None:
        if self.learned and loss > self.uniform + ABOVE_UNIFORM_NATS:
            raise Diverged(step, f"{what} {loss:.3g} at step {step} is above that of a uniform guess "
                                 f"({self.uniform:.3g}) after the model had learned (best {self.running_min:.3g})")


# --------------------------------------------------------------------------- time

class TrainClock:
    """Training seconds with validation (and whatever else is measured apart) taken out, and the warm-up
    steps excluded from throughput.

    The warm-up mark, each pause and the end are taken after a device synchronisation, so queued GPU work
    is counted where it ran. Pauses are added up by name (``"eval"``: validation). ``clock``: seconds from
    an arbitrary start (``time.perf_counter``; a test passes its own).
    """

    def __init__(self, device: torch.device, warmup_steps: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device, self.warmup_steps, self.clock = device, warmup_steps, clock
        self.started = clock()
        self.paused_by: dict[str, float] = {}
        self.warm_at: tuple[float, int] | None = None   # (training seconds, tokens) when warm-up ended

    @property
    def paused_s(self) -> float:
        return sum(self.paused_by.values())

    def seconds(self) -> float:
        return self.clock() - self.started - self.paused_s

    @contextlib.contextmanager
    def paused(self, name: str = "eval") -> Iterator[None]:
        _sync(self.device)
        t0 = self.clock()
        try:
            yield
        finally:
            self.paused_by[name] = self.paused_by.get(name, 0.0) + self.clock() - t0

    def after_step(self, steps: int, tokens: int) -> None:
        if steps == self.warmup_steps:
            _sync(self.device)
            self.warm_at = (self.seconds(), tokens)

    def throughput(self, train_s: float, tokens: int) -> tuple[float | None, bool]:
        """-> (tokens per second, whether the warm-up is included because the trial was too short)."""
        if self.warm_at is not None and tokens > self.warm_at[1] and train_s > self.warm_at[0]:
            return (tokens - self.warm_at[1]) / (train_s - self.warm_at[0]), False
        return (tokens / train_s if tokens and train_s > 0 else None), True


# --------------------------------------------------------------------------- pieces of the loop

@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TrialTimeout` in this thread after ``seconds``, even if a step hangs in Python.

    SIGALRM only works in the main thread; elsewhere the step loop's own clock check is the guard.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TrialTimeout(f"trial exceeded its timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # A caller's own alarm (e.g. pytest-timeout, a worker's watchdog) is put back afterwards, less
    # the time spent here, instead of being cancelled.
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    armed_at = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - armed_at), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


class _Meter:
    """Device-side accumulators between host reads: no sync inside the step loop."""

    def __init__(self, device: torch.device, clip: float) -> None:
        z = lambda dt=torch.float32: torch.zeros((), device=device, dtype=dt)  # noqa: E731
        self.loss_sum, self.norm_sum, self.max_norm = z(), z(), z()
        self.count, self.clipped, self.step = z(torch.int64), z(torch.int64), z(torch.int64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.clip = clip

    def update(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.step += 1
        loss = loss.detach().float()
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step, self.first_bad)
        self.loss_sum += loss
        self.count += 1
        finite_norm = torch.nan_to_num(norm.float(), nan=0.0, posinf=3.0e38)
        self.norm_sum += finite_norm
        self.max_norm = torch.maximum(self.max_norm, finite_norm)
        if self.clip > 0:
            self.clipped += (norm > self.clip).long()

    def read_interval(self) -> tuple[float, float, int, int]:
        """-> (mean loss since the last read, mean gradient norm before clipping since the last read, first
        non-finite step or -1, steps); resets the interval."""
        # One device-to-host transfer for the four values, not four syncs.
        loss_sum, norm_sum, count, first_bad = torch.stack(
            [self.loss_sum.double(), self.norm_sum.double(), self.count.double(), self.first_bad.double()]).tolist()
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.count.zero_()
        if not count:
            return float("nan"), float("nan"), int(first_bad), 0
        return loss_sum / count, norm_sum / count, int(first_bad), int(count)


def _make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr)
    # Fused on CUDA and CPU: the unfused AdamW calls step.item() for every parameter at every step.
    try:
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                 fused=device.type in ("cuda", "cpu"))
    except RuntimeError:  # a torch without the fused kernel for this device
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


# --------------------------------------------------------------------------- the loop

class TrialLoop:
    """One trial's model, optimiser and progress, and the loop that trains it.

    :meth:`build` builds the model (its family's) and optionally warms up; :meth:`run` trains and
    evaluates it: :meth:`train` is the canonical truncated-BPTT loop, :meth:`step` per window,
    :meth:`validate` at each checkpoint, and every observer's ``on_step`` after each step. Observers read
    the attributes below and measure inside :meth:`measuring`.
    """

    def __init__(self, spec: TrialSpec, corpus: Corpus, device: torch.device, result: TrialResult, *,
                 options: RunOptions, observers: Sequence[TrialObserver] = (), probe: Any = None,
                 on_checkpoint: CheckpointCallback | None = None) -> None:
        t = spec.train
        self.spec, self.corpus, self.device, self.result, self.options = spec, corpus, device, result, options
        self.observers, self.probe, self.on_checkpoint = observers, probe, on_checkpoint
        self.deadline: float | None = None   # perf_counter time past which training ends as a timeout
        self.family = family_of(spec.model)
        self.amp = t.amp == "bf16" and device.type == "cuda"
        self.budget = Budget.of(t, corpus.train.numel())
        self.guard = DivergenceGuard(corpus.vocab_size, t.spike_factor)
        self.meter = _Meter(device, t.clip)
        self.clock = TrainClock(device, t.warmup_steps)
        self.lr, self.best_val = t.lr, math.inf
        self.steps = self.tokens = self.longest = 0
        self.state: Any = None   # the model's state, carried from window to window (detached at each start)

    # ..................................................................... what observers use

    def seconds(self) -> float:
        """Training seconds so far (validation and other measurements taken out)."""
        return self.clock.seconds()

    @contextlib.contextmanager
    def measuring(self, name: str) -> Iterator[None]:
        """Work on the model that is not training (``"eval"``: validation; a diagnostic: its own name): the
        training clock is paused and every observer (the probe) books it as phase ``name``."""
        with self.clock.paused(name), _each(o.phase(name) for o in self.observers):
            yield

    def evaluate(self) -> float:
        """Validation loss of the model now, by its family's fair rule."""
        t = self.spec.train
        return self.family.evaluate(self.model, self.spec.model, self.valid, t.eval_bptt, self.amp)

    # ..................................................................... the trial

    def build(self) -> None:
        """The data on the device, the family's model, and the process's warm-up (``options.warm_up_steps``)."""
        t, model_cfg, vocab = self.spec.train, self.spec.model, self.corpus.vocab_size
        # Data goes to the device once; windows are views of these matrices.
        self.train_data = batchify(self.corpus.train, self.spec.batch_size).to(self.device)
        self.valid = batchify(self.corpus.valid, t.eval_batch_size).to(self.device)
        self.model = self.family.build(model_cfg, vocab).to(self.device)
        self.result.n_params = count_params(self.model)
        self.result.flops_per_token = self.family.flops(model_cfg, vocab, self.model, self.spec.bptt)
        self.result.evaluation = self.family.info.evaluation_of(model_cfg)
        self.forward = torch.compile(self.model) if t.compile else self.model
        if self.options.warm_up_steps:
            self.warm_up(self.options.warm_up_steps)

    def run(self) -> None:
        """Train to the budget (timed from here, and limited by ``timeout_s``), then evaluate."""
        t = self.spec.train
        self.deadline = time.perf_counter() + t.timeout_s if t.timeout_s else None
        self.opt = _make_optimizer(self.model, t, self.device)
        for o in self.observers:
            o.on_start(self)
        self.clock = TrainClock(self.device, t.warmup_steps)   # training time starts here
        try:
            with _each(o.training(self) for o in self.observers):
                self.train()
                for o in self.observers:
                    o.after_training(self)
        finally:
            self._record_training()
        _summarise_validation(self.result)
        if t.test:
            t0 = time.perf_counter()
            test = batchify(self.corpus.test, t.eval_batch_size).to(self.device)
            self.result.test_ppl = _ppl(self.family.evaluate(self.model, self.spec.model, test, t.eval_bptt, self.amp))
            self.result.eval_s += time.perf_counter() - t0

    def train(self) -> None:
        """Truncated BPTT over the train split, pass after pass, until the budget is spent."""
        t, bs = self.spec.train, self.spec.batch_size
        variable = VariableBptt.around(self.spec.bptt) if t.variable_bptt else None
        rng = np.random.default_rng(t.seed)
        while not self.budget.done:
            for n_window, (i, seq_len) in enumerate(epoch_windows(self.train_data.size(0), self.spec.bptt, variable,
                                                                  rng)):
                if n_window == 0 or (t.reset_every and n_window % t.reset_every == 0):
                    self.state = self.family.init_state(self.model, bs)   # each pass (and reset_every) starts afresh
                seq_len, keep = self.budget.cut(seq_len, bs, self.tokens)
                self.step(i, seq_len, keep, self.lr * (variable.lr_factor(seq_len) if variable else 1.0))
                progress = self.budget.progress(self.tokens, self.clock.seconds())
                # A schedule on progress: the same lr at the same fraction of the budget for every shape.
                self.lr /= t.anneal ** self.budget.anneals_due(progress)
                due = self.budget.checkpoint_due(progress)
                if self.steps % t.log_every == 0 or due:
                    self.read_losses()
                if due:
                    self.validate()
                for o in self.observers:
                    o.on_step(self)
                if self.budget.done:
                    break
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    raise TrialTimeout(f"trial exceeded its timeout of {t.timeout_s:g} s")

    def step(self, i: int, seq_len: int, keep: int | None, lr: float) -> None:
        """One window at row ``i``: forward, loss, backward, clip, update. Nothing is read back to the host."""
        x, y = get_batch(self.train_data, i, seq_len)
        self.state = repackage_hidden(self.state)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with _each(o.around_step(self, seq_len) for o in self.observers):
            loss = self._loss(x, y, keep)
        norm = self._update(loss, self.opt)
        self.meter.update(loss, norm)
        self.steps += 1
        self.tokens += y.numel() if keep is None else keep
        self.longest = max(self.longest, seq_len)
        self.clock.after_step(self.steps, self.tokens)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, keep: int | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, self.state = self.forward(x, self.state)
            if keep is not None:  # the budget's last window: only its first `keep` targets
                # (slicing every step would cost a full-size gradient copy in backward)
                logits, y = logits[:keep], y[:keep]
            return F.cross_entropy(logits.float(), y)

    def _update(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
        """Backward, clip, step; the gradient norm before clipping (a device tensor)."""
        clip = self.spec.train.clip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        opt.step()
        return norm

    def read_losses(self) -> None:
        """The mean training loss and gradient norm since the last read (one host read) and the learning rate
        now, as a curve point and a divergence check."""
        mean, norm, first_bad, n = self.meter.read_interval()
        if n:
            self.result.train_curve.append({"step": self.steps, "tokens": self.tokens,
                                            "seconds": round(self.clock.seconds(), 4),
                                            "loss": mean if math.isfinite(mean) else None,
                                            "grad_norm": norm if math.isfinite(norm) else None, "lr": self.lr})
            self.guard.check_train(mean, first_bad, self.steps)

    def validate(self) -> None:
        """A checkpoint: validation loss, the divergence check, SGD's annealing, the caller's pruning."""
        t = self.spec.train
        with self.measuring("eval"):
            val = self.evaluate()
        point = {"step": self.steps, "tokens": self.tokens, "seconds": round(self.clock.seconds(), 4), "loss": val,
                 "ppl": _ppl(val)}
        self.result.val_curve.append(point)
        self.guard.check_val(val, self.steps)
        if val < self.best_val:
            self.best_val = val
        elif t.optimizer == "sgd" and t.anneal_at is None:
            self.lr /= t.anneal  # the canonical recipe: anneal when validation stops improving
        for o in self.observers:
            o.on_validate(self, point)
        # The caller's callback (storage round-trips for pruning) is not training either.
        with self.clock.paused("eval"):
            prune = self.on_checkpoint is not None and self.on_checkpoint(len(self.result.val_curve) - 1, point)
        if prune:
            raise Pruned(f"pruned at checkpoint {len(self.result.val_curve)} (val ppl {point['ppl']:.4g})")

    def warm_up(self, steps: int) -> None:
        """``steps`` untimed training steps of this trial's own shape and one validation window, then the
        model exactly as built again (weights and buffers restored, a throwaway optimiser, the RNG draws
        put back): start-up costs leave the trial without changing how it trains."""
        t = self.spec.train
        # Kept on the host: a copy on the device could be what does not fit.
        built = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                 for k, v in self.model.state_dict().items()}
        opt = _make_optimizer(self.model, t, self.device)
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            self.state = self.family.init_state(self.model, self.spec.batch_size)
            for i, seq_len in itertools.islice(epoch_windows(self.train_data.size(0), self.spec.bptt), steps):
                x, y = get_batch(self.train_data, i, seq_len)
                self.state = repackage_hidden(self.state)
                self._update(self._loss(x, y, None), opt)
            self.family.evaluate(self.model, self.spec.model, self.valid[: t.eval_bptt + 1], t.eval_bptt, self.amp)
        self.model.load_state_dict(built)
        del built, opt
        self.state = None
        release_memory(self.device)

    def _record_training(self) -> None:
        """What the loop itself measured, whatever stopped it."""
        _sync(self.device)
        r, t = self.result, self.spec.train
        r.train_s = self.clock.seconds()
        r.eval_s = self.clock.paused_by.get("eval", 0.0)
        r.steps, r.train_tokens, r.max_window = self.steps, self.tokens, self.longest or None
        r.budget_tokens = self.budget.tokens
        r.warmup_steps = min(t.warmup_steps, self.steps)
        r.final_lr = self.lr
        if self.steps:
            r.max_grad_norm = float(self.meter.max_norm.item())
            r.clipped_frac = float(self.meter.clipped.item()) / self.steps if t.clip > 0 else 0.0
        r.tokens_per_s, r.timing_includes_warmup = self.clock.throughput(r.train_s, self.tokens)
        if r.tokens_per_s is not None:
            r.achieved_flops = r.tokens_per_s * r.flops_per_token


@contextlib.contextmanager
def _each(contexts: Iterable[contextlib.AbstractContextManager[Any] | None]) -> Iterator[None]:
    """Enter every context given (an observer's None: none), innermost last."""
    with contextlib.ExitStack() as stack:
        for context in contexts:
            if context is not None:
                stack.enter_context(context)
        yield


# --------------------------------------------------------------------------- process-wide state

def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generator a trial on ``device`` draws from (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


_UNREADABLE = object()


def _read(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except RuntimeError:   # torch refuses to read a legacy flag that disagrees with the new setting
        return _UNREADABLE


def _precision_state() -> tuple[list[tuple[Callable[[Any], None], Any]], list[tuple[Any, str]]]:
    """Every setting through which torch keeps float32 matmul and cuDNN precision: the legacy flags (with
    their setters) where they can be read, and the ``fp32_precision`` strings of torch 2.9+."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    legacy: list[tuple[Callable[[], Any], Callable[[Any], None]]] = [
        (lambda: cuda.allow_tf32, lambda v: setattr(cuda, "allow_tf32", v)),
        (lambda: cudnn.allow_tf32, lambda v: setattr(cudnn, "allow_tf32", v)),
        (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision)]
    objects = [torch.backends, cuda, cudnn, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)]
    return ([(set_, value) for get, set_ in legacy if (value := _read(get)) is not _UNREADABLE],
            [(o, o.fp32_precision) for o in objects if o is not None and hasattr(o, "fp32_precision")])


def _restore_precision(state: tuple[list[tuple[Callable[[Any], None], Any]], list[tuple[Any, str]]]) -> None:
    legacy, strings = state
    for set_, value in legacy:
        set_(value)
    for o, value in strings:
        o.fp32_precision = value


@contextlib.contextmanager
def tf32_flags(allow: bool) -> Iterator[None]:
    """TF32 allowed (or not) in CUDA matmuls and cuDNN inside; every precision setting as it was, after.

    torch 2.9+ keeps the setting twice, in the legacy flags and in the ``fp32_precision`` strings, and
    refuses to read a flag when the two disagree. The legacy setters write both consistently, so the
    trial sets through them; afterwards the legacy values go back first and the strings last, exactly."""
    saved = _precision_state()
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        _restore_precision(saved)


@contextlib.contextmanager
def _trial_state(device: torch.device, t: TrainConfig) -> Iterator[None]:
    """The trial's seed (model initialisation, dropout) and, on CUDA, its TF32 setting, inside; the
    process's RNG states and flags as the caller had them, after (``torch.rand`` after a trial draws what it
    would have drawn without it)."""
    with torch.random.fork_rng(devices=_rng_devices(device)), \
            (tf32_flags(t.tf32) if device.type == "cuda" else contextlib.nullcontext()):
        torch.random.default_generator.manual_seed(t.seed)
        for index in _rng_devices(device):
            torch.cuda.default_generators[index].manual_seed(t.seed)
        yield


@contextlib.contextmanager
def _cuda_memory_cap(device: torch.device, cap_mib: float | None) -> Iterator[None]:
    """``memory_cap_mib`` as the CUDA allocator's hard limit for the trial; the caller's limit after."""
    if device.type != "cuda" or cap_mib is None:
        yield
        return
    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, total - free - torch.cuda.memory_reserved(device))
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    before = get(device) if get is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(cuda_pool_fraction(cap_mib, total, outside), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)


# --------------------------------------------------------------------------- memory

def release_memory(device: torch.device) -> None:
    """Free what the last trial left: Python garbage, torch's CUDA cache, and on glibc the heap pages
    that malloc keeps after a free (so the next trial's resident set starts from what is really live)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    allocator.trim()


# --------------------------------------------------------------------------- the trial

def cuda_pool_fraction(cap_mib: float, total_bytes: int, outside_pool_bytes: int) -> float:
    """The fraction of this GPU torch's pool may use to stand in for a card of ``cap_mib``.

    A real card of that size also holds the CUDA context (and cuDNN/cuBLAS workspaces) outside torch's
    pool, so the pool gets the cap minus what lives outside it here; otherwise a "16 GiB" wall mapped
    on an 80 GB card would overstate what fits on a real 16 GB one."""
    return max(0.0, min(1.0, (cap_mib * 2**20 - outside_pool_bytes) / total_bytes))


def run_trial(spec: TrialSpec, corpus: Corpus | CorpusSpec | str, device: torch.device | str | None = None,
              probe: Any | None = None, on_checkpoint: CheckpointCallback | None = None, *,
              options: RunOptions | None = None, observers: Sequence[TrialObserver] = ()) -> TrialResult:
    """Train and evaluate one configuration. Never raises for a trial outcome; see ``TrialResult.status``.

    ``spec`` is the configuration (bptt, batch size, :class:`ModelConfig` with an optional ``factory`` for
    your own model, :class:`TrainConfig`); ``corpus`` comes from :func:`bptt_harness.corpus.load`
    (``bptt_harness.load_corpus``), or is what it takes (``"synthetic:k=6"``, a path, a ``CorpusSpec``);
    ``device`` is ``"auto"`` (None), ``"cpu"``, ``"cuda"`` or a ``torch.device``.

    ``probe`` is a :class:`bptt_harness.probe.Probe` (or anything with ``__enter__``/``__exit__`` and a
    ``report()``) wrapped around the training part; its ``phase("eval")`` marks the checkpoint
    validations, so training's costs leave them out. ``on_checkpoint(index, point)`` is called at each
    validation checkpoint and returns True to prune the trial. ``options`` are what the caller decides
    beside the study file (a memory cap, the time grid's end, warm-up steps: :class:`RunOptions`);
    ``observers`` measure more (:class:`bptt_harness.observers.TrialObserver`), after the built-in ones.

    The process's RNG states and TF32 flags are as they were afterwards. Raises :class:`HarnessError` only
    for a configuration that cannot run at all on this corpus (e.g. a split too short for one window),
    before anything is trained.
    """
    if isinstance(corpus, (str, CorpusSpec)):
        corpus = load_corpus(corpus)
    elif not isinstance(corpus, Corpus):
        raise HarnessError(f"corpus {type(corpus).__name__} is not a corpus: pass bptt_harness.load_corpus(...) or a "
                           "corpus spec such as 'synthetic:k=6' or a text file's path")
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    options = options if options is not None else RunOptions()
    t = spec.train
    check_fits(corpus, spec.batch_size, spec.bptt, t.eval_batch_size)
    result = TrialResult(bptt=spec.bptt, batch_size=spec.batch_size, seed=t.seed, device=str(device))
    release_memory(device)
    watching = [*_builtin_observers(device, t, options, probe), *observers]
    start = time.perf_counter()
    status, error = "ok", None
    loop = TrialLoop(spec, corpus, device, result, options=options, observers=watching, probe=probe,
                     on_checkpoint=on_checkpoint)
    try:
        with _trial_state(device, t), _cuda_memory_cap(device, options.memory_cap_mib):
            loop.build()   # the process's start-up (a warm-up) is not charged to the trial's timeout
            with _deadline(t.timeout_s):
                loop.run()
    except Diverged as e:
        status, error, result.diverged_step = "diverged", str(e), e.step
    except TrialTimeout as e:
        status, error = "timeout", str(e)
    except Pruned as e:
        status, error = "pruned", str(e)
    except SystemExit as e:  # a user's model (or code it calls) exiting ends its trial, not the sweep
        status, error = "failed", f"SystemExit({e.code!r}) raised inside the trial"
    except Exception as e:  # noqa: BLE001 - a trial's failure is a result, not the caller's crash
        if is_oom(e):
            status, error = "oom", str(e).strip().splitlines()[0][:500]
        else:
            status, error = "failed", f"{type(e).__name__}: {e}"[:2000]
            log.debug("trial failed", exc_info=True)
    # Released here, outside every except block: a live traceback would keep the step's tensors.
    del loop
    release_memory(device)
    result.status, result.error = status, error  # type: ignore[assignment]
    if status in ("pruned", "timeout") and result.val_loss is None:
        _summarise_validation(result)  # stopped early but measured: keep the checkpoints' perplexity
    result.wall_s = time.perf_counter() - start
    for o in watching:
        try:
            o.fill(result)
        except Exception as e:  # noqa: BLE001 - a broken observer (or probe) must not lose the trial
            log.warning("%s could not record its measurement: %s", type(o).__name__, e)
    derive(result)
    return result


def _builtin_observers(device: torch.device, t: TrainConfig, options: RunOptions, probe: Any) -> list[TrialObserver]:
    """The probe's phases (first: it marks the trial's start), the time grid, and on CPU the memory counter
    (last: its exact count replaces the probe's resident-set estimate)."""
    out: list[TrialObserver] = []
    if probe is not None:
        out.append(ProbePhases(probe))
    if t.time_grid_s:
        out.append(TimeGrid(t.time_grid_s, options.time_grid_until_s))
    if device.type == "cpu":
        # On CPU every trial counts its memory (a hook per saved tensor: no measurable cost); with a
        # memory cap the count is also the cap.
        cap = options.memory_cap_mib
        out.append(CpuMemoryCounter(int(cap * 2**20) if cap is not None else None))
    return out


def _summarise_validation(result: TrialResult) -> None:
    """Final and best validation loss and perplexity from the checkpoints' curve."""
    losses = [p["loss"] for p in result.val_curve if p["loss"] is not None and math.isfinite(p["loss"])]
    if not losses:
        return
    result.val_loss, result.best_val_loss = result.val_curve[-1]["loss"], min(losses)
    result.val_ppl, result.best_val_ppl = _ppl(result.val_loss), _ppl(result.best_val_loss)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
