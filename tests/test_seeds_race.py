"""Issue 13, item 2: seed noise (standard errors, ties), racing the contenders, and what the
recommendation says about n, intervals, single seeds, failed seeds and test perplexity."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bptt_harness.cli import main
from bptt_harness.config import load_study
from bptt_harness.report.build import build
from bptt_harness.report.frame import records_to_frame
from bptt_harness.seeds import leaders, pooled_cv, seed_means
from bptt_harness.study import Objective, open_storage, prepare
from bptt_harness.study.race import RACE_KEY, Standing, plan_round


def test_pooled_noise_standard_error_and_ties_by_hand() -> None:
    a, b = [100.0, 104.0, 96.0], [200.0, 190.0]
    cv_a = 4.0 / 100.0                                  # sd 4 around 100
    cv_b = statistics.stdev(b) / 195.0
    pooled = math.sqrt((2 * cv_a ** 2 + 1 * cv_b ** 2) / 3)
    assert pooled_cv([a, b, [150.0]]) == pytest.approx(pooled)
    assert pooled_cv([[150.0], [120.0]]) is None
    means = seed_means({"a": a, "b": b, "c": [150.0]})
    # Its own noise at n >= 2 (n - 1 degrees of freedom); at n = 1 the pooled one, labelled as borrowed.
    assert means["a"].se == pytest.approx(4.0 / math.sqrt(3)) and means["a"].dof == 2 and means["a"].source == "own"
    assert means["c"].se == pytest.approx(pooled * 150.0) and means["c"].dof == 3
    assert means["c"].source == "the pooled seed noise of 2 configurations"
    assert means["c"].interval().label() == "95% t interval, n=1, df=3, noise borrowed from the pooled seed noise of 2 configurations"
    assert means["a"].interval().label() == "95% t interval, n=3, df=2"
    # The interval uses the t quantile on its degrees of freedom: 4.303 at df = 2, not 2.
    assert means["a"].interval().hi - 100.0 == pytest.approx(4.3027 * 4.0 / math.sqrt(3), rel=1e-4)
    assert seed_means({"x": [150.0], "y": [120.0]})["x"].se is None


def test_two_configurations_two_standard_errors_apart_on_n_2_are_not_separated() -> None:
    # Each n = 2 with sd 1: SE of each mean 0.707, of the difference 1. Two SE apart: z = 2 would call it
    # real; Welch's t on about 2 degrees of freedom does not.
    means = seed_means({"a": [99.0, 101.0], "b": [101.0, 103.0]})
    lead = leaders(means)
    assert lead.best == "a" and lead.tied == ["b"] and not lead.separated and lead.noise_known
    assert lead.tests["b"] is not None and lead.tests["b"].dof == pytest.approx(2.0)
    # Far apart: separated; with three rivals Holm adjusts the p values before calling it.
    far = seed_means({"a": [99.0, 101.0], "b": [150.0, 152.0], "c": [160.0, 161.0]})
    assert leaders(far).separated
    # One seed each: the noise is unknown, so nothing is separated and only equal means tie.
    singles = leaders(seed_means({"a": [100.0], "b": [140.0]}))
    assert not singles.separated and not singles.noise_known and singles.tied == []


def test_the_report_does_not_call_two_configurations_2_se_apart_on_n_2_separated() -> None:
    recs = [rec(35, 5, p, s) for s, p in enumerate((99.0, 101.0))] + [rec(70, 5, p, s) for s, p in enumerate((101.0, 103.0))]
    rep = build(records_to_frame(recs), study_name="s")
    h = rep.advice.headline
    assert "separated" not in h and "ties with bptt 70 × bs 5" in h
    assert list(rep.ranking.table["place"]) == [1, 1]
    # Ten standard errors apart, it is.
    recs = [rec(35, 5, p, s) for s, p in enumerate((99.0, 101.0))] + [rec(70, 5, p, s) for s, p in enumerate((109.0, 111.0))]
    h = build(records_to_frame(recs), study_name="s").advice.headline
    assert "Its perplexity is separated from every other configuration's (Welch tests at 95%, Holm-adjusted over 1 comparison)" in h


def test_race_rounds_measure_the_noise_then_chase_only_the_contenders() -> None:
    single = {"a": Standing((100.0,), 1), "b": Standing((101.0,), 1), "c": Standing((150.0,), 1)}
    assert plan_round(single, max_seeds=3, left=5) == ["b", "a"]       # noise unknown: the runner-up, then the best
    noisy = {"a": Standing((99.0, 101.0), 2), "b": Standing((103.0, 99.0), 2), "c": Standing((150.0,), 1)}
    assert plan_round(noisy, max_seeds=3, left=5) == ["b", "a"]        # c is beyond the noise
    assert plan_round(noisy, max_seeds=3, left=1) == ["b"]             # the race's budget: the runner-up first
    assert plan_round(noisy, max_seeds=2, left=5) == []                # everyone at max_seeds
    capped = {**noisy, "a": Standing((99.0, 101.0, 100.0), 3)}
    assert plan_round(capped, max_seeds=3, left=5) == ["b"]
    apart = {"a": Standing((100.0, 100.5), 2), "b": Standing((120.0, 121.0), 2)}
    assert plan_round(apart, max_seeds=5, left=5) == []                # separated: the race is over
    # A configuration whose seeds all diverged has runs but no perplexity: never a contender.
    assert plan_round({**apart, "d": Standing((), 2)}, max_seeds=5, left=5) == []


def test_the_race_spends_its_runs_on_rivals_with_one_seed_first() -> None:
    # The case: the best and a far one measured twice, the runner-up once. Its run comes first,
    # and the race goes on while it has one seed (it is not separated from the best).
    st = {"best": Standing((200.0, 201.0), 2), "runner": Standing((202.0,), 1), "far": Standing((260.0, 262.0), 2)}
    assert plan_round(st, max_seeds=3, left=1) == ["runner"]
    assert plan_round(st, max_seeds=3, left=4) == ["runner", "best"]
    # The published CPU study after its first racing round: bptt 10 x bs 20 (n = 1) is nearer the best than
    # bptt 35 x bs 5, which is not separated from it; it gets the next run, before anyone with two seeds
    # (then the best, then the others).
    published = {"10x5": Standing((126.59, 127.60), 2), "35x5": Standing((135.61, 138.65), 2),
                 "10x20": Standing((136.48,), 1), "70x5": Standing((160.92,), 1), "35x20": Standing((225.8,), 1)}
    assert plan_round(published, max_seeds=3, left=3) == ["10x20", "10x5", "35x5"]


RACE = """
name = "race"
sampler = "grid"
objectives = ["val_ppl"]

