"""The memory and speed map: a few timed steps per (bptt, batch size) cell, and the memory wall.

Perplexity needs full training; memory and throughput need a handful of steps. ``bptt-harness profile``
runs, for every cell of a study's search space, ``warmup_steps`` untimed and ``steps`` timed
training steps (no full training, one window of validation), recording training peak memory, tokens
per second and achieved FLOP/s. Then, for each bptt, it finds the largest batch size that fits
(doubling, then bisection), beyond the search space if the wall lies there. Out-of-memory attempts
are rows, not crashes. The result is ``results/<study>/profile.csv``, one row per attempt.

The sweep reads it: cells that cannot fit are recorded as out of memory without training, and
``--max-seconds`` plans the token budget from the profiled rates.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bptt_harness.config import StudyConfig
from bptt_harness.errors import HarnessError
from bptt_harness.spec import RunOptions

log = logging.getLogger(__name__)

PROFILE_CSV = "profile.csv"
WALL_UPPER = 65_536           # no out-of-memory by this batch size: the wall is "above"
STATUS_FIT = ("ok", "diverged")  # a diverged step still ran forward and backward: it fit


@dataclass
class ProfileRow:
    """One attempt: a few timed training steps of one (bptt, batch size)."""

    bptt: int
    batch_size: int
    phase: str                       # grid (a cell of the search space) or wall (the memory-wall search)
    status: str
    error: str | None = None
    steps: int = 0
    tokens_per_step: int = 0
    tokens_per_s: float | None = None
    achieved_flops_per_s: float | None = None
    peak_mem_mib: float | None = None
    peak_mem_torch_mib: float | None = None
    peak_mem_nvml_mib: float | None = None
    memory_cap_mib: float | None = None
    seconds: float = 0.0
    device: str = ""

    @property
    def fits(self) -> bool:
        return self.status in STATUS_FIT

    @property
    def memory_mib(self) -> float | None:
        return self.peak_mem_mib


PROFILE_COLUMNS = tuple(f.name for f in dataclasses.fields(ProfileRow))
# The machine's fingerprint, on every row (bptt_harness.hardware.fingerprint).
PROFILE_FINGERPRINT = ("gpu_name", "gpu_memory_mib", "cpu_model", "torch_version", "machine_id", "hostname")
# What each profile.csv column means: the table of bptt_harness/report/README.md (profile_columns_markdown).
PROFILE_DOCS = {
    "bptt": "the window length of the attempt (for phase eval: the validation's eval_bptt)",
    "batch_size": "the batch size of the attempt (for phase eval: eval_batch_size)",
    "phase": "grid (a (bptt, batch size) cell of the search space), wall (an attempt of the search for the largest "
             "batch size that fits at this bptt, beyond the search space if need be) or eval (one full validation "
             "pass of the study's model: what each checkpoint costs)",
    "status": "ok, oom (ran out of memory, or past memory_cap_mib), diverged (ran, so it fits) or failed",
    "error": "why the attempt did not finish ok (first line)",
    "steps": "training steps taken: 2 untimed, then the timed ones (more when the timed ones took under a second)",
    "tokens_per_step": "bptt x batch_size",
    "tokens_per_s": "training tokens per second over the timed steps (eval: validation tokens per second)",
    "achieved_flops_per_s": "tokens_per_s x the model's estimated training FLOPs per token",
    "peak_mem_mib": "training peak memory, MiB, as trials.csv's peak_mem_mib (torch max_memory_reserved on CUDA; on "
                    "CPU the bytes a step holds, counted)",
    "peak_mem_torch_mib": "torch max_memory_allocated, MiB (CUDA)",
    "peak_mem_nvml_mib": "peak device memory used, MiB (NVML, whole GPU)",
    "memory_cap_mib": "the study's max_memory_gib x 1024 the attempt ran under (empty: no cap)",
    "seconds": "wall-clock seconds of the attempt",
    "device": "torch device",
    "gpu_name": "GPU model (empty on CPU)",
    "gpu_memory_mib": "GPU memory, MiB",
    "cpu_model": "CPU model",
    "torch_version": "torch version",
    "machine_id": "hardware fingerprint (the same on every row)",
    "hostname": "host name",
}


def profile_columns_markdown() -> str:
    """The ``profile.csv`` table of ``bptt_harness/report/README.md``."""
    return "\n".join(["| column | meaning |", "|---|---|",
                      *(f"| `{c}` | {PROFILE_DOCS[c]} |" for c in (*PROFILE_COLUMNS, *PROFILE_FINGERPRINT))])


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

def grid_values(config: StudyConfig, name: str) -> list[int]:
    """A searched integer's values for the map: its grid, or for a range its powers of two (plus the ends)."""
    p = config.search[name]
    try:
        return sorted(set(int(v) for v in p.grid()))
    except HarnessError:
        lo, hi = int(p.low or 1), int(p.high or 1)
        values = {lo, hi} | {2 ** k for k in range(math.ceil(math.log2(lo)), int(math.log2(hi)) + 1)}
        return sorted(v for v in values if lo <= v <= hi)


def cells(config: StudyConfig) -> list[tuple[int, int]]:
    return list(itertools.product(grid_values(config, "bptt"), grid_values(config, "batch_size")))


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
    from bptt_harness.probe import make_probe
    from bptt_harness.trainer import run_trial

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


def _spec(config: StudyConfig, bptt: int, bs: int) -> Any:
    from bptt_harness.spec import TrialSpec

    return TrialSpec(bptt=bptt, batch_size=bs, model=config.model, train=config.train)


