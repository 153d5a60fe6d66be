"""The forum's rules of thumb, checked (issue 26): each verdict fed records where the rule holds, where it
fails and where the study cannot test it (tests/synthetic.py's laws give the known answers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from synthetic import SyntheticLaw, synthetic_records

from bptt_harness.report import generate_from_records
from bptt_harness.report.frame import records_to_frame
from bptt_harness.report.html import esc
from bptt_harness.report.memory import fit_memory
from bptt_harness.report.rules import (
    STEP_WORK,
    VERDICTS,
    check_memory,
    check_rules,
    check_speed,
    check_stability,
    equal_step_groups,
    stratified_p,
    within_slope,
)

# Three equal-tokens-per-step groups: 1,400 (35x40, 70x20), 2,800 (35x80, 70x40, 140x20), 5,600 (70x80, 140x40).
BPTTS, BSS = (35, 70, 140), (20, 40, 80)
CPU = dict(gpu_name=None)


def frame(**kw) -> pd.DataFrame:
    kw.setdefault("bptts", BPTTS)
    kw.setdefault("batch_sizes", BSS)
    return records_to_frame(synthetic_records(**kw))


# --------------------------------------------------------------------------- known answers of the statistics

def test_the_exact_test_gives_the_hypergeometric_answers() -> None:
    assert stratified_p([(1, 1, 0, 1)]) == pytest.approx((0.5, 1.0))
    assert stratified_p([(2, 2, 0, 2)]) == pytest.approx((1 / 6, 1.0))   # C(2,2)C(2,0)/C(4,2)
    assert stratified_p([(1, 1, 0, 1), (1, 1, 0, 1)]) == pytest.approx((0.25, 1.0))
    assert stratified_p([(0, 1, 1, 1)]) == pytest.approx((1.0, 0.5))
    assert stratified_p([(1, 1, 1, 1), (0, 2, 0, 2)]) == pytest.approx((1.0, 1.0))   # no information


def test_the_within_group_slope_ignores_the_groups_offsets() -> None:
    # y = 5 x + 100 g: pooled across groups the slope would be wrong; within them it is 5, exactly.
    x = [1, 2, 3, 1, 2, 3]
    g = [0, 0, 0, 1, 1, 1]
    slope, se, dof, n = within_slope(x, [5 * a + 100 * b for a, b in zip(x, g)], g)
    assert slope == pytest.approx(5) and se == pytest.approx(0) and dof == 3 and n == 6


# --------------------------------------------------------------------------- memory

def test_memory_holds_and_both_knobs_free_the_same_memory_per_token() -> None:
    r = check_memory(frame(law=SyntheticLaw(mem_slope_mib=0.3)))
    assert r.verdict == "holds" and r.text.startswith("Holds")
    assert r.numbers["mib_per_ktok_bptt"] == pytest.approx(300) and r.numbers["mib_per_ktok_bs"] == pytest.approx(300)
    assert r.numbers["same_per_token"] is True and "free the same memory" in r.text
    assert r.numbers["equal_step_max_diff_pct"] == pytest.approx(0, abs=1e-9)


def test_memory_holds_but_the_batch_size_frees_more_per_token() -> None:
    # 20 MiB per sequence (a hidden state) that bptt does not touch: reducing bs frees it too.
    r = check_memory(frame(law=SyntheticLaw(mem_slope_mib=0.3, mem_per_bs_mib=20.0)))
    assert r.verdict == "holds"
    assert r.numbers["same_per_token"] is False and r.numbers["ratio_bptt_to_bs"] < 1 - 0.1
    assert "do not free the same memory" in r.text and "free the same memory (ratio" not in r.text


def test_memory_does_not_hold_when_bptt_frees_nothing() -> None:
    # Memory independent of the window (e.g. recomputed activations): reducing bptt cannot fix an OOM.
    r = check_memory(frame(law=SyntheticLaw(mem_bptt_power=0.0, mem_slope_mib=10.0)))
    assert r.verdict == "does not hold" and r.numbers["bptt_frees"] == "no" and r.numbers["bs_frees"] == "yes"
    assert "reducing bptt frees no memory" in r.text and "Holds" not in r.text


def test_memory_is_not_tested_with_one_batch_size() -> None:
    r = check_memory(frame(batch_sizes=(20,)))
    assert r.verdict == "not tested"
    assert "differ in the batch size alone, so the two knobs cannot be compared" in r.text
    assert "Reducing bptt frees" in r.text


def test_memory_reads_the_profile_when_the_study_has_one() -> None:
    trials = frame(batch_sizes=(20,))   # the trials alone cannot test it
    profile = pd.DataFrame([{"bptt": b, "batch_size": s, "phase": "grid", "status": "ok",
                             "peak_mem_mib": 50 + 0.1 * b * s, "tokens_per_s": 1000.0, "tokens_per_step": b * s,
                             "device": "cpu"}
                            for b in (10, 40) for s in (4, 16)])
    r = check_memory(trials, profile, fit_memory(trials, profile))
    assert r.verdict == "holds" and r.numbers["source"] == "the profile" and "from 4 shapes in the profile" in r.text
    assert r.numbers["model_mib_per_ktok"] == pytest.approx(100)


# --------------------------------------------------------------------------- stability

EDGE = SyntheticLaw(diverge_lr=20.0, diverge_bptt_exponent=1.0)   # bptt 35 diverges from lr 20, 70 from 10, 140 from 5


def test_stability_holds_when_longer_windows_diverge_at_equal_tokens_per_step_and_lr() -> None:
    r = check_stability(frame(lrs=(5.0, 10.0, 20.0, 40.0), repeats=2, law=EDGE))
    assert r.verdict == "holds" and r.text.startswith("Holds")
    assert r.numbers["p_longer_diverges_more"] < 0.05 and r.numbers["shorter_diverged_more"] == 0
    assert ("bptt 35 × bs 80 0/2 at lr 5, 0/2 at lr 10, 2/2 at lr 20, 2/2 at lr 40; bptt 70 × bs 40 0/2 at lr 5, 2/2 at "
            "lr 10" in r.text) and "bptt 140 × bs 20 2/2 at lr 5" in r.text


def test_stability_with_one_seed_per_shape_is_within_chance() -> None:
    # The same law, one run per configuration: 4 groups point the rule's way, p = 1/16 is not enough.
    r = check_stability(frame(lrs=(5.0, 10.0, 20.0, 40.0), law=EDGE))
    assert r.verdict == "inconclusive" and r.numbers["p_longer_diverges_more"] == pytest.approx(1 / 16)
    assert "one seed" in r.text and "Holds" not in r.text


def test_stability_does_not_hold_when_longer_windows_are_the_more_stable() -> None:
    law = SyntheticLaw(diverge_lr=20.0, diverge_bptt_exponent=-1.0)
    r = check_stability(frame(lrs=(10.0, 20.0, 40.0, 80.0), repeats=2, law=law))
    assert r.verdict == "does not hold" and "longer windows were the more stable" in r.text
    assert r.numbers["p_shorter_diverges_more"] < 0.05


def test_stability_does_not_hold_when_only_the_lr_decides() -> None:
    r = check_stability(frame(lrs=(20.0, 40.0), law=SyntheticLaw(diverge_lr=30.0)))
    assert r.verdict == "does not hold" and "never turned a diverging run into a finished one" in r.text
    assert r.numbers["all_diverged"] == 3


def test_stability_is_not_tested_when_nothing_diverged() -> None:
    r = check_stability(frame(lrs=(10.0,)))
    assert r.verdict == "not tested" and "none of the 9 runs diverged" in r.text


def test_stability_is_not_tested_when_equal_shapes_differ_in_lr() -> None:
    records = synthetic_records(bptts=BPTTS, batch_sizes=BSS, lrs=(40.0,))
    for rec in records:   # an lr rule that gives every shape its own lr
        rec["config"]["lr"] = 40.0 * rec["config"]["bptt"] / 35
    r = check_stability(records_to_frame(records))
    assert r.verdict == "not tested" and "also differ in lr" in r.text


def test_the_gradient_norm_exponent_is_recovered_with_its_interval() -> None:
    law = SyntheticLaw(grad_norm_exponent=0.5, grad_norm_noise=0.05, diverge_lr=25.0, diverge_bptt_exponent=1.0)
    r = check_stability(frame(lrs=(5.0, 10.0), repeats=3, law=law))
    n = r.numbers
    assert n["grad_norm_exponent"] == pytest.approx(0.5, abs=0.1)
    assert n["grad_norm_exponent_lo"] < 0.5 < n["grad_norm_exponent_hi"] and n["grad_norm_dof"] > 0
    assert f"grows as bptt^{n['grad_norm_exponent']:.2f}" in r.text and "degree(s) of freedom" in r.text


def test_stability_names_clipping_arms_and_runs_the_guard_let_finish() -> None:
    records = synthetic_records(bptts=BPTTS, batch_sizes=BSS, lrs=(5.0, 10.0, 20.0, 40.0), clips=(0.0, 0.25), law=EDGE,
                                vocab_size=1000)
    for rec in records:
        if rec["config"]["clip"] == 0.25 and rec["status"] == "diverged":  # clipping saves them
            rec["status"] = rec["result"]["status"] = "ok"
            rec["result"]["val_ppl"] = 50.0
    records[0]["result"]["val_ppl"] = 5000.0   # finished "ok", worse than a uniform guess over 1,000 tokens
    r = check_stability(records_to_frame(records))
    assert "clipping off: 27 of 36 runs diverged and 1 more ended worse than a uniform guess" in r.text
    assert "clip 0.25: 0 of 36 runs diverged." in r.text
    assert "Counting as unstable also the 1 run(s) that finished with a validation perplexity above a uniform" in r.text
    assert "leaving out 1 that ended worse than a uniform guess" in r.text   # its gradient norm is its blow-up
    clean = check_stability(frame(lrs=(5.0, 10.0, 20.0, 40.0), law=EDGE, vocab_size=10_000))
    assert "uniform guess" not in clean.text and "clipping arm" not in clean.text


# --------------------------------------------------------------------------- speed

def test_speed_holds_when_the_longer_window_is_slower_beyond_the_noise() -> None:
    r = check_speed(frame(repeats=2, law=SyntheticLaw(speed_bptt_exponent=0.5)))
    assert r.verdict == "holds" and r.text.startswith("Holds on this GPU")
    assert r.numbers["slower"] == 3 and r.numbers["faster"] == 0
    assert r.numbers["ratios"][1] == pytest.approx(0.5, rel=0.05)   # 2,800 tokens: bptt 140 vs 35, 4^-0.5


def test_speed_does_not_hold_when_the_longer_window_is_faster() -> None:
    r = check_speed(frame(repeats=2, law=SyntheticLaw(speed_bptt_exponent=-0.5), **CPU))
    assert r.verdict == "does not hold" and "longer window is more than 10% faster" in r.text and "this CPU" in r.text


def test_speed_does_not_hold_when_the_shape_does_not_matter() -> None:
    r = check_speed(frame(repeats=2, law=SyntheticLaw(noise=0.01)))
    assert r.verdict == "does not hold" and "by less than 10%" in r.text


def test_speed_is_inconclusive_within_the_noise_or_without_repeats() -> None:
    # No effect, 10% noise per run. (With seed 0 one group draws 0.79x, a false call a 95% procedure makes
    # now and then; seed 1 shows the usual case.)
    noisy = check_speed(frame(repeats=2, law=SyntheticLaw(noise=0.1), seed=1))
    assert noisy.verdict == "inconclusive" and "within the timing noise" in noisy.text and "Holds" not in noisy.text
    once = check_speed(frame(law=SyntheticLaw(speed_bptt_exponent=0.5)))
    assert once.verdict == "inconclusive" and "timing noise is unknown" in once.text
    # Two lrs time the same shapes twice: that is a noise estimate, and the verdict comes back.
    lrs = check_speed(frame(lrs=(10.0, 20.0), law=SyntheticLaw(speed_bptt_exponent=0.5)))
    assert lrs.verdict == "holds" and "differ in lr" not in lrs.text
    records = synthetic_records(bptts=BPTTS, batch_sizes=BSS, repeats=2, law=SyntheticLaw(speed_bptt_exponent=0.5))
    for rec in records:   # an lr rule that gives every shape its own lr: the work of a step stays the same
        rec["config"]["lr"] = 40.0 * rec["config"]["bptt"] / 35
    ruled = check_speed(records_to_frame(records))
    assert ruled.verdict == "holds" and "differ in lr, which does not change the work of a step" in ruled.text


def test_speed_compares_shapes_only_under_one_allocator_setting() -> None:
    """The allocator moves a CPU step's speed by up to 20%: shapes timed under two settings are not compared."""
    records = synthetic_records(bptts=BPTTS, batch_sizes=BSS, repeats=2, law=SyntheticLaw(speed_bptt_exponent=0.5))
    setting = dict(zip(BPTTS, ("kept", "default", "LD_PRELOAD libjemalloc.so.2")))   # each bptt its own
    for rec in records:
        rec["hardware"]["malloc"] = setting[rec["config"]["bptt"]]
    r = check_speed(records_to_frame(records))
    assert r.verdict == "not tested" and "also differ in malloc" in r.text
    for rec in records:
        rec["hardware"]["malloc"] = "kept"
    assert check_speed(records_to_frame(records)).verdict == "holds"


