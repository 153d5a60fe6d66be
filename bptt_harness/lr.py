"""How the learning rate follows the shape (the study file's ``[lr]`` table).

With SGD and gradient clipping the update of one step is bounded by ``lr x clip`` whatever the batch,
so a fixed lr hands the shapes with more, smaller steps more total movement at an equal token budget.
A rule takes that out of the comparison: ``linear`` or ``sqrt`` scale ``[train] lr`` (the lr of the
reference shape) by ``(bptt x bs) / (ref_bptt x ref_batch_size)`` or its square root; ``tuned`` gives
each configuration the best of a small ladder of multipliers around such a rule, chosen on validation
loss after a short run (:mod:`bptt_harness.study.tuning` runs the ladder). Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bptt_harness.errors import HarnessError

RULES = ("fixed", "linear", "sqrt", "tuned")
SCALINGS = ("fixed", "linear", "sqrt")


def scaled_lr(scaling: str, ref_lr: float, ratio: float) -> float:
    """``ref_lr`` for a shape with ``ratio`` times the reference's tokens per step."""
    if scaling == "linear":
        return ref_lr * ratio
    if scaling == "sqrt":
        return ref_lr * math.sqrt(ratio)
    return ref_lr


@dataclass(frozen=True)
class LrRule:
    """``[lr]``: how each configuration's learning rate is set from ``[train] lr``.

    Attributes:
        rule: ``fixed`` (``[train] lr`` for every shape), ``linear`` or ``sqrt`` (scaled from the
            reference shape by tokens per step, or its square root), or ``tuned``.
        ref_bptt, ref_batch_size: the shape whose lr is ``[train] lr``.
        tune_from: ``tuned`` only: the rule whose lr is the middle of the ladder.
        ladder: ``tuned`` only: multipliers of that lr that are tried.
        tune_fraction: ``tuned`` only: each ladder run trains on this fraction of the budget; the
            lowest loss after it on a held-out slice of the training data wins (another seed than the
            measured runs', and never the validation split the report ranks on).
        max_lr: no shape gets a larger lr than this (a scaled-up lr can pass plain SGD's stability edge).
    """

    rule: str = "fixed"
    ref_bptt: int = 35
    ref_batch_size: int = 20
    tune_from: str = "sqrt"
    ladder: tuple[float, ...] = (0.5, 1.0, 2.0)
    tune_fraction: float = 0.1
    max_lr: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise HarnessError(f"lr rule = {self.rule!r} is not known; use one of {', '.join(RULES)}")
        if self.tune_from not in SCALINGS:
            raise HarnessError(f"lr tune_from = {self.tune_from!r} is not known; use one of {', '.join(SCALINGS)}")
        for key in ("ref_bptt", "ref_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"lr {key} = {value!r} must be an integer >= 1")
        if not self.ladder or any(not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m)
                                  or m <= 0 for m in self.ladder):
            raise HarnessError(f"lr ladder = {list(self.ladder)!r} must be a non-empty list of numbers > 0")
        if len(set(self.ladder)) != len(self.ladder):
            raise HarnessError(f"lr ladder = {list(self.ladder)!r} repeats a multiplier; list each once")
        if not isinstance(self.tune_fraction, (int, float)) or not 0 < self.tune_fraction <= 1:
            raise HarnessError(f"lr tune_fraction = {self.tune_fraction!r} must be a number in (0, 1]")
        if self.max_lr is not None and (not isinstance(self.max_lr, (int, float)) or not 0 < self.max_lr < math.inf):
            raise HarnessError(f"lr max_lr = {self.max_lr!r} must be a number > 0 (or left out)")

    @property
    def scaling(self) -> str:
        """The formula behind the lr: the rule itself, or for ``tuned`` the ladder's middle."""
        return self.tune_from if self.rule == "tuned" else self.rule

    def lr_for(self, ref_lr: float, bptt: int, batch_size: int) -> float:
        """The rule's lr for a shape (for ``tuned``: the middle of its ladder)."""
        ratio = (bptt * batch_size) / (self.ref_bptt * self.ref_batch_size)
        lr = scaled_lr(self.scaling, ref_lr, ratio)
        return lr if self.max_lr is None else min(lr, self.max_lr)

    def describe(self, ref_lr: float) -> str:
        """The rule in words, for the report: ``sqrt rule: lr 20 at bptt 35 × bs 20, x √(tokens per step / 700)``."""
        ref = f"lr {ref_lr:g} at bptt {self.ref_bptt} × bs {self.ref_batch_size}"
        tokens = self.ref_bptt * self.ref_batch_size
        formula = {"fixed": f"lr {ref_lr:g} for every shape",
                   "linear": f"{ref} × (tokens per step / {tokens})",
                   "sqrt": f"{ref} × √(tokens per step / {tokens})"}[self.scaling]
        if self.max_lr is not None and self.scaling != "fixed":
            formula += f", at most {self.max_lr:g}"
        if self.rule != "tuned":
            return f"{self.rule} rule: {formula}"
        ladder = "/".join(f"×{m:g}" for m in sorted(self.ladder))
        return (f"tuned: the best of {ladder} around the {self.scaling} rule ({formula}), chosen after "
                f"{self.tune_fraction:.0%} of the budget on a held-out slice of the training data, with another seed")


def parse_lr_table(table: Any) -> LrRule:
    """``[lr]`` of a study file -> :class:`LrRule` (keys checked by ``bptt_harness.config``)."""
    table = dict(table)
    if "ladder" in table:
        ladder = table["ladder"]
        if not isinstance(ladder, list):
            raise HarnessError(f"study file: lr.ladder = {ladder!r} must be a list of multipliers, e.g. [0.5, 1, 2]")
        table["ladder"] = tuple(float(m) if isinstance(m, int) and not isinstance(m, bool) else m for m in ladder)
    return LrRule(**table)
