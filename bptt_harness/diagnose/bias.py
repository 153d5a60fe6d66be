"""Truncation bias: how much truncating backpropagation at K steps changes the gradient.

For a stretch of ``long`` tokens per column (read from a state carried over the text before it), the
gradient of the mean loss computed as truncated BPTT with windows of K tokens (the state detached at each
window start, its values carried: what training with bptt K computes) against the same loss with one window
over the whole stretch. Bias(K) = ||E[g_K - g_long]|| / ||E g_long||, the expectations over draws of
columns, measured directly (Aicher, Foti & Fox 2019); it is not assumed to fall geometrically."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.diagnose.common import columns, device_of, flat_grad, measuring_mode, warm_state
from bptt_harness.model import ModelFamily, repackage_hidden

__all__ = ["TruncationBias", "truncation_bias", "truncated_gradient"]


@dataclass
class TruncationBias:
    """Relative gradient bias for each truncation length.

    Attributes:
        ladder: the truncation lengths K.
        bias: ``||E[g_K - g_long]|| / ||E g_long||`` for each K.
        long: the reference backpropagation length (tokens).
        tolerance: :attr:`smallest_k` is the smallest K with a bias below it.
    """

    ladder: list[int]
    bias: list[float]
    long: int
    tolerance: float

    @property
    def smallest_k(self) -> int | None:
        """The smallest K whose bias is below the tolerance, and stays below it for every longer K measured;
        None when none is."""
        for i, k in enumerate(self.ladder):
            if all(b < self.tolerance for b in self.bias[i:]):
                return k
        return None


def truncated_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: object, k: int,
                       params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of the mean loss over ``x``'s rows, backpropagated through windows of ``k`` rows (the
    state detached at each window start, its values carried on)."""
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.size(0), k):
        state = repackage_hidden(state)
        logits, state = model(x[start:start + k], state)
        total = total + F.cross_entropy(logits.float(), y[start:start + k].reshape(-1), reduction="sum")
    return flat_grad(total / y.numel(), params)


def truncation_bias(model: nn.Module, family: ModelFamily, split: torch.Tensor, ladder: list[int], long: int, *,
                    columns_per_draw: int = 8, draws: int = 4, warm: int = 64, tolerance: float = 0.1,
                    seed: int = 0) -> TruncationBias:
    """Truncation bias of ``model`` on ``split`` for each K of ``ladder`` (each below ``long``) against
    backpropagation through ``long`` tokens; ``draws`` x ``columns_per_draw`` stretches drawn from ``seed``."""
    device = device_of(model)
    split = split.to(device)
    ladder = sorted({k for k in ladder if 1 <= k < long})
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    high = split.numel() - long - 1
    if high <= warm:
        raise ValueError(f"the split has {split.numel()} tokens, too few for stretches of {long} after {warm}")
    sum_long: torch.Tensor | None = None
    sum_diff = [torch.zeros(()) for _ in ladder]
    with measuring_mode(model):
        for _ in range(draws):
            starts = (torch.randint(warm, high, (columns_per_draw,), generator=g)).to(device)
            x = columns(split, starts + long, long)
            y = columns(split, starts + long + 1, long)
            state = warm_state(model, family, split, starts, warm)
            g_long = truncated_gradient(model, x, y, state, long, params)
            sum_long = g_long if sum_long is None else sum_long + g_long
            for i, k in enumerate(ladder):
                sum_diff[i] = sum_diff[i] + (truncated_gradient(model, x, y, state, k, params) - g_long)
    assert sum_long is not None
    ref = float(sum_long.norm())
    bias = [float(d.norm()) / ref if ref > 0 else float("nan") for d in sum_diff]
    return TruncationBias(ladder=ladder, bias=bias, long=long, tolerance=tolerance)
