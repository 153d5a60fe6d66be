"""Controlled designs: the named slices of a study (``[slices.NAME]`` in a study file).

A sentence about one knob needs configurations that differ only in that knob. A grid over bptt x
batch size moves tokens per step, and with it the optimiser steps of an equal token budget, the lr a
scaling rule gives, the schedule and the order the text is seen in, all at once. A slice lists its
points directly instead: ``tokens_per_step = 640`` with ``bptt = [5, 10, 20, 40, 80]`` derives each
point's batch size (640 / bptt), so its points share tokens per step, steps, lr and schedule and differ
only in bptt; a batch arm fixes bptt and lists batch sizes. A slice holds the lr fixed (``[train] lr``,
or its own ``lr``) unless it says ``lr = "rule"``, which lets the study's ``[lr]`` rule set each point's.

Each trial records the slices its configuration belongs to (``TrialConfig.slices``), so the report can
pick the configurations that differ only in bptt. Torch-free: parsing a study file imports this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Point", "Slice", "held_lr", "point_of", "slice_names", "union_points", "describe_slices"]

# One configuration of a slice: its searched keys and values, sorted by key (hashable, comparable).
Point = tuple[tuple[str, Any], ...]


def point_of(params: Mapping[str, Any]) -> Point:
    """A configuration's parameters as a :data:`Point`."""
    return tuple(sorted(params.items()))


@dataclass(frozen=True)
class Slice:
    """One named slice: its points, what varies across them, and its lr.

    Attributes:
        name: the slice's name (``[slices.NAME]``), recorded with each of its trials.
        points: the configurations, in the order the study file lists them.
        varies: the keys with more than one value across the points (``bptt`` and ``batch_size`` for a
            slice at one ``tokens_per_step``: the batch size follows bptt).
        tokens_per_step: bptt x batch size of every point, when the slice declares it.
        lr: the lr every point gets (held fixed across the slice), or None: the study's ``[lr]`` rule sets
            each point's lr (``lr = "rule"``).
    """

    name: str
    points: tuple[Point, ...]
    varies: tuple[str, ...]
    tokens_per_step: int | None = None
    lr: float | None = None

    def contains(self, params: Mapping[str, Any]) -> bool:
        return point_of(params) in self.points

    def describe(self) -> str:
        """The slice in words: ``bptt: bptt 5-80 at 640 tokens per step (batch size 128-8), lr 20 fixed``."""
        parts = []
        # At one tokens per step the batch size follows bptt: the tokens per step says it.
        for key in (k for k in self.varies if not (self.tokens_per_step and k == "batch_size")):
            values = sorted({dict(p)[key] for p in self.points})
            parts.append(f"{key} {_span(values)}")
        fixed = {k: v for k, v in self.points[0] if k not in self.varies}
        at = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in fixed.items()
                       if k in ("bptt", "batch_size"))
        what = " x ".join(parts) if parts else "one configuration"
        where = f" at {self.tokens_per_step} tokens per step" if self.tokens_per_step else (f" at {at}" if at else "")
        lr = "lr from the [lr] rule" if self.lr is None else f"lr {self.lr:g} fixed"
        return f"{self.name}: {what}{where}, {lr}"


def _span(values: list) -> str:
    if len(values) <= 3:
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return f"{values[0]}-{values[-1]} ({len(values)} values)"


def slice_names(slices: Iterable[Slice], params: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of the slices that contain this configuration (a point two slices share is in both)."""
    return tuple(s.name for s in slices if s.contains(params))


def held_lr(slices: Iterable[Slice], params: Mapping[str, Any]) -> float | None:
    """The lr a slice holds this configuration at, or None when the ``[lr]`` rule sets it (no slice
    contains it, or its slices say ``lr = "rule"``). Slices that share a point agree on its lr (checked
    when the study file is read)."""
    for s in slices:
        if s.contains(params):
            return s.lr
    return None


def union_points(slices: Iterable[Slice]) -> list[dict[str, Any]]:
    """Every configuration of the slices once, in the order the study file lists them."""
    seen: set[Point] = set()
    out = []
    for s in slices:
        for p in s.points:
            if p not in seen:
                seen.add(p)
                out.append(dict(p))
    return out


def describe_slices(slices: Iterable[Slice]) -> str:
    """All slices in words, ``; ``-separated (the study's ``slices_description`` column)."""
    return "; ".join(s.describe() for s in slices)
