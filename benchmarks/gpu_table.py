"""``make gpu-table``: the published bptt x batch-size table, measured on one data-centre GPU.

1. Grid: ``studies/wikitext2-gpu.toml`` (its corpus, the 2x650 LSTM, its [train] recipe) over bptt
   {35, 70, 140, 280} x batch size {20, 80, 320}, every configuration on the same number of training
   tokens, stored as an ordinary harness study in ``results/published/<device label>/`` (``study.db``
   + ``study.json``), so ``harness report`` and ``harness compare`` work on the folder.
2. Memory wall: at bptt 280 and 560, the largest batch size that fits, found by doubling from 256
   until out of memory, then bisecting between the last fit and the first OOM to 5% (or 32). Each
   attempt is a 3-step run; every attempt, fit or OOM, is a row of ``memory-wall.csv`` with the
   machine's fingerprint.
3. The report (``trials.csv``, ``configs.csv``, ``report.html``), ``fingerprint.json``,
   ``gpu-table.json`` (the plan, the calibration, the wall, what was skipped) and ``gpu-table.log``;
   the ranking table is printed last.

Time: the whole script keeps under ``--max-seconds`` (default 450 s). It first times a few steps at
each batch size (bptt 35, the slowest per token) and gives every grid configuration the largest equal
token budget that fits the grid's share of the time (``--tokens`` overrides); work that would cross
the cap is skipped, logged and listed in ``gpu-table.json``. Rerunning the same command resumes the
study with the budget it started with.

Without CUDA it refuses (exit 2) unless ``--allow-cpu``; ``--allow-cpu --tiny`` is a CPU rehearsal
(synthetic corpus, tiny model, a 2x2 grid, a memory cap that forces OOMs) for the tests.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # the --max-seconds clock starts before the heavy imports

import argparse
import copy
import csv
import datetime as dt
import io
import json
import math
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # gpu_check, also when this file is imported by path

import torch

from harness.errors import HarnessError

STUDY_FILE = Path("studies") / "wikitext2-gpu.toml"
SAFETY = 1.3                # estimated seconds are multiplied by this
STORE_S = 0.5               # per trial: Optuna storage writes, probe start and stop
DEFAULT_MAX_SECONDS = 450.0
MARGIN_FRAC = 0.05          # of --max-seconds, never planned for
# A 2x650 LSTM on an H100, conservatively, for when a calibration run gives no number.
FALLBACK_TPS_PER_BS, FALLBACK_TPS_MAX = 2_000.0, 250_000.0
WALL_STEPS = 3              # step 2 runs its forward while step 1's gradients are alive; step 3 shows it is steady
WALL_UPPER = 65_536         # no OOM by here: the wall is reported as "above"
STATUS_FIT = ("ok", "diverged")  # a diverged step still ran forward and backward: it fit


# --------------------------------------------------------------------------- the search (pure)

@dataclass
class WallSearch:
    """Outcome of :func:`find_max_fitting`: the bracket (largest batch size that fit, smallest that did
    not) and why the search ended."""

    largest_fit: int | None = None
    smallest_fail: int | None = None
    attempts: list[tuple[int, str, bool | None]] = field(default_factory=list)  # (bs, phase, fit)
    reason: str = ""

    @property
    def resolved(self) -> bool:
        return self.reason == "resolved"


def _gap_ok(lo: int, hi: int, resolution: int, rel_resolution: float) -> bool:
    return hi - lo <= max(1, resolution, int(rel_resolution * lo))


def find_max_fitting(try_fn: Callable[[int, str], bool | None], start: int, resolution: int = 32,
                     rel_resolution: float = 0.05, max_attempts: int = 12, upper: int = WALL_UPPER) -> WallSearch:
    """The largest batch size that fits: double from ``start`` until one does not fit (halve if
    ``start`` does not), then bisect between the last fit and the first failure until the gap is at
    most ``max(resolution, rel_resolution x largest fit)``.

    ``try_fn(bs, phase)`` answers True (fits), False (does not: out of memory) or None (inconclusive:
    stop here, e.g. out of time or a broken device). At most ``max_attempts`` calls.
    """
    s = WallSearch()

    def attempt(bs: int, phase: str) -> bool | None:
        fit = try_fn(bs, phase)
        s.attempts.append((bs, phase, fit))
        if fit is True:
            s.largest_fit = bs
        elif fit is False:
            s.smallest_fail = bs
        return fit

    def done(reason: str) -> WallSearch:
        s.reason = reason
        return s

    bs, phase = start, "double"
    while s.smallest_fail is None or s.largest_fit is None:
        if len(s.attempts) >= max_attempts:
            return done("attempt cap")
        fit = attempt(bs, phase)
        if fit is None:
            return done("stopped")
        if fit and s.smallest_fail is None:
            if bs * 2 > upper:
                return done(f"no OOM up to bs {bs} (search limit {upper})")
            bs *= 2
        elif not fit:
            if bs == 1:
                return done("batch size 1 does not fit")
            bs, phase = bs // 2, "halve"
    while not _gap_ok(s.largest_fit, s.smallest_fail, resolution, rel_resolution):
        if len(s.attempts) >= max_attempts:
            return done("attempt cap")
        if attempt((s.largest_fit + s.smallest_fail) // 2, "bisect") is None:
            return done("stopped")
    return done("resolved")


def choose_tokens(seconds: float, per_token_s: float, fixed_s: float, lo: int, hi: int, step: int) -> int:
    """The largest multiple of ``step`` in [lo, hi] with ``fixed_s + tokens x per_token_s <= seconds``;
    ``lo`` when even that does not fit (the caller says so)."""
    if per_token_s <= 0:
        return hi
    fits = int(max(0.0, seconds - fixed_s) / per_token_s) // step * step
    return max(lo, min(hi, fits))


# --------------------------------------------------------------------------- plan, clock, log

@dataclass(frozen=True)
class Plan:
    """What to measure: the full GPU table, or the tiny CPU rehearsal."""

    name: str
    grid_bptt: tuple[int, ...]
    grid_bs: tuple[int, ...]
    wall_bptt: tuple[int, ...]
    wall_start: int
    wall_resolution: int
    wall_rel_resolution: float
    wall_max_attempts: int            # per bptt
    wall_cap_mib: float | None        # a forced memory cap (rehearsal); None: the device's own memory
    wall_reserve_s: float             # kept free for the memory wall while the grid runs
    report_reserve_s: float           # kept free for the report at the end
    calibration_steps: int
    min_trial_timeout_s: float
    token_step: int                   # token budgets are multiples of this
    overrides: dict = field(default_factory=dict)  # study-file tables replaced or updated (tiny)
    description: str = ""


def full_plan() -> Plan:
    return Plan(name="wikitext2-gpu-table", grid_bptt=(35, 70, 140, 280), grid_bs=(20, 80, 320),
                wall_bptt=(280, 560), wall_start=256, wall_resolution=32, wall_rel_resolution=0.05,
                wall_max_attempts=12, wall_cap_mib=None, wall_reserve_s=120.0, report_reserve_s=25.0,
                calibration_steps=30, min_trial_timeout_s=60.0, token_step=10_000,
                description="published table: wikitext2-gpu.toml as a grid, bptt {35,70,140,280} x bs "
                            "{20,80,320}, equal token budget per configuration")


def tiny_plan(device: torch.device) -> Plan:
    # On CPU a 3 MiB cap (counted exactly by the trainer) puts the wall near bs 150 at bptt 8 and bs 80
    # at bptt 16. CUDA's allocator works in 2 MiB segments, so a GPU rehearsal gets a larger cap.
    cuda = device.type == "cuda"
    return Plan(name="gpu-table-tiny", grid_bptt=(4, 12), grid_bs=(8, 16), wall_bptt=(8, 16),
                wall_start=256 if cuda else 16, wall_resolution=8, wall_rel_resolution=0.05,
                wall_max_attempts=14 if cuda else 12, wall_cap_mib=64.0 if cuda else 3.0,
                wall_reserve_s=20.0, report_reserve_s=20.0, calibration_steps=10, min_trial_timeout_s=30.0,
                token_step=500,
                overrides={"corpus": {"source": "synthetic:k=6,vocab=8,noise=2,tokens=20000"},
                           "model": {"type": "lstm", "emsize": 16, "nhid": 32, "layers": 1, "dropout": 0.0},
                           "train": {"optimizer": "adamw", "lr": 0.01, "clip": 1.0, "tokens": 6000,
                                     "checkpoints": 2, "eval_bptt": 64}},
                description="tiny CPU rehearsal of benchmarks/gpu_table.py (not a measurement)")


class Clock:
    """Seconds since the script started, against the --max-seconds cap."""

    def __init__(self, max_seconds: float, started: float | None = None) -> None:
        self.max_seconds = max_seconds
        self.t0 = time.monotonic() if started is None else started

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.max_seconds - self.elapsed()

    def margin(self) -> float:
        return MARGIN_FRAC * self.max_seconds


def fmt_s(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m}m{s:02d}s"


class Log:
    """Progress lines to stderr with elapsed and remaining time; kept for ``gpu-table.log``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        line = f"[{fmt_s(self.clock.elapsed())} elapsed, {fmt_s(self.clock.left())} left] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.lines.append(line)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_text(path: Path, text: str) -> None:
    from harness.report.io import write_files_atomic

    write_files_atomic({path: text})


