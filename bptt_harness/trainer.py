"""One trial: build a model, train it with truncated BPTT under a declared budget, evaluate it.

The loop reads like the canonical example (``batchify``, windows, ``repackage_hidden``); the parts
around it are small named pieces, each tested alone: :class:`Budget` (exactly how many tokens, when
to validate), :class:`DivergenceGuard` (when a loss means the trial blew up), :class:`_Meter`
(device-side accumulators: the step loop never reads a value back to the host) and
:class:`TrainClock` (training seconds without validation, warm-up excluded from throughput).
Every way a trial can end (ok, diverged, oom, pruned, timeout, failed) is a :class:`TrialResult`,
never an exception for the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bptt_harness.batching import VariableBptt, batchify, epoch_windows, get_batch, windows
from bptt_harness.corpus import Corpus, check_fits
from bptt_harness.errors import HarnessError
from bptt_harness.hardware import resolve_device
from bptt_harness.model import (
    build_model,
    count_params,
    estimated_flops_per_token,
    flops_per_token,
    repackage_hidden,
)
from bptt_harness.record import ProbeReport, TrialResult, derive
from bptt_harness.spec import ModelConfig, TrainConfig, TrialSpec, resolve_budget_tokens

__all__ = ["ModelConfig", "TrainConfig", "TrialSpec", "TrialResult", "Budget", "DivergenceGuard", "TrainClock",
           "run_trial", "warm_up", "evaluate", "is_oom", "release_memory", "resolve_device"]

log = logging.getLogger(__name__)

# A model has "learned" once its best training loss is this far below a uniform guess; from then on a
# loss this far above the uniform guess is a blow-up, even if it stays finite.
LEARNED_NATS = 1.0
ABOVE_UNIFORM_NATS = 0.5


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


def oom_error_type() -> type[Exception]:
    """torch's out-of-memory exception: ``torch.OutOfMemoryError`` from torch 2.5, before that only
    ``torch.cuda.OutOfMemoryError`` (the same class where both exist)."""
    found = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return found if isinstance(found, type) else MemoryError


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
    reaches ``k / n``; the last is the end of the budget. Apart from them, a time grid (``time_grid_s``)
    asks for a validation point near every multiple of that many training seconds.
    """

    tokens: int | None          # exact target tokens, or None for a time budget
    seconds: float | None
    checkpoints: int
    next_checkpoint: int = 1
    time_grid_s: float | None = None
    time_grid_until_s: float | None = None
    next_time_point: int = 1

    @classmethod
    def of(cls, t: TrainConfig, train_split_tokens: int) -> Budget:
        tokens = resolve_budget_tokens(t, train_split_tokens)
        return cls(tokens=tokens, seconds=t.seconds if tokens is None else None, checkpoints=t.checkpoints,
                   time_grid_s=t.time_grid_s, time_grid_until_s=t.time_grid_until_s)

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

    def time_point_due(self, seconds: float, step_s: float) -> float | None:
        """The grid time to take a point for at a step that ended at ``seconds`` after ``step_s`` seconds,
        or None. A grid time is due at the step end nearest to it: the next step (assumed as long as this
        one) would end further past it than this one ends short of it. A step longer than the grid
        crosses several grid times; the point goes to the nearest, and the others get none."""
        if not self.time_grid_s:
            return None
        last = math.floor((seconds + step_s / 2) / self.time_grid_s)
        if last < self.next_time_point:
            return None
        nearest = min(max(round(seconds / self.time_grid_s), self.next_time_point), last)
        self.next_time_point = last + 1
        if self.time_grid_until_s is not None and nearest * self.time_grid_s > self.time_grid_until_s + 1e-9:
            return None
        return round(nearest * self.time_grid_s, 9)

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
    """Training seconds with validation taken out, and the warm-up excluded from throughput.

    The warm-up mark and the end are taken after a device synchronisation, so queued GPU work is
    counted where it ran.
    """

    def __init__(self, device: torch.device, warmup_steps: int) -> None:
        self.device, self.warmup_steps = device, warmup_steps
        self.started = time.perf_counter()
        self.paused_s = 0.0
        self.warm_at: tuple[float, int] | None = None   # (training seconds, tokens) when warm-up ended

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

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


