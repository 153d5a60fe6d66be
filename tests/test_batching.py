"""bptt_harness.batching: the truncated-BPTT picture, exactly (issue 2)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bptt_harness.batching import VariableBptt, batchify, epoch_windows, get_batch, windows


def stream(n: int) -> torch.Tensor:
    """Token ids equal to their position, so every value says where it came from."""
    return torch.arange(n, dtype=torch.int64)


def targets_of_one_epoch(matrix: torch.Tensor, bptt: int, variable: VariableBptt | None = None,
                         seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for i, seq_len in epoch_windows(matrix.size(0), bptt, variable, rng):
        x, y = get_batch(matrix, i, seq_len)
        assert x.shape == (seq_len, matrix.size(1))
        out += y.tolist()
    return out


def assert_each_token_is_a_target_once(n: int, bs: int, targets: list[int]) -> None:
    """Every token of the trimmed stream is a target exactly once, except the first of each column.

    (The first token of column j is where slice j starts: nothing before it in that column predicts
    it. With bs = 1 that is just the first token of the stream.)
    """
    rows = n // bs
    column_starts = {j * rows for j in range(bs)}
    expected = [t for t in range(rows * bs) if t not in column_starts]
    counts = Counter(targets)
    assert sorted(counts) == expected
    assert set(counts.values()) == {1}


# --------------------------------------------------------------------------- batchify

def test_batchify_shape_drops_the_tail() -> None:
    m = batchify(stream(103), 4)
    assert m.shape == (25, 4)
    assert m.dtype == torch.int64 and m.is_contiguous()


def test_column_j_is_the_jth_contiguous_slice() -> None:
    m = batchify(stream(103), 4)
    for j in range(4):
        assert m[:, j].tolist() == list(range(25 * j, 25 * (j + 1)))


def test_batchify_rejects_batch_size_zero() -> None:
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        batchify(stream(10), 0)


# --------------------------------------------------------------------------- windows

def test_y_is_x_shifted_by_one_token() -> None:
    m = batchify(stream(100), 5)  # 20 rows
    x, y = get_batch(m, 3, 6)
    assert x.shape == (6, 5) and y.shape == (30,)
    assert torch.equal(y.view(6, 5), x + 1)  # ids are positions: the next token in each column
    assert torch.equal(x, m[3:9]) and torch.equal(y.view(6, 5), m[4:10])


def test_last_window_is_shorter() -> None:
    m = batchify(stream(100), 5)  # 20 rows -> windows start at 0, 7, 14
    lengths = [x.size(0) for x, _ in windows(m, 7)]
    assert lengths == [7, 7, 5]
    x, y = list(windows(m, 7))[-1]
    assert y.numel() == 5 * 5 and y.max().item() == m[-1].max().item()


def test_fixed_windows_make_every_token_a_target_once() -> None:
    n, bs = 1003, 7
    m = batchify(stream(n), bs)
    assert_each_token_is_a_target_once(n, bs, targets_of_one_epoch(m, 10))
    assert_each_token_is_a_target_once(n, bs, [t for _, y in windows(m, 10) for t in y.tolist()])


def test_with_one_column_every_token_but_the_first_is_a_target_once() -> None:
    targets = targets_of_one_epoch(batchify(stream(50), 1), 8)
    assert sorted(targets) == list(range(1, 50))


def test_variable_windows_make_every_token_a_target_once() -> None:
    n, bs = 5000, 3
    m = batchify(stream(n), bs)
    variable = VariableBptt(20)
    lengths = [seq_len for _, seq_len in epoch_windows(m.size(0), 20, variable, np.random.default_rng(1))]
    assert len(set(lengths)) > 5  # the lengths really vary
    assert_each_token_is_a_target_once(n, bs, targets_of_one_epoch(m, 20, variable, seed=1))


def test_epoch_windows_start_where_the_last_one_ended() -> None:
    starts = list(epoch_windows(20, 7))
    assert starts == [(0, 7), (7, 7), (14, 5)]


# --------------------------------------------------------------------------- variable length

def draw_many(v: VariableBptt, n: int = 40_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([v.draw(rng) for _ in range(n)])


def test_variable_bptt_mixture_mean_and_spread() -> None:
    v = VariableBptt(70)
    lengths = draw_many(v)
    half = lengths < (70 + 35) / 2  # the two centres are 7 sd apart: the midpoint separates them
    assert half.mean() == pytest.approx(0.05, abs=0.006)
    main, short = lengths[~half], lengths[half]
    assert main.mean() == pytest.approx(70, abs=0.15)
    assert short.mean() == pytest.approx(35, abs=0.6)
    assert main[(main < v.cap)].std() == pytest.approx(5.0, rel=0.06)  # sd 5 (the cap trims a sliver)
    assert short.std() == pytest.approx(5.0, rel=0.1)
    assert lengths.mean() == pytest.approx(0.95 * 70 + 0.05 * 35, abs=0.3)


def test_variable_bptt_minimum_is_five() -> None:
    lengths = draw_many(VariableBptt(6), n=5_000)
    assert lengths.min() == 5
    assert (lengths == 5).mean() > 0.2  # the clamp is hit often when bptt is near the minimum


def test_variable_bptt_cap_bounds_the_longest_window() -> None:
    v = VariableBptt(40)
    assert v.cap == 55  # bptt + 3 sd
    lengths = draw_many(v)
    assert lengths.max() == v.cap  # reached (3 sd happens) and never exceeded
    capped = VariableBptt(40, max_len=42)
    assert capped.cap == 42 and draw_many(capped, n=2_000).max() == 42


def test_variable_bptt_lr_factor_is_length_over_bptt() -> None:
    v = VariableBptt(70)
    assert v.lr_factor(70) == 1.0
    assert v.lr_factor(35) == 0.5
    assert v.lr_factor(77) == pytest.approx(1.1)


def test_variable_bptt_is_reproducible_with_a_seed() -> None:
    v = VariableBptt(30)
    assert draw_many(v, 200, seed=3).tolist() == draw_many(v, 200, seed=3).tolist()
    assert draw_many(v, 200, seed=3).tolist() != draw_many(v, 200, seed=4).tolist()


# --------------------------------------------------------------------------- property

@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 400), bs=st.integers(1, 12), bptt=st.integers(1, 40), variable=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_windows_cover_the_stream(n: int, bs: int, bptt: int, variable: bool, seed: int) -> None:
    m = batchify(stream(n), bs)
    rows = n // bs
    assert m.shape == (rows, bs)
    if rows < 2:
        assert list(epoch_windows(rows, bptt)) == []
        return
    v = VariableBptt(bptt) if variable else None
    rng = np.random.default_rng(seed)
    spans = list(epoch_windows(rows, bptt, v, rng))
    for k, (i, seq_len) in enumerate(spans):
        x, y = get_batch(m, i, seq_len)
        assert torch.equal(y.view_as(x), x + 1)
        limit = v.cap if v else bptt
        assert 1 <= seq_len <= limit
        if k < len(spans) - 1 and not v:
            assert seq_len == bptt  # only the last window may be shorter
    assert sum(seq_len for _, seq_len in spans) == rows - 1
    assert_each_token_is_a_target_once(n, bs, targets_of_one_epoch(m, bptt, v, seed))