# --------------------------------------------------------------------------- study config

def table_raw(base_raw: dict, plan: Plan, tokens: int | None, timeout_s: float, device: torch.device) -> dict:
    """The study file as it runs here: the raw TOML edited, so the copy stored with the study is true.
    ``tokens`` None keeps the file's (or the plan's) budget."""
    raw = copy.deepcopy(base_raw)
    for table, values in plan.overrides.items():
        raw[table] = values if table in ("corpus", "model") else {**raw.get(table, {}), **values}
    raw.update(name=plan.name, description=plan.description, sampler="grid", pruner="none",
               device=device.type, search={"bptt": list(plan.grid_bptt), "batch_size": list(plan.grid_bs)})
    raw.pop("trials", None)  # a grid study finishes its whole grid
    raw.pop("storage", None)  # study.json names it
    raw["train"] = {**raw.get("train", {}), "timeout_s": float(timeout_s)}
    if tokens is not None:
        raw["train"]["tokens"] = int(tokens)
    raw["train"].pop("epochs", None)  # an epochs budget would override the equal token budget
    return raw


def table_config(base: Any, plan: Plan, tokens: int | None, timeout_s: float, device: torch.device) -> Any:
    from harness.config import parse_study

    return parse_study(table_raw(base.raw, plan, tokens, timeout_s, device), path=STUDY_FILE,
                       results_root=base.results_root)


