"""Issue 13, item 1: how the learning rate follows the shape ([lr] rule), tuned ladders, and where the
choice shows up (every trial's record, configs.csv, the recommendation)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import optuna
import pytest

from bptt_harness.cli import main
from bptt_harness.config import parse_study
from bptt_harness.errors import HarnessError
from bptt_harness.lr import LrRule
from bptt_harness.report.build import build
from bptt_harness.report.frame import records_to_frame
from bptt_harness.spec import TrainConfig
from bptt_harness.study import open_storage, trial_spec
from bptt_harness.study.tuning import pick, short_train

BASE = {"name": "lr", "corpus": {"source": "synthetic:k=4,vocab=6,noise=2,tokens=8000"},
        "train": {"lr": 20.0}, "search": {"bptt": [10, 35, 140], "batch_size": [5, 20, 80]}}


@pytest.mark.parametrize("rule, bptt, bs, expected", [
    # Reference bptt 35 x bs 20 = 700 tokens per step, lr 20; values worked out by hand.
    ("fixed", 10, 5, 20.0),
    ("linear", 10, 5, 20.0 * 50 / 700),            # 1.428571...
    ("sqrt", 10, 5, 20.0 / math.sqrt(14)),         # 5.345225...
    ("linear", 140, 80, 320.0),                    # 16 x the reference's tokens per step
    ("sqrt", 140, 80, 80.0),                       # sqrt(16) = 4
    ("linear", 35, 20, 20.0),
    ("sqrt", 70, 10, 20.0),                        # same tokens per step as the reference
])
def test_each_rule_gives_the_hand_computed_lr(rule: str, bptt: int, bs: int, expected: float) -> None:
    assert LrRule(rule).lr_for(20.0, bptt, bs) == pytest.approx(expected, rel=1e-12)


def test_max_lr_caps_a_scaled_up_lr_only() -> None:
    capped = LrRule("sqrt", max_lr=20.0)
    assert capped.lr_for(20.0, 140, 80) == 20.0                                   # 80 without the cap
    assert capped.lr_for(20.0, 10, 5) == pytest.approx(20.0 / math.sqrt(14))     # below it: unchanged
    assert capped.describe(20.0) == "sqrt rule: lr 20 at bptt 35 × bs 20 × √(tokens per step / 700), at most 20"
    with pytest.raises(HarnessError, match=r"lr max_lr = -1.0 must be a number > 0"):
        LrRule("sqrt", max_lr=-1.0)


def test_a_reference_shape_of_ones_own_and_tuned_centres_on_its_rule() -> None:
    assert LrRule("linear", ref_bptt=10, ref_batch_size=5).lr_for(2.0, 20, 5) == pytest.approx(4.0)
    assert LrRule("tuned", tune_from="sqrt").lr_for(20.0, 140, 80) == pytest.approx(80.0)
    assert LrRule("tuned", tune_from="fixed").lr_for(20.0, 140, 80) == pytest.approx(20.0)
    assert "sqrt rule: lr 20 at bptt 35 × bs 20 × √(tokens per step / 700)" == LrRule("sqrt").describe(20.0)
    tuned = LrRule("tuned", ladder=(2.0, 0.5, 1.0), tune_fraction=0.1).describe(20.0)
    assert tuned.startswith("tuned: the best of ×0.5/×1/×2 around the sqrt rule") and "10% of the budget" in tuned


def test_the_ladder_picks_the_lowest_validation_loss_and_never_a_blown_up_rung() -> None:
    rungs = [{"lr": 5.0, "val_loss": 5.1, "status": "ok"}, {"lr": 10.0, "val_loss": 4.9, "status": "ok"},
             {"lr": 20.0, "val_loss": None, "status": "diverged"}]
    assert pick(rungs) == 10.0
    # A diverged rung with a lower loss recorded before it blew up still loses; equal losses: the smaller lr.
    assert pick([{"lr": 4.0, "val_loss": 3.0, "status": "diverged"}, {"lr": 8.0, "val_loss": 6.0, "status": "ok"}]) == 8.0
    assert pick([{"lr": 8.0, "val_loss": 5.0, "status": "ok"}, {"lr": 4.0, "val_loss": 5.0, "status": "ok"}]) == 4.0
    assert pick([{"lr": 8.0, "val_loss": None, "status": "oom"}, {"lr": 4.0, "val_loss": None, "status": "failed"}]) == 4.0


def test_the_ladder_trains_a_fraction_of_the_budget_and_only_observes_once() -> None:
    t = TrainConfig(tokens=200_000, checkpoints=4, test=True, time_grid_s=1.0)
    s = short_train(t, 0.1, 1_000_000)
    assert (s.tokens, s.checkpoints, s.test, s.time_grid_s) == (20_000, 1, False, None)
    assert short_train(TrainConfig(epochs=2.0), 0.25, 1001).tokens == 500
    assert short_train(TrainConfig(budget="seconds", seconds=60.0), 0.1, 1000).seconds == pytest.approx(6.0)


def test_study_file_lr_table_is_checked() -> None:
    config = parse_study({**BASE, "lr": {"rule": "sqrt"}})
    assert config.lr_rule == LrRule("sqrt")
    assert trial_spec(config, {"bptt": 10, "batch_size": 5}, 0).train.lr == pytest.approx(20.0 / math.sqrt(14))
    assert trial_spec(parse_study(BASE), {"bptt": 10, "batch_size": 5}, 0).train.lr == 20.0
    with pytest.raises(HarnessError, match=re.escape("unknown key [lr] 'rul' (did you mean 'rule'?)")):
        parse_study({**BASE, "lr": {"rul": "sqrt"}})
    with pytest.raises(HarnessError, match=r"lr rule = 'square' is not known; use one of fixed, linear, sqrt, tuned"):
        parse_study({**BASE, "lr": {"rule": "square"}})
    with pytest.raises(HarnessError, match=r"search.lr with lr.rule = 'linear'"):
        parse_study({**BASE, "lr": {"rule": "linear"}, "search": {**BASE["search"], "lr": [1.0, 2.0]}})
    with pytest.raises(HarnessError, match=r"lr.ladder = 2 must be a list"):
        parse_study({**BASE, "lr": {"rule": "tuned", "ladder": 2}})
    with pytest.raises(HarnessError, match=r"lr ladder = \[1.0, -2.0\] must be a non-empty list of numbers > 0"):
        parse_study({**BASE, "lr": {"rule": "tuned", "ladder": [1, -2]}})
    with pytest.raises(HarnessError, match=r"lr tune_fraction = 1.5 must be a number in \(0, 1\]"):
        parse_study({**BASE, "lr": {"rule": "tuned", "tune_fraction": 1.5}})
    with pytest.raises(HarnessError, match=r"lr.ref_bptt = 3.5 must be an integer"):
        parse_study({**BASE, "lr": {"rule": "sqrt", "ref_bptt": 3.5}})


TUNED = """
name = "tuned"
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
repeats = 2