def time_validation(config: StudyConfig, corpus: Any, device: Any) -> ProfileRow:
    """One full validation pass of the study's model (what every checkpoint costs), as a row of phase
    ``eval`` (bptt and batch size are the evaluation's)."""
    import time

    import torch

    from bptt_harness.batching import batchify
    from bptt_harness.model import family_of
    from bptt_harness.trainer import release_memory

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
    from bptt_harness.trainer import WARM_UP_STEPS

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


# --------------------------------------------------------------------------- reading it back

def write_profile(profile: Profile, directory: Path, fingerprint: dict) -> Path:
    """``profile.csv``: one row per attempt, with the machine's fingerprint on every row."""
    import pandas as pd

    from bptt_harness.fileio import write_files_atomic

    df = pd.DataFrame([dataclasses.asdict(r) for r in profile.rows], columns=list(PROFILE_COLUMNS))
    for key in PROFILE_FINGERPRINT:
        df[key] = fingerprint.get(key)
    path = directory / PROFILE_CSV
    directory.mkdir(parents=True, exist_ok=True)
    write_files_atomic({path: df.to_csv(index=False, lineterminator="\n")})
    return path


def load_profile(directory: Path) -> Any:
    """The study's ``profile.csv`` as a DataFrame, or None when it has none."""
    import pandas as pd

    path = Path(directory) / PROFILE_CSV
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - a damaged profile is ignored, never a crash of the sweep
        log.warning("ignoring unreadable %s: %s", path, e)
        return None


def walls_table(df: Any) -> Any:
    """Per bptt: the largest batch size that fit and the smallest that ran out of memory."""
    import pandas as pd

    if df is None or df.empty:
        return pd.DataFrame(columns=["bptt", "largest_fit_bs", "smallest_oom_bs", "peak_mib_at_fit"])
    out = []
    for bptt, g in df[df["phase"] != "eval"].groupby("bptt"):
        ok = g[g["status"].isin(STATUS_FIT)]
        oom = g[g["status"] == "oom"]
        fit_bs = int(ok["batch_size"].max()) if len(ok) else None
        oom_bs = oom["batch_size"][oom["batch_size"] > (fit_bs or 0)]
        at_fit = ok[ok["batch_size"] == fit_bs]
        mem = at_fit["peak_mem_mib"]
        out.append({"bptt": int(bptt), "largest_fit_bs": fit_bs,
                    "smallest_oom_bs": int(oom_bs.min()) if len(oom_bs) else None,
                    "peak_mib_at_fit": float(mem.max()) if len(mem) else None})
    return pd.DataFrame(out)


def doesnt_fit(df: Any, memory_cap_mib: float | None, bptt: int, bs: int) -> bool:
    """Whether the profile shows (bptt, bs) cannot fit under the same memory cap: some cell with a bptt
    and a batch size no larger ran out of memory (memory grows with both), and no cell at least as large
    in both fitted. A sweep records such a cell as ``oom`` without training it."""
    if df is None or df.empty:
        return False
    cap = df["memory_cap_mib"]
    same = df[cap.isna()] if memory_cap_mib is None else df[(cap - memory_cap_mib).abs() < 1e-6]
    smaller_oom = same[(same["status"] == "oom") & (same["bptt"] <= bptt) & (same["batch_size"] <= bs)]
    larger_fit = same[same["status"].isin(STATUS_FIT) & (same["bptt"] >= bptt) & (same["batch_size"] >= bs)]
    return bool(len(smaller_oom)) and not len(larger_fit)


def rate(df: Any, bptt: int, bs: int) -> float | None:
    """Profiled tokens/s of a cell (the median of its fitting attempts), or None."""
    if df is None or df.empty:
        return None
    g = df[(df["bptt"] == bptt) & (df["batch_size"] == bs) & df["status"].isin(STATUS_FIT)]["tokens_per_s"].dropna()
    return float(g.median()) if len(g) else None


SAFETY = 1.25   # planned seconds are multiplied by this: the profile's steps are not the whole run


def plan_tokens(df: Any, cells: Iterable[tuple[int, int]], max_seconds: float, checkpoints: int,
                repeats: int = 1) -> int:
    """The largest token budget whose sweep fits ``max_seconds``: every cell trains ``tokens`` at its
    profiled rate, plus per trial its set-up (measured in the profile) and ``checkpoints`` validations
    (the profile's ``eval`` row), all times :data:`SAFETY`.

    Raises :class:`HarnessError` when a cell was not profiled, or when not even 1,000 tokens fit."""
    cells = list(cells)
    missing = [c for c in cells if rate(df, *c) is None]
    if df is None or missing:
        where = f"e.g. bptt {missing[0][0]} x bs {missing[0][1]}" if missing else "there is no profile.csv"
        raise HarnessError(f"--max-seconds needs the profiled rate of every cell ({where}); run "
                           "bptt-harness profile on the study first")
    grid = df[(df["phase"] == "grid") & df["status"].isin(STATUS_FIT) & df["tokens_per_s"].notna()]
    # What a profile trial cost beyond its timed steps: model set-up, memory release, probe.
    setup = float((grid["seconds"] - grid["steps"] * grid["tokens_per_step"] / grid["tokens_per_s"]).clip(lower=0)
                  .median()) if len(grid) else 1.0
    evals = df[df["phase"] == "eval"]["seconds"]
    eval_s = float(evals.median()) if len(evals) else 0.0
    per_token = sum(1.0 / (rate(df, *c) or math.inf) for c in cells) * repeats
    fixed = len(cells) * repeats * (setup + checkpoints * eval_s)
    tokens = int((max_seconds / SAFETY - fixed) / per_token) if per_token > 0 else 0
    if tokens < 1_000:
        raise HarnessError(f"--max-seconds {max_seconds:g} leaves {max(tokens, 0)} tokens per trial for "
                           f"{len(cells) * repeats} trials (set-up and validation alone take {fixed:.0f} s); allow "
                           "more time or search fewer cells")
    return tokens