def test_speed_is_not_tested_without_shapes_at_equal_tokens_per_step() -> None:
    r = check_speed(frame(bptts=(35,)))
    assert r.verdict == "not tested" and "no two shapes in the study share tokens per step" in r.text


def test_speed_reads_the_profile_beside_the_trials() -> None:
    trials = frame(repeats=2, law=SyntheticLaw(speed_bptt_exponent=0.5))
    profile = pd.DataFrame([{"bptt": b, "batch_size": s, "phase": "grid", "status": "ok", "peak_mem_mib": 1.0,
                             "tokens_per_s": 1000.0 * (b / 35) ** -0.5} for b in BPTTS for s in BSS])
    r = check_speed(trials, profile)
    assert r.numbers["profile_agrees"] == 3 and "profile's timings point the same way in 3 of 3" in r.text
    alone = check_speed(frame(bptts=(35,), repeats=2), profile)
    assert alone.numbers["source"] == "the profile" and alone.verdict == "holds"


# --------------------------------------------------------------------------- the report

def test_every_rule_is_in_the_html_the_console_and_summary_json(tmp_path: Path) -> None:
    records = synthetic_records(bptts=BPTTS, batch_sizes=BSS, lrs=(5.0, 10.0, 20.0, 40.0), repeats=2, law=EDGE)
    paths = generate_from_records(records, study_name="rules", out_dir=tmp_path)
    s = json.loads(paths.summary_json.read_text(), parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    rules = s["rules_of_thumb"]
    assert set(rules) == {"memory", "stability", "speed"}
    html = paths.html.read_text()
    assert "The rules of thumb, checked" in html and "The rules of thumb, checked" in paths.summary
    for key, r in rules.items():
        assert r["verdict"] in VERDICTS and r["key"] == key
        assert esc(r["text"]) in html
        assert f"{key} ({r['verdict']})" in paths.summary
    assert rules["stability"]["verdict"] == "holds" and rules["stability"]["table"]
    assert math.isfinite(rules["stability"]["numbers"]["p_longer_diverges_more"])


def test_check_rules_on_nothing_that_finished() -> None:
    records = synthetic_records(bptts=(35,), batch_sizes=(20,), lrs=(40.0,))
    rules = check_rules(records_to_frame(records))
    assert [r.verdict for r in rules.checks()] == ["not tested"] * 3
    # Every cell out of memory: no measurement at all, and still a verdict per rule rather than an error.
    oom = check_rules(frame(law=SyntheticLaw(card_mib=100.0)))
    assert [r.verdict for r in oom.checks()] == ["not tested"] * 3
    assert "no trial finished" in oom.speed.text


# --------------------------------------------------------------------------- studies/stability.toml

def test_the_stability_study_can_see_the_stability_rule() -> None:
    """Shapes at equal tokens per step with the same lr (a fixed rule), several lrs, an unclipped and a clipped
    arm, and seeds: what check_stability needs to say more than "not tested"."""
    import itertools

    from bptt_harness.config import load_study

    config = load_study(Path(__file__).resolve().parent.parent / "studies" / "stability.toml")
    assert config.sampler == "grid" and config.lr_rule.rule == "fixed" and config.repeats >= 2
    shapes = list(itertools.product(config.search["bptt"].grid(), config.search["batch_size"].grid()))
    by_tokens: dict[int, set[int]] = {}
    for b, s in shapes:
        by_tokens.setdefault(b * s, set()).add(b)
    assert any(len(b) >= 2 for b in by_tokens.values())
    assert len(config.search["lr"].grid()) >= 3
    clips = config.search["clip"].grid()
    assert 0.0 in clips and any(c > 0 for c in clips)
    assert config.train.anneal == 1.0   # the lr a configuration names is the lr it trains at


def test_clip_is_a_searched_key_that_reaches_the_trial_and_its_record() -> None:
    """The clipped and unclipped arms differ only in clip: the trial trains with the searched value, and the
    record (and so trials.csv and the rules' groups) says which arm a run was in."""
    from bptt_harness.config import load_study
    from bptt_harness.record import StudyInfo, TrialResult
    from bptt_harness.study import make_record, trial_spec
    from bptt_harness.trial_cli import parse_config

    config = load_study(Path(__file__).resolve().parent.parent / "studies" / "stability.toml")
    params = parse_config("bptt=8,batch_size=128,clip=0.25,lr=6")
    assert params["clip"] == 0.25 and isinstance(params["clip"], float)
    spec = trial_spec(config, params, repeat=1)
    assert spec.train.clip == 0.25 and spec.train.lr == 6.0 and spec.train.seed == config.train.seed + 1
    record = make_record(StudyInfo(name="stability"), spec, params, 1, TrialResult(bptt=8, batch_size=128), {}, "")
    assert record.config.value("clip") == 0.25
    assert records_to_frame([record.to_dict()])["clip"].tolist() == [0.25]
    assert trial_spec(config, {**params, "clip": 0.0}, repeat=0).train.clip == 0.0


@pytest.mark.parametrize("key", ["heads", "mem_len", "weight_dropout"])
def test_shapes_of_models_that_differ_in_any_recorded_model_key_are_not_compared(key: str) -> None:
    """A Transformer's heads or memory, an AWD-LSTM's dropouts change a step's work as much as its width."""
    runs = pd.DataFrame({"tokens_per_step": [640, 640], "bptt": [10, 20], "batch_size": [64, 32],
                         "model": ["transformer"] * 2, key: [1, 2]})
    assert equal_step_groups(runs, STEP_WORK) == []
    assert len(equal_step_groups(runs.assign(**{key: 1}), STEP_WORK)) == 1
