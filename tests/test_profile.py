"""bptt-harness profile: the memory and speed map, the wall per bptt, and what the sweep does with it."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from bptt_harness.cli import main
from bptt_harness.profile import find_max_fitting
from bptt_harness.profile_csv import SAFETY, ProfileRow, doesnt_fit, plan_tokens, walls_table

pytestmark = pytest.mark.usefixtures("one_thread")


def study(tmp_path: Path, name: str = "prof", cap_gib: float | None = 0.004, bptt: str = "[5, 20]",
          bs: str = "[4, 16, 512]") -> Path:
    path = tmp_path / f"{name}.toml"
    cap = f"max_memory_gib = {cap_gib}\n" if cap_gib else ""
    path.write_text(f'name = "{name}"\nsampler = "grid"\n{cap}' + textwrap.dedent(f"""
        [corpus]
        source = "synthetic:k=4,vocab=8,noise=4,tokens=20000"
        [model]
        emsize = 16
        nhid = 16
        layers = 1
        dropout = 0.0
        [train]
        optimizer = "adamw"
        lr = 0.01
        tokens = 4000
        checkpoints = 2
        [search]
        bptt = {bptt}
        batch_size = {bs}
    """))
    return path


# --------------------------------------------------------------------------- the search (pure)

@pytest.mark.parametrize("limit, start", [(100, 4), (100, 512), (1, 1), (7, 8), (64, 64)])
def test_find_max_fitting_brackets_the_wall(limit, start):
    tried: list[int] = []
    s = find_max_fitting(lambda bs: tried.append(bs) or bs <= limit, start)
    assert s.reason == "resolved" and s.largest_fit <= limit < s.smallest_fail
    assert s.smallest_fail - s.largest_fit <= max(1, int(0.05 * s.largest_fit))  # within 5% of the wall
    assert len(tried) == len(set(tried)) <= 14


def test_find_max_fitting_without_a_wall_and_when_stopped():
    assert find_max_fitting(lambda bs: True, 4, upper=64).reason.startswith("no out-of-memory up to bs 64")
    assert find_max_fitting(lambda bs: False, 4).reason == "batch size 1 does not fit"
    assert find_max_fitting(lambda bs: None, 4).reason == "stopped"


def test_doesnt_fit_uses_monotone_memory_and_the_same_cap():
    rows = [ProfileRow(10, 8, "grid", "ok", memory_cap_mib=100.0), ProfileRow(10, 64, "grid", "oom", memory_cap_mib=100.0),
            ProfileRow(40, 8, "grid", "oom", memory_cap_mib=100.0)]
    df = pd.DataFrame([vars(r) for r in rows])
    assert doesnt_fit(df, 100.0, 10, 64) and doesnt_fit(df, 100.0, 20, 128) and doesnt_fit(df, 100.0, 40, 8)
    assert not doesnt_fit(df, 100.0, 10, 32)      # between a fit and a failure: not guessed
    assert not doesnt_fit(df, 100.0, 10, 8) and not doesnt_fit(df, None, 10, 64)  # another cap: not known
    assert not doesnt_fit(None, 100.0, 10, 64)


def test_plan_tokens_from_rates_setup_and_validation():
    rows = [ProfileRow(10, 10, "grid", "ok", steps=5, tokens_per_step=100, tokens_per_s=1000.0, seconds=1.5),
            ProfileRow(20, 10, "grid", "ok", steps=5, tokens_per_step=200, tokens_per_s=2000.0, seconds=1.5),
            ProfileRow(70, 10, "eval", "ok", seconds=2.0)]
    df = pd.DataFrame([vars(r) for r in rows])
    # set-up 1 s per trial, 2 checkpoints x 2 s: fixed 2 x 5 s; 1/1000 + 1/2000 s per token.
    tokens = plan_tokens(df, [(10, 10), (20, 10)], max_seconds=1.25 * (10 + 15), checkpoints=2)
    assert tokens == pytest.approx(10_000, abs=2)
    with pytest.raises(Exception, match="leaves"):
        plan_tokens(df, [(10, 10), (20, 10)], max_seconds=5, checkpoints=2)
    with pytest.raises(Exception, match="bptt-harness profile"):
        plan_tokens(df, [(10, 10), (40, 10)], max_seconds=100, checkpoints=2)


# --------------------------------------------------------------------------- the command

def test_profile_maps_every_cell_and_finds_the_wall_under_a_cpu_cap(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["profile", str(study(tmp_path)), "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(results / "prof" / "profile.csv")
    grid = df[df["phase"] == "grid"]
    assert {(int(b), int(s)) for b, s in zip(grid["bptt"], grid["batch_size"])} == {
        (b, s) for b in (5, 20) for s in (4, 16, 512)}
    assert grid[grid["status"] == "ok"]["tokens_per_s"].gt(0).all()
    assert (grid.set_index(["bptt", "batch_size"]).loc[(20, 512), "status"]) == "oom"  # a row, not a crash
    walls = walls_table(df).set_index("bptt")
    for bptt in (5, 20):
        fit, fail = walls.loc[bptt, "largest_fit_bs"], walls.loc[bptt, "smallest_oom_bs"]
        assert fit and fail and fit < fail <= fit * 1.06 + 1
    assert walls.loc[5, "largest_fit_bs"] > walls.loc[20, "largest_fit_bs"]  # longer windows hit it sooner
    assert df["machine_id"].notna().all() and (df["phase"] == "eval").sum() == 1
    assert "memory wall per bptt" in out and "cells/s" in out


def test_sweep_skips_a_cell_the_profile_says_cannot_fit(tmp_path, monkeypatch):
    import bptt_harness.study.objective

    path, results = study(tmp_path, bs="[4, 512]"), tmp_path / "results"
    assert main(["profile", str(path), "--results-dir", str(results), "--wall", "no"]) == 0
    trained: list[tuple[int, int]] = []
    original = bptt_harness.study.objective.run_trial

    def spy(spec, *a, **k):
        trained.append((spec.bptt, spec.batch_size))
        return original(spec, *a, **k)

    monkeypatch.setattr(bptt_harness.study.objective, "run_trial", spy)
    assert main(["sweep", str(path), "--results-dir", str(results)]) == 0
    rows = {(int(r["bptt"]), int(r["batch_size"])): r for r in csv.DictReader(open(results / "prof" / "trials.csv"))}
    assert rows[(20, 512)]["status"] == "oom" and "not trained" in rows[(20, 512)]["error"]
    assert (20, 512) not in trained and (5, 4) in trained


def _injected_profile(results: Path, cells: list[tuple[int, int]], rates: dict[tuple[int, int], float]) -> pd.DataFrame:
    """A profile.csv with known rates: each grid cell 5 timed steps in 0.5 s of wall time (its set-up is the
    rest), one validation of 0.1 s."""
    rows = [ProfileRow(b, s, "grid", "ok", steps=5, tokens_per_step=b * s, tokens_per_s=rates[(b, s)], seconds=0.5)
            for b, s in cells] + [ProfileRow(70, 10, "eval", "ok", seconds=0.1)]
    df = pd.DataFrame([vars(r) for r in rows])
    (results / "prof").mkdir(parents=True, exist_ok=True)
    df.to_csv(results / "prof" / "profile.csv", index=False)
    return df


def test_max_seconds_plans_the_budget_from_the_profiled_rates(tmp_path, capsys):
    """The planner's arithmetic with injected rates (no wall-clock speed involved): the sweep trains every
    cell on the budget whose predicted time fits the limit, and one token more would not."""
    path, results = study(tmp_path, cap_gib=None, bptt="[20, 40]", bs="[8, 16]"), tmp_path / "results"
    cells = [(20, 8), (20, 16), (40, 8), (40, 16)]
    rates = {(20, 8): 8_000.0, (20, 16): 12_000.0, (40, 8): 10_000.0, (40, 16): 16_000.0}
    df = _injected_profile(results, cells, rates)
    limit, checkpoints = 6.0, 2
    planned = plan_tokens(df, cells, limit, checkpoints)

    # What the planner promises: every cell trains `tokens` at its rate, plus per trial the median set-up
    # (a profile cell's wall time beyond its timed steps) and the validations, all times SAFETY.
    median_setup = float(pd.Series([0.5 - 5 * b * s / rates[(b, s)] for b, s in cells]).median())

    def promised(tokens: int) -> float:
        return SAFETY * (tokens * sum(1 / r for r in rates.values()) + len(cells) * (median_setup + checkpoints * 0.1))

    assert promised(planned) <= limit < promised(planned + 1)
    assert 1_000 <= planned < 10_000

    assert main(["sweep", str(path), "--results-dir", str(results), "--max-seconds", str(limit), "--no-report"]) == 0
    assert f"budget: {planned:,} training tokens per trial (planned from profile.csv" in capsys.readouterr().err
    from bptt_harness.report import generate

    rows = list(csv.DictReader(open(generate(results / "prof").csv)))
    assert len(rows) == 4 and {int(r["train_tokens"]) for r in rows} == {planned}   # not the study file's 4000
    # A resumed study keeps the budget it was planned with.
    assert main(["sweep", str(path), "--results-dir", str(results), "--max-seconds", "999", "--no-report"]) == 0
    assert "planned when this study started" in capsys.readouterr().err


def test_the_report_shows_the_profile_the_wall_and_the_memory_models_held_out_error(tmp_path):
    path, results = study(tmp_path, bs="[4, 16]"), tmp_path / "results"
    assert main(["profile", str(path), "--results-dir", str(results)]) == 0
    assert main(["sweep", str(path), "--results-dir", str(results)]) == 0
    html = (results / "prof" / "report.html").read_text()
    assert 'id="fig-profile-tps"' in html and 'id="fig-profile-mem"' in html
    assert "The memory wall, measured" in html and 'id="memory-wall"' in html
    assert "Leave-one-out check" in html and "Fitted on" in html and "profile cells of the" in html