[lr]
rule = "tuned"
tune_from = "linear"
ref_bptt = 4
ref_batch_size = 4
ladder = [0.5, 1, 2]
tune_fraction = 0.2

[search]
bptt = [4, 8]
batch_size = [4]
"""


@pytest.mark.slow
def test_a_tuned_study_runs_each_ladder_once_and_stores_the_choice(tmp_path: Path, one_thread: None) -> None:
    study_file = tmp_path / "tuned.toml"
    study_file.write_text(TUNED)
    results = tmp_path / "results"
    assert main(["sweep", str(study_file), "--results-dir", str(results)]) == 0
    study = optuna.load_study(study_name="tuned", storage=open_storage(f"sqlite:///{results / 'tuned' / 'study.db'}"))
    recs = [t.user_attrs["record"] for t in study.get_trials()]
    assert len(recs) == 4
    by_key: dict[str, list[dict]] = {}
    for r in recs:
        by_key.setdefault(r["config_key"], []).append(r)
    for key, runs in by_key.items():
        bptt = runs[0]["config"]["bptt"]
        middle = 0.01 * bptt / 4                           # the linear rule from bptt 4 x bs 4
        stored = study.user_attrs[f"lr_tuned:{key}"]
        assert [rung["lr"] for rung in stored["ladder"]] == pytest.approx([middle / 2, middle, middle * 2])
        for r in runs:
            assert r["lr_choice"]["rule"] == "tuned" and r["lr_choice"]["rule_lr"] == pytest.approx(middle)
            assert r["config"]["lr"] == pytest.approx(stored["lr"]) and r["lr_choice"]["ladder"] == stored["ladder"]
        # The ladder ran once (20% of 2,000 tokens per rung), charged to one trial; the repeat reused it.
        assert sorted(r["lr_choice"]["tune_tokens"] for r in runs) == [0, 3 * 400]
        assert "tuned: the best of ×0.5/×1/×2 around the linear rule" in runs[0]["study"]["lr_rule_text"]
    with open(results / "tuned" / "configs.csv", newline="") as f:
        configs = list(csv.DictReader(f))
    assert {row["lr_rule"] for row in configs} == {"tuned"}
    assert sorted(float(row["lr"]) for row in configs) == pytest.approx(
        sorted(study.user_attrs[f"lr_tuned:{row['config_key']}"]["lr"] for row in configs))
    html = (results / "tuned" / "report.html").read_text()
    assert "How was the learning rate set?" in html and "Tuning cost 2,400 training tokens" in html


def _rec(bptt: int, bs: int, ppl: float, lr: float, rule: str, seed: int = 0) -> dict:
    return {"status": "ok", "config_key": f"bptt={bptt},batch_size={bs}",
            "config": {"bptt": bptt, "batch_size": bs, "lr": lr, "seed": seed, "repeat": seed},
            "lr_choice": {"rule": rule, "rule_lr": lr},
            "result": {"status": "ok", "val_ppl": ppl, "tokens_per_s": 1000.0 * bs, "train_tokens": 10_000,
                       "val_curve": [{"step": 1, "tokens": 10_000, "seconds": 10.0 / bs, "loss": math.log(ppl),
                                      "ppl": ppl}]},
            "study": {"name": "s", "budget": "tokens", "budget_tokens": 10_000, "cost": "seconds_per_token",
                      "lr_rule_text": LrRule(rule).describe(20.0)}}


def test_the_recommendation_names_the_lr_and_its_rule_and_configs_keep_bptt_and_batch_as_the_axes() -> None:
    sqrt = LrRule("sqrt")
    recs = [_rec(b, 5, p, sqrt.lr_for(20.0, b, 5), "sqrt") for b, p in ((10, 100.0), (35, 130.0), (140, 160.0))]
    rep = build(records_to_frame(recs), study_name="s")
    assert rep.advice.headline.startswith("Use bptt 10 × bs 5 (lr 5.35, by the sqrt rule):")
    assert list(rep.configs["lr_rule"]) == ["sqrt"] * 3
    assert rep.configs.set_index("config_key").at["bptt=140,batch_size=5", "lr"] == pytest.approx(20.0)
    found = {f.key: f.text for f in rep.advice.findings}
    assert found["lr"].startswith("Sqrt rule: lr 20 at bptt 35 × bs 20 × √(tokens per step / 700).")
    assert "used lr 5.35 to 20" in found["lr"]
    # lr follows the shape under a rule, so these shapes differ in lr as well as bptt: no bptt verdict, and the
    # lr is named as the confound (issue 20: a causal sentence about bptt only from a slice differing only in bptt).
    assert found["bptt"].startswith("Cannot tell")
    assert "different learning rates" in found["bptt"]
    fixed = build(records_to_frame([_rec(10, 5, 100.0, 20.0, "fixed"), _rec(35, 20, 130.0, 20.0, "fixed")]),
                  study_name="s")
    assert fixed.advice.headline.startswith("Use bptt 10 × bs 5 (lr 20, the same for every shape):")


# --------------------------------------------------------------------------- issue 20, item 5

def _fake_ladder(monkeypatch: pytest.MonkeyPatch, best_lr: float | None = None) -> list[tuple]:
    """Replace the trainer with a recorder: each rung's (spec, corpus); the loss is lowest at ``best_lr``."""
    import bptt_harness.study.tuning
    from bptt_harness.record import TrialResult

    calls: list[tuple] = []

    def run_trial(spec, corpus, device, options=None, **_):
        calls.append((spec, corpus))
        loss = abs(spec.train.lr - best_lr) if best_lr is not None else 1.0
        return TrialResult(status="ok", val_loss=loss, train_tokens=spec.train.tokens, wall_s=0.0)

    monkeypatch.setattr(bptt_harness.study.tuning, "run_trial", run_trial)
    return calls


