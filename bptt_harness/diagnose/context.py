"""Context use: how much of the text before a prediction the model actually uses.

For a ladder of n (1, 2, 4, ...), the loss at a fixed sample of target positions when only the last n real
tokens are available, against the loss with the state carried over real text. "Only the last n" is a
replace-style perturbation (Khandelwal et al. 2018): the state is warmed on a stretch from elsewhere in the
split, phase-matched (it ends at the same offset modulo ``period``), so the model sees well-formed text
whose content before the last n tokens is unrelated. A zero reset is not used: a state the model never saw
in training confounds "lost context" with "unfamiliar state" (on periodic synthetic data it gives
perplexities in the thousands at n = 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.diagnose.common import advance, columns, device_of, measuring_mode, sample_ends, warm_state
from bptt_harness.model import ModelFamily

__all__ = ["ContextUse", "context_use", "context_ladder"]


def context_ladder(longest_bptt: int, factor: int = 4) -> list[int]:
    """1, 2, 4, ... below ``factor`` x ``longest_bptt``, then ``factor`` x ``longest_bptt`` itself (the same ladder
    for every configuration of a study: it is derived from the study's largest bptt)."""
    top = max(1, factor * longest_bptt)
    ladder, n = [], 1
    while n < top:
        ladder.append(n)
        n *= 2
    return [*ladder, top]


@dataclass
class ContextUse:
    """Losses (nats) at the sampled targets with the last ``n`` tokens real, for each ``n`` of ``ladder``.

    Attributes:
        ladder: the n measured.
        losses: ``(len(ladder), positions)``: each target's loss with the last n tokens real.
        carried: ``(positions,)``: each target's loss with all ``warm + max(ladder)`` tokens before it real
            (the carried state: every rung reads ``warm`` tokens before its last n, so the longest rung is the
            carried state with only its first ``warm`` tokens replaced).
        targets: ``(positions,)`` the target tokens (to look at one kind of target alone).
        tolerance: the relative tolerance of :attr:`effective_context`.
    """

    ladder: list[int]
    losses: torch.Tensor
    carried: torch.Tensor
    targets: torch.Tensor
    tolerance: float

    def curve(self, mask: torch.Tensor | None = None) -> list[float]:
        """Mean loss for each n (over the targets in ``mask``, default all)."""
        m = self.losses if mask is None else self.losses[:, mask]
        return [float(v) for v in m.mean(dim=1)]

    def carried_loss(self, mask: torch.Tensor | None = None) -> float:
        return float((self.carried if mask is None else self.carried[mask]).mean())

    def effective_context(self, mask: torch.Tensor | None = None) -> int | None:
        """The smallest n whose mean loss is at most ``(1 + tolerance)`` x the carried-state loss; None when
        no n of the ladder gets there (the model uses more context than the ladder's top)."""
        ref = self.carried_loss(mask)
        for n, loss in zip(self.ladder, self.curve(mask)):
            if loss <= ref + self.tolerance * abs(ref):
                return n
        return None

    def increase(self) -> list[float]:
        """Mean loss increase over the carried state, for each n (nats)."""
        ref = self.carried_loss()
        return [v - ref for v in self.curve()]


def context_use(model: nn.Module, family: ModelFamily, split: torch.Tensor, ladder: list[int], *,
                positions: int = 64, warm: int = 64, period: int = 1, tolerance: float = 0.01,
                seed: int = 0) -> ContextUse:
    """Context use of ``model`` on ``split`` (1-D token ids) for each n of ``ladder``.

    Targets are ``positions`` positions drawn from ``seed``; each configuration with the same ladder, warm
    length and seed is measured on the same targets. The ``warm`` tokens that replace the text before the
    last n end ``shift + n % period`` tokens before the target (``shift``: a multiple of ``period`` beyond the
    whole real stretch), so they end at the same phase as the text they replace; ``period`` is the text's
    period where it has one (synthetic corpora), else 1 (then one warmed state serves every n)."""
    device = device_of(model)
    split = split.to(device)
    top = max(ladder)
    span = warm + top
    shift = period * -(-span // period)   # the replacing stretch lies wholly before the real one
    ends = sample_ends(split.numel(), positions, span + shift + period, seed).to(device)
    targets = split[ends]
    with measuring_mode(model), torch.no_grad():
        carried = _target_loss(model, family.init_state(model, len(ends)), columns(split, ends, span), targets)
        warmed: dict[int, Any] = {}   # the replacing state, by phase
        losses = []
        for n in ladder:
            phase = n % period
            if phase not in warmed:
                warmed[phase] = warm_state(model, family, split, ends - shift - phase, warm)
            losses.append(_target_loss(model, warmed[phase], columns(split, ends, n), targets))
    return ContextUse(ladder=list(ladder), losses=torch.stack(losses).cpu(), carried=carried.cpu(),
                      targets=targets.cpu(), tolerance=tolerance)


def _target_loss(model: nn.Module, state: Any, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each column's loss at the token after its last row, read from ``state``: the rows before the last
    only advance the state (no logits), the last row is decoded."""
    if x.size(0) > 1:
        state = advance(model, x[:-1], state)
    logits, _ = model(x[-1:], state)
    return F.cross_entropy(logits.float(), targets, reduction="none")
