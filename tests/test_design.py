"""Controlled designs (issue 20, item 2): ``[slices.NAME]`` in a study file, its errors, the lr it holds
fixed, what each trial records, and the shipped default study as a bptt slice of at least one epoch."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from bptt_harness.config import load_study, parse_study
from bptt_harness.design import describe_slices
from bptt_harness.errors import HarnessError
from bptt_harness.record import TrialRecord, flatten
from bptt_harness.study import grid_points, trial_spec

STUDIES = Path(__file__).resolve().parent.parent / "studies"

BASE = {
    "name": "t",
    "sampler": "grid",
    "corpus": {"source": "synthetic:k=4,tokens=5000"},
    "model": {"nhid": 8, "emsize": 8, "layers": 1},
    "train": {"tokens": 1000, "lr": 20.0},
    "lr": {"rule": "sqrt", "ref_bptt": 35, "ref_batch_size": 20},
    "slices": {"bptt": {"tokens_per_step": 64, "bptt": [4, 8, 16]},
               "batch": {"bptt": 8, "batch_size": [2, 8, 16]}},
}


def study(**slices) -> dict:
    raw = copy.deepcopy(BASE)
    raw["slices"] = slices or raw["slices"]
    return raw


def test_tokens_per_step_derives_the_batch_size_and_slices_share_a_point_once() -> None:
    config = parse_study(copy.deepcopy(BASE))
    points = [p for p, _ in grid_points(config)]
    assert points == [{"bptt": 4, "batch_size": 16}, {"bptt": 8, "batch_size": 8}, {"bptt": 16, "batch_size": 4},
                      {"bptt": 8, "batch_size": 2}, {"bptt": 8, "batch_size": 16}]
    assert config.grid_size() == config.n_trials() == 5
    assert config.slice_names({"bptt": 8, "batch_size": 8}) == ("bptt", "batch")
    assert config.slice_names({"bptt": 16, "batch_size": 4}) == ("bptt",)
    assert config.slices[0].varies == ("bptt", "batch_size") and config.slices[1].varies == ("batch_size",)
    # The search space is the union the slices span (what the report and the profile read).
    assert config.search["bptt"].choices == (4, 8, 16) and config.search["batch_size"].choices == (2, 4, 8, 16)


def test_a_slice_holds_the_lr_fixed_where_the_rule_would_move_it() -> None:
    config = parse_study(copy.deepcopy(BASE))
    lrs = {(p["bptt"], p["batch_size"]): trial_spec(config, p, 0).train.lr for p, _ in grid_points(config)}
    assert set(lrs.values()) == {20.0}  # the batch arm too: the sqrt rule would give 20 x sqrt(16 / 700) at bs 2
    # lr = "rule" hands the lr to the [lr] rule: the batch arm then moves it with tokens per step.
    raw = study(bptt=BASE["slices"]["bptt"], batch={"bptt": 8, "batch_size": [2, 16], "lr": "rule"},
                other={"bptt": 4, "batch_size": 2})
    ruled = parse_study(raw)
    assert trial_spec(ruled, {"bptt": 8, "batch_size": 2}, 0).train.lr == pytest.approx(20 * math.sqrt(16 / 700))
    assert trial_spec(ruled, {"bptt": 4, "batch_size": 2}, 0).train.lr == 20.0
    # A slice's own lr, capped by [lr] max_lr like every other lr.
    raw = study(bptt={"tokens_per_step": 64, "bptt": [4, 8], "lr": 30.0})
    raw["lr"]["max_lr"] = 25.0
    capped = parse_study(raw)
    assert {trial_spec(capped, p, 0).train.lr for p, _ in grid_points(capped)} == {25.0}
    assert "lr 25 fixed" in describe_slices(capped.slices)


def test_a_tuned_rule_does_not_tune_inside_a_slice_that_holds_its_lr() -> None:
    raw = study(bptt={"tokens_per_step": 64, "bptt": [4, 8]}, arm={"bptt": 4, "batch_size": [2, 4], "lr": "rule"})
    raw["lr"] = {"rule": "tuned"}
    config = parse_study(raw)
    assert config.held_lr({"bptt": 8, "batch_size": 8}) == 20.0
    assert config.held_lr({"bptt": 4, "batch_size": 2}) is None


def test_keys_a_slice_leaves_out_take_the_studys_own_values() -> None:
    raw = study(bptt={"tokens_per_step": 64, "bptt": [4, 8]}, width={"bptt": 8, "batch_size": 8, "nhid": [8, 16]})
    config = parse_study(raw)
    points = [p for p, _ in grid_points(config)]
    assert {"bptt": 4, "batch_size": 16, "nhid": 8} in points
    assert points.count({"bptt": 8, "batch_size": 8, "nhid": 8}) == 1  # shared by both slices
    assert config.slice_names({"bptt": 8, "batch_size": 8, "nhid": 8}) == ("bptt", "width")


@pytest.mark.parametrize(("slices", "message"), [
    ({"bptt": {"tokens_per_step": 64, "bptt": [4, 6]}},
     "slices.bptt: tokens_per_step = 64 is not a multiple of bptt 6 (64 / 6 = 10.67); use bptt values that "
     "divide 64 (near 6: 4 or 8)"),
    ({"bptt": {"tokens_per_step": 64, "bpt": [4]}}, "unknown key [slices.bptt] 'bpt' (did you mean 'bptt'?)"),
    ({"bptt": {"tokens_per_step": 64, "bptt": [4], "batch_size": [16]}}, "gives both batch_size and tokens_per_step"),
    ({"bptt": {"bptt": [4, 8]}}, "slices.bptt needs batch_size = [..] or tokens_per_step = N"),
    ({"bptt": {"tokens_per_step": 64}}, "slices.bptt has no bptt"),
    ({"bptt": {"tokens_per_step": 0, "bptt": [4]}}, "tokens_per_step = 0 must be >= 1"),
    ({"bptt": {"tokens_per_step": 64.0, "bptt": [4]}}, "slices.bptt.tokens_per_step = 64.0 must be an integer"),
    ({"bptt": {"tokens_per_step": 64, "bptt": [4, 4]}}, "slices.bptt.bptt = [4, 4] repeats a value"),
    ({"bptt": {"tokens_per_step": 64, "bptt": {"low": 4, "high": 8}}}, "slices.bptt.bptt is a range"),
    ({"bptt": {"tokens_per_step": 64, "bptt": [0]}}, "slices.bptt.bptt values must lie in [1, 100000]; got 0..0"),
    ({"bptt": {"bptt": 4, "batch_size": 4, "lr": "rul"}}, "slices.bptt.lr = 'rul' (did you mean 'rule'?) must be"),
    ({"bptt": {"bptt": 4, "batch_size": 4, "lr": [1.0, 2.0]}}, "must be one number > 0"),
    ({"a": {"bptt": 4, "batch_size": 4, "lr": "rule"}, "b": {"bptt": 4, "batch_size": [4, 8]}},
     "slices.a and slices.b share bptt 4 x batch_size 4 but train it at different lr (the [lr] rule and 20)"),
    ({"1x": {"bptt": 4, "batch_size": 4}}, "slice name '1x' must start with a letter"),
    ({"bptt": [4, 8]}, "slices.bptt must be a table of keys"),
])
def test_a_bad_slice_is_one_line_naming_it(slices: dict, message: str) -> None:
    with pytest.raises(HarnessError) as e:
        parse_study(study(**slices))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_slices_need_a_grid_and_exclude_search_and_a_tuned_rule_with_nothing_to_tune() -> None:
    for change, message in (({"sampler": "tpe"}, 'runs with sampler = "grid"'),
                            ({"search": {"bptt": [4], "batch_size": [4]}}, "give [search]"),
                            ({"slices": {}}, "[slices] needs at least one [slices.NAME] table"),
                            ({"lr": {"rule": "tuned"}}, "every slice holds its lr fixed, so nothing is tuned")):
        raw = {**copy.deepcopy(BASE), **change}
        with pytest.raises(HarnessError) as e:
            parse_study(raw)
        assert message in str(e.value), (change, str(e.value))
    raw = copy.deepcopy(BASE)
    del raw["slices"]
    raw["search"] = {"bptt": [4], "batch_size": [4], "tokens_per_step": 64}
    with pytest.raises(HarnessError, match=r"a controlled slice is its own table, \[slices.NAME\]"):
        parse_study(raw)


def test_each_trial_records_its_slices_and_the_study_describes_them() -> None:
    from bptt_harness.record import StudyInfo, TrialResult
    from bptt_harness.study import make_record

    config = parse_study(copy.deepcopy(BASE))
    params = {"bptt": 8, "batch_size": 8}
    info = StudyInfo(name="t", slices_text=describe_slices(config.slices))
    rec = make_record(info, trial_spec(config, params, 0), params, 0, TrialResult(bptt=8, batch_size=8), {}, "now",
                      slices=config.slice_names(params))
    row = flatten(TrialRecord.from_dict(rec.to_dict()))
    assert row["slices"] == "bptt,batch"
    assert row["slices_description"] == ("bptt: bptt 4/8/16 at 64 tokens per step, lr 20 fixed; "
                                         "batch: batch_size 2/8/16 at bptt 8, lr 20 fixed")
    assert flatten(make_record(StudyInfo(), trial_spec(config, params, 0), params, 0, TrialResult(), {},
                               "now"))["slices"] is None


SWEPT = """
name = "sl"
sampler = "grid"
[corpus]
source = "synthetic:k=4,tokens=6000"
[model]
emsize = 8
nhid = 8
layers = 1
dropout = 0.0
[train]
lr = 2.0
tokens = 600
checkpoints = 1
eval_bptt = 32
[lr]
rule = "linear"
[slices.bptt]
tokens_per_step = 32
bptt = [4, 8]
[slices.batch]
bptt = 8
batch_size = [2, 4]
"""


def test_a_grid_of_slices_runs_every_point_once_with_its_slice_recorded(tmp_path: Path) -> None:
    """Through the sweep: the points of two slices run once each, each trial stores its slices and lr; a
    slice extended on resume runs its new point, a slice whose lr changed is refused."""
    from bptt_harness.api import load_results
    from bptt_harness.study.sweep import run_study

    path = tmp_path / "sl.toml"
    path.write_text(SWEPT)
    paths = run_study(path, results_dir=tmp_path, quiet=True)
    rows = {(r["bptt"], r["batch_size"]): r for r in load_results(paths.html.parent).to_dict("records")}
    assert set(rows) == {(4, 8), (8, 4), (8, 2)}
    assert rows[(8, 4)]["slices"] == "bptt,batch" and rows[(8, 2)]["slices"] == "batch"
    assert {r["lr"] for r in rows.values()} == {2.0} and {r["lr_rule"] for r in rows.values()} == {"fixed"}
    path.write_text(SWEPT.replace("bptt = [4, 8]", "bptt = [4, 8, 16]"))
    assert len(load_results(run_study(path, results_dir=tmp_path, quiet=True).html.parent)) == 4
    path.write_text(SWEPT.replace("[slices.batch]", "[slices.batch]\nlr = 1.0").replace("[slices.bptt]",
                                                                                      "[slices.bptt]\nlr = 1.0"))
    with pytest.raises(HarnessError, match=r"changed: slices.batch.lr, slices.bptt.lr"):
        run_study(path, results_dir=tmp_path, quiet=True)


def test_the_default_study_is_a_bptt_slice_of_at_least_one_epoch() -> None:
    """studies/default.toml: a slice whose configurations differ only in bptt (one tokens per step, so one
    batch-size-times-bptt, equal steps and one lr), trained at least one full epoch, plus a batch arm."""
    config = load_study(STUDIES / "default.toml")
    by_name = {s.name: s for s in config.slices}
    bptt = by_name["bptt"]
    assert bptt.tokens_per_step is not None and bptt.lr is not None
    assert set(bptt.varies) == {"bptt", "batch_size"} and len(bptt.points) >= 4
    assert {dict(p)["bptt"] * dict(p)["batch_size"] for p in bptt.points} == {bptt.tokens_per_step}
    assert {trial_spec(config, dict(p), 0).train.lr for p in bptt.points} == {bptt.lr}
    assert config.train.budget == "tokens" and config.train.epochs is not None and config.train.epochs >= 1
    assert config.train.anneal_at is not None  # the schedule follows progress, not a shape's checkpoints
    arm = by_name["batch"]
    assert arm.varies == ("batch_size",) and len(arm.points) >= 2


def test_the_profile_maps_the_shapes_the_slices_list_not_their_product() -> None:
    from bptt_harness.profile_csv import cells

    config = parse_study(copy.deepcopy(BASE))
    assert cells(config) == [(4, 16), (8, 2), (8, 8), (8, 16), (16, 4)]


def test_racing_runs_of_a_slice_keep_its_slices_and_lr(tmp_path: Path) -> None:
    from bptt_harness.api import load_results
    from bptt_harness.study.sweep import run_study

    path = tmp_path / "raced.toml"
    path.write_text(SWEPT.replace('name = "sl"', 'name = "raced"') + "[race]\nmax_seeds = 2\ntrials = 2\n")
    rows = load_results(run_study(path, results_dir=tmp_path, quiet=True).html.parent).to_dict("records")
    raced = [r for r in rows if r["repeat"] > 0]
    assert len(rows) == 5 and len(raced) == 2
    first = {r["config_key"]: r for r in rows if r["repeat"] == 0}
    for r in raced:
        assert r["slices"] == first[r["config_key"]]["slices"] and r["lr"] == 2.0 and r["lr_rule"] == "fixed"