def write_study_json(config: Any, storage_url: str, out: Path) -> None:
    """What ``harness.study.write_study_json`` writes, but into ``out`` (it can only write results/<name>/)."""
    from harness.config import redact

    meta = {"study_name": config.name, "storage": redact(storage_url), "objectives": list(config.objectives),
            "cost": config.cost, "sampler": config.sampler, "study_file": str(config.path) if config.path else None}
    write_text(out / "study.json", json.dumps(meta, indent=2))


def stored_tokens(storage: Any, name: str) -> int | None:
    """The token budget of a study already in this storage (a rerun resumes it with the same budget)."""
    import optuna

    if name not in optuna.get_all_study_names(storage):
        return None
    raw = optuna.load_study(study_name=name, storage=storage).user_attrs.get("study_config") or {}
    tokens = (raw.get("train") or {}).get("tokens")
    return int(tokens) if isinstance(tokens, int) else None


# --------------------------------------------------------------------------- calibration and estimates

@dataclass
class Rates:
    """Measured (or assumed) tokens/s per batch size and the per-trial costs around training."""

    tps: dict[int, float]
    setup_s: float = 2.0      # model build, data to the device, probe
    eval_s: float = 1.0       # one validation pass
    measured: bool = False

    def at(self, bs: int) -> float:
        """Tokens/s at ``bs``: the rate of the nearest calibrated batch size at or below it (bigger
        batches run at least as fast), scaled down linearly below the smallest."""
        below = [b for b in self.tps if b <= bs]
        if below:
            return self.tps[max(below)]
        b0 = min(self.tps)
        return self.tps[b0] * bs / b0

    def trial_s(self, bs: int, tokens: int, checkpoints: int) -> float:
        return SAFETY * (tokens / self.at(bs) + self.setup_s + checkpoints * self.eval_s) + STORE_S

    def attempt_s(self, bptt: int, bs: int) -> float:
        return SAFETY * (WALL_STEPS * bptt * bs / self.at(bs) + self.setup_s) + STORE_S


def fallback_rates(bs_list: tuple[int, ...]) -> Rates:
    return Rates({bs: min(FALLBACK_TPS_MAX, FALLBACK_TPS_PER_BS * bs) for bs in bs_list})


def calibrate(config: Any, corpus: Any, device: torch.device, plan: Plan, log: Log) -> tuple[Rates, list[dict]]:
    """Time ``calibration_steps`` steps per grid batch size at the shortest grid bptt (the slowest per
    token: most optimiser steps per token). Warm-up steps are excluded from tokens/s by the trainer."""
    from harness.trainer import TrialSpec, run_trial

    bptt = min(plan.grid_bptt)
    rows, rates = [], fallback_rates(plan.grid_bs)
    measured: dict[int, float] = {}
    setup, evals = [], []
    for bs in plan.grid_bs:
        train = replace(config.train, tokens=bptt * bs * plan.calibration_steps, checkpoints=1, timeout_s=60.0)
        r = run_trial(TrialSpec(bptt=bptt, batch_size=bs, model=config.model, train=train), corpus, device)
        rows.append({"bptt": bptt, "batch_size": bs, "status": r.status, "steps": r.steps,
                     "tokens_per_s": r.tokens_per_s, "train_s": r.train_s, "eval_s": r.eval_s, "wall_s": r.wall_s})
        log(f"calibration bptt={bptt} bs={bs}: {r.status}, "
            + (f"{r.tokens_per_s:,.0f} tok/s" if r.tokens_per_s else "no rate") + f", {r.wall_s:.1f} s")
        if r.tokens_per_s:
            measured[bs] = r.tokens_per_s
            setup.append(max(0.0, r.wall_s - r.train_s - r.eval_s))
            evals.append(r.eval_s)
    if measured:
        # min(setup): the first run also pays CUDA and cuDNN initialisation, once per process.
        rates = Rates({**rates.tps, **measured}, setup_s=min(setup), eval_s=max(evals), measured=True)
    else:
        log("calibration gave no rate; using the assumed H100 rates (conservative)")
    return rates, rows


