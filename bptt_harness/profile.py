"""The memory and speed map: a few timed steps per (bptt, batch size) cell, and the memory wall.

Perplexity needs full training; memory and throughput need a handful of steps. ``bptt-harness profile``
runs, for every cell of a study's search space, ``warmup_steps`` untimed and ``steps`` timed
training steps (no full training, one window of validation), recording training peak memory, tokens
per second and achieved FLOP/s. Then, for each bptt, it finds the largest batch size that fits
(doubling, then bisection), beyond the search space if the wall lies there. Out-of-memory attempts
are rows, not crashes. The result is ``results/<study>/profile.csv``, one row per attempt.

The sweep and the report read it back through :mod:`bptt_harness.profile_csv`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bptt_harness.batching import batchify
from bptt_harness.config import StudyConfig
from bptt_harness.fileio import write_files_atomic
from bptt_harness.model import family_of
from bptt_harness.probe import make_probe
from bptt_harness.profile_csv import PROFILE_COLUMNS, PROFILE_CSV, PROFILE_FINGERPRINT, STATUS_FIT, ProfileRow, cells, grid_values
from bptt_harness.spec import RunOptions, TrialSpec
from bptt_harness.trainer import WARM_UP_STEPS, release_memory, run_trial

log = logging.getLogger(__name__)

WALL_UPPER = 65_536           # no out-of-memory by this batch size: the wall is "above"


# --------------------------------------------------------------------------- the wall search (pure)

@dataclass
class WallSearch:
    """The bracket around the largest batch size that fits, and why the search ended."""

    largest_fit: int | None = None
    smallest_fail: int | None = None
    attempts: list[tuple[int, bool | None]] = field(default_factory=list)
    reason: str = ""


def find_max_fitting(try_fn: Callable[[int], bool | None], start: int, resolution: float = 0.05,
                     max_attempts: int = 14, upper: int = WALL_UPPER) -> WallSearch:
    """The largest batch size that fits: double from ``start`` until one does not (halve while
    ``start`` does not), then bisect until the gap is at most ``resolution`` x the largest fit (and at
    least 1). ``try_fn(bs)`` answers True (fits), False (out of memory) or None (inconclusive: stop)."""
    s = WallSearch()

    def attempt(bs: int) -> bool | None:
        fit = try_fn(bs)
        s.attempts.append((bs, fit))
        if fit is True:
            s.largest_fit = bs
        elif fit is False:
            s.smallest_fail = bs
        return fit

    bs = start
    while s.smallest_fail is None or s.largest_fit is None:
        if len(s.attempts) >= max_attempts:
            s.reason = "attempt cap"
            return s
        fit = attempt(bs)
        if fit is None:
            s.reason = "stopped"
            return s
        if fit and s.smallest_fail is None:
            if bs * 2 > upper:
                s.reason = f"no out-of-memory up to bs {bs}"
                return s
            bs *= 2
        elif not fit:
            if bs == 1:
                s.reason = "batch size 1 does not fit"
                return s
            bs = bs // 2
        else:  # fits below a known failure: bisect from here
            break
    while True:
        lo, hi = s.largest_fit, s.smallest_fail
        assert lo is not None and hi is not None  # the loop above ends only with both known
        if hi - lo <= max(1, int(resolution * lo)):
            break
        if len(s.attempts) >= max_attempts:
            s.reason = "attempt cap"
            return s
        if attempt((lo + hi) // 2) is None:
            s.reason = "stopped"
            return s
    s.reason = "resolved"
    return s


# --------------------------------------------------------------------------- measuring

def short_corpus(corpus: Any, bptt: int, bs: int, steps: int, eval_bs: int, eval_bptt: int) -> Any:
    """The corpus cut to what ``steps`` windows read (the text tiled, so no shape is refused for a short
    corpus: memory and speed depend on shapes, not on the text) and one window of validation."""
    def tiled(ids: Any, n: int) -> Any:
        return ids.repeat(math.ceil(n / ids.numel()))[:n]

    held = tiled(corpus.valid, (min(bptt, eval_bptt) + 1) * eval_bs)
    return replace(corpus, train=tiled(corpus.train, (bptt * steps + 2) * bs), valid=held, test=held)


# A cell's timed steps must add up to at least this: a few steps of a tiny window take milliseconds,
# and timing them measured 0.3x to 6x the rate of a whole trial of the same cell on CPU.
MIN_TIMED_S = 1.0
MAX_STEPS = 2_000


def profile_cell(config: StudyConfig, corpus: Any, device: Any, bptt: int, bs: int, phase: str,
                 steps: int = 5, warmup: int = 2, probe_factory: Callable[[Any], Any] | None = None,
                 warm_up_steps: int = 0) -> ProfileRow:
    """``warmup`` untimed and at least ``steps`` timed training steps of one cell -> its row. A cell whose
    timed steps took under :data:`MIN_TIMED_S` is measured again with more steps. ``warm_up_steps``: the
    process's start-up, before the first cell (``RunOptions.warm_up_steps``)."""
    t = config.train
    while True:
        total = warmup + steps
        train = replace(t.short(total * bptt * bs), warmup_steps=warmup, variable_bptt=False, log_every=total,
                        eval_bptt=min(t.eval_bptt, bptt))
        spec = replace(_spec(config, bptt, bs), train=train)
        small = short_corpus(corpus, bptt, bs, total, t.eval_batch_size, t.eval_bptt)
        r = run_trial(spec, small, device, probe=(probe_factory or make_probe)(device),
                      options=RunOptions(memory_cap_mib=config.memory_cap_mib, warm_up_steps=warm_up_steps))
        warm_up_steps = 0
        timed_s = steps * bptt * bs / r.tokens_per_s if r.tokens_per_s else math.inf
        # Only the map's rates are planned with; a wall attempt needs the memory of a few steps.
        if phase != "grid" or r.status != "ok" or timed_s >= MIN_TIMED_S or steps >= MAX_STEPS:
            break
        steps = min(MAX_STEPS, math.ceil(steps * 1.5 * MIN_TIMED_S / max(timed_s, 1e-6)))
    return ProfileRow(bptt=bptt, batch_size=bs, phase=phase, status=r.status,
                      error=r.error.splitlines()[0][:300] if r.error else None, steps=r.steps, tokens_per_step=bptt * bs,
                      tokens_per_s=r.tokens_per_s, achieved_flops_per_s=r.achieved_flops,
                      peak_mem_mib=r.probe.peak_mem_mib, peak_mem_torch_mib=r.probe.peak_mem_torch_mib,
                      peak_mem_nvml_mib=r.probe.peak_mem_nvml_mib,
                      memory_cap_mib=config.memory_cap_mib, seconds=r.wall_s, device=str(device))


