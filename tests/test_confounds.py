"""Issue 20, items 3-4: confounds named with their numbers, and every verdict sentence computed from the
data: each test feeds data where a sentence must be said and data where it must not."""

from __future__ import annotations

import json
import math

import pytest

from bptt_harness.report.build import Report, build
from bptt_harness.report.confounds import CONTEXT_COLUMN, controlled_slice, detect, spearman
from bptt_harness.report.frame import records_to_frame
from bptt_harness.report.noise import table_means
from bptt_harness.report.summary import summary, summary_json
from bptt_harness.stats import holm, t_interval, t_quantile, t_sf, welch
from tests.synthetic import synthetic_records

BUDGET = 400_000


def rec(bptt: int, bs: int, ppl: float, seed: int = 0, *, lr: float = 20.0, final_lr: float | None = None,
        steps: int | None = None, tps: float = 10_000.0, curve: list[float] | None = None,
        epochs: float | None = 1.0) -> dict:
    """One ok run; ``curve``: validation perplexities at equal fractions of the budget (the last is ``ppl``)."""
    steps = steps if steps is not None else BUDGET // (bptt * bs)
    pts = curve if curve is not None else [ppl * 1.6, ppl * 1.2, ppl * 1.05, ppl]
    secs = BUDGET / tps
    val_curve = [{"step": steps * (k + 1) // len(pts), "tokens": BUDGET * (k + 1) // len(pts),
                  "seconds": secs * (k + 1) / len(pts), "loss": math.log(p), "ppl": p} for k, p in enumerate(pts)]
    return {"status": "ok", "config_key": f"bptt={bptt},batch_size={bs}" + ("" if lr == 20.0 else f",lr={lr:g}"),
            "config": {"bptt": bptt, "batch_size": bs, "lr": lr, "seed": seed, "repeat": seed},
            "result": {"status": "ok", "val_ppl": ppl, "tokens_per_s": tps, "train_tokens": BUDGET, "steps": steps,
                       "budget_tokens": BUDGET, "tokens_per_step": bptt * bs, "train_s": secs,
                       "final_lr": final_lr if final_lr is not None else lr, "val_curve": val_curve},
            "study": {"name": "c", "budget": "tokens", "budget_tokens": BUDGET, "budget_epochs": epochs,
                      "cost": "seconds_per_token"}}


def report(records: list[dict]) -> Report:
    return build(records_to_frame(records), study_name="c")


def answers(rep: Report) -> dict[str, str]:
    return {f.key: f.text for f in rep.advice.findings}


