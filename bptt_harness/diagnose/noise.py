"""The gradient noise scale (McCandlish et al. 2018): the batch size above which a larger batch buys little
per token.

B_simple = tr(Sigma) / |G|^2, from the squared gradient norms at two batch sizes (the unbiased estimators of
the paper's appendix A.1, as gpt-neox computes them): with ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``,

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each draw takes ``big`` sequences of ``bptt`` tokens at random places (each read from the state carried over
the text before it); the small-batch gradients are its ``big / small`` groups and the big-batch gradient their
mean. The two estimates are averaged over draws before their ratio is taken (a ratio of noisy estimates is
biased; the sums are not). The unit of B is the sequence; times ``bptt`` it is tokens per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.diagnose.common import columns, device_of, flat_grad, measuring_mode, warm_state
from bptt_harness.model import ModelFamily

__all__ = ["NoiseScale", "noise_scale", "noise_estimates"]


@dataclass
class NoiseScale:
    """The noise scale at one bptt.

    Attributes:
        bptt: the sequence length (tokens per sequence).
        small, big: the two batch sizes (sequences).
        grad_sq: the estimate of |G|^2 (averaged over draws).
        trace: the estimate of tr(Sigma) per sequence (averaged over draws).
        draws: draws averaged.
    """

    bptt: int
    small: int
    big: int
    grad_sq: float
    trace: float
    draws: int

    @property
    def sequences(self) -> float | None:
        """B_simple in sequences per step; None when |G|^2 is not estimated positive (the gradient is all
        noise at this sample size: the batch that would help is beyond what was measured)."""
        return self.trace / self.grad_sq if self.grad_sq > 0 and self.trace > 0 else None

    @property
    def tokens(self) -> float | None:
        """B_simple in tokens per step (sequences x bptt)."""
        s = self.sequences
        return s * self.bptt if s is not None else None

    def token_cost(self, batch_tokens: float) -> float | None:
        """The predicted tokens to reach a given loss with ``batch_tokens`` per step, relative to the fewest
        possible (a batch far below the noise scale): ``1 + B / B_noise``."""
        b = self.tokens
        return 1.0 + batch_tokens / b if b else None


def noise_estimates(small_sq: float, big_sq: float, small: int, big: int) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from the squared gradient norms at batch sizes ``small`` < ``big``."""
    grad_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return grad_sq, trace


def noise_scale(model: nn.Module, family: ModelFamily, split: torch.Tensor, bptt: int, *, small: int = 4,
                big: int = 32, draws: int = 4, warm: int = 64, seed: int = 0) -> NoiseScale:
    """The gradient noise scale of ``model`` on ``split`` for sequences of ``bptt`` tokens."""
    if big <= small or big % small:
        raise ValueError(f"big={big} must be a multiple of small={small} and larger")
    device = device_of(model)
    split = split.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    high = split.numel() - bptt - 1
    if high <= warm:
        raise ValueError(f"the split has {split.numel()} tokens, too few for sequences of {bptt} after {warm}")
    grad_sq = trace = 0.0
    with measuring_mode(model):
        for _ in range(draws):
            starts = torch.randint(warm, high, (big,), generator=g).to(device)
            groups = []
            for part in starts.split(small):
                x, y = columns(split, part + bptt, bptt), columns(split, part + bptt + 1, bptt)
                logits, _ = model(x, warm_state(model, family, split, part, warm))
                groups.append(flat_grad(F.cross_entropy(logits.float(), y.reshape(-1)), params))
            small_sq = float(torch.stack([v.pow(2).sum() for v in groups]).mean())
            big_sq = float(torch.stack(groups).mean(dim=0).pow(2).sum())
            d_grad, d_trace = noise_estimates(small_sq, big_sq, small, big)
            grad_sq += d_grad / draws
            trace += d_trace / draws
    return NoiseScale(bptt=bptt, small=small, big=big, grad_sq=grad_sq, trace=trace, draws=draws)
