"""The memory model recovers a known linear law and predicts the largest bptt per card."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic import SyntheticLaw, synthetic_records

from bptt_harness.report.frame import records_to_frame
from bptt_harness.report.memory import CARDS_MIB, card_table, fit_linear, fit_memory, leave_one_out_pct, make_fit, memory_wall
from bptt_harness.trainer import cuda_pool_fraction


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
    table = card_table(f, [20, 80], {"16 GiB": 16_384.0, "T4 16GB": CARDS_MIB["T4 16GB"]}).set_index("batch_size")
    # An exact law: no interval. (16384 - 400 - 1000) / 0.25 = 59,936 tokens per step -> bptt 2996 at bs 20.
    assert table.loc[20, "16 GiB"] in (2995, 2996) and table.loc[80, "16 GiB"] in (748, 749)
    # A real "16 GB" T4 offers 15,360 MiB: (15360 - 1400) / 0.25 / 20 = 2792.
    assert table.loc[20, "T4 16GB"] in (2791, 2792)
    assert math.isnan(f.loo_max_pct) or f.loo_max_pct < 1e-6


def test_prediction_interval_on_a_known_noisy_law_widens_when_extrapolating():
    x = np.repeat([1_000.0, 2_000.0, 4_000.0, 8_000.0], 5)

    def fit(rng: np.random.Generator):
        return make_fit(x, 500.0 + 0.05 * x + rng.normal(0, 4.0, x.size), "lstm 2x128", gpu=True, overhead=300.0,
                        source="profile")

    rng = np.random.default_rng(1)
    f = fit(rng)
    inside = f.upper(4_000) - float(f.predict(4_000))
    far = f.upper(80_000) - float(f.predict(80_000))
    assert inside > 0 and far > 3 * inside     # ten times past the data: much less sure
    # Coverage over repeated studies: a fresh point of the same law falls under the upper end ~97.5% of the time.
    hits = []
    for _ in range(600):
        g = fit(rng)
        new_x = rng.uniform(1_000, 8_000)
        hits.append(500.0 + 0.05 * new_x + rng.normal(0, 4.0) <= g.upper(new_x))
    assert 0.95 < np.mean(hits) < 0.995
    # The card answer keeps the interval and the context out: never more than the bare line allows.
    card = 16_384.0
    bare = (card - 300.0 - f.intercept_mib) / f.slope_mib
    assert f.max_tokens_per_step(card) < bare
    assert f.upper(f.max_tokens_per_step(card)) + 300.0 == pytest.approx(card, abs=0.5)


def test_leave_one_out_error_of_an_exact_and_a_bent_law():
    x = np.array([100.0, 200.0, 400.0, 800.0, 1600.0])
    assert leave_one_out_pct(x, 10 + 0.5 * x).max() < 1e-9
    bent = 10 + 0.5 * x + 0.0004 * x ** 2    # memory that is not linear shows up as held-out error
    assert leave_one_out_pct(x, bent).max() > 5


def test_the_cap_emulation_leaves_room_for_the_context_a_real_card_holds():
    total = 80 * 2**30
    assert cuda_pool_fraction(16_384, total, 0) == pytest.approx(16_384 / 81_920)
    assert cuda_pool_fraction(16_384, total, 500 * 2**20) == pytest.approx((16_384 - 500) / 81_920)
    assert cuda_pool_fraction(100, total, 500 * 2**20) == 0.0


def test_variable_windows_use_the_longest_window_as_x():
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 40), gpu_name=None)
    for r in recs:
        r["result"]["max_window"] = r["config"]["bptt"] + 8      # windows up to bptt + 3 sd
        bs = r["config"]["batch_size"]
        r["result"]["probe"]["peak_mem_mib"] = 100.0 + 0.01 * (r["config"]["bptt"] + 8) * bs
    f = fit_memory(records_to_frame(recs))[0]
    assert f.intercept_mib == pytest.approx(100.0) and f.slope_mib == pytest.approx(0.01)


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
