"""One trial: build a model, train it with truncated BPTT under a declared budget, evaluate it.

The step loop never reads a value back to the host: losses, gradient norms and the divergence
flag accumulate in device tensors and are read every ``log_every`` steps and at checkpoints.
Every way a trial can end (ok, diverged, oom, pruned, timeout, failed) is a :class:`TrialResult`,
never an exception for the caller.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from harness.batching import VariableBptt, batchify, epoch_windows, get_batch, windows
from harness.corpus import Corpus, check_fits
from harness.errors import HarnessError
from harness.model import ModelConfig, RNNModel, count_params, flops_per_token, repackage_hidden

log = logging.getLogger(__name__)

STATUSES = ("ok", "diverged", "oom", "pruned", "timeout", "failed")


@dataclass(frozen=True)
class TrainConfig:
    """How a trial trains. Every field is a study-file key under ``[train]``.

    Attributes:
        optimizer: ``"sgd"`` (the canonical recipe: lr 20, clip 0.25, lr / ``anneal`` when validation
            stops improving) or ``"adamw"`` (fused on CUDA).
        lr: learning rate.
        weight_decay: AdamW weight decay.
        clip: gradient-norm clipping threshold (0 disables clipping; the norm is still recorded).
        budget: ``"tokens"`` (every configuration sees the same training tokens; the fair default)
            or ``"seconds"`` of training time.
        tokens: training tokens when ``budget = "tokens"``.
        epochs: if set, overrides ``tokens`` with ``epochs`` passes over the train split.
        seconds: training seconds when ``budget = "seconds"``.
        checkpoints: validation evaluations spread evenly over the budget (the last one is the end).
        spike_factor: a logged training loss above ``spike_factor`` x its running minimum is divergence.
        timeout_s: wall-clock limit for the whole trial; past it the trial ends as ``timeout``.
        seed: seeds the model initialisation, dropout and variable-length windows.
        eval_batch_size: columns used for validation and test (fixed, so every configuration is
            evaluated the same way; the state is carried through the whole split).
        eval_bptt: window length for evaluation. With the state carried it only changes speed.
        test: also evaluate the test split at the end.
        variable_bptt: AWD-LSTM variable window lengths around ``bptt`` with the lr scaled by length.
        reset_every: reset the hidden state to zeros every N windows (None: carry it for the whole pass).
        anneal: SGD learning-rate divisor when a checkpoint does not improve validation loss.
        amp: ``"bf16"`` autocast on CUDA, or ``None``.
        tf32: allow TF32 matmuls on CUDA.
        compile: wrap the model in ``torch.compile``.
        memory_cap_mib: a memory budget for the trial. On CUDA it is the allocator's hard limit; on
            CPU parameters, gradients, optimiser state and saved activations are counted against it.
            Exceeding it ends the trial as ``oom``.
        log_every: steps between reads of the device-side accumulators (divergence checks, curve points).
        warmup_steps: steps excluded from the tokens/s measurement.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 20.0
    weight_decay: float = 0.0
    clip: float = 0.25
    budget: Literal["tokens", "seconds"] = "tokens"
    tokens: int = 200_000
    epochs: float | None = None
    seconds: float = 60.0
    checkpoints: int = 4
    spike_factor: float = 3.0
    timeout_s: float | None = None
    seed: int = 0
    eval_batch_size: int = 10
    eval_bptt: int = 70
    test: bool = False
    variable_bptt: bool = False
    reset_every: int | None = None
    anneal: float = 4.0
    amp: Literal["bf16"] | None = None
    tf32: bool = True
    compile: bool = False
    memory_cap_mib: float | None = None
    log_every: int = 25
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> HarnessError:
            return HarnessError(f"train {key}={getattr(self, key)!r} is invalid; {allowed}")

        if self.optimizer not in ("sgd", "adamw"):
            raise bad("optimizer", "use 'sgd' or 'adamw'")
        if self.budget not in ("tokens", "seconds"):
            raise bad("budget", "use 'tokens' or 'seconds'")
        for key in ("lr", "seconds"):
            if not _finite_number(getattr(self, key)) or getattr(self, key) <= 0:
                raise bad(key, "it must be a number > 0")
        if not _finite_number(self.clip) or self.clip < 0:
            raise bad("clip", "it must be a number >= 0 (0 disables clipping)")
        if not _finite_number(self.spike_factor) or self.spike_factor <= 1:
            raise bad("spike_factor", "it must be a number > 1")
        for key in ("tokens", "checkpoints", "eval_batch_size", "eval_bptt", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "it must be an integer >= 1")
        if self.epochs is not None and (not _finite_number(self.epochs) or self.epochs <= 0):
            raise bad("epochs", "it must be a number > 0")
        if self.timeout_s is not None and (not _finite_number(self.timeout_s) or self.timeout_s <= 0):
            raise bad("timeout_s", "it must be a number of seconds > 0")
        if self.amp not in (None, "bf16"):
            raise bad("amp", "use 'bf16' or leave it out")
        if self.memory_cap_mib is not None and (not _finite_number(self.memory_cap_mib) or self.memory_cap_mib <= 0):
            raise bad("memory_cap_mib", "it must be a number of MiB > 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise bad("seed", "it must be an integer in [0, 2**32)")
        if not _finite_number(self.anneal) or self.anneal < 1:
            raise bad("anneal", "it must be a number >= 1 (1 disables annealing)")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "it must be a number >= 0")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise bad("warmup_steps", "it must be an integer >= 0")
        if self.reset_every is not None and (not isinstance(self.reset_every, int) or isinstance(
                self.reset_every, bool) or self.reset_every < 1):
            raise bad("reset_every", "it must be an integer >= 1 (or left out to carry the state)")


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrialSpec:
    """One configuration to measure."""

    bptt: int
    batch_size: int
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for key in ("bptt", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"{key}={value!r} must be an integer >= 1")