def grid_cells(plan: Plan) -> list[tuple[int, int]]:
    return [(bptt, bs) for bptt in plan.grid_bptt for bs in plan.grid_bs]


def plan_tokens(plan: Plan, rates: Rates, config: Any, clock: Clock) -> tuple[int, float, float]:
    """(tokens per configuration, seconds the grid may use, estimated grid seconds at that budget)."""
    cells = grid_cells(plan)
    ckpt = config.train.checkpoints
    # Every checkpoint on its own step, even for the largest window x batch.
    step = plan.token_step
    lo = math.ceil(ckpt * max(b * s for b, s in cells) / step) * step
    hi = max(lo, config.train.tokens)
    seconds = clock.left() - plan.wall_reserve_s - plan.report_reserve_s - clock.margin()
    per_token = sum(SAFETY / rates.at(bs) for _, bs in cells)
    fixed = sum(rates.trial_s(bs, 0, ckpt) for _, bs in cells)
    tokens = choose_tokens(seconds, per_token, fixed, lo, hi, step)
    return tokens, seconds, fixed + tokens * per_token


# --------------------------------------------------------------------------- the grid

@dataclass
class GridOutcome:
    done: int = 0
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _next_waiting(study: Any) -> dict | None:
    from optuna.trial import TrialState

    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not waiting:
        return None
    # Optuna pops the oldest waiting trial; its parameters were fixed by enqueue_trial.
    return dict(min(waiting, key=lambda t: t.number).system_attrs.get("fixed_params", {}))


def run_grid(study: Any, config: Any, corpus: Any, device: torch.device, fp: dict, rates: Rates, plan: Plan,
             clock: Clock, log: Log) -> GridOutcome:
    """Run the queued grid trials one by one while each one's estimate fits before the wall's reserve."""
    from harness.study import Objective, TrialFailed, progress, reap

    total = config.n_trials()
    tokens, ckpt = config.train.tokens, config.train.checkpoints

    def on_start(trial: Any, params: dict) -> None:
        p = progress(study)
        log(f"grid trial {p.done + 1}/{total}: bptt={params['bptt']} bs={params['batch_size']} "
            f"(est {rates.trial_s(params['batch_size'], tokens, ckpt):.0f} s)")

    def on_result(trial: Any, record: dict) -> None:
        r = record["result"]
        bits = [record["status"]]
        if r.get("val_ppl"):
            bits.append(f"val ppl {r['val_ppl']:.2f}")
        if r.get("tokens_per_s"):
            bits.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if record["status"] != "ok" and record.get("error"):
            bits.append(record["error"][:120])
        log(f"  {record['config_key']}: {', '.join(bits)}, {r.get('wall_s', 0):.1f} s")

    objective = Objective(config, corpus, device, fp, on_result=on_result, on_start=on_start)
    out = GridOutcome(total=total)
    while True:
        reap(study)  # a rerun after a kill: the dead run's trial is queued again
        params = _next_waiting(study)
        if params is None:
            break
        need = rates.trial_s(params["batch_size"], tokens, ckpt)
        room = clock.left() - plan.wall_reserve_s - plan.report_reserve_s - clock.margin()
        if need > room:
            out.skipped = [f"bptt={p['bptt']} bs={p['batch_size']}" for p in _waiting_params(study)]
            log(f"time cap near: skipping {len(out.skipped)} grid trial(s) (next needs ~{need:.0f} s, "
                f"{max(0.0, room):.0f} s left for the grid); rerun the same command to finish them")
            break
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)
    p = progress(study)
    out.done, out.counts = p.done, dict(p.counts)
    return out


def _waiting_params(study: Any) -> list[dict]:
    from optuna.trial import TrialState

    waiting = sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), key=lambda t: t.number)
    return [dict(t.system_attrs.get("fixed_params", {})) for t in waiting]