def _corpus(train: int = 10_000, valid: int = 500):
    import torch

    from bptt_harness.corpus import Corpus

    return Corpus(train=torch.arange(train), valid=torch.arange(valid) + 10**6, test=torch.arange(valid) + 2 * 10**6,
                  vocab=["<unk>"], name="c", source="c", licence="")


@pytest.mark.parametrize("ref_lr", [15.0, 20.0, 30.0])
def test_the_tuned_ladder_never_exceeds_max_lr(monkeypatch: pytest.MonkeyPatch, ref_lr: float) -> None:
    from bptt_harness.spec import TrialSpec
    from bptt_harness.study.tuning import rung_lrs, tune

    rule = LrRule("tuned", ladder=(0.5, 1.0, 2.0), max_lr=20.0)
    calls = _fake_ladder(monkeypatch, best_lr=40.0)   # the loss would reward the largest lr it is offered
    spec = TrialSpec(10, 5, train=TrainConfig(lr=rule.lr_for(ref_lr, 10, 5) if ref_lr <= 20 else 20.0, tokens=1000))
    tuned = tune(spec, _corpus(), "cpu", rule)
    lrs = [c[0].train.lr for c in calls]
    assert max(lrs) <= 20.0 and tuned.lr <= 20.0 and [r["lr"] for r in tuned.ladder] == lrs
    assert len(set(lrs)) == len(lrs)   # x1 and x2 both capped at 20 run once
    assert rung_lrs(15.0, rule) == [7.5, 15.0, 20.0] and rung_lrs(20.0, rule) == [10.0, 20.0]
    assert rung_lrs(15.0, LrRule("tuned")) == [7.5, 15.0, 30.0]   # no cap: the ladder as declared