class _CpuMemoryCap:
    """Counts what a training step keeps alive on CPU and, with a cap, raises the real OOM type past it.

    CPU has no allocator statistics like CUDA's, and RSS is blurred by malloc's reuse, so we count
    bytes exactly: static (parameters, gradients, optimiser state) plus the activations autograd saves.
    """

    def __init__(self, cap_bytes: int | None, static_bytes: int, param_ptrs: Iterable[int] = ()) -> None:
        self.cap, self.static = cap_bytes, static_bytes
        # Autograd saves the weights too; they are already in ``static``, so never count them twice.
        self.param_ptrs = set(param_ptrs)
        self.saved = 0
        self.seen: set[int] = set(self.param_ptrs)
        self.peak = static_bytes

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


class _Meter:
    """Device-side accumulators between host reads: no sync inside the step loop."""

    def __init__(self, device: torch.device, clip: float) -> None:
        z = lambda dt=torch.float32: torch.zeros((), device=device, dtype=dt)  # noqa: E731
        self.loss_sum, self.max_norm = z(), z()
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
        self.max_norm = torch.maximum(self.max_norm, torch.nan_to_num(norm.float(), nan=0.0, posinf=3.0e38))
        if self.clip > 0:
            self.clipped += (norm > self.clip).long()

    def read_interval(self) -> tuple[float, int, int]:
        """-> (mean loss since the last read, first non-finite step or -1, steps); resets the interval."""
        # One device-to-host transfer for the three values, not three syncs.
        loss_sum, count, first_bad = torch.stack(
            [self.loss_sum.double(), self.count.double(), self.first_bad.double()]).tolist()
        self.loss_sum.zero_()
        self.count.zero_()
        return (loss_sum / count if count else float("nan")), int(first_bad), int(count)


def evaluate(model: torch.nn.Module, matrix: torch.Tensor, bptt: int, bs: int, amp: bool) -> float:
    """Mean cross-entropy over a split with fixed windows and the state carried through it."""
    model.eval()
    total = torch.zeros((), device=matrix.device, dtype=torch.float64)
    count = 0
    hidden = model.init_hidden(bs)  # type: ignore[operator]  # the model interface: any module with init_hidden
    with torch.inference_mode(), torch.autocast(matrix.device.type, dtype=torch.bfloat16, enabled=amp):
        for x, y in windows(matrix, bptt):
            logits, hidden = model(x, hidden)
            total += F.cross_entropy(logits.float(), y, reduction="sum").double()
            count += y.numel()
    model.train()
    return total.item() / count


