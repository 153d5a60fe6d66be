"""Issue 19 (seams) and 23 (the first five minutes): a new measurement is an observer, a new model is a
family, and a trial leaves the process as it found it.

Everything here is added from the test, without touching the trainer, config, record or report code: a
toy observer, a toy model family (a bag of embeddings, no state) that trains through a whole study and its
report, and a toy family whose memory law has a window² term.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from studyfiles import write_model_study
from synthetic import synthetic_records
from torch import nn

import bptt_harness
import bptt_harness.trainer as trainer
from bptt_harness.batching import batchify
from bptt_harness.cli import main
from bptt_harness.config import parse_study
from bptt_harness.corpus import Corpus
from bptt_harness.errors import HarnessError
from bptt_harness.model import ModelFamily, evaluate_carried, evaluate_sliding, family_of, register_family, unregister_family
from bptt_harness.observers import TrialObserver
from bptt_harness.probe import make_probe
from bptt_harness.report.build import build
from bptt_harness.report.frame import records_to_frame
from bptt_harness.report.html import render
from bptt_harness.report.memory import card_table, fit_memory, shape_label
from bptt_harness.spec import WINDOW2_X_BS, WINDOW_X_BS, FamilyInfo, MemoryTerm, ModelConfig, RunOptions, TrainConfig, TrialSpec, declare_family, forget_family
from bptt_harness.trainer import WARM_UP_STEPS, run_trial, tf32_flags

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(emsize=16, nhid=16, layers=1, dropout=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def spec(bptt: int = 10, bs: int = 8, model: ModelConfig = TINY, **train: Any) -> TrialSpec:
    train = {"optimizer": "adamw", "lr": 1e-2, "tokens": 4_000, "checkpoints": 1, **train}
    return TrialSpec(bptt=bptt, batch_size=bs, model=model, train=TrainConfig(**train))


# --------------------------------------------------------------------------- a toy observer

class Counter(TrialObserver):
    """Counts steps and checkpoints, and measures something at each checkpoint apart from training."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s
        self.started = self.steps = self.finished = 0
        self.checkpoints: list[int] = []
        self.measured_s = 0.0
        self.filled: Any = None

    def on_start(self, loop: Any) -> None:
        self.started += 1
        assert loop.steps == 0 and isinstance(loop.model, nn.Module)

    def on_step(self, loop: Any) -> None:
        self.steps += 1

    def on_validate(self, loop: Any, point: dict) -> None:
        self.checkpoints.append(point["step"])
        with loop.measuring("toy"):   # e.g. a diagnostic of the model at this checkpoint
            t0 = time.perf_counter()
            time.sleep(self.sleep_s)
            self.measured_s += time.perf_counter() - t0

    def after_training(self, loop: Any) -> None:
        self.finished += 1

    def fill(self, result: Any) -> None:
        self.filled = result.status


def test_a_toy_observer_counts_steps_and_checkpoints_and_measures_apart(syn: Corpus) -> None:
    toy = Counter(sleep_s=0.05)
    probe = make_probe("cpu")
    r = run_trial(spec(tokens=9_600, checkpoints=3), syn, "cpu", probe=probe, observers=[toy])
    assert r.status == "ok" and r.steps == 120
    assert (toy.started, toy.steps, toy.finished, toy.filled) == (1, 120, 1, "ok")
    assert toy.checkpoints == [p["step"] for p in r.val_curve] == [40, 80, 120]
    # Its work is not training: the clock paused for it (whatever the machine's speed) and the probe booked
    # it under its own phase.
    assert r.train_s <= r.wall_s - toy.measured_s
    assert probe.phase_cost("toy").seconds >= toy.measured_s >= 3 * 0.05
    # Observing changes nothing of how the trial trains.
    plain = run_trial(spec(tokens=9_600, checkpoints=3), syn, "cpu")
    assert [p["loss"] for p in plain.val_curve] == [p["loss"] for p in r.val_curve]


