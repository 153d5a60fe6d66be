"""The truncated-BPTT picture, exactly.

``batchify`` cuts the token stream into ``bs`` contiguous parts and stacks them as columns of a
``(N // bs, bs)`` matrix: column ``j`` is the ``j``-th contiguous slice of the stream, and row ``i``
holds the ``i``-th token of every slice. A window at row ``i`` is ``x = M[i : i+L]`` and
``y = M[i+1 : i+1+L]`` with ``L = min(bptt, rows - 1 - i)``: targets are inputs shifted by one token
and the last window is shorter. The hidden state flows from one window to the next down each column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


def batchify(ids: torch.Tensor, bs: int) -> torch.Tensor:
    """``(N,)`` -> ``(N // bs, bs)``, dropping the tail that does not divide by ``bs``."""
    if bs < 1:
        raise ValueError(f"batch size must be >= 1, got {bs}")
    rows = ids.numel() // bs
    return ids[: rows * bs].view(bs, rows).t().contiguous()


def get_batch(matrix: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window starting at row ``i``: inputs and the targets one token later, flattened for the loss."""
    seq_len = min(seq_len, matrix.size(0) - 1 - i)
    x = matrix[i : i + seq_len]
    y = matrix[i + 1 : i + 1 + seq_len]
    return x, y.reshape(-1)


def windows(matrix: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-length windows over one pass of ``matrix`` (what evaluation uses)."""
    for i in range(0, matrix.size(0) - 1, bptt):
        yield get_batch(matrix, i, bptt)


@dataclass(frozen=True)
class VariableBptt:
    """AWD-LSTM's variable window length.

    With probability ``p`` the centre is ``bptt``, else ``bptt / 2``; the length is drawn from a
    normal with standard deviation ``sd`` around it, then clamped to ``[min_len, max_len]``. The
    cap ``max_len`` (default ``bptt + 3 * sd``) makes the longest window, and so peak activation
    memory, known in advance. The learning rate of a step is multiplied by ``seq_len / bptt``: a window
    longer than ``bptt`` gets a larger lr and a shorter one a smaller lr. The loss is a mean over the
    window's targets, so without the rescale a short window's few tokens would move the weights as much
    as a long window's many; with it each step moves them in proportion to the tokens it trained on.
    """

    bptt: int
    p: float = 0.95
    sd: float = 5.0
    min_len: int = 5
    max_len: int | None = None

    @classmethod
    def around(cls, bptt: int) -> VariableBptt:
        """AWD-LSTM's spread scaled to ``bptt``: its sd 5 and minimum 5 were chosen for bptt 70, and a
        fixed sd of 5 around bptt 2 would make the mean window twice as long as asked."""
        spread = bptt * 5 / 70
        return cls(bptt, sd=spread, min_len=max(1, round(spread)))

    @property
    def cap(self) -> int:
        return self.max_len if self.max_len is not None else max(self.bptt, round(self.bptt + 3 * self.sd))

    def draw(self, rng: np.random.Generator) -> int:
        centre = self.bptt if rng.random() < self.p else self.bptt / 2
        length = int(round(rng.normal(centre, self.sd)))
        return int(min(max(self.min_len, length), self.cap))

    def lr_factor(self, seq_len: int) -> float:
        """The step's lr multiplier: above 1 for a window longer than ``bptt``, below 1 for a shorter one."""
        return seq_len / self.bptt


def epoch_windows(rows: int, bptt: int, variable: VariableBptt | None = None,
                  rng: np.random.Generator | None = None) -> Iterator[tuple[int, int]]:
    """Start row and length of each training window of one pass over a ``rows``-row matrix.

    Pure index arithmetic, so the trainer can slice a matrix that already lives on the GPU.
    """
    i = 0
    while i < rows - 1:
        want = variable.draw(rng) if variable is not None and rng is not None else bptt
        seq_len = min(want, rows - 1 - i)
        yield i, seq_len
        i += seq_len