# --------------------------------------------------------------------------- the memory wall

def wall_corpus(corpus: Any, bptt: int, bs: int, eval_bs: int) -> Any:
    """The corpus cut to what a wall attempt reads: ``WALL_STEPS`` windows of train (the text tiled,
    so no batch size is refused for a short corpus) and one window of validation, so evaluating
    costs nothing. Memory depends on shapes, not on the text."""
    def tiled(ids: torch.Tensor, n: int) -> torch.Tensor:
        return ids.repeat(math.ceil(n / ids.numel()))[:n]

    held = tiled(corpus.valid, (bptt + 1) * eval_bs)
    return replace(corpus, train=tiled(corpus.train, (bptt * WALL_STEPS + 2) * bs), valid=held, test=held)


WALL_COLUMNS = ("bptt", "batch_size", "tokens_per_step", "status", "phase", "attempt", "steps", "train_s",
                "torch_alloc_mib", "torch_reserved_mib", "nvml_device_mib", "nvml_process_mib",
                "nvml_process_source", "start_mib", "cap_peak_mib", "memory_cap_mib", "probe_kind", "device",
                "started_at", "finished_at", "error", "device_label")


def wall_columns() -> tuple[str, ...]:
    from harness.hardware import FINGERPRINT_KEYS

    return WALL_COLUMNS + tuple(k for k in FINGERPRINT_KEYS if k not in WALL_COLUMNS)


def write_wall_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=wall_columns(), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    write_text(path, buf.getvalue())


def _device_healthy(device: torch.device) -> bool:
    """After an error that is not OOM, is the device still usable? (A sticky CUDA error is not.)"""
    if device.type != "cuda":
        return True
    try:
        (torch.ones(1, device=device) + 1).cpu()
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001 - any error here means the context is gone
        return False


@dataclass
class WallContext:
    config: Any
    corpus: Any
    device: torch.device
    fp: dict
    plan: Plan
    rates: Rates
    clock: Clock
    log: Log
    path: Path
    rows: list[dict] = field(default_factory=list)
    broken: bool = False


def wall_attempt(ctx: WallContext, bptt: int, bs: int, phase: str, deadline: float) -> bool | None:
    """One short run at (bptt, bs): True it ran, False it did not (OOM, or another error on a device
    that still works: the limit of what runs, recorded with its error), None inconclusive (out of
    time, timeout, a broken device). Every run is a row of memory-wall.csv."""
    from gpu_check import memory_now, row_of

    from harness.hardware import device_label
    from harness.probe import make_probe
    from harness.trainer import TrialSpec, release_memory, run_trial

    need = ctx.rates.attempt_s(bptt, bs)
    if ctx.broken or ctx.clock.elapsed() + need > deadline:
        why = "the device failed earlier" if ctx.broken else f"~{need:.0f} s needed, time cap near"
        ctx.log(f"  wall bptt={bptt} bs={bs}: not tried ({why})")
        return None
    t = ctx.config.train
    train = replace(t, tokens=bptt * bs * WALL_STEPS, checkpoints=1, memory_cap_mib=ctx.plan.wall_cap_mib,
                    timeout_s=max(ctx.plan.min_trial_timeout_s, 3 * need))
    spec = TrialSpec(bptt=bptt, batch_size=bs, model=ctx.config.model, train=train)
    release_memory(ctx.device)
    probe = make_probe(ctx.device)
    start_mib, started = memory_now(ctx.device, probe), now_iso()
    result = run_trial(spec, wall_corpus(ctx.corpus, bptt, bs, t.eval_batch_size), ctx.device, probe=probe)
    row = row_of(phase, spec, result, start_mib, ctx.fp)
    row.update(phase=phase, attempt=len(ctx.rows) + 1, tokens_per_step=bptt * bs, steps=result.steps,
               cap_peak_mib=result.probe.peak_mem_mib if ctx.device.type == "cpu" else None, memory_cap_mib=ctx.plan.wall_cap_mib,
               started_at=started, finished_at=now_iso(), device_label=device_label(ctx.fp), **ctx.fp)
    ctx.rows.append(row)
    write_wall_csv(ctx.rows, ctx.path)  # after every attempt: a killed run keeps what it measured
    mem = row["torch_reserved_mib"] or row["cap_peak_mib"] or result.probe.peak_mem_mib
    ctx.log(f"  wall bptt={bptt} bs={bs} ({phase}): {result.status}"
            + (f", peak {mem:,.1f} MiB" if mem else "") + f", {result.wall_s:.1f} s")
    if result.status in STATUS_FIT:
        return True
    if result.status == "oom":
        return False
    error = (result.error or "")[:160]
    if result.status == "failed" and _device_healthy(ctx.device):
        # E.g. a kernel's size limit below the memory wall: nothing larger runs either.
        ctx.log(f"  wall bptt={bptt} bs={bs}: failed ({error}); counted as the limit of what runs")
        return False
    ctx.broken = result.status == "failed"
    ctx.log(f"  wall bptt={bptt} bs={bs}: {result.status} ({error}); search stopped here")
    return None


