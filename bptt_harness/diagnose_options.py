"""What the diagnostics measure and with which tolerances: :class:`DiagnoseOptions`, the study file's
``[diagnostics]`` table (no torch: parsing a study file stays light).

The measurements themselves are :mod:`bptt_harness.diagnose`; this module only declares and validates their
options, so the config layer, the record's column descriptions and the report share one set of defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from bptt_harness.errors import HarnessError

__all__ = ["DiagnoseOptions", "MEASUREMENTS"]

MEASUREMENTS = ("context", "reach", "bias", "noise")


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < 1


@dataclass(frozen=True)
class DiagnoseOptions:
    """Options of the four diagnostics; every field is a key of a study file's ``[diagnostics]`` table.

    Attributes:
        measure: which measurements to take: any of ``context``, ``reach``, ``bias``, ``noise``.
        positions: target positions sampled from the split for context use and gradient reach; the same
            positions (from ``seed``) for every configuration of a study.
        context_tolerance: effective context = the smallest n whose loss is within this fraction of the
            carried-state loss (0.01: 1%).
        context_factor: the context ladder 1, 2, 4, ... reaches at least this many times the largest bptt.
        warm_tokens: tokens of a phase-matched stretch from elsewhere in the split that warm the state before
            the last n real tokens (context use), and of real text before every measured window (the others).
        reach_fraction: gradient reach = the largest lag whose gradient norm is at least this fraction of
            the largest norm over lags.
        reach_factor: lags measured: 0 .. this many times the largest bptt.
        bias_tolerance: truncation bias tolerance: the smallest K whose gradient differs from the long one
            by less than this fraction (0.1: 10%).
        bias_factor: the long (reference) backpropagation covers this many times the largest bptt.
        bias_columns: sequences per draw for the truncation bias.
        bias_draws: draws averaged for the truncation bias.
        noise_small, noise_big: the two batch sizes (sequences of bptt tokens) of the noise-scale estimator;
            ``noise_big`` must be a multiple of ``noise_small``.
        noise_draws: draws of ``noise_big`` sequences whose estimates are averaged.
        every: at which checkpoints a trial measures them (1: every checkpoint, 2: every other one, ...);
            always at the end of training.
        seed: the positions' seed.
        save_model: keep each trial's trained weights and config beside its record (``models/``).
    """

    measure: tuple[str, ...] = MEASUREMENTS
    positions: int = 64
    context_tolerance: float = 0.01
    context_factor: int = 4
    warm_tokens: int = 64
    reach_fraction: float = 0.01
    reach_factor: int = 2
    bias_tolerance: float = 0.1
    bias_factor: int = 2
    bias_columns: int = 8
    bias_draws: int = 1
    noise_small: int = 4
    noise_big: int = 32
    noise_draws: int = 4
    every: int = 1
    seed: int = 0
    save_model: bool = False

    def __post_init__(self) -> None:
        measure = tuple(self.measure) if isinstance(self.measure, (list, tuple)) else self.measure
        object.__setattr__(self, "measure", measure)
        if not isinstance(measure, tuple) or not measure or any(m not in MEASUREMENTS for m in measure):
            raise HarnessError(f"diagnostics measure={self.measure!r} is invalid; use a non-empty list of "
                               f"{', '.join(MEASUREMENTS)}")
        for key in ("positions", "context_factor", "warm_tokens", "reach_factor", "bias_factor", "bias_columns",
                    "bias_draws", "noise_small", "noise_big", "noise_draws", "every"):
            value = getattr(self, key)
            if not _whole(value) or value < 1:
                raise HarnessError(f"diagnostics {key}={value!r} is invalid; it must be an integer >= 1")
        for key in ("context_tolerance", "reach_fraction", "bias_tolerance"):
            value = getattr(self, key)
            if not _fraction(value):
                raise HarnessError(f"diagnostics {key}={value!r} is invalid; it must be a number in (0, 1)")
        if self.noise_big <= self.noise_small or self.noise_big % self.noise_small:
            raise HarnessError(f"diagnostics noise_big={self.noise_big} is invalid; it must be a multiple of "
                               f"noise_small={self.noise_small} and larger than it")
        if not _whole(self.seed) or not 0 <= self.seed < 2**32:
            raise HarnessError(f"diagnostics seed={self.seed!r} is invalid; it must be an integer in [0, 2**32)")
        if not isinstance(self.save_model, bool):
            raise HarnessError(f"diagnostics save_model={self.save_model!r} is invalid; use true or false")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def wants(self, measurement: str) -> bool:
        return measurement in self.measure
