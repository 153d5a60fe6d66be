"""The memory model recovers a known linear law and predicts the largest bptt per card."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.report.frame import records_to_frame
from harness.report.memory import CARDS_GIB, card_table, fit_linear, fit_memory, memory_wall
from harness.report.synthetic import SyntheticLaw, synthetic_records


def test_fit_linear_recovers_a_noisy_law():
    rng = np.random.default_rng(0)
    x = rng.uniform(100, 200_000, 300)
    y = 812.0 + 0.0731 * x + rng.normal(0, 25.0, x.size)
    a, b, rmse, max_err, r2, se_b = fit_linear(x, y)
    assert a == pytest.approx(812.0, abs=10)
    assert b == pytest.approx(0.0731, rel=0.01)
    assert rmse == pytest.approx(25.0, rel=0.15)
    assert abs(b - 0.0731) < 4 * se_b
    assert r2 > 0.999
    assert max_err >= rmse


def test_fit_through_two_points_has_no_error_estimate():
    a, b, rmse, *_ = fit_linear(np.array([1.0, 3.0]), np.array([2.0, 6.0]))
    assert (a, b) == pytest.approx((0.0, 2.0))
    assert math.isnan(rmse)


def test_fit_memory_on_synthetic_trials_and_card_predictions():
    law = SyntheticLaw(mem_base_mib=1000.0, mem_slope_mib=0.25, card_mib=24_576.0)
    trials = records_to_frame(synthetic_records(law=law))
    fits = fit_memory(trials)
    assert len(fits) == 1
    f = fits[0]
    assert f.gpu
    assert f.intercept_mib == pytest.approx(1000.0, abs=1e-6)
    assert f.slope_mib == pytest.approx(0.25, rel=1e-9)
    # The synthetic probe reports NVML process memory 400 MiB above torch's pool: that is the overhead.
    assert f.overhead_mib == pytest.approx(400.0)
    table = card_table(f, [20, 80], CARDS_GIB).set_index("batch_size")
    # 16 GiB: (16384 - 400 - 1000) / 0.25 = 59,936 tokens per step -> bptt 2996 at bs 20, 749 at bs 80.
    assert table.loc[20, "16 GiB"] == 2996
    assert table.loc[80, "16 GiB"] == 749
    assert list(table.columns) == [f"{g} GiB" for g in CARDS_GIB]
    assert table.loc[20, "141 GiB"] > table.loc[20, "80 GiB"] > table.loc[20, "16 GiB"]


def test_memory_wall_finds_the_edge():
    trials = records_to_frame(synthetic_records(law=SyntheticLaw(mem_slope_mib=0.3, card_mib=24_576.0)))
    wall = memory_wall(trials)
    assert wall.largest_ok["tokens_per_step"] == 140 * 320
    assert wall.smallest_oom["tokens_per_step"] == 280 * 320
    per = wall.per_batch.set_index("batch_size")
    assert per.loc[320, "max_ok_bptt"] == 140 and per.loc[320, "min_oom_bptt"] == 280
    assert wall.card_mib == 24_576.0


def test_cpu_trials_get_a_fit_but_no_gpu_flag():
    trials = records_to_frame(synthetic_records(gpu_name=None))
    fits = fit_memory(trials)
    assert fits and not fits[0].gpu
