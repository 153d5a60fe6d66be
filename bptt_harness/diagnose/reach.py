"""Gradient reach: how far back the loss at a target is sensitive to the input.

The norm of d loss_t / d e_{t-1-k}, where e is the embedding layer's output, for lags k = 0 .. ``max_lag``
(lag 0: the input just before the target), averaged over sampled targets. The embedding output is caught
by a forward hook on the model's ``nn.Embedding`` (every built-in family and any factory model with one),
so no family needs to expose its inputs; cuDNN RNNs are measured through the native kernels (the same
function, but differentiable in eval mode)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.diagnose.common import advance, columns, device_of, measuring_mode, sample_ends, warm_state
from bptt_harness.errors import HarnessError
from bptt_harness.model import ModelFamily

__all__ = ["GradientReach", "gradient_reach", "input_embedding"]


@dataclass
class GradientReach:
    """Gradient norms by lag.

    Attributes:
        norms: ``(max_lag + 1, positions)``: ``|d loss_t / d e_{t-1-k}|`` for each lag k and target.
        targets: ``(positions,)`` the target tokens.
        fraction: reach = the largest lag whose mean norm is at least this fraction of the largest mean norm.
    """

    norms: torch.Tensor
    targets: torch.Tensor
    fraction: float

    @property
    def lags(self) -> list[int]:
        return list(range(self.norms.size(0)))

    def profile(self, mask: torch.Tensor | None = None) -> list[float]:
        """Mean norm at each lag (over the targets in ``mask``, default all)."""
        m = self.norms if mask is None else self.norms[:, mask]
        return [float(v) for v in m.mean(dim=1)]

    def peak_lag(self, mask: torch.Tensor | None = None) -> int:
        p = self.profile(mask)
        return max(range(len(p)), key=p.__getitem__)

    def reach(self, mask: torch.Tensor | None = None) -> int | None:
        """The largest lag (tokens back) whose mean norm is at least ``fraction`` x the largest; None when no
        gradient reaches the input (all zero: the model ignores it) or a norm is not finite."""
        p = self.profile(mask)
        top = max(p)
        if not all(math.isfinite(v) for v in p) or top <= 0:
            return None
        return max(k for k, v in enumerate(p) if v >= self.fraction * top)

    def censored(self, mask: torch.Tensor | None = None) -> bool:
        """True when the reach is the last lag measured: the gradient reaches at least that far."""
        return self.reach(mask) == self.norms.size(0) - 1


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input embedding: its first ``nn.Embedding``, or one line saying there is none."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise HarnessError(f"gradient reach needs an nn.Embedding in the model; {type(model).__name__} has none")


def gradient_reach(model: nn.Module, family: ModelFamily, split: torch.Tensor, max_lag: int, *,
                   positions: int = 64, warm: int = 64, fraction: float = 0.01, seed: int = 0) -> GradientReach:
    """Gradient reach of ``model`` on ``split`` for lags 0 .. ``max_lag``: each target's window holds its
    ``max_lag + 1`` inputs, read from the state carried over the ``warm`` tokens before them."""
    device = device_of(model)
    split = split.to(device)
    length = max_lag + 1
    ends = sample_ends(split.numel(), positions, length + warm, seed).to(device)
    targets = split[ends]
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        caught.append(output)

    with measuring_mode(model):
        state = warm_state(model, family, split, ends - length, warm)
        x = columns(split, ends, length)
        handle = input_embedding(model).register_forward_hook(catch)
        try:   # the rows before the last only advance the state; the last is decoded
            state = advance(model, x[:-1], state) if length > 1 else state
            logits, _ = model(x[-1:], state)
        finally:
            handle.remove()
        if not caught or not all(c.requires_grad for c in caught):
            raise HarnessError("gradient reach: the embedding output does not require a gradient (frozen weights?)")
        # Each column's loss depends only on its own inputs: one backward of the sum gives every column's.
        F.cross_entropy(logits.float(), targets, reduction="sum").backward(inputs=caught)
        grad = torch.cat([c.grad if c.grad is not None else torch.zeros_like(c) for c in caught])
        norms = grad.float().norm(dim=-1).flip(0)   # the last row is lag 0
    return GradientReach(norms=norms.detach().cpu(), targets=targets.cpu(), fraction=fraction)
