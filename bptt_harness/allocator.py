"""The C allocator under torch's CPU tensors: what bptt-harness's own processes ask of it, and the trim
between trials.

A CPU training step allocates and frees the same large buffers every step (the logits and their
gradient: 28 MB each at bptt 35 x bs 20 over 10,000 words). With glibc's defaults the heap's free top is
given back to the kernel once it passes the trim threshold, and the next step takes those pages again,
one page fault each: 4-15 thousand faults a step at that shape. Keeping them made ``bptt-harness trial``
9% faster there (median of 5 alternated rounds of ``benchmarks/bench_trainer.py``; single runs 5-21%). PyTorch's CPU
performance guide recommends an allocator that keeps freed memory (jemalloc, tcmalloc); :func:`keep_freed_memory`
gets the same effect from glibc itself: blocks up to 32 MiB (glibc's largest mmap threshold) come from the
heap, and the heap's free top is kept for the next step. Blocks above 32 MiB still come from fresh
mappings: serving them from the heap too doubled the resident set at bptt 70 x bs 64.

The command-line entry point calls it once per process (``bptt-harness`` and its worker processes), as a
process owner may; the library never does (:func:`bptt_harness.run_trial` in a user's process leaves the
allocator as the user set it). Each trial records the setting (``malloc``): throughput depends on it.
Between trials :func:`trim` gives the heap's free pages back, whatever the setting, so a trial's resident
set starts from what is live.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Mapping
from typing import Any

from bptt_harness.errors import HarnessError

__all__ = ["KEPT", "MMAP_THRESHOLD", "OPT_OUT_ENV", "TRIM_THRESHOLD", "glibc_available", "keep_freed_memory", "left_alone",
           "setting", "trim"]

KEPT = "kept"
MMAP_THRESHOLD = 32 * 2**20   # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**31 - 1     # mallopt takes an int: never trim while training
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's own variables for these settings: a user who set any of them keeps them.
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
               "MALLOC_ARENA_MAX")
OPT_OUT_ENV = "BPTT_HARNESS_MALLOC"   # "default": leave glibc as it is

# Process state, as the allocator's own is: what keep_freed_memory asked of glibc in this process (glibc
# has no getter for its thresholds).
_asked: list[str] = []


@functools.cache
def _libc() -> Any:
    """The process's own symbols (the C library among them): no search for the library's file, which
    starts ``ldconfig`` and finds nothing in a slim container."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _glibc() -> Any:
    """The C library if it is glibc (the one with ``mallopt``, ``malloc_trim`` and ``gnu_get_libc_version``)."""
    libc = _libc()
    if libc is None or not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return libc


def glibc_available() -> bool:
    """Whether the C library is glibc, whose settings :func:`keep_freed_memory` changes."""
    return _glibc() is not None


def left_alone(environ: Mapping[str, str]) -> str | None:
    """Why a process with this environment keeps its allocator as it is (the user's to set), or None."""
    opt_out = environ.get(OPT_OUT_ENV, "")
    if opt_out.strip().lower() == "default":
        return f"default ({OPT_OUT_ENV}=default)"
    if opt_out.strip():
        raise HarnessError(f"{OPT_OUT_ENV}={opt_out!r}: the only value is 'default' (glibc's own settings); "
                           "unset it to keep freed memory for the next step")
    preload = [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if "malloc" in p]
    if preload:
        return f"LD_PRELOAD {os.path.basename(preload[0])}"
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    named = [k for k in _MALLOC_ENV if k in environ]
    if tunables or named:
        return "set by the environment (" + ", ".join([*tunables, *named]) + ")"
    return None


def keep_freed_memory() -> str:
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse (see the module's docstring); the setting
    this process now runs with, as :func:`setting` gives it. Left as it is where the environment says
    otherwise (``BPTT_HARNESS_MALLOC=default``, a preloaded allocator, glibc's malloc thresholds or arenas
    in ``MALLOC_*`` or ``GLIBC_TUNABLES=glibc.malloc.*``) or where the C library is not glibc. Any other
    value of ``BPTT_HARNESS_MALLOC`` is a ``HarnessError``."""
    why = left_alone(os.environ)
    libc = _glibc()
    if why is None and libc is not None:
        # The mmap threshold first: setting either turns off glibc's own adjustment of both.
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
        why = KEPT if ok else "default (mallopt refused)"
    _asked[:] = [why or "default (not glibc)"]
    return _asked[0]


def setting() -> str:
    """How this process's allocator treats freed memory: ``kept`` (:func:`keep_freed_memory`), or why not
    (``default``: glibc's defaults; a preloaded allocator; settings from the environment)."""
    if _asked:
        return _asked[0]
    why = left_alone(os.environ)
    return why if why is not None and not why.startswith("default") else "default"


def trim() -> None:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
