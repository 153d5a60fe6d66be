"""Ranking: Pareto fronts, ties within the spread, infeasible rows, equal-time ranking."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bptt_harness.report.frame import aggregate_configs, records_to_frame
from bptt_harness.report.rank import dominance_matrix, equal_time_ranking, pareto_ranks, pareto_ranks_2d, ppl_at, rank_configs


def configs(rows: list[dict]) -> pd.DataFrame:
    """A hand-made per-configuration frame with the columns rank_configs reads."""
    base = {"n": 1, "n_trials": 1, "n_oom": 0, "n_diverged": 0, "n_other": 0, "val_ppl_std": np.nan,
            "seconds_per_ktok_std": np.nan, "reason": "", "tokens_per_step": 0}
    out = []
    for r in rows:
        row = {**base, **r}
        row.setdefault("config_key", f"bptt={row['bptt']},batch_size={row['batch_size']}")
        row["tokens_per_step"] = row["bptt"] * row["batch_size"]
        out.append(row)
    return pd.DataFrame(out)


def test_pareto_ranks_known_answer():
    # (ppl, cost): A and B are the front; C is dominated by B only; D by everyone.
    vals = np.array([[100.0, 4.0], [110.0, 2.0], [120.0, 3.0], [130.0, 5.0]])
    assert pareto_ranks(vals).tolist() == [1, 1, 2, 3]


def test_rank_order_ties_broken_by_perplexity_and_infeasible_apart():
    df = configs([
        dict(bptt=35, batch_size=20, val_ppl=120.0, seconds_per_ktok=1.0),
        dict(bptt=70, batch_size=20, val_ppl=110.0, seconds_per_ktok=2.0),
        dict(bptt=140, batch_size=20, val_ppl=130.0, seconds_per_ktok=3.0),  # dominated by both
        dict(bptt=35, batch_size=10, val_ppl=100.0, seconds_per_ktok=4.0),
        dict(bptt=560, batch_size=80, val_ppl=np.nan, seconds_per_ktok=np.nan, n=0, n_oom=1,
             reason="oom: CUDA out of memory"),
        dict(bptt=35, batch_size=5, val_ppl=np.nan, seconds_per_ktok=np.nan, n=0, n_diverged=1,
             reason="diverged at step 12"),
        dict(bptt=35, batch_size=7, val_ppl=np.nan, seconds_per_ktok=np.nan, n=0, n_other=1, reason="failed: boom"),
    ])
    r = rank_configs(df, "seconds_per_ktok")
    assert r.table["config_key"].tolist() == ["bptt=35,batch_size=10", "bptt=70,batch_size=20",
                                              "bptt=35,batch_size=20", "bptt=140,batch_size=20"]
    assert r.table["pareto_rank"].tolist() == [1, 1, 1, 2]
    assert r.table["place"].tolist() == [1, 2, 3, 4]
    assert not r.table["tie"].any()
    assert sorted(r.infeasible["config_key"]) == ["bptt=35,batch_size=5", "bptt=560,batch_size=80"]
    assert set(r.infeasible["reason"]) == {"oom: CUDA out of memory", "diverged at step 12"}
    assert r.unranked["config_key"].tolist() == ["bptt=35,batch_size=7"]


def test_differences_within_spread_are_ties_not_wins():
    # B is 1 ppl better and 0.01 s cheaper than A, but both differences are inside the spread of
    # repeats: without spreads B dominates A, with them they share the front and the place.
    rows = [dict(bptt=35, batch_size=20, val_ppl=101.0, seconds_per_ktok=1.01, n=3, val_ppl_std=2.0,
                 seconds_per_ktok_std=0.05),
            dict(bptt=70, batch_size=20, val_ppl=100.0, seconds_per_ktok=1.00, n=3, val_ppl_std=2.0,
                 seconds_per_ktok_std=0.05),
            dict(bptt=140, batch_size=20, val_ppl=130.0, seconds_per_ktok=1.0, n=3, val_ppl_std=2.0,
                 seconds_per_ktok_std=0.05)]
    r = rank_configs(configs(rows), "seconds_per_ktok")
    t = r.table.set_index("config_key")
    assert t.loc["bptt=70,batch_size=20", "pareto_rank"] == t.loc["bptt=35,batch_size=20", "pareto_rank"] == 1
    assert t.loc["bptt=70,batch_size=20", "place"] == t.loc["bptt=35,batch_size=20", "place"] == 1
    assert t.loc["bptt=70,batch_size=20", "tie"] and t.loc["bptt=35,batch_size=20", "tie"]
    # 130 vs 100 is far outside the spread and the cost is tied: dominated.
    assert t.loc["bptt=140,batch_size=20", "pareto_rank"] == 2
    assert t.loc["bptt=140,batch_size=20", "place"] == 3
    # The same numbers measured once each: an ordinary strict ranking.
    no_spread = [{**r, "n": 1, "val_ppl_std": np.nan, "seconds_per_ktok_std": np.nan} for r in rows]
    t1 = rank_configs(configs(no_spread), "seconds_per_ktok").table.set_index("config_key")
    assert t1.loc["bptt=70,batch_size=20", "pareto_rank"] == 1
    assert t1.loc["bptt=35,batch_size=20", "pareto_rank"] == 2


def test_spread_of_one_config_is_borrowed_by_a_single_run():
    d = dominance_matrix(np.array([[100.0, 1.0], [101.0, 1.0]]), np.array([[2.0, 0.0], [np.nan, np.nan]]))
    assert not d.any()  # 1 ppl apart with a spread of ~2.8: neither wins


def test_missing_cost_falls_back_to_seconds_per_token_with_a_note():
    df = configs([dict(bptt=35, batch_size=20, val_ppl=120.0, seconds_per_ktok=1.0, joules_per_ktok=np.nan),
                  dict(bptt=70, batch_size=20, val_ppl=110.0, seconds_per_ktok=2.0, joules_per_ktok=np.nan)])
    r = rank_configs(df, "joules_per_ktok")
    assert r.cost == "seconds_per_ktok"
    assert any("not measured" in n for n in r.notes)


points = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(points)
def test_fast_2d_sort_matches_the_matrix_sort(pts):
    vals = np.array(pts, dtype=float)
    assert pareto_ranks_2d(vals).tolist() == pareto_ranks(vals).tolist()


@settings(max_examples=100, deadline=None)
@given(points)
def test_front_members_are_not_dominated_and_every_later_rank_is(pts):
    vals = np.array(pts, dtype=float)
    ranks = pareto_ranks(vals)
    dom = dominance_matrix(vals)
    for j, r in enumerate(ranks):
        dominators = ranks[dom[:, j]]
        assert (dominators < r).all()
        if r > 1:
            assert (dominators == r - 1).any()


def _trial(key_bptt: int, bs: int, curve: list[tuple[float, float]], status: str = "ok", seed: int = 0) -> dict:
    ppl = math.exp(curve[-1][1]) if curve else None
    return {"status": status, "config_key": f"bptt={key_bptt},batch_size={bs}",
            "config": {"bptt": key_bptt, "batch_size": bs, "seed": seed, "repeat": seed},
            "result": {"val_ppl": ppl, "tokens_per_s": 1000.0 * bs, "train_tokens": 10_000,
                       "val_curve": [{"step": i, "tokens": i, "seconds": s, "loss": loss, "ppl": math.exp(loss)}
                                     for i, (s, loss) in enumerate(curve)]}}


def test_ppl_at_interpolates_the_loss_and_is_nan_before_the_first_checkpoint():
    curve = [{"seconds": 1.0, "loss": 5.0}, {"seconds": 3.0, "loss": 4.0}]
    assert ppl_at(curve, 2.0) == pytest.approx(math.exp(4.5))
    assert ppl_at(curve, 3.0) == pytest.approx(math.exp(4.0))
    assert math.isnan(ppl_at(curve, 0.5))
    assert math.isnan(ppl_at(curve, 4.0))


def test_equal_time_ranking_disagrees_with_the_budget_ranking():
    # Small config: best at the (token) budget, but slow. Big config: worse at the budget, far ahead at 2 s.
    small = _trial(35, 20, [(2.0, 5.5), (4.0, 5.0), (6.0, 4.5), (8.0, 4.0)])
    big = _trial(140, 80, [(0.5, 5.2), (1.0, 4.8), (1.5, 4.6), (2.0, 4.4)])
    trials = records_to_frame([small, big])
    ranking = rank_configs(aggregate_configs(trials))
    et = equal_time_ranking(trials, ranking.table)
    assert et.seconds == pytest.approx(2.0)
    assert et.best_budget == "bptt=35,batch_size=20"
    assert et.best_time == "bptt=140,batch_size=80"
    assert et.disagree
    at = et.table.set_index("config_key")["ppl_at_time"]
    assert at["bptt=35,batch_size=20"] == pytest.approx(math.exp(5.5))
    assert at["bptt=140,batch_size=80"] == pytest.approx(math.exp(4.4))


def test_equal_time_ranking_agrees_when_the_best_is_best_at_every_time():
    a = _trial(35, 20, [(1.0, 5.0), (2.0, 4.0)])
    b = _trial(70, 20, [(1.0, 5.5), (2.0, 4.5), (3.0, 4.4)])
    trials = records_to_frame([a, b])
    ranking = rank_configs(aggregate_configs(trials))
    et = equal_time_ranking(trials, ranking.table)
    assert et.seconds == pytest.approx(2.0)
    assert not et.disagree


def test_equal_time_says_nothing_when_the_best_had_no_checkpoint_yet():
    # The budget's best is slow: its first checkpoint comes after the fast one has finished.
    slow_best = _trial(35, 20, [(5.0, 4.5), (10.0, 4.0)])
    fast = _trial(140, 80, [(1.0, 5.0), (2.0, 4.6)])
    trials = records_to_frame([slow_best, fast])
    et = equal_time_ranking(trials, rank_configs(aggregate_configs(trials)).table)
    assert et.seconds == pytest.approx(2.0)
    assert not et.comparable and not et.disagree