def run_wall(ctx: WallContext) -> dict[int, WallSearch]:
    """Search each wall bptt in turn, each with an equal share of the time left before the report."""
    out: dict[int, WallSearch] = {}
    p = ctx.plan
    for i, bptt in enumerate(p.wall_bptt):
        left = ctx.clock.left() - p.report_reserve_s - ctx.clock.margin()
        deadline = ctx.clock.elapsed() + max(0.0, left) / (len(p.wall_bptt) - i)
        ctx.log(f"memory wall bptt={bptt}: doubling from bs={p.wall_start} ({max(0.0, left):.0f} s left for "
                f"{len(p.wall_bptt) - i} bptt value(s))")
        def try_fn(bs: int, phase: str, bptt: int = bptt, deadline: float = deadline) -> bool | None:
            return wall_attempt(ctx, bptt, bs, phase, deadline)

        search = find_max_fitting(try_fn, p.wall_start, p.wall_resolution, p.wall_rel_resolution,
                                  p.wall_max_attempts)
        out[bptt] = search
        ctx.log(f"memory wall bptt={bptt}: largest fit bs={search.largest_fit}, smallest that did not "
                f"bs={search.smallest_fail} ({search.reason})")
    return out


def wall_summary(searches: dict[int, WallSearch], rows: list[dict]) -> list[dict]:
    out = []
    for bptt, s in searches.items():
        mine = [r for r in rows if r["bptt"] == bptt]
        fit = [r for r in mine if r["batch_size"] == s.largest_fit and r["status"] in STATUS_FIT]
        # The allocator's reservation on CUDA; the trainer's exact count under a CPU cap.
        peak = (fit[-1]["torch_reserved_mib"] or fit[-1]["cap_peak_mib"]) if fit else None
        fail = [r for r in mine if r["batch_size"] == s.smallest_fail and r["status"] not in STATUS_FIT]
        out.append({"bptt": bptt, "largest_fit_bs": s.largest_fit, "smallest_fail_bs": s.smallest_fail,
                    "fail_status": fail[-1]["status"] if fail else None,
                    "fail_error": fail[-1]["error"] if fail else None,
                    "tokens_per_step_at_fit": bptt * s.largest_fit if s.largest_fit else None,
                    "peak_mib_at_fit": peak, "attempts": len(mine), "result": s.reason})
    return out


def wall_table(summary: list[dict], label: str) -> str:
    head = ("bptt", "largest fit bs", "smallest failing bs", "tokens/step", "peak MiB", "attempts", "search")
    body = [(r["bptt"], r["largest_fit_bs"] or "-",
             f"{r['smallest_fail_bs']} ({r['fail_status']})" if r["smallest_fail_bs"] else "-",
             f"{r['tokens_per_step_at_fit']:,}" if r["tokens_per_step_at_fit"] else "-",
             f"{r['peak_mib_at_fit']:,.1f}" if r["peak_mib_at_fit"] else "-",
             r["attempts"], r["result"]) for r in summary]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = [f"memory wall on {label}:"]
    lines += ["  " + "  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in (head, *body)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def pick_device(args: argparse.Namespace) -> torch.device | None:
    """CUDA when present; CPU only when asked; None (refused) otherwise."""
    if torch.cuda.is_available():
        return torch.device(args.device)
    if not args.allow_cpu:
        return None
    return torch.device("cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="The published bptt x batch-size table on one GPU (make gpu-table).")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU is visible (hours, unless --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, corpus and grid: a rehearsal, not a measurement")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per configuration (default: "
                    "the largest that fits the time, at most the study's)")
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                    help=f"cap on the whole run (default {DEFAULT_MAX_SECONDS:g})")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default results/published/<device label>, or "
                         "results/gpu-table-tiny/<label> with --tiny)")
    args = ap.parse_args(argv)
    if args.tokens is not None and args.tokens < 1:
        ap.error(f"--tokens {args.tokens} must be >= 1")
    if not args.max_seconds > 0:
        ap.error(f"--max-seconds {args.max_seconds} must be > 0")
    if not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r} must be cuda or cuda:N (CPU runs need --allow-cpu)")
    return args