def test_an_observer_of_a_trial_that_ends_early_still_fills_and_a_broken_one_loses_nothing(syn: Corpus) -> None:
    class Broken(Counter):
        def fill(self, result: Any) -> None:
            raise RuntimeError("observer bug")

    toy, broken = Counter(), Broken()
    r = run_trial(spec(tokens=8_000, checkpoints=4), syn, "cpu", on_checkpoint=lambda i, p: i == 1,
                  observers=[broken, toy])
    assert r.status == "pruned" and len(r.val_curve) == 2 and r.val_ppl is not None
    assert toy.filled == "pruned" and toy.finished == 0   # after_training is for a trial that spent its budget


# --------------------------------------------------------------------------- process-wide state

def test_a_trial_leaves_the_global_rng_as_it_found_it(syn: Corpus) -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    dropout = ModelConfig(emsize=16, nhid=16, layers=2, dropout=0.3)
    r = run_trial(spec(model=dropout, tokens=2_000, variable_bptt=True), syn, "cpu")
    assert r.status == "ok"
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)
    # ... and the trial is still seeded by its own seed, not by the caller's state.
    torch.manual_seed(999)
    again = run_trial(spec(model=dropout, tokens=2_000, variable_bptt=True), syn, "cpu")
    assert again.val_ppl == r.val_ppl


