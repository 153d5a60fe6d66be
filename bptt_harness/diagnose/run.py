"""The four measurements of one model, with a study's options: :func:`diagnose` -> :class:`Diagnosis`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bptt_harness.diagnose.bias import TruncationBias, truncation_bias
from bptt_harness.diagnose.context import ContextUse, context_ladder, context_use
from bptt_harness.diagnose.noise import NoiseScale, noise_scale
from bptt_harness.diagnose.reach import GradientReach, gradient_reach
from bptt_harness.diagnose_options import DiagnoseOptions
from bptt_harness.model import ModelFamily

__all__ = ["Diagnosis", "diagnose", "bias_ladder", "text_period", "COLUMNS"]

# The flat summary of a diagnosis: diagnostics.csv's columns and trials.csv's end-of-training values.
COLUMNS = ("effective_context_tokens", "gradient_reach_tokens", "truncation_bias_k", "noise_scale_tokens")


def text_period(extra: dict[str, Any]) -> int:
    """The period of a corpus's text (``Corpus.extra``): a synthetic corpus's segment, ``k + 1`` tokens; 1 for
    text without one."""
    k = extra.get("dependency_distance")
    return int(k) + 1 if isinstance(k, int) and k > 0 else 1


def bias_ladder(bptt: int, long: int) -> list[int]:
    """Truncation lengths 2, 8, 32, ... (x4) below ``long``, and the configuration's own ``bptt``: each length
    costs a forward and backward pass over the stretch, so the ladder is sparse (K = 1 alone, a pass per
    token, costs as much as three others)."""
    ladder, k = {bptt} if bptt < long else set(), 2
    while k < long:
        ladder.add(k)
        k *= 4
    return sorted(ladder)


@dataclass
class Diagnosis:
    """What was measured on one model (None: not asked for)."""

    bptt: int
    context: ContextUse | None = None
    reach: GradientReach | None = None
    bias: TruncationBias | None = None
    noise: NoiseScale | None = None

    def summary(self) -> dict[str, float | int | None]:
        """The four columns (None where not measured or not found within what was measured)."""
        return {
            "effective_context_tokens": self.context.effective_context() if self.context else None,
            "gradient_reach_tokens": self.reach.reach() if self.reach else None,
            "truncation_bias_k": self.bias.smallest_k if self.bias else None,
            "noise_scale_tokens": _finite(self.noise.tokens) if self.noise else None,
        }

    def curves(self) -> dict[str, Any]:
        """The curves behind the summary, as plain JSON values (the stored record keeps them)."""
        out: dict[str, Any] = {}
        if self.context:
            c = self.context
            out["context"] = {"n": c.ladder, "loss": _rounded(c.curve()), "carried_loss": round(c.carried_loss(), 6),
                              "tolerance": c.tolerance}
        if self.reach:
            out["reach"] = {"norm": _rounded(self.reach.profile()), "fraction": self.reach.fraction,
                            "censored": self.reach.censored()}
        if self.bias:
            out["bias"] = {"k": self.bias.ladder, "bias": _rounded(self.bias.bias), "long": self.bias.long,
                           "tolerance": self.bias.tolerance}
        if self.noise:
            n = self.noise
            out["noise"] = {"bptt": n.bptt, "small": n.small, "big": n.big, "grad_sq": n.grad_sq, "trace": n.trace,
                            "sequences": _finite(n.sequences)}
        return out


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _rounded(values: list[float]) -> list[float | None]:
    return [round(v, 6) if math.isfinite(v) else None for v in values]


def diagnose(model: nn.Module, family: ModelFamily, split: torch.Tensor, bptt: int, longest_bptt: int,
             options: DiagnoseOptions | None = None, *, period: int = 1) -> Diagnosis:
    """The measurements ``options.measure`` of ``model`` (trained with ``bptt``) on ``split``; the ladders come
    from ``longest_bptt``, the study's largest, so every configuration is measured on the same ones.
    ``period``: the text's period where it has one (a synthetic corpus), for the context ladder's
    phase-matched replacement."""
    o = options if options is not None else DiagnoseOptions()
    out = Diagnosis(bptt=bptt)
    if o.wants("context"):
        out.context = context_use(model, family, split, context_ladder(longest_bptt, o.context_factor),
                                  positions=o.positions, warm=o.warm_tokens, period=period,
                                  tolerance=o.context_tolerance, seed=o.seed)
    if o.wants("reach"):
        out.reach = gradient_reach(model, family, split, o.reach_factor * longest_bptt, positions=o.positions,
                                   warm=o.warm_tokens, fraction=o.reach_fraction, seed=o.seed)
    if o.wants("bias"):
        long = o.bias_factor * longest_bptt
        out.bias = truncation_bias(model, family, split, bias_ladder(bptt, long), long,
                                   columns_per_draw=o.bias_columns, draws=o.bias_draws, warm=o.warm_tokens,
                                   tolerance=o.bias_tolerance, seed=o.seed)
    if o.wants("noise"):
        out.noise = noise_scale(model, family, split, bptt, small=o.noise_small, big=o.noise_big, draws=o.noise_draws,
                                warm=o.warm_tokens, seed=o.seed)
    return out