def _make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr)
    # Fused on CUDA and CPU: the unfused AdamW calls step.item() for every parameter at every step.
    try:
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                 fused=device.type in ("cuda", "cpu"))
    except RuntimeError:  # a torch without the fused kernel for this device
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _static_bytes(model: torch.nn.Module, t: TrainConfig) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights + gradients (+ AdamW's two moments)
    return params * (4 if t.optimizer == "adamw" else 2)




# --------------------------------------------------------------------------- memory

@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory(device: torch.device) -> None:
    """Free what the last trial left: Python garbage, torch's CUDA cache, and on glibc the heap pages
    that malloc keeps after a free (so the next trial's resident set starts from what is really live)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# --------------------------------------------------------------------------- the trial

def cuda_pool_fraction(cap_mib: float, total_bytes: int, outside_pool_bytes: int) -> float:
    """The fraction of this GPU torch's pool may use to stand in for a card of ``cap_mib``.

    A real card of that size also holds the CUDA context (and cuDNN/cuBLAS workspaces) outside torch's
    pool, so the pool gets the cap minus what lives outside it here; otherwise a "16 GiB" wall mapped
    on an 80 GB card would overstate what fits on a real 16 GB one."""
    return max(0.0, min(1.0, (cap_mib * 2**20 - outside_pool_bytes) / total_bytes))


def run_trial(spec: TrialSpec, corpus: Corpus, device: torch.device | str | None = None,
              probe: Any | None = None, on_checkpoint: CheckpointCallback | None = None) -> TrialResult:
    """Train and evaluate one configuration. Never raises for a trial outcome; see ``TrialResult.status``.

    ``spec`` is the configuration (bptt, batch size, :class:`ModelConfig` with an optional ``factory`` for
    your own model, :class:`TrainConfig`); ``corpus`` comes from :func:`bptt_harness.corpus.load` (``bptt_harness.load_corpus``);
    ``device`` is ``"auto"`` (None), ``"cpu"``, ``"cuda"`` or a ``torch.device``.

    ``probe`` is a :class:`bptt_harness.probe.Probe` (or anything with ``__enter__``/``__exit__`` and a
    ``report()``) wrapped around the training part; its ``phase("eval")`` marks the checkpoint
    validations, so training's costs leave them out. ``on_checkpoint(index, point)`` is called at each
    validation checkpoint and returns True to prune the trial.

    Raises :class:`HarnessError` only for a configuration that cannot run at all on this corpus
    (e.g. a split too short for one window), before anything is trained.
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    t = spec.train
    check_fits(corpus, spec.batch_size, spec.bptt, t.eval_batch_size)
    result = TrialResult(bptt=spec.bptt, batch_size=spec.batch_size, seed=t.seed, device=str(device))
    release_memory(device)
    if probe is not None and hasattr(probe, "mark_trial_start"):
        probe.mark_trial_start()
    start = time.perf_counter()
    status, error = "ok", None
    cuda_cap = False
    try:
        with _deadline(t.timeout_s):
            if device.type == "cuda" and t.memory_cap_mib is not None:
                free, total = torch.cuda.mem_get_info(device)
                outside = max(0, total - free - torch.cuda.memory_reserved(device))
                torch.cuda.set_per_process_memory_fraction(cuda_pool_fraction(t.memory_cap_mib, total, outside), device)
                cuda_cap = True
            _train_and_eval(spec, corpus, device, probe, on_checkpoint, result, start)
    except Diverged as e:
        status, error, result.diverged_step = "diverged", str(e), e.step
    except TrialTimeout as e:
        status, error = "timeout", str(e)
    except Pruned as e:
        status, error = "pruned", str(e)
    except Exception as e:  # noqa: BLE001 - a trial's failure is a result, not the caller's crash
        if is_oom(e):
            status, error = "oom", str(e).strip().splitlines()[0][:500]
        else:
            status, error = "failed", f"{type(e).__name__}: {e}"[:2000]
            log.debug("trial failed", exc_info=True)
    # Released here, outside every except block: a live traceback would keep the step's tensors.
    if cuda_cap:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    release_memory(device)
    result.status, result.error = status, error  # type: ignore[assignment]
    if status in ("pruned", "timeout") and result.val_loss is None:
        _summarise_validation(result)  # stopped early but measured: keep the checkpoints' perplexity
    result.wall_s = time.perf_counter() - start
    if probe is not None and hasattr(probe, "report"):
        try:
            measured = probe.report()
            measured = measured if isinstance(measured, ProbeReport) else ProbeReport(**measured)
            if result.probe.peak_mem_mib is not None:  # counted on CPU: exact, whatever ran before
                measured.peak_mem_mib = result.probe.peak_mem_mib
            result.probe = measured
        except Exception as e:  # noqa: BLE001 - a broken probe must not lose the trial
            log.warning("probe report failed: %s", e)
    derive(result)
    return result


def _train_and_eval(spec: TrialSpec, corpus: Corpus, device: torch.device, probe: Any | None,
                    on_checkpoint: CheckpointCallback | None, result: TrialResult, start: float) -> None:
    t, bs = spec.train, spec.batch_size
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    amp = t.amp == "bf16" and device.type == "cuda"

    # Data goes to the device once; windows are views of these matrices.
    train = batchify(corpus.train, bs).to(device)
    valid = batchify(corpus.valid, t.eval_batch_size).to(device)
    model = build_model(spec.model, corpus.vocab_size).to(device)
    result.n_params = count_params(model)
    result.flops_per_token = (flops_per_token(spec.model, corpus.vocab_size) if spec.model.factory is None
                              else estimated_flops_per_token(model))
    forward = torch.compile(model) if t.compile else model
    opt = _make_optimizer(model, t, device)
    variable = VariableBptt.around(spec.bptt) if t.variable_bptt else None
    cap = _cpu_cap(model, t, device)   # on CPU: the count behind peak_mem_mib, and the cap if one is set
    counted = 0   # the longest window counted so far: a window no longer than it holds no more memory

    budget = Budget.of(t, corpus.train.numel())
    result.budget_tokens = budget.tokens
    guard = DivergenceGuard(corpus.vocab_size, t.spike_factor)
    meter = _Meter(device, t.clip)
    deadline = start + t.timeout_s if t.timeout_s else None
    lr, best_val = t.lr, math.inf
    tokens = steps = longest = 0
    last_end = 0.0   # training seconds at the end of the previous step

    def read_and_check() -> None:
        mean, first_bad, n = meter.read_interval()
        if n:
            result.train_curve.append({"step": steps, "tokens": tokens, "seconds": round(clock.seconds(), 4),
                                       "loss": mean if math.isfinite(mean) else None})
            guard.check_train(mean, first_bad, steps)

    def validate() -> None:
        nonlocal lr, best_val
        with clock.paused(), _phase(probe, "eval"):
            val = evaluate(model, valid, t.eval_bptt, t.eval_batch_size, amp)
        point = {"step": steps, "tokens": tokens, "seconds": round(clock.seconds(), 4), "loss": val,
                 "ppl": _ppl(val)}
        result.val_curve.append(point)
        guard.check_val(val, steps)
        if val < best_val:
            best_val = val
        elif t.optimizer == "sgd":
            lr /= t.anneal  # the canonical recipe: anneal when validation stops improving
        # The caller's callback (storage round-trips for pruning) is not training either.
        with clock.paused():
            prune = on_checkpoint is not None and on_checkpoint(len(result.val_curve) - 1, point)
        if prune:
            raise Pruned(f"pruned at checkpoint {len(result.val_curve)} (val ppl {point['ppl']:.4g})")

    def observe(grid_s: float, at_checkpoint: bool) -> None:
        """A point of the time grid: it reads validation loss and nothing else (no annealing, divergence
        check or pruning), so observing never changes how the trial trains."""
        if at_checkpoint:  # this step was just validated
            val = result.val_curve[-1]["loss"]
        else:
            with clock.paused(), _phase(probe, "eval"):
                val = evaluate(model, valid, t.eval_bptt, t.eval_batch_size, amp)
        result.time_curve.append({"grid_s": grid_s, "seconds": round(clock.seconds(), 4), "step": steps,
                                  "tokens": tokens, "loss": val, "ppl": _ppl(val)})

    clock = TrainClock(device, t.warmup_steps)
    init_hidden: Callable[[int], Any] = model.init_hidden  # type: ignore[assignment]  # the model interface
    try:
        with probe if probe is not None else contextlib.nullcontext():
            hidden = init_hidden(bs)
            while not budget.done:
                for n_window, (i, seq_len) in enumerate(epoch_windows(train.size(0), spec.bptt, variable, rng)):
                    if n_window == 0 or (t.reset_every and n_window % t.reset_every == 0):
                        hidden = init_hidden(bs)   # each pass (and reset_every) starts from zeros
                    seq_len, keep = budget.cut(seq_len, bs, tokens)
                    longest = max(longest, seq_len)
                    x, y = get_batch(train, i, seq_len)
                    hidden = repackage_hidden(hidden)
                    step_lr = lr * (variable.lr_factor(seq_len) if variable else 1.0)
                    for group in opt.param_groups:
                        group["lr"] = step_lr
                    # Saved activations are counted on a window longer than any counted before (and every
                    # window under a cap): the same shape holds the same bytes, and a Python hook per
                    # saved tensor costs about 1% of a CPU step.
                    count = cap is not None and (cap.cap is not None or seq_len > counted)
                    if count:
                        cap.step_start()
                        counted = max(counted, seq_len)
                    hooks = torch.autograd.graph.saved_tensors_hooks(cap.pack, cap.unpack) if count else \
                        contextlib.nullcontext()
                    with hooks, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        logits, hidden = forward(x, hidden)
                        if keep is not None:  # the budget's last window: only its first `keep` targets
                            # (slicing every step would cost a full-size gradient copy in backward)
                            logits, y = logits[:keep], y[:keep]
                        loss = F.cross_entropy(logits.float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip if t.clip > 0 else math.inf)
                    opt.step()
                    meter.update(loss, norm)
                    steps += 1
                    tokens += y.numel()
                    clock.after_step(steps, tokens)

                    now = clock.seconds()
                    due = budget.checkpoint_due(budget.progress(tokens, now))
                    if steps % t.log_every == 0 or due:
                        read_and_check()
                    if due:
                        validate()
                    grid_s = budget.time_point_due(now, now - last_end)
                    if grid_s is not None:
                        observe(grid_s, due)
                    last_end = clock.seconds()
                    if budget.done:
                        break
                    if deadline is not None and time.perf_counter() > deadline:
                        raise TrialTimeout(f"trial exceeded its timeout of {t.timeout_s:g} s")
    finally:
        _sync(device)
        result.train_s = clock.seconds()
        result.eval_s = clock.paused_s
        result.steps, result.train_tokens, result.max_window = steps, tokens, longest or None
        result.warmup_steps = min(t.warmup_steps, steps)
        result.final_lr = lr
        if steps:
            result.max_grad_norm = float(meter.max_norm.item())
            result.clipped_frac = float(meter.clipped.item()) / steps if t.clip > 0 else 0.0
        result.tokens_per_s, result.timing_includes_warmup = clock.throughput(result.train_s, tokens)
        if result.tokens_per_s is not None:
            result.achieved_flops = result.tokens_per_s * result.flops_per_token
        if cap:
            result.probe.peak_mem_mib = cap.peak / 2**20

    _summarise_validation(result)
    if t.test:
        t0 = time.perf_counter()
        test = batchify(corpus.test, t.eval_batch_size).to(device)
        result.test_ppl = _ppl(evaluate(model, test, t.eval_bptt, t.eval_batch_size, amp))
        result.eval_s += time.perf_counter() - t0


def _phase(probe: Any | None, name: str) -> contextlib.AbstractContextManager:
    """The probe's phase marker, or nothing for a probe without phases."""
    phase = getattr(probe, "phase", None)
    return phase(name) if phase is not None else contextlib.nullcontext()


def _cpu_cap(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> _CpuMemoryCap | None:
    """On CPU every trial counts its memory (a hook per saved tensor: no measurable cost); with
    ``memory_cap_mib`` the count is also the cap."""
    if device.type != "cpu":
        return None
    cap = int(t.memory_cap_mib * 2**20) if t.memory_cap_mib is not None else None
    return _CpuMemoryCap(cap, _static_bytes(model, t), {p.untyped_storage().data_ptr() for p in model.parameters()})


def warm_up(spec: TrialSpec, corpus: Corpus, device: torch.device | str | None = None, steps: int = 3) -> float:
    """A few untimed training steps and one validation window of ``spec``'s model, once per process
    before its first timed trial: imports, thread pools, the CUDA context and cuDNN's first kernels
    are then not charged to whichever configuration happens to run first. Returns the seconds it took."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    t0 = time.perf_counter()
    short = replace(spec.train, budget="tokens", tokens=steps * spec.bptt * spec.batch_size, epochs=None,
                    checkpoints=1, test=False, timeout_s=None, memory_cap_mib=None, warmup_steps=1, time_grid_s=None)
    # The validation checkpoint runs over one window of the valid split, not all of it.
    one_window = (spec.train.eval_bptt + 1) * spec.train.eval_batch_size
    head = replace(corpus, valid=corpus.valid[:one_window]) if corpus.valid.numel() > one_window else corpus
    try:
        run_trial(replace(spec, train=short), head, device)
    except HarnessError:
        pass   # a configuration that cannot run here is reported by the real trial
    release_memory(device)
    return time.perf_counter() - t0


def _summarise_validation(result: TrialResult) -> None:
    """Final and best validation loss and perplexity from the checkpoints' curve."""
    losses = [p["loss"] for p in result.val_curve if p["loss"] is not None and math.isfinite(p["loss"])]
    if not losses:
        return
    result.val_loss, result.best_val_loss = result.val_curve[-1]["loss"], min(losses)
    result.val_ppl, result.best_val_ppl = _ppl(result.val_loss), _ppl(result.best_val_loss)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