def _sigterm_as_interrupt() -> None:
    """A scheduler's SIGTERM ends the run like Ctrl-C: the running trial is marked failed (a rerun
    retries it) and gpu-table.json and the log are written."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@dataclass
class Run:
    """What the run decided and measured, written as ``gpu-table.json``."""

    started_at: str
    device: str
    device_label: str
    out: str
    max_seconds: float
    tiny: bool
    tokens_per_config: int | None = None
    tokens_source: str = ""
    grid_seconds_planned: float | None = None
    grid_seconds_estimated: float | None = None
    rates_measured: bool = False
    calibration: list[dict] = field(default_factory=list)
    grid: dict = field(default_factory=dict)
    memory_wall: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    finished_at: str | None = None
    elapsed_s: float | None = None


def check_resume(args: argparse.Namespace, stored: int | None, out: Path) -> None:
    """A study resumes only with the budget it started with: equal tokens per configuration."""
    if stored is not None and args.tokens is not None and args.tokens != stored:
        raise HarnessError(f"the study in {out} already ran with {stored:,} tokens per configuration; "
                           "rerun without --tokens to resume it, or pass another --out")


def decide_tokens(args: argparse.Namespace, stored: int | None, plan: Plan, rates: Rates, config: Any,
                  clock: Clock, run: Run, log: Log) -> int:
    tokens, seconds, est = plan_tokens(plan, rates, config, clock)
    run.grid_seconds_planned = round(seconds, 1)
    if stored is not None or args.tokens is not None:
        tokens = stored if stored is not None else args.tokens
        run.tokens_source = "resumed: the study's budget" if stored is not None else "--tokens"
        est = sum(rates.trial_s(bs, tokens, config.train.checkpoints) for _, bs in grid_cells(plan))
    elif tokens >= config.train.tokens:
        run.tokens_source = "the study file's budget, which fits the time"
    else:
        run.tokens_source = "the largest that fits the time"
    run.grid_seconds_estimated = round(est, 1)
    log(f"token budget {tokens:,} per configuration ({run.tokens_source}); grid estimate ~{est:.0f} s "
        f"for {len(grid_cells(plan))} configurations ({seconds:.0f} s available; rates "
        + ", ".join(f"bs {bs}: {rates.at(bs):,.0f} tok/s" for bs in plan.grid_bs) + ")")
    if est > seconds:
        note = (f"the grid estimate ({est:.0f} s) exceeds its share of the time ({seconds:.0f} s): "
                "trials that do not fit will be skipped")
        run.notes.append(note)
        log(note)
    return tokens


def execute(args: argparse.Namespace, device: torch.device, clock: Clock) -> int:
    import optuna

    from harness.config import load_study
    from harness.hardware import device_label, fingerprint
    from harness.study import load_corpus, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines say what each trial did
    # Heartbeats (RDB storages) are "experimental" in Optuna: the same warning at every start says nothing.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    plan = tiny_plan(device) if args.tiny else full_plan()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from threads; a shared CPU loses a lot
    fp = fingerprint(device)
    label = device_label(fp)
    out = (args.out or ROOT / "results" / ("gpu-table-tiny" if args.tiny else "published") / label).resolve()
    log = Log(clock)
    run = Run(started_at=now_iso(), device=str(device), device_label=label, out=str(out),
              max_seconds=args.max_seconds, tiny=args.tiny)
    if device.type == "cpu" and not args.tiny:
        log("warning: the full table on CPU takes hours; the time cap will skip most of it")
    log(f"gpu-table on {device} ({label}) -> {out}")
    base = load_study(ROOT / STUDY_FILE)
    # Everything that can fail on bad input (study file, corpus, storage) fails before anything is written.
    probe_config = table_config(base, plan, None, 1800.0, device)  # its tokens: the most a cell may get
    corpus = load_corpus(probe_config)
    out.mkdir(parents=True, exist_ok=True)
    storage_url = f"sqlite:///{out / 'study.db'}"
    storage = open_storage(storage_url)
    stored = stored_tokens(storage, plan.name)
    check_resume(args, stored, out)
    write_text(out / "fingerprint.json", json.dumps({**fp, "device_label": label, "written_at": now_iso()}, indent=2))
    _sigterm_as_interrupt()
    wall_rows: list[dict] = []
    report = None
    try:
        measure(args, plan, base, probe_config, corpus, device, fp, storage, stored, storage_url, out, clock, run,
                log, wall_rows)
        if not run.grid.get("done"):
            raise HarnessError(f"no grid trial finished within --max-seconds {args.max_seconds:g}, so there is no "
                               "table to report; rerun with more time (finished work is kept)")
        log("writing the report")
        report = make_report(out, storage_url, plan.name)
    except KeyboardInterrupt:
        run.notes.append("interrupted (SIGINT/SIGTERM): what finished is stored; rerun the same command to "
                         f"resume, or build the report with: harness report {out}")
        log(run.notes[-1])
        finish(out, run, log, clock, label, report=None, wall_rows=wall_rows)
        return 130
    except HarnessError as e:
        run.notes.append(f"error: {e}")
        finish(out, run, log, clock, label, report=None, wall_rows=wall_rows)
        raise
    finish(out, run, log, clock, label, report=report, wall_rows=wall_rows)
    return 0


def measure(args: argparse.Namespace, plan: Plan, base: Any, probe_config: Any, corpus: Any, device: torch.device,
            fp: dict, storage: Any, stored: int | None, storage_url: str, out: Path, clock: Clock, run: Run,
            log: Log, wall_rows: list[dict]) -> None:
    """Calibrate, choose the budget, run the grid, then the memory wall; fills ``run`` and ``wall_rows``."""
    from harness.study import create_study, enqueue_grid

    rates, run.calibration = calibrate(probe_config, corpus, device, plan, log)
    run.rates_measured = rates.measured
    tokens = decide_tokens(args, stored, plan, rates, probe_config, clock, run, log)
    run.tokens_per_config = tokens
    # A trial three times slower than estimated ends as timeout instead of eating the memory wall's time.
    slowest = max(rates.trial_s(bs, tokens, probe_config.train.checkpoints) for bs in plan.grid_bs)
    timeout = min(base.train.timeout_s or 1800.0, max(plan.min_trial_timeout_s, 3 * slowest))
    config = table_config(base, plan, tokens, timeout, device)
    study = create_study(config, storage)
    enqueue_grid(study, config)
    write_study_json(config, storage_url, out)
    grid = run_grid(study, config, corpus, device, fp, rates, plan, clock, log)
    run.grid = asdict(grid)
    if grid.skipped:
        run.notes.append(f"grid trials skipped for time: {', '.join(grid.skipped)}")
    ctx = WallContext(config, corpus, device, fp, plan, rates, clock, log, out / "memory-wall.csv", rows=wall_rows)
    try:
        searches = run_wall(ctx)
    except Exception as e:  # noqa: BLE001 - the grid is measured: its report must still be written
        run.notes.append(f"memory wall stopped by an error: {type(e).__name__}: {str(e)[:300]}")
        log(run.notes[-1])
        return
    run.memory_wall = wall_summary(searches, ctx.rows)
    unresolved = [b for b, s in searches.items() if not s.resolved]
    if unresolved:
        run.notes.append(f"memory wall not resolved for bptt {unresolved}: see 'result' in gpu-table.json")


def make_report(out: Path, storage_url: str, name: str) -> Any:
    """The report, or a HarnessError: the measurements are stored, so a failure here loses nothing
    that ``harness report`` cannot rebuild on any machine."""
    from harness.report import generate

    try:
        return generate(out, storage=storage_url, study_name=name)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. plotly missing on the GPU machine
        raise HarnessError(f"the report failed ({type(e).__name__}: {str(e)[:200]}); the measurements are "
                           f"stored: rebuild it with harness report {out}") from None


def finish(out: Path, run: Run, log: Log, clock: Clock, label: str, report: Any, wall_rows: list[dict]) -> None:
    """gpu-table.json and gpu-table.log, then the wall table, the files, and the ranking table last."""
    run.finished_at, run.elapsed_s = now_iso(), round(clock.elapsed(), 1)
    summary_lines = [wall_table(run.memory_wall, label)] if run.memory_wall else []
    files = ["study.db", "study.json", "fingerprint.json", "gpu-table.json", "gpu-table.log"]
    files += ["memory-wall.csv"] if wall_rows else []
    files += ["trials.csv", "configs.csv", "report.html"] if report is not None else []
    summary_lines.append(f"wrote {out}/: {', '.join(files)} (finished in {fmt_s(clock.elapsed())})")
    summary_lines += [f"note: {n}" for n in run.notes]
    if report is not None:
        summary_lines += ["", report.summary]  # the ranking table, last
    text = "\n".join(summary_lines)
    write_text(out / "gpu-table.json", json.dumps(asdict(run), indent=2, default=str))
    write_text(out / "gpu-table.log", "\n".join(log.lines + ["", text]) + "\n")
    print(text, flush=True)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.max_seconds, started)
    device = pick_device(args)
    if device is None:
        print("error: no CUDA GPU is visible; the table needs one (pass --allow-cpu, with --tiny for a quick "
              "CPU rehearsal)", file=sys.stderr)
        return 2
    try:
        return execute(args, device, clock)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # a machine without the harness's dependencies: say which
        print(f"error: Python package {e.name!r} is missing here; install the harness's dependencies "
              "(pyproject.toml) first", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(started=_STARTED))