def slice_runs(ppl: dict[int, tuple[float, ...]], tokens_per_step: int = 400, **kw) -> list[dict]:
    """A controlled slice: bptt x bs = tokens_per_step for every bptt, the same lr and steps."""
    return [rec(b, tokens_per_step // b, p, s, **kw) for b, ps in ppl.items() for s, p in enumerate(ps)]


# --- statistics -----------------------------------------------------------------------------------

def test_t_quantiles_on_the_real_degrees_of_freedom() -> None:
    # Table values of the two-sided 95% quantile, and the normal one in the limit.
    for dof, q in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423), (1e7, 1.9600)):
        assert t_quantile(0.975, dof) == pytest.approx(q, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_sf(t_quantile(0.9, 2.5), 2.5) == pytest.approx(0.1, abs=1e-9)   # fractional (Welch) dof
    with pytest.raises(ValueError, match="p = 1"):
        t_quantile(1, 3)
    iv = t_interval(100.0, 1.0, 1, n=2)
    assert (iv.lo, iv.hi) == pytest.approx((100 - 12.7062, 100 + 12.7062), abs=1e-4)
    assert iv.label() == "95% t interval, n=2, df=1"
    assert t_interval(100.0, None, None, n=1).label() == "n=1, noise unknown"


def test_welch_and_holm_by_hand() -> None:
    w = welch(100.0, 1.0, 1, 103.0, 1.0, 1)
    assert w.se == pytest.approx(math.sqrt(2)) and w.dof == pytest.approx(2.0)
    assert w.p == pytest.approx(2 * t_sf(3 / math.sqrt(2), 2))
    # Holm: sorted p times (m - rank), made monotone.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


# --- steps -----------------------------------------------------------------------------------------

def test_a_ranking_explained_by_steps_is_named_with_its_numbers() -> None:
    # The synthetic law: perplexity falls with optimiser steps (and a little with bptt).
    rep = build(records_to_frame(synthetic_records(bptts=(35, 70, 140), batch_sizes=(10, 20, 40))), study_name="s")
    steps = rep.confounds.as_dict()["steps"]
    assert steps["applies"] and steps["spearman"] < -0.9 and steps["ratio"] == pytest.approx(16.0, rel=1e-2)
    assert "the ranking follows optimiser steps" in answers(rep)["confounds"]
    assert "Caution: the ranking is confounded (optimiser steps" in rep.advice.headline
    data = json.loads(summary_json(rep))
    assert data["confounds"]["steps"]["steps_max"] == pytest.approx(2_000_000 // 350)
    # Where the compared configurations took the same steps, it is not said.
    flat = report(slice_runs({10: (120.0, 121.0), 20: (110.0, 111.0), 40: (130.0, 129.0)}))
    assert "steps" not in flat.confounds.as_dict()
    assert "optimiser steps" not in " ".join(answers(flat).values())


def test_steps_that_differ_but_do_not_order_the_ranking_are_not_a_confound() -> None:
    # The most-stepped configuration is the worst: steps differ, the order does not follow them.
    recs = [rec(10, 10, 150.0), rec(10, 20, 120.0), rec(10, 40, 110.0)]
    table = report(recs).ranking.table
    assert table["steps"].nunique() == 3
    assert "steps" not in report(recs).confounds.names()
    assert spearman(table["steps"].to_numpy(), table["val_ppl"].to_numpy()) == pytest.approx(1.0)


# --- the bptt verdict -------------------------------------------------------------------------------

def test_an_edge_optimum_says_try_beyond_and_makes_the_bptt_verdict_inconclusive() -> None:
    rep = report(slice_runs({10: (100.0, 101.0), 20: (120.0, 121.0), 40: (140.0, 141.0)}))
    edge = rep.confounds.as_dict()["grid_edge"]
    assert edge["bptt"] == {"best": 10, "edge": "lowest", "searched": [10, 20, 40], "try": "5 and below"}
    assert "batch_size" not in edge   # at one tokens per step the batch size follows bptt
    bptt = answers(rep)["bptt"]
    assert bptt.startswith("Inconclusive at this budget: the best (bptt 10 × bs 40) has the lowest bptt searched "
                           "(10 to 40): try bptt 5 and below")
    high = report(slice_runs({10: (140.0, 141.0), 20: (120.0, 121.0), 40: (100.0, 101.0)}))
    assert "try bptt 80 and above" in answers(high)["bptt"]
    # An interior optimum, separated from both neighbours: no "try", and the verdict is given.
    mid = report(slice_runs({10: (120.0, 121.0), 20: (100.0, 101.0), 40: (130.0, 131.0)}))
    assert "grid_edge" not in mid.confounds.names() and "try bptt" not in answers(mid)["bptt"]
    assert answers(mid)["bptt"].startswith("bptt 20 is best: shorter and longer windows are worse beyond the seed "
                                           "noise (Welch tests at 95%, Holm-adjusted over 2 comparisons)")
    assert summary(mid)["bptt_verdict"]["conclusive"] is True
    assert "Caution" not in mid.advice.headline and "confounded" not in mid.advice.headline
    assert summary(rep)["bptt_verdict"]["conclusive"] is False


def test_an_interior_best_within_the_noise_is_not_called_best() -> None:
    rep = report(slice_runs({10: (120.0, 121.0), 20: (100.0, 104.0), 40: (101.0, 105.0)}))
    text = answers(rep)["bptt"]
    assert text.startswith("No difference beyond the seed noise: bptt 20 had the lowest perplexity but is not "
                           "separated from bptt 40")
    assert "is best" not in text


def test_no_sentence_about_bptt_without_a_slice_that_differs_only_in_bptt() -> None:
    # bptt and batch size move together, tokens per step and steps differ: no causal sentence.
    rep = report([rec(10, 10, 100.0), rec(20, 40, 120.0), rec(40, 40, 140.0)])
    assert controlled_slice(rep.ranking.table, rep.trials) is None
    assert answers(rep)["bptt"].startswith("Cannot tell: no configurations of this study differ only in bptt")
    # Different lr at the same shape product: not a slice either, and the lr confound is named.
    lr = report([rec(10, 40, 100.0, lr=5.0), rec(20, 20, 110.0, lr=10.0), rec(40, 10, 120.0)])
    assert controlled_slice(lr.ranking.table, lr.trials) is None
    assert lr.confounds.as_dict()["lr"]["lr_min"] == 5.0 and lr.confounds.as_dict()["lr"]["values"] == 3
    assert "used different learning rates" in answers(lr)["confounds"]
    same = report(slice_runs({10: (100.0,), 20: (110.0,)}))
    assert "lr" not in same.confounds.names()


def test_the_schedule_and_the_text_seen_are_confounds_when_they_differ() -> None:
    annealed = report(slice_runs({10: (100.0, 101.0)}) + slice_runs({20: (110.0, 111.0)}, final_lr=5.0)
                      + slice_runs({40: (90.0, 91.0)}))
    assert annealed.confounds.as_dict()["schedule"]["annealed"] == ["bptt 20 × bs 20"]
    # Annealing is an outcome of the same schedule rule: the slice keeps all three, and says it is confounded.
    assert len(controlled_slice(annealed.ranking.table, annealed.trials)) == 3
    assert answers(annealed)["bptt"].startswith("Inconclusive at this budget: 1 of 3 compared configurations annealed")
    plain = report(slice_runs({10: (100.0, 101.0), 20: (110.0, 111.0)}))
    assert "schedule" not in plain.confounds.names()
    short = report(slice_runs({10: (100.0, 101.0), 20: (110.0, 111.0)}, epochs=0.15))
    assert short.confounds.as_dict()["data_seen"] == {
        "applies": True, "text": "the budget is 0.15 of an epoch, so batch sizes 20, 40 trained on different parts "
                                 "of the text", "epochs": 0.15, "batch_sizes": [20, 40]}
    assert "data_seen" not in plain.confounds.names()   # one epoch: every configuration saw all the text
    unknown = report(slice_runs({10: (100.0, 101.0), 20: (110.0, 111.0)}, epochs=None))
    assert unknown.confounds.as_dict()["data_seen"]["applies"] is None


def test_unused_context_is_measured_when_the_trials_have_it_and_said_not_measured_otherwise() -> None:
    rep = report(slice_runs({10: (100.0, 101.0), 20: (110.0, 111.0)}))
    missing = rep.confounds.as_dict()["unused_context"]
    assert missing["applies"] is None and missing["text"].startswith("not measured")
    assert "unused_context: Not measured" in answers(rep)["confounds"]
    trials = rep.trials.assign(**{CONTEXT_COLUMN: 5.0})
    found = detect(rep.ranking.table, trials, rep.configs, rep.budget, "x").as_dict()["unused_context"]
    assert found["applies"] and found["context_tokens"] == 5.0 and found["shortest_bptt"] == 10
    enough = detect(rep.ranking.table, rep.trials.assign(**{CONTEXT_COLUMN: 30.0}), rep.configs, rep.budget, "x")
    assert "unused_context" not in enough.as_dict()


def test_a_leader_still_changing_at_the_end_is_not_settled() -> None:
    # bptt 20 leads until the last checkpoint, where bptt 40 overtakes it far beyond the seed noise.
    moving = (slice_runs({20: (100.0, 101.0)}, curve=None)
              + [rec(40, 10, p, s, curve=[300.0, 250.0, 200.0, p]) for s, p in enumerate((90.0, 91.0))]
              + slice_runs({10: (150.0, 151.0)}))
    rep = report(moving)
    ns = rep.confounds.as_dict()["not_settled"]
    assert ns["applies"] and ns["from"] == "bptt=20,batch_size=20" and ns["to"] == "bptt=40,batch_size=10"
    assert ns["between"] == [0.75, 1.0]
    steady = report(slice_runs({10: (120.0, 121.0), 20: (100.0, 101.0), 40: (130.0, 131.0)}))
    assert "not_settled" not in steady.confounds.as_dict()


# --- the other canned sentences --------------------------------------------------------------------

def test_no_configuration_diverged_does_not_hide_validation_rises() -> None:
    rising = report([rec(10, 40, 100.0, curve=[150.0, 110.0, 130.0, 100.0]), rec(20, 20, 110.0)])
    text = answers(rising)["stability"]
    assert text.startswith("No configuration diverged, but validation perplexity rose by more than 1% between "
                           "checkpoints in 1 run(s) of 1 configuration(s): bptt 10 × bs 40 (+18%).")
    calm = report([rec(10, 40, 100.0), rec(20, 20, 110.0)])
    assert answers(calm)["stability"].startswith("No configuration diverged, and no validation perplexity rose")


def test_the_interaction_counts_only_differences_beyond_the_noise() -> None:
    # Two tokens-per-step groups; throughput gaps of 5% inside a 6% run-to-run spread: not counted.
    recs = []
    for tps_s, tps_l, group in ((10_000, 9_500, 400), (10_000, 9_500, 800)):
        for s, jitter in enumerate((0.94, 1.06)):
            recs.append(rec(10, group // 10, 100.0 + s, s, tps=tps_s * jitter))
            recs.append(rec(40, group // 40, 100.5 + s, s, tps=tps_l * jitter))
    text = answers(report(recs))["interaction"]
    assert "throughput lower in 0, higher in 0, no difference beyond the run-to-run spread in 2" in text
    assert "perplexity lower in 0, higher in 0, no difference beyond the seed noise in 2" in text
    # Far apart and repeatable: counted.
    recs = []
    for group in (400, 800):
        for s, jitter in enumerate((0.99, 1.01)):
            recs.append(rec(10, group // 10, 100.0 + s, s, tps=20_000 * jitter))
            recs.append(rec(40, group // 40, 150.0 + s, s, tps=10_000 * jitter))
    text = answers(report(recs))["interaction"]
    assert "perplexity lower in 0, higher in 2" in text and "throughput lower in 0, higher in 2" in text


def test_equal_time_uses_the_noise_measured_at_that_time() -> None:
    # At the budget A (bptt 10) is clearly best. At the last common time (the end of the faster B) A's two
    # seeds read 150 and B's 90 and 140: B's mean is lower, but its seeds disagree so widely there that the
    # two are not separated, and the report says "within the noise" rather than "the rankings disagree".
    recs = [rec(10, 40, p, s, tps=5_000, curve=[200.0, 150.0, 120.0, p]) for s, p in enumerate((100.0, 101.0))]
    recs += [rec(20, 20, p, s, tps=10_000) for s, p in enumerate((90.0, 140.0))]
    rep = report(recs)
    et = rep.equal_time
    assert et.best_time == "bptt=20,batch_size=20" and et.best_budget == "bptt=10,batch_size=40"
    assert et.leaders is not None and et.leaders.noise_known and not et.disagree
    text = answers(rep)["equal_time"]
    assert text.startswith("Yes, within the noise.") and "is not separated from it with the seed noise measured at " \
        "that time (Welch tests at 95%, Holm-adjusted over 1 comparison)" in text
    assert list(et.table["ppl_at_time_interval"]) == ["95% t interval, n=2, df=1"] * 2
    # B's seeds agreeing at that time: the same means are now separated, and the answer is No.
    recs = recs[:2] + [rec(20, 20, p, s, tps=10_000) for s, p in enumerate((114.0, 116.0))]
    rep = report(recs)
    assert rep.equal_time.disagree and answers(rep)["equal_time"].startswith("No. At the study's budget the best is "
                                                                             "bptt 10 × bs 40")


def test_a_slice_the_study_declared_is_the_one_compared() -> None:
    # Two groups that each differ only in bptt; the study declared the 800 one as its slice (issue 20 item 2).
    recs = slice_runs({10: (120.0, 121.0), 20: (100.0, 101.0), 40: (130.0, 131.0)}) + \
        slice_runs({10: (90.0, 91.0), 20: (95.0, 96.0)}, tokens_per_step=800)
    rep = report(recs)
    found = controlled_slice(rep.ranking.table, rep.trials)
    assert found is not None and set(found["tokens_per_step"]) == {400}     # found: the one with most bptt values
    trials = rep.trials.assign(slices=["bptt-640" if t == 800 else "" for t in rep.trials["tokens_per_step"]])
    declared = controlled_slice(rep.ranking.table, trials)
    assert declared is not None and set(declared["tokens_per_step"]) == {800} and list(declared["bptt"]) == [10, 20]


def test_a_slice_of_single_seeds_gives_no_verdict_and_a_clean_one_says_nothing_differs() -> None:
    singles = report(slice_runs({10: (120.0,), 20: (100.0,), 40: (130.0,)}))
    text = answers(singles)["bptt"]
    assert text.startswith("Cannot tell yet: bptt 20 had the lowest perplexity, but with one seed each the seed "
                           "noise is unknown")
    assert "is best" not in text
    clean = report(slice_runs({10: (120.0, 121.0), 20: (100.0, 101.0), 40: (130.0, 131.0)}))
    assert answers(clean)["confounds"].startswith("Nothing found besides the searched knobs")
    edge = report(slice_runs({10: (100.0, 101.0), 20: (120.0, 121.0)}))
    assert "Nothing found" not in answers(edge)["confounds"] and "grid_edge: " in answers(edge)["confounds"]


def test_equal_time_still_best_and_separated_only_when_it_is() -> None:
    # A is best at the budget and at the common time, far beyond its seeds' spread there.
    recs = [rec(10, 40, p, s, tps=10_000) for s, p in enumerate((100.0, 101.0))]
    recs += [rec(20, 20, p, s, tps=10_000) for s, p in enumerate((150.0, 151.0))]
    text = answers(report(recs))["equal_time"]
    assert text.startswith("Yes. At equal training time")
    assert "is still best and separated from every other configuration (perplexity 100.5) with the seed noise " \
        "measured at that time (Welch tests at 95%, Holm-adjusted over 1 comparison)" in text
    # The same order within the noise: still best, but not called separated.
    recs = [rec(10, 40, p, s, tps=10_000) for s, p in enumerate((100.0, 104.0))]
    recs += [rec(20, 20, p, s, tps=10_000) for s, p in enumerate((101.0, 105.0))]
    text = answers(report(recs))["equal_time"]
    assert "is still best (perplexity" in text and "separated" not in text


def test_a_frame_without_seed_intervals_gives_means_of_unknown_noise() -> None:
    frame = records_to_frame([rec(10, 40, 100.0)]).assign(n=1)
    means = table_means(frame[["config_key", "val_ppl", "n"]])
    assert means["bptt=10,batch_size=40"].se is None and means["bptt=10,batch_size=40"].estimate == 100.0


def test_a_verdict_resting_on_borrowed_noise_says_so() -> None:
    recs = [rec(10, 40, p, s) for s, p in enumerate((100.0, 101.0))] + [rec(20, 20, 150.0)]
    h = report(recs).advice.headline
    assert "Its perplexity is separated from every other configuration's (Welch tests at 95%, Holm-adjusted over 1 " \
        "comparison; 1 single-seed configuration borrows the pooled seed noise of the others)" in h
    recs = [rec(10, 40, p, s) for s, p in enumerate((100.0, 101.0))] + [rec(20, 20, p, s) for s, p in enumerate((150.0, 151.0))]
    assert "borrow" not in report(recs).advice.headline