def _spec(config: StudyConfig, bptt: int, bs: int) -> TrialSpec:
    return TrialSpec(bptt=bptt, batch_size=bs, model=config.model, train=config.train)


def time_validation(config: StudyConfig, corpus: Any, device: Any) -> ProfileRow:
    """One full validation pass of the study's model (what every checkpoint costs), as a row of phase
    ``eval`` (bptt and batch size are the evaluation's)."""
    t = config.train
    family = family_of(config.model)
    model = family.build(config.model, corpus.vocab_size).to(device)
    valid = batchify(corpus.valid, t.eval_batch_size).to(device)
    amp = t.amp == "bf16" and getattr(device, "type", "cpu") == "cuda"
    start = time.perf_counter()
    family.evaluate(model, config.model, valid, t.eval_bptt, amp)
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del model, valid
    release_memory(device)
    return ProfileRow(bptt=t.eval_bptt, batch_size=t.eval_batch_size, phase="eval", status="ok",
                      tokens_per_step=t.eval_bptt * t.eval_batch_size,
                      tokens_per_s=corpus.valid.numel() / seconds if seconds > 0 else None,
                      memory_cap_mib=config.memory_cap_mib, seconds=seconds, device=str(device))


@dataclass
class Profile:
    rows: list[ProfileRow]
    walls: dict[int, WallSearch]


def run_profile(config: StudyConfig, corpus: Any, device: Any, steps: int = 5, wall: bool | None = None,
                on_row: Callable[[ProfileRow], None] | None = None,
                measure: Callable[..., ProfileRow] = profile_cell) -> Profile:
    """Every cell of the study's search space, then the memory wall per bptt.

    The wall is searched where a wall exists: on a GPU, or under a memory cap (``max_memory_gib``) on
    CPU. ``wall=None`` decides that; ``on_row`` sees each attempt as it finishes (progress)."""
    if wall is None:
        wall = getattr(device, "type", "cpu") == "cuda" or config.memory_cap_mib is not None
    rows: list[ProfileRow] = []

    def run(bptt: int, bs: int, phase: str) -> ProfileRow:
        # The first attempt carries the process's warm-up: start-up is not the first cell's.
        row = measure(config, corpus, device, bptt, bs, phase, steps=steps,
                      warm_up_steps=0 if rows else WARM_UP_STEPS)
        rows.append(row)
        if on_row:
            on_row(row)
        return row

    for bptt, bs in cells(config):
        run(bptt, bs, "grid")
    rows.append(time_validation(config, corpus, device))
    if on_row:
        on_row(rows[-1])
    walls: dict[int, WallSearch] = {}
    if wall:
        for bptt in grid_values(config, "bptt"):
            mine = [r for r in rows if r.bptt == bptt]
            fit = [r.batch_size for r in mine if r.fits]
            failed = [r.batch_size for r in mine if not r.fits and r.status == "oom"]
            known = {r.batch_size: r.fits for r in mine if r.status in (*STATUS_FIT, "oom")}

            def try_fn(bs: int, bptt: int = bptt, known: dict = known) -> bool | None:
                if bs in known:
                    return known[bs]
                row = run(bptt, bs, "wall")
                return True if row.fits else False if row.status == "oom" else None

            start = max(fit) if fit else max(1, min(failed) // 2 if failed else 1)
            walls[bptt] = find_max_fitting(try_fn, start)
    return Profile(rows, walls)


# --------------------------------------------------------------------------- writing it

def write_profile(profile: Profile, directory: Path, fingerprint: dict) -> Path:
    """``profile.csv``: one row per attempt, with the machine's fingerprint on every row."""
    df = pd.DataFrame([dataclasses.asdict(r) for r in profile.rows], columns=list(PROFILE_COLUMNS))
    for key in PROFILE_FINGERPRINT:
        df[key] = fingerprint.get(key)
    path = directory / PROFILE_CSV
    directory.mkdir(parents=True, exist_ok=True)
    write_files_atomic({path: df.to_csv(index=False, lineterminator="\n")})
    return path