def _precision() -> dict[str, Any]:
    """Every precision setting a user can read (``ERR``: one torch refuses to read, set inconsistently)."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn

    def read(get: Any) -> Any:
        try:
            return get()
        except RuntimeError:
            return "ERR"

    out = {"matmul.allow_tf32": read(lambda: m.allow_tf32), "cudnn.allow_tf32": read(lambda: c.allow_tf32),
           "float32_matmul_precision": read(torch.get_float32_matmul_precision)}
    for name, obj in (("backends", torch.backends), ("matmul", m), ("cudnn", c), ("conv", getattr(c, "conv", None)),
                      ("rnn", getattr(c, "rnn", None))):
        if obj is not None and hasattr(obj, "fp32_precision"):
            out[f"{name}.fp32_precision"] = obj.fp32_precision
    return out


@pytest.fixture
def restore_precision() -> Iterator[None]:
    before = trainer._precision_state()
    yield
    trainer._restore_precision(before)


SETTINGS = {   # how a user may have set precision before calling run_trial
    "untouched": lambda: None,
    "legacy matmul on": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "legacy cudnn off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "matmul precision medium": lambda: torch.set_float32_matmul_precision("medium"),
    "new api, conv ieee": lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")
    if hasattr(torch.backends.cudnn, "conv") else None,
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("allow", [True, False])
def test_tf32_flags_are_put_back_exactly(setting: str, allow: bool, restore_precision: None) -> None:
    SETTINGS[setting]()
    before = _precision()
    with tf32_flags(allow):
        assert torch.backends.cuda.matmul.allow_tf32 is allow and torch.backends.cudnn.allow_tf32 is allow
    assert _precision() == before
    with pytest.raises(ValueError), tf32_flags(allow):
        raise ValueError("a trial's error")
    assert _precision() == before


def test_a_cuda_trial_sets_its_tf32_setting_and_puts_the_callers_back(monkeypatch: pytest.MonkeyPatch,
                                                                       restore_precision: None) -> None:
    monkeypatch.setattr(trainer, "_rng_devices", lambda device: [])   # no CUDA generator on this machine
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    before = _precision()
    with trainer._trial_state(torch.device("cuda"), TrainConfig(tf32=True)):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert _precision() == before
    with trainer._trial_state(torch.device("cpu"), TrainConfig(tf32=True)):
        assert _precision() == before   # a CPU trial does not touch them


# --------------------------------------------------------------------------- warm-up and factory builds

BUILDS: list[str] = []


class Small(nn.Module):
    def __init__(self, cfg: ModelConfig, ntoken: int) -> None:
        super().__init__()
        self.nhid = cfg.nhid
        self.emb = nn.Embedding(ntoken, cfg.emsize)
        self.rnn = nn.GRU(cfg.emsize, cfg.nhid)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(cfg.nhid, ntoken)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, hidden = self.rnn(self.drop(self.emb(x)), hidden)
        return self.out(self.drop(y)).view(-1, self.out.out_features), hidden

    def init_hidden(self, bs: int) -> torch.Tensor:
        return torch.zeros(1, bs, self.nhid, device=self.out.weight.device)


def counted(cfg: ModelConfig, ntoken: int) -> nn.Module:
    BUILDS.append(cfg.factory or "")   # a factory's side effect: it must run once per trial
    return Small(cfg, ntoken)


FACTORY = f"{__name__}:counted"


def test_the_warm_up_runs_on_the_trials_own_model_and_changes_nothing(syn: Corpus) -> None:
    model = ModelConfig(factory=FACTORY, emsize=8, nhid=8)
    BUILDS.clear()
    cold = run_trial(spec(model=model, tokens=3_000, checkpoints=2, log_every=5), syn, "cpu")
    warm = run_trial(spec(model=model, tokens=3_000, checkpoints=2, log_every=5), syn, "cpu",
                     options=RunOptions(warm_up_steps=WARM_UP_STEPS))
    assert cold.status == warm.status == "ok"
    assert len(BUILDS) == 2   # one build per trial, warm-up included
    assert [p["loss"] for p in warm.train_curve] == [p["loss"] for p in cold.train_curve]
    assert warm.val_ppl == cold.val_ppl and warm.steps == cold.steps
    assert warm.wall_s > warm.train_s + warm.eval_s   # it ran, outside training and validation time


def test_the_trial_command_builds_a_factory_model_once_per_trial_and_the_check(capsys: pytest.CaptureFixture) -> None:
    BUILDS.clear()
    args = ["trial", "--source", "synthetic:k=4,vocab=6,tokens=5000", "--bptt", "8", "--batch-size", "4",
            "--factory", FACTORY, "--emsize", "8", "--nhid", "8", "--optimizer", "adamw", "--lr", "0.01",
            "--tokens", "800", "--checkpoints", "1", "--device", "cpu", "--no-probe", "--json", "--repeats", "2"]
    assert main(args) == 0
    assert [json.loads(line)["status"] for line in capsys.readouterr().out.splitlines()] == ["ok", "ok"]
    assert len(BUILDS) == 3   # the one-line check before anything runs, then once per trial (it was 4)


def test_a_sweep_builds_a_factory_model_once_per_trial_and_describes_it_by_what_it_is(tmp_path: Path) -> None:
    study = write_model_study(tmp_path, "own", f'factory = "{FACTORY}"\nemsize = 8\nnhid = 12')
    BUILDS.clear()
    paths = bptt_harness.run_study(study, results_dir=tmp_path / "results", quiet=True)
    assert len(BUILDS) == 1 + 2   # the check before the study starts, then one per trial
    df = bptt_harness.load_results(paths.html.parent)
    assert set(df["status"]) == {"ok"} and set(df["model"]) == {FACTORY}
    # Not the built-in model's shape fields (layers 2 is the default config's, not this model's).
    assert df[["nhid", "emsize", "layers", "dropout"]].isna().all().all()
    n = int(df["n_params"].iloc[0])
    assert shape_label(df.iloc[0]) == f"{FACTORY} ({n:,} parameters)"
    summary = json.loads(paths.summary_json.read_text())
    assert {f["shape"] for f in summary["memory"]["fits"]} == {f"{FACTORY} ({n:,} parameters)"}
    assert f"{FACTORY} ({n:,} parameters)" in paths.html.read_text()


# --------------------------------------------------------------------------- a toy model family

class Bag(nn.Module):
    """Each prediction from the mean embedding of the window's tokens so far: no state across windows, so
    its context is the window (the first targets of a window see little)."""

    def __init__(self, cfg: ModelConfig, ntoken: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(ntoken, cfg.emsize)
        self.out = nn.Linear(cfg.emsize, ntoken)

    def forward(self, x: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        seen = torch.arange(1, x.size(0) + 1, device=x.device, dtype=torch.float32).view(-1, 1, 1)
        logits = self.out(self.emb(x).cumsum(0) / seen)
        return logits.view(-1, logits.size(-1)), None


BAG = ModelFamily(
    FamilyInfo("bag", keys=("emsize",), shape="d{emsize}", carries_state=False, evaluation="sliding",
               memory_terms=(WINDOW_X_BS,)),
    build=Bag, flops_per_token=lambda cfg, ntoken, model: 6.0 * cfg.emsize * ntoken,
    init_state=lambda model, bs: None)


@pytest.fixture
def bag() -> Iterator[ModelFamily]:
    register_family(BAG)
    yield BAG
    unregister_family("bag")


def test_a_toy_family_trains_through_run_trial(bag: ModelFamily, syn: Corpus) -> None:
    model = ModelConfig(type="bag", emsize=8)
    assert family_of(model) is bag and model.describe() == "bag d8"
    r = run_trial(spec(bptt=16, model=model, tokens=6_000, checkpoints=2, lr=0.05), syn, "cpu")
    assert r.status == "ok", r.error
    assert r.n_params == 2 * 8 * syn.vocab_size + syn.vocab_size and r.flops_per_token == 6.0 * 8 * syn.vocab_size
    assert r.val_ppl < syn.vocab_size   # it learned something (a uniform guess scores vocab_size)
    # Evaluated by its own rule: sliding windows of eval_bptt, not the carried-state loop.
    net = bag.build(model, syn.vocab_size)
    valid = batchify(syn.valid, 10)
    assert r.evaluation == "sliding" and run_trial(spec(tokens=500), syn, "cpu").evaluation == "carried"
    assert bag.evaluate(net, model, valid, 16) == pytest.approx(evaluate_sliding(net.eval(), valid, 16, False, lambda: None))
    assert bag.evaluate(net, model, valid, 16) != pytest.approx(evaluate_carried(net, valid, 16, False, None))


def test_a_toy_family_is_a_study_key_and_reports(bag: ModelFamily, tmp_path: Path) -> None:
    study = write_model_study(tmp_path, "bag", 'type = "bag"\nemsize = 8')
    paths = bptt_harness.run_study(study, results_dir=tmp_path / "results", quiet=True)
    df = bptt_harness.load_results(paths.html.parent)
    assert len(df) == 2 and set(df["status"]) == {"ok"} and set(df["model"]) == {"bag"}
    assert set(df["emsize"]) == {8} and df[["nhid", "layers", "dropout"]].isna().all().all()
    fits = json.loads(paths.summary_json.read_text())["memory"]["fits"]
    assert [f["shape"] for f in fits] == ["bag d8"]
    assert "bag d8" in paths.html.read_text()


def test_a_family_is_validated_where_the_study_file_is(bag: ModelFamily) -> None:
    raw = {"name": "x", "model": {"type": "bagg"}, "search": {"bptt": [4], "batch_size": [4]}}
    with pytest.raises(HarnessError, match=r"model type 'bagg' is not known \(did you mean 'bag'\?\)") as e:
        parse_study(raw)
    assert "\n" not in str(e.value) and "lstm, gru, transformer, awd-lstm, bag" in str(e.value)
    with pytest.raises(HarnessError, match="reset_every=3 resets a state that the bag family does not carry"):
        spec(model=ModelConfig(type="bag"), reset_every=3)
    with pytest.raises(HarnessError, match="'factory' is not a family"):
        ModelConfig(type="factory")
    unregister_family("bag")
    with pytest.raises(HarnessError, match="model type 'bag' is not known"):
        ModelConfig(type="bag")


def test_the_config_layer_stays_light() -> None:
    code = ("import sys, bptt_harness.config, bptt_harness.spec; "
            "print(sorted(m for m in ('torch', 'optuna', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the sliding evaluation, known answer

class SeesAfter(nn.Module):
    """On a stream where each token is the previous one + 1 (mod V), predicts the next token surely once it
    has seen ``k`` tokens of its window, and guesses uniformly before: its loss counts the targets scored
    with less than ``k`` tokens of context."""

    def __init__(self, vocab: int, k: int) -> None:
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, x: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        pos = torch.arange(x.size(0)).view(-1, 1, 1)
        sure = F.one_hot((x + 1) % self.vocab, self.vocab).float() * 100.0
        return torch.where(pos >= self.k - 1, sure, torch.zeros_like(sure)).view(-1, self.vocab), None


@pytest.mark.parametrize("rows", [101, 100, 37])
def test_sliding_windows_score_every_target_once_with_the_same_context(rows: int) -> None:
    vocab, k, bptt, stride = 7, 4, 10, 5
    matrix = torch.arange(rows).remainder(vocab).view(-1, 1).expand(rows, 3).contiguous()
    model = SeesAfter(vocab, k)
    uniform = math.log(vocab)
    # Only the first window's first k - 1 rows lack context: each later target sees >= bptt - stride + 1 >= k.
    sliding = evaluate_sliding(model, matrix, bptt, False, lambda: None, stride=stride)
    assert sliding == pytest.approx((k - 1) / (rows - 1) * uniform, rel=1e-6)
    # Fixed windows without a carried state: every window starts blind.
    fixed = evaluate_carried(model, matrix, bptt, False, None)
    assert fixed == pytest.approx(math.ceil((rows - 1) / bptt) * (k - 1) / (rows - 1) * uniform, rel=1e-6)
    # A stride as long as the window is the fixed windows again, but for the last window: it is a whole
    # window, reaching back over targets already scored, so its targets see more context.
    whole = evaluate_sliding(model, matrix, bptt, False, lambda: None, stride=bptt)
    assert whole == pytest.approx(fixed, rel=1e-9) if (rows - 1) % bptt == 0 else whole < fixed


# --------------------------------------------------------------------------- a memory law with a window² term

@pytest.fixture
def attention() -> Iterator[FamilyInfo]:
    info = FamilyInfo("attn", keys=("emsize", "layers"), shape="{layers}x{emsize}", carries_state=False,
                      evaluation="sliding", memory_terms=(WINDOW_X_BS, WINDOW2_X_BS))
    declare_family(info)   # torch-free: the report needs only the declaration
    yield info
    forget_family("attn")


def _quadratic_trials(a: float, b: float, c: float) -> pd.DataFrame:
    recs = synthetic_records(bptts=(16, 32, 64, 128), batch_sizes=(8, 32), gpu_name=None)
    for r in recs:
        w, bs = r["config"]["bptt"], r["config"]["batch_size"]
        r["config"].update(model="attn", layers=2, emsize=64, nhid=None)
        r["status"] = r["result"]["status"] = "ok"
        r["result"]["probe"]["peak_mem_mib"] = a + b * w * bs + c * w * w * bs
    return records_to_frame(recs)


def test_the_memory_fit_uses_the_terms_the_family_declares(attention: FamilyInfo) -> None:
    a, b, c = 300.0, 0.02, 0.0005
    trials = _quadratic_trials(a, b, c)
    fits = fit_memory(trials)
    assert len(fits) == 1
    f = fits[0]
    assert f.shape == "attn 2x64" and f.terms == (WINDOW_X_BS, WINDOW2_X_BS) and not f.linear
    assert (f.intercept_mib, *f.coefs) == pytest.approx((a, b, c), rel=1e-6)
    assert math.isnan(f.loo_max_pct) or f.loo_max_pct < 1e-6   # an exact law predicts every held-out point
    assert f.law() == "300 + 0.02 × window × bs + 0.0005 × window² × bs"
    # The card answer solves the family's law: the largest window w with a + b w bs + c w² bs <= card.
    table = card_table(f, [8, 32], {"4 GiB": 4096.0}).set_index("batch_size")
    for bs in (8, 32):
        room = 4096.0 - f.overhead_mib - a
        w = (-b * bs + math.sqrt((b * bs) ** 2 + 4 * c * bs * room)) / (2 * c * bs)
        assert table.loc[bs, "4 GiB"] in (math.floor(w) - 1, math.floor(w))
    # The report states the family's law, not the recurrent one.
    rep = build(trials, study_name="attn")
    assert f.law() in render(rep) and f.law() in next(x.text for x in rep.advice.findings if x.key == "memory")
    # The same points read with the recurrent law would not hold: the terms matter.
    forget_family("attn")
    linear = fit_memory(trials)[0]
    assert linear.linear and linear.loo_max_pct > 5


def test_memory_terms_are_plain_data() -> None:
    assert (WINDOW_X_BS.name, WINDOW2_X_BS.name, MemoryTerm(0, 1).name) == ("window × bs", "window² × bs", "bs")
    assert np.array_equal(WINDOW2_X_BS.of(np.array([2.0, 3.0]), 4), [16.0, 36.0])
    with pytest.raises(HarnessError, match="memory_terms"):
        FamilyInfo("broken", memory_terms=(MemoryTerm(0, 0),))
    with pytest.raises(HarnessError, match="evaluation 'strided' is not known"):
        FamilyInfo("broken", evaluation="strided")


# --------------------------------------------------------------------------- run options and short runs

def test_train_config_short_is_the_one_quick_run() -> None:
    t = TrainConfig(epochs=3.0, checkpoints=5, test=True, time_grid_s=2.0, lr=3.0, seed=4)
    q = t.short(1234)
    assert (q.budget, q.tokens, q.epochs, q.checkpoints, q.test, q.time_grid_s) == ("tokens", 1234, None, 1, False, None)
    assert (q.lr, q.seed) == (3.0, 4)   # everything else as it was
    s = TrainConfig(budget="seconds", seconds=60.0).short(seconds=6.0)
    assert (s.budget, s.seconds, s.checkpoints) == ("seconds", 6.0, 1)
    with pytest.raises(HarnessError, match="exactly one of tokens or seconds"):
        t.short()


@pytest.mark.parametrize("field, value", [("memory_cap_mib", 0.0), ("memory_cap_mib", math.inf),
                                          ("time_grid_until_s", -1.0), ("warm_up_steps", -1), ("warm_up_steps", 1.5)])
def test_bad_run_options_are_one_line(field: str, value: Any) -> None:
    with pytest.raises(HarnessError, match=field) as e:
        RunOptions(**{field: value})
    assert "\n" not in str(e.value)


def test_values_the_study_sets_are_not_train_keys() -> None:
    for key in ("time_grid_until_s", "memory_cap_mib"):
        raw = {"name": "x", "train": {key: 1.0}, "search": {"bptt": [4], "batch_size": [4]}}
        with pytest.raises(HarnessError, match=key):
            parse_study(raw)
    config = parse_study({"name": "x", "max_memory_gib": 0.5, "search": {"bptt": [4], "batch_size": [4]}})
    assert config.memory_cap_mib == 512.0


def test_whether_a_family_carries_state_and_how_it_is_evaluated_may_depend_on_its_keys() -> None:
    """A Transformer carries a memory only with mem_len > 0; without one it is evaluated in sliding windows."""
    info = FamilyInfo("memo", keys=("layers",), shape="{layers}", carries_state=lambda cfg: cfg.layers > 1,
                      evaluation=lambda cfg: "carried" if cfg.layers > 1 else "sliding")
    declare_family(info)
    try:
        with pytest.raises(HarnessError, match="does not carry"):
            spec(model=ModelConfig(type="memo", layers=1), reset_every=2)
        carried = spec(model=ModelConfig(type="memo", layers=2), reset_every=2).model
        assert info.evaluation_of(carried) == "carried" and info.evaluation_of(ModelConfig(type="memo", layers=1)) == "sliding"
        odd = FamilyInfo("memo", evaluation=lambda cfg: "strided")
        with pytest.raises(HarnessError, match="evaluation 'strided' is not known"):
            odd.evaluation_of(carried)
    finally:
        forget_family("memo")
