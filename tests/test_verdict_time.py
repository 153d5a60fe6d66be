"""Issue 13, items 3 and 4: the verdict at every budget, and equal time measured on a common time grid
(kept apart from training: observing never changes what a trial does)."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState, create_trial

from bptt_harness.observers import TimeGrid
from bptt_harness.report.build import build
from bptt_harness.report.frame import aggregate_configs, records_to_frame
from bptt_harness.report.html import render
from bptt_harness.report.rank import equal_time_ranking, rank_configs
from bptt_harness.spec import ModelConfig, TrainConfig, TrialSpec
from bptt_harness.study import observe_until
from bptt_harness.trainer import run_trial


def test_a_time_point_goes_to_the_step_end_nearest_its_grid_time() -> None:
    b = TimeGrid(1.0)
    assert b.due(0.4, 0.4) is None            # the next end (~0.8) is still short of 1 s
    assert b.due(0.8, 0.4) == 1.0             # 0.8 is 0.2 short; the next end would be 0.2 past
    assert b.due(1.2, 0.4) is None            # 1.0 was taken; 2.0 is far away
    assert b.due(1.55, 0.35) is None          # 1.55 + 0.175 < 2
    assert b.due(1.9, 0.35) == 2.0
    # A step longer than the grid crosses several grid times: one point, for the nearest; 3 and 4 get none.
    assert b.due(5.1, 3.2) == 5.0
    assert b.due(5.5, 0.4) is None


def test_no_time_point_past_the_shortest_finished_run() -> None:
    b = TimeGrid(1.0, until_s=2.0)
    assert [b.due(s, 0.1) for s in (0.98, 1.98, 2.98, 3.98)] == [1.0, 2.0, None, None]

    def trial(status: str, grid: list[float]) -> FrozenTrial:
        curve = [{"grid_s": g, "loss": 1.0} for g in grid]
        return create_trial(state=TrialState.COMPLETE, values=[1.0],
                            user_attrs={"record": {"status": status, "result": {"time_curve": curve}}})

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for t in (trial("ok", [3.0, 6.0, 9.0]), trial("ok", [3.0, 6.0]), trial("diverged", [3.0]), trial("ok", []),
              create_trial(state=TrialState.FAIL)):   # a worker that died: no record
        study.add_trial(t)
    assert observe_until(study, _spec(3.0)) == 6.0
    assert observe_until(study, _spec(None)) is None
    assert observe_until(optuna.create_study(), _spec(3.0)) is None


def _spec(grid: float | None) -> TrialSpec:
    return TrialSpec(bptt=8, batch_size=4, model=ModelConfig(emsize=8, nhid=16, layers=1, dropout=0.2),
                     train=TrainConfig(optimizer="sgd", lr=5.0, tokens=4000, checkpoints=4, eval_bptt=32,
                                       time_grid_s=grid, log_every=5, seed=3))


def test_observing_on_the_time_grid_does_not_change_training(syn, one_thread: None) -> None:
    plain = run_trial(_spec(None), syn, "cpu")
    # A grid far finer than a step: nearly every step is observed.
    watched = run_trial(_spec(1e-6), syn, "cpu")
    assert plain.status == watched.status == "ok"
    assert not plain.time_curve and len(watched.time_curve) >= watched.steps // 2
    # Same losses, same annealing, same end: dropout's random stream and the lr schedule were untouched.
    assert [p["loss"] for p in watched.val_curve] == [p["loss"] for p in plain.val_curve]
    assert [p["loss"] for p in watched.train_curve] == [p["loss"] for p in plain.train_curve]
    assert watched.final_lr == plain.final_lr and watched.val_ppl == plain.val_ppl
    # Observation time is validation time, not training time.
    assert watched.eval_s > plain.eval_s
    grid = [p["grid_s"] for p in watched.time_curve]
    assert grid == sorted(grid) and len(set(grid)) == len(grid)
    assert all(math.isfinite(p["loss"]) and p["ppl"] == pytest.approx(math.exp(p["loss"])) for p in watched.time_curve)


def _trial(bptt: int, bs: int, checkpoints: list[float], seed: int = 0, *, time_points: dict[float, float] | None = None,
           tps: float = 1000.0, budget: int = 40_000) -> dict:
    """A record whose validation losses at 1/n..n/n of the budget are ``checkpoints`` and whose time-grid
    points are ``time_points`` (grid seconds -> loss)."""
    n = len(checkpoints)
    train_s = budget / tps
    curve = [{"step": k, "tokens": budget * (k + 1) // n, "seconds": train_s * (k + 1) / n, "loss": loss,
              "ppl": math.exp(loss)} for k, loss in enumerate(checkpoints)]
    grid = [{"grid_s": g, "seconds": g + 0.01, "step": 1, "tokens": 1, "loss": loss, "ppl": math.exp(loss)}
            for g, loss in (time_points or {}).items()]
    return {"status": "ok", "config_key": f"bptt={bptt},batch_size={bs}",
            "config": {"bptt": bptt, "batch_size": bs, "lr": 20.0, "seed": seed, "repeat": seed},
            "result": {"status": "ok", "val_ppl": math.exp(checkpoints[-1]), "tokens_per_s": tps,
                       "train_tokens": budget, "budget_tokens": budget, "val_curve": curve, "time_curve": grid},
            "study": {"name": "v", "budget": "tokens", "budget_tokens": budget, "cost": "seconds_per_token"}}


def test_a_winner_that_changes_with_the_budget_is_reported_as_still_moving() -> None:
    # A leads at 25-75% of the budget, B overtakes it at the end, far beyond the seed noise.
    a = [_trial(35, 5, [6.0, 5.0, 4.6, 4.5], s) for s in range(2)]
    b = [_trial(10, 5, [6.5, 5.4, 4.8, 4.3], s) for s in range(2)]
    rep = build(records_to_frame(a + b), study_name="v")
    leg = rep.budget.tokens
    assert list(leg.table["at"]) == [0.25, 0.5, 0.75, 1.0]
    assert list(leg.table["best"]) == ["bptt=35,batch_size=5"] * 3 + ["bptt=10,batch_size=5"]
    assert leg.moving
    text = {f.key: f.text for f in rep.advice.findings}["budget"]
    assert text.startswith("At equal tokens the best changed between 75% and 100% of the budget "
                           "(from bptt 35 × bs 5 to bptt 10 × bs 5): a longer run may change it again")
    html = render(rep)
    assert 'id="budget-tokens"' in html and 'id="fig-budget"' in html


def test_a_winner_that_settled_early_is_reported_as_settled() -> None:
    a = [_trial(35, 5, [6.5, 5.0, 4.6, 4.3], s) for s in range(2)]
    b = [_trial(10, 5, [6.0, 5.4, 4.9, 4.6], s) for s in range(2)]
    rep = build(records_to_frame(a + b), study_name="v")
    assert not rep.budget.tokens.moving and rep.budget.tokens.since == 0.5
    text = {f.key: f.text for f in rep.advice.findings}["budget"]
    assert text.startswith("At equal tokens bptt 35 × bs 5 has led (or tied for the lead) since 50% of the budget: "
                           "the verdict was not moving at the end")


def test_equal_time_reads_the_time_grid_and_never_ranks_a_configuration_not_measured_there() -> None:
    # Fast ran for 3 s (grid points 1, 2, 3), slow for 10 s; a third configuration has no time points.
    fast = _trial(140, 80, [5.0, 4.6], tps=13_333.0, time_points={1.0: 5.4, 2.0: 5.0, 3.0: 4.6})
    slow = _trial(10, 5, [4.8, 4.2], tps=4_000.0, time_points={g: 6.0 - 0.15 * g for g in range(1, 11)})
    blind = _trial(35, 20, [5.1, 4.4], tps=8_000.0)
    trials = records_to_frame([fast, slow, blind])
    et = equal_time_ranking(trials, rank_configs(aggregate_configs(trials)).table)
    assert et.on_grid and et.seconds == 3.0 and et.max_offset_s == pytest.approx(0.01)
    t = et.table.set_index("config_key")
    assert t.at["bptt=140,batch_size=80", "ppl_at_time"] == pytest.approx(math.exp(4.6))
    assert t.at["bptt=10,batch_size=5", "ppl_at_time"] == pytest.approx(math.exp(6.0 - 0.45))
    assert t.at["bptt=140,batch_size=80", "place_time"] == 1 and t.at["bptt=10,batch_size=5", "place_time"] == 2
    assert math.isnan(t.at["bptt=35,batch_size=20", "place_time"])
    rep = build(trials, study_name="v")
    html = render(rep)
    assert "not measured" in html.split('id="equal-time"')[1].split("</table>")[0]
    text = {f.key: f.text for f in rep.advice.findings}["equal_time"]
    assert "1 configuration(s) had no validation point at that time: shown as not measured, not ranked." in text
    assert "measured validation point of the study's time grid" in text


def test_without_a_grid_a_configuration_with_no_checkpoint_by_then_is_not_measured_rather_than_last() -> None:
    # The published case: a slow configuration second at equal tokens has its first checkpoint after the
    # comparison time, so it has no value there; it must not be ranked last for that reason.
    fast = _trial(10, 80, [5.2, 4.9, 4.8], tps=18_000.0)
    slow = _trial(10, 5, [5.5, 4.8, 4.6], tps=4_000.0)
    mid = _trial(35, 20, [5.6, 5.0, 4.85], tps=10_000.0)
    trials = records_to_frame([fast, slow, mid])
    et = equal_time_ranking(trials, rank_configs(aggregate_configs(trials)).table)
    t = et.table.set_index("config_key")
    assert not et.on_grid
    assert math.isnan(t.at["bptt=10,batch_size=5", "ppl_at_time"]) and math.isnan(t.at["bptt=10,batch_size=5", "place_time"])
    assert sorted(t["place_time"].dropna()) == [1, 2]
