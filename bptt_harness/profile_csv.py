"""``profile.csv`` read back: its rows, the walls, whether a cell fits, the rates, and the budget they plan.

Written by :mod:`bptt_harness.profile` (``bptt-harness profile``); read by the sweep (cells that cannot fit
are recorded as out of memory without training; ``--max-seconds`` plans the token budget from the
profiled rates) and by the report. No torch: reading a profile needs only pandas.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bptt_harness.config import StudyConfig
from bptt_harness.design import union_points
from bptt_harness.errors import HarnessError

log = logging.getLogger(__name__)

PROFILE_CSV = "profile.csv"
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


# --------------------------------------------------------------------------- the study's cells

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
    """The (bptt, batch size) cells of a study: its grid's, or the shapes its slices list."""
    if config.slices:
        return sorted({(int(p["bptt"]), int(p["batch_size"])) for p in union_points(config.slices)})
    return list(itertools.product(grid_values(config, "bptt"), grid_values(config, "batch_size")))


# --------------------------------------------------------------------------- reading it back

def load_profile(directory: Path) -> Any:
    """The study's ``profile.csv`` as a DataFrame, or None when it has none."""
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