[corpus]
source = "synthetic:k=4,vocab=6,noise=2,tokens=8000"

[model]
emsize = 8
nhid = 16
layers = 1
dropout = 0.0

[train]
optimizer = "adamw"
lr = 0.01
clip = 1.0
tokens = 2000
checkpoints = 2
eval_bptt = 64

[race]
max_seeds = 3
trials = 2

[search]
bptt = [4, 8]
batch_size = [4]
"""


@pytest.mark.slow
def test_a_race_reruns_the_leaders_with_new_seeds_within_its_budget(tmp_path: Path, one_thread: None) -> None:
    study_file = tmp_path / "race.toml"
    study_file.write_text(RACE)
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results), "--no-report"]) == 0
    url = f"sqlite:///{results / 'race' / 'study.db'}"
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    trials = study.get_trials()
    raced = [t for t in trials if RACE_KEY in t.user_attrs]
    # One pass of 2, then one round: no noise was known, so both leaders ran again, spending the budget.
    assert len(trials) == 4 and len(raced) == 2
    assert sorted(t.user_attrs[RACE_KEY] for t in raced) == ["bptt=4,batch_size=4#1", "bptt=8,batch_size=4#1"]
    assert all(t.user_attrs["record"]["config"]["seed"] == 1 and t.user_attrs["repeat"] == 1 for t in raced)
    assert {t.user_attrs["record"]["study"]["race_trials"] for t in trials} == {2}
    # A racing run queued twice (two workers racing at once) runs once: the copy is pruned as spurious.
    study.enqueue_trial(raced[0].params, user_attrs={"repeat": 1, RACE_KEY: raced[0].user_attrs[RACE_KEY]})
    config = load_study(study_file, results_root=results)
    study, corpus, device = prepare(config, url, "cpu")
    study.optimize(Objective(config, corpus, device, {}), n_trials=1)
    extra = study.get_trials()[-1]
    assert extra.state == TrialState.PRUNED and "already queued" in extra.user_attrs["spurious"]
    assert sum("record" in t.user_attrs for t in study.get_trials()) == 4


def test_a_resumed_study_may_change_its_race_but_not_its_lr_rule(tmp_path: Path) -> None:
    from bptt_harness.config import parse_study
    from bptt_harness.errors import HarnessError
    from bptt_harness.study import create_study

    base = {"name": "r", "sampler": "grid", "corpus": {"source": "synthetic:k=4,vocab=6,noise=2,tokens=8000"},
            "search": {"bptt": [4], "batch_size": [4]}, "race": {"trials": 2}, "lr": {"rule": "sqrt"}}
    storage = open_storage(f"sqlite:///{tmp_path / 'r.db'}")
    create_study(parse_study(base), storage)
    create_study(parse_study({**base, "race": {"trials": 6, "max_seeds": 4}}), storage)
    with pytest.raises(HarnessError, match=r"changed: lr.rule"):
        create_study(parse_study({**base, "lr": {"rule": "linear"}}), storage)


def rec(bptt: int, bs: int, ppl: float | None, seed: int = 0, *, status: str = "ok", test: float | None = None,
        tps: float = 10_000.0) -> dict:
    ok = status == "ok"
    return {"status": status, "config_key": f"bptt={bptt},batch_size={bs}",
            "config": {"bptt": bptt, "batch_size": bs, "lr": 20.0, "seed": seed, "repeat": seed},
            "result": {"status": status, "val_ppl": ppl if ok else None, "test_ppl": test if ok else None,
                       "tokens_per_s": tps if ok else None, "train_tokens": 100_000 if ok else 0,
                       "val_curve": [{"step": 1, "tokens": 100_000, "seconds": 100_000 / tps,
                                      "loss": math.log(ppl), "ppl": ppl}] if ok else []},
            "study": {"name": "s", "budget": "tokens", "budget_tokens": 100_000, "cost": "seconds_per_token"}}


def test_a_difference_below_the_seed_noise_is_a_tie_and_the_recommendation_says_so() -> None:
    recs = ([rec(35, 5, p, s) for s, p in enumerate((100.0, 104.0, 98.0))]
            + [rec(10, 5, p, s, tps=12_000.0) for s, p in enumerate((102.0, 99.0, 105.0))]
            + [rec(70, 5, p, s) for s, p in enumerate((130.0, 131.0, 129.0))])
    rep = build(records_to_frame(recs), study_name="s")
    t = rep.ranking.table.set_index("config_key")
    assert t.at["bptt=35,batch_size=5", "n"] == 3 and not t.at["bptt=35,batch_size=5", "single_seed"]
    # 100.7 against 102: 1.3 apart, far inside the 95% t intervals (df = 2 each): a tie on perplexity.
    assert t.at["bptt=35,batch_size=5", "val_ppl_lo"] < t.at["bptt=10,batch_size=5", "val_ppl"] < \
        t.at["bptt=35,batch_size=5", "val_ppl_hi"]
    h = rep.advice.headline
    assert "Within the seed noise (Welch tests at 95%, Holm-adjusted over 2 comparisons) its perplexity ties with" in h
    assert "bptt 70" not in h.split("ties with")[1]
    assert "[n=3, 95% t interval " in h
    # The same means from single seeds: the noise is unknown, and the recommendation says that instead.
    singles = build(records_to_frame([rec(35, 5, 100.67), rec(10, 5, 102.0, tps=12_000.0), rec(70, 5, 130.0)]),
                    study_name="s")
    assert "seed noise is unknown" in singles.advice.headline and "ties with" not in singles.advice.headline
    assert "[single-seed]" in singles.advice.headline


def test_single_seed_configurations_are_labelled_and_borrow_the_pooled_noise() -> None:
    recs = [rec(35, 5, p, s) for s, p in enumerate((100.0, 102.0, 98.0))] + [rec(140, 5, 150.0)]
    rep = build(records_to_frame(recs), study_name="s")
    c = rep.configs.set_index("config_key")
    assert bool(c.at["bptt=140,batch_size=5", "single_seed"])
    assert c.at["bptt=140,batch_size=5", "val_ppl_se"] == pytest.approx(0.02 * 150.0)   # cv 2/100, n = 1
    assert c.at["bptt=140,batch_size=5", "noise_from"] == "the pooled seed noise of 1 configuration"
    assert c.at["bptt=140,batch_size=5", "val_ppl_dof"] == 2
    assert c.at["bptt=35,batch_size=5", "val_ppl_se"] == pytest.approx(2.0 / math.sqrt(3))
    html = rep.ranking.table
    assert list(html["single_seed"]) == [False, True]
    from bptt_harness.report.html import render

    assert "1 (single-seed)" in render(rep)


def test_a_configuration_that_diverged_on_a_seed_is_never_recommended_silently() -> None:
    recs = ([rec(35, 5, 100.0, 0), rec(35, 5, 101.0, 1), rec(35, 5, None, 2, status="diverged")]
            + [rec(10, 5, 120.0, s) for s in range(3)])
    h = build(records_to_frame(recs), study_name="s").advice.headline
    assert h.startswith("Use bptt 35 × bs 5")
    assert "Caution: it diverged on 1 of 3 seeds; its perplexity is the mean of the seeds that finished." in h


def test_test_perplexity_of_the_recommended_and_the_best() -> None:
    # bptt 10 is 1.5% worse but much cheaper: recommended; bptt 35 is the best by validation.
    recs = [rec(35, 5, 100.0, test=95.0, tps=1_000.0), rec(10, 5, 101.5, test=97.0, tps=10_000.0)]
    h = build(records_to_frame(recs), study_name="s").advice.headline
    assert h.startswith("Use bptt 10 × bs 5")
    assert "Test perplexity: 97; the best by validation, bptt 35 × bs 5, 95." in h