@dataclass
class TrialResult:
    """Everything one trial measured. ``asdict`` of it is what the study stores."""

    status: str = "ok"
    error: str | None = None
    diverged_step: int | None = None
    bptt: int = 0
    batch_size: int = 0
    seed: int = 0
    device: str = "cpu"
    val_loss: float | None = None
    val_ppl: float | None = None
    best_val_loss: float | None = None
    best_val_ppl: float | None = None
    test_ppl: float | None = None
    train_tokens: int = 0
    steps: int = 0
    tokens_per_s: float | None = None
    train_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    max_grad_norm: float | None = None
    clipped_frac: float | None = None
    n_params: int = 0
    flops_per_token: float = 0.0
    achieved_flops: float | None = None
    final_lr: float | None = None
    # Each point: step, tokens seen, training seconds elapsed and the loss.
    train_curve: list[dict] = field(default_factory=list)
    val_curve: list[dict] = field(default_factory=list)
    probe: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


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
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MARKERS))


def resolve_device(name: str | None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU. Asking for CUDA without one is a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise HarnessError(f"device {name!r} is not known; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Counts what a training step keeps alive on CPU and raises the real OOM type past the cap.

    CPU has no allocator statistics like CUDA's, and RSS is blurred by malloc's reuse, so we count
    bytes exactly: static (parameters, gradients, optimiser state) plus the activations autograd saves.
    """

    def __init__(self, cap_bytes: int, static_bytes: int, param_ptrs: set[int] = frozenset()) -> None:
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
            if total > self.cap:
                raise torch.OutOfMemoryError(
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


def evaluate(model: RNNModel, matrix: torch.Tensor, bptt: int, bs: int, amp: bool) -> float:
    """Mean cross-entropy over a split with fixed windows and the state carried through it."""
    model.eval()
    total = torch.zeros((), device=matrix.device, dtype=torch.float64)
    count = 0
    hidden = model.init_hidden(bs)
    with torch.inference_mode(), torch.autocast(matrix.device.type, dtype=torch.bfloat16, enabled=amp):
        for x, y in windows(matrix, bptt):
            logits, hidden = model(x, hidden)
            total += F.cross_entropy(logits.float(), y, reduction="sum").double()
            count += y.numel()
    model.train()
    return total.item() / count


def budget_steps(spec: TrialSpec, train_tokens: int) -> int | None:
    """Optimiser steps the token budget allows (None for a seconds budget)."""
    t = spec.train
    if t.budget == "seconds":
        return None
    if t.epochs is not None:
        # One epoch is one pass of windows over the batchified matrix (its last window is shorter), as
        # in the canonical example; train_tokens / (bptt * bs) can spill a step into the next pass.
        per_epoch = math.ceil((train_tokens // spec.batch_size - 1) / spec.bptt)
        return max(1, math.ceil(round(t.epochs * per_epoch, 6)))
    return max(1, math.ceil(t.tokens / (spec.bptt * spec.batch_size)))


def _make_optimizer(model: RNNModel, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr)
    # Fused on CUDA and CPU: the unfused AdamW calls step.item() for every parameter at every step.
    try:
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                 fused=device.type in ("cuda", "cpu"))
    except RuntimeError:  # a torch without the fused kernel for this device
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def _static_bytes(model: RNNModel, t: TrainConfig) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights + gradients (+ AdamW's two moments)
    return params * (4 if t.optimizer == "adamw" else 2)


def run_trial(spec: TrialSpec, corpus: Corpus, device: torch.device | str | None = None,
              probe: Any | None = None, on_checkpoint: CheckpointCallback | None = None) -> TrialResult:
    """Train and evaluate one configuration. Never raises for a trial outcome; see ``TrialResult.status``.

    ``probe`` is a context manager wrapped around the training part (see :mod:`harness.probe`); its
    ``report()`` dict is stored in ``TrialResult.probe``. ``on_checkpoint(index, point)`` is called at
    each validation checkpoint and returns True to prune the trial.

    Raises :class:`HarnessError` only for a configuration that cannot run at all on this corpus
    (e.g. a split too short for one window), before anything is trained.
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    t = spec.train
    check_fits(corpus, spec.batch_size, spec.bptt, t.eval_batch_size)
    result = TrialResult(bptt=spec.bptt, batch_size=spec.batch_size, seed=t.seed, device=str(device))
    start = time.perf_counter()
    status, error = "ok", None
    cuda_cap = False
    try:
        with _deadline(t.timeout_s):
            if device.type == "cuda" and t.memory_cap_mib is not None:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, t.memory_cap_mib * 2**20 / total), device)
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
    result.status, result.error = status, error
    if status in ("pruned", "timeout") and result.val_loss is None:
        _summarise_validation(result)  # stopped early but measured: keep the checkpoints' perplexity
    result.wall_s = time.perf_counter() - start
    if probe is not None and hasattr(probe, "report"):
        try:
            result.probe = {**probe.report(), **result.probe}
        except Exception as e:  # noqa: BLE001 - a broken probe must not lose the trial
            log.warning("probe report failed: %s", e)
    return result


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _train_and_eval(spec: TrialSpec, corpus: Corpus, device: torch.device, probe: Any | None,
                    on_checkpoint: CheckpointCallback | None, result: TrialResult, start: float) -> None:
    t = spec.train
    torch.manual_seed(t.seed)
    rng = np.random.default_rng(t.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    amp = t.amp == "bf16" and device.type == "cuda"

    # Data goes to the device once; windows are views of these matrices.
    train = batchify(corpus.train, spec.batch_size).to(device)
    valid = batchify(corpus.valid, t.eval_batch_size).to(device)
    model = RNNModel(spec.model, corpus.vocab_size).to(device)
    result.n_params = count_params(model)
    result.flops_per_token = flops_per_token(spec.model, corpus.vocab_size)
    forward = torch.compile(model) if t.compile else model
    opt = _make_optimizer(model, t, device)
    lr = t.lr
    # Never force windows longer than bptt itself (AWD-LSTM's minimum of 5 assumes bptt ~ 70).
    variable = VariableBptt(spec.bptt, min_len=min(5, spec.bptt)) if t.variable_bptt else None
    meter = _Meter(device, t.clip)
    cap = None
    if t.memory_cap_mib is not None and device.type == "cpu":
        cap = _CpuMemoryCap(int(t.memory_cap_mib * 2**20), _static_bytes(model, t),
                            {p.untyped_storage().data_ptr() for p in model.parameters()})
    saved_hooks = (torch.autograd.graph.saved_tensors_hooks(cap.pack, cap.unpack) if cap
                   else contextlib.nullcontext())

    max_steps = budget_steps(spec, corpus.train.numel())
    n_ckpt = t.checkpoints
    # Checkpoint k (1-based) is due when progress reaches k / n_ckpt of the budget.
    if max_steps is None:
        progress = lambda step, secs: secs / t.seconds  # noqa: E731
    elif variable is None:
        progress = lambda step, secs: step / max_steps  # noqa: E731
    else:
        # Variable windows: count tokens, not steps, so every configuration still sees the same data.
        budget_tokens = max_steps * spec.bptt * spec.batch_size
        progress = lambda step, secs: tokens / budget_tokens  # noqa: E731
    next_ckpt = 1
    # An untrained model predicts about uniformly (loss ~ log V): a loss far above that is divergence
    # even when it was never lower, e.g. a huge learning rate that blows up in the first steps.
    uniform_loss = math.log(corpus.vocab_size)
    running_min = uniform_loss
    tokens = steps = 0
    eval_s = 0.0          # checkpoint evaluation time, excluded from training time
    # Warm-up (allocator growth, cuDNN autotuning) is excluded from tokens/s; a trial too short to
    # spare it is timed whole.
    warm = t.warmup_steps if max_steps is None else min(t.warmup_steps, max_steps // 5)
    timed_from: tuple[float, int] | None = (0.0, 0) if warm == 0 else None  # (train clock, tokens)
    best_val = math.inf
    hidden = model.init_hidden(spec.batch_size)
    deadline = start + t.timeout_s if t.timeout_s else None

    def train_seconds() -> float:
        return time.perf_counter() - train_start - eval_s

    def read_and_check() -> None:
        nonlocal running_min
        mean, first_bad, n = meter.read_interval()
        if n == 0:
            return
        result.train_curve.append({"step": steps, "tokens": tokens, "seconds": round(train_seconds(), 4),
                                   "loss": mean if math.isfinite(mean) else None})
        if first_bad >= 0:
            raise Diverged(first_bad, f"non-finite loss or gradient norm at step {first_bad}")
        if mean > t.spike_factor * running_min:
            raise Diverged(steps, f"loss {mean:.3g} at step {steps} is above {t.spike_factor:g} x "
                                  f"its running minimum {running_min:.3g}")
        running_min = min(running_min, mean)

    def checkpoint() -> None:
        nonlocal eval_s
        _sync(device)
        t0 = time.perf_counter()
        seconds = round(train_seconds(), 4)
        try:
            evaluate_checkpoint(seconds)
        finally:
            # Evaluation and the caller's callback (storage round-trips for pruning) are not training.
            eval_s += time.perf_counter() - t0

    def evaluate_checkpoint(seconds: float) -> None:
        nonlocal lr, best_val
        val = evaluate(model, valid, t.eval_bptt, t.eval_batch_size, amp)
        point = {"step": steps, "tokens": tokens, "seconds": seconds, "loss": val, "ppl": _ppl(val)}
        result.val_curve.append(point)
        if not math.isfinite(val) or val > t.spike_factor * uniform_loss:
            raise Diverged(steps, f"validation loss {val:.4g} at step {steps} is not finite or above "
                                  f"{t.spike_factor:g} x that of a uniform guess ({uniform_loss:.3g})")
        if val < best_val:
            best_val = val
        elif t.optimizer == "sgd":
            lr /= t.anneal  # the canonical recipe: anneal when validation stops improving
        if on_checkpoint is not None and on_checkpoint(len(result.val_curve) - 1, point):
            raise Pruned(f"pruned at checkpoint {len(result.val_curve)} (val ppl {point['ppl']:.4g})")

    probe_ctx = probe if probe is not None else contextlib.nullcontext()
    train_start = time.perf_counter()
    try:
        with probe_ctx, saved_hooks:
            done = False
            while not done:
                hidden = model.init_hidden(spec.batch_size)
                for n_window, (i, seq_len) in enumerate(epoch_windows(train.size(0), spec.bptt, variable, rng)):
                    if t.reset_every and n_window % t.reset_every == 0:
                        hidden = model.init_hidden(spec.batch_size)
                    x, y = get_batch(train, i, seq_len)
                    hidden = repackage_hidden(hidden)
                    step_lr = lr * (variable.lr_factor(seq_len) if variable else 1.0)
                    for group in opt.param_groups:
                        group["lr"] = step_lr
                    if cap:
                        cap.step_start()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        logits, hidden = forward(x, hidden)
                        loss = F.cross_entropy(logits.float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip if t.clip > 0 else math.inf)
                    opt.step()
                    meter.update(loss, norm)
                    steps += 1
                    tokens += y.numel()

                    if steps == warm:
                        _sync(device)
                        timed_from = (train_seconds(), tokens)
                    done_frac = progress(steps, train_seconds())
                    due = done_frac >= next_ckpt / n_ckpt
                    if steps % t.log_every == 0 or due:
                        read_and_check()
                    if due:
                        checkpoint()
                        # Skip every checkpoint this step has reached: with fewer steps than
                        # checkpoints, one evaluation per step, and the budget is not overrun.
                        while next_ckpt <= n_ckpt and done_frac >= next_ckpt / n_ckpt:
                            next_ckpt += 1
                    if next_ckpt > n_ckpt:
                        done = True
                        break
                    if deadline is not None and time.perf_counter() > deadline:
                        raise TrialTimeout(f"trial exceeded its timeout of {t.timeout_s:g} s")
    finally:
        _sync(device)
        result.train_s = train_seconds()
        result.eval_s = eval_s
        result.steps, result.train_tokens = steps, tokens
        result.final_lr = lr
        if steps:
            result.max_grad_norm = float(meter.max_norm.item())
            result.clipped_frac = float(meter.clipped.item()) / steps if t.clip > 0 else 0.0
        if timed_from is not None and tokens > timed_from[1] and result.train_s > timed_from[0]:
            result.tokens_per_s = (tokens - timed_from[1]) / (result.train_s - timed_from[0])
            result.achieved_flops = result.tokens_per_s * result.flops_per_token
        if cap:
            result.probe["cpu_cap_peak_mib"] = cap.peak / 2**20

    _summarise_validation(result)
    if t.test:
        t0 = time.perf_counter()
        test = batchify(corpus.test, t.eval_batch_size).to(device)
        result.test_ppl = _ppl(evaluate(model, test, t.eval_bptt, t.eval_batch_size, amp))
        result.eval_s += time.perf_counter() - t0


def _summarise_validation(result: TrialResult) -> None:
    """Final and best validation loss and perplexity from the checkpoints' curve."""
    losses = [p["loss"] for p in result.val_curve if p["loss"] is not None and math.isfinite(p["loss"])]
    if not losses:
        return
    result.val_loss, result.best_val_loss = result.val_curve[-1]["loss"], min(losses)
    result.val_ppl, result.best_val_ppl = _ppl(result.val_loss), _ppl(result.best_val_loss)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