def test_tuning_uses_another_seed_and_a_held_out_slice_of_training_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from bptt_harness.spec import TrialSpec
    from bptt_harness.study.tuning import tune

    calls = _fake_ladder(monkeypatch)
    corpus = _corpus()
    spec = TrialSpec(10, 5, train=TrainConfig(lr=20.0, tokens=1000, seed=7, eval_bptt=20, eval_batch_size=4))
    tune(spec, corpus, "cpu", LrRule("tuned"))
    for rung, tuning in calls:
        # Not the seed of the measured run nor of any repeat of it (seed + repeat).
        assert rung.train.seed not in range(7, 7 + 100)
        # Judged on the end of the training split, trained on the rest: never the reported validation split.
        assert tuning.valid.min() < 10**6 and not set(tuning.valid.tolist()) & set(corpus.valid.tolist())
        assert tuning.train.numel() + tuning.valid.numel() == corpus.train.numel()
        assert not set(tuning.train.tolist()) & set(tuning.valid.tolist())
        assert tuning.valid.numel() == 500   # as large as the validation split (at most a tenth of train)


def test_a_ladder_rung_keeps_the_anneals_of_its_part_of_the_budget() -> None:
    t = TrainConfig(tokens=10_000, anneal_at=(0.05, 0.5), seed=3)
    short = short_train(t, 0.1, 10**6)
    assert short.tokens == 1000 and short.anneal_at == pytest.approx((0.5,))   # 5% of the full run = 50% of 10%
    assert short_train(TrainConfig(tokens=10_000), 0.1, 10**6).anneal_at is None   # the plateau rule: one checkpoint


class _LrAtProgress:
    """An observer: the lr of every step against the fraction of the token budget done."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def on_step(self, loop) -> None:
        self.points.append((loop.tokens / loop.budget.tokens, loop.lr))

    def __getattr__(self, name: str):   # every other observer hook does nothing
        return lambda *a, **k: None


def test_annealing_on_progress_is_the_same_for_shapes_with_different_steps(one_thread: None) -> None:
    """anneal_at: two shapes with 8x different steps between checkpoints get the same lr at the same token
    fraction, and a validation that does not improve does not anneal (the plateau rule would)."""
    from bptt_harness.corpus import load
    from bptt_harness.spec import ModelConfig, TrialSpec
    from bptt_harness.trainer import run_trial

    corpus = load("synthetic:k=4,vocab=6,noise=2,tokens=8000")
    model = ModelConfig(emsize=8, nhid=8, layers=1, dropout=0.0)
    # lr 200 with no clip: validation gets worse between checkpoints, which the plateau rule would punish.
    train = TrainConfig(lr=200.0, clip=0.0, tokens=4096, checkpoints=4, anneal=2.0, anneal_at=(0.5, 0.75),
                        spike_factor=1e6)
    lrs = {}
    for bptt, bs in ((4, 4), (8, 16)):
        seen = _LrAtProgress()
        r = run_trial(TrialSpec(bptt, bs, model=model, train=train), corpus, "cpu", observers=[seen])
        assert r.steps == 4096 // (bptt * bs) and r.final_lr == pytest.approx(50.0)
        lrs[bptt] = seen.points
    for points in lrs.values():   # the lr after each step, as a function of the fraction done
        assert all(lr == (200.0 if f < 0.5 else 100.0 if f < 0.75 else 50.0) for f, lr in points)
    plateau = run_trial(TrialSpec(8, 16, model=model, train=replace_train(train, anneal_at=None)), corpus, "cpu")
    assert plateau.final_lr is not None and plateau.final_lr < 200.0   # this run's validation did not always improve


def replace_train(t: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(t, **changes)
