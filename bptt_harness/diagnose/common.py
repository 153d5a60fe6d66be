"""What the four measurements share: the model in a deterministic, differentiable mode, columns of text cut
from a split at sampled positions, and a state warmed on the text before them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bptt_harness.model import ModelFamily, repackage_hidden

__all__ = ["measuring_mode", "columns", "sample_ends", "warm_state", "device_of", "flat_grad", "advance"]


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def measuring_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout: every measurement is of the deterministic function), with cuDNN's
    RNN kernels off inside (their backward runs only in training mode; the native kernels compute the same
    function); the model's mode, the cuDNN flag and the process's RNG states as they were, after."""
    was_training = model.training
    model.eval()
    try:
        with torch.backends.cudnn.flags(enabled=False), torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


def sample_ends(n_tokens: int, count: int, low: int, seed: int, period: int = 1) -> torch.Tensor:
    """``count`` distinct target positions in ``[low, n_tokens)`` drawn with a local generator from ``seed``
    (the process's generators are not touched), sorted. The same arguments give the same positions: every
    configuration of a study is measured at the same places."""
    if n_tokens - low < 1:
        raise ValueError(f"the split has {n_tokens} tokens, fewer than the {low + 1} one measurement needs")
    g = torch.Generator().manual_seed(seed)
    count = min(count, n_tokens - low)
    picks = torch.randperm(n_tokens - low, generator=g)[:count] + low
    return picks.sort().values


def columns(split: torch.Tensor, ends: torch.Tensor, length: int) -> torch.Tensor:
    """``(length, len(ends))``: column j is ``split[ends[j] - length : ends[j]]``."""
    rows = torch.arange(length, device=split.device).unsqueeze(1) - length
    return split[ends.to(split.device).unsqueeze(0) + rows]


def advance(model: nn.Module, x: torch.Tensor, state: Any) -> Any:
    """The state after ``model`` read ``x`` from ``state``: the model's own ``advance(x, state)`` where it has
    one (the built-in RNNs: no decoder, whose logits over a large vocabulary cost most of a forward pass and
    are not needed here), else its forward pass's state."""
    step = getattr(model, "advance", None)
    return step(x, state) if callable(step) else model(x, state)[1]


def warm_state(model: nn.Module, family: ModelFamily, split: torch.Tensor, starts: torch.Tensor, length: int) -> Any:
    """The state after the model read ``split[s - length : s]`` for each ``s`` in ``starts`` (one column each),
    without a graph: the carried state a window starting at ``s`` would have in training."""
    state = family.init_state(model, len(starts))
    if length <= 0:
        return state
    with torch.no_grad():
        state = advance(model, columns(split, starts, length), state)
    return repackage_hidden(state)


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``loss`` with respect to ``params`` as one vector (zeros for a parameter the loss does
    not reach); the parameters' ``.grad`` are left alone."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)])
