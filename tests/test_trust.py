"""Every number means what its column says (issue 11): budgets, training costs apart from validation,
per-trial memory, warm-up, finite blow-ups, old torch, corpus order, the one typed record, variable
windows and shared CPU workers."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bptt_harness.batching import VariableBptt
from bptt_harness.corpus import Corpus, document_order, load
from bptt_harness.model import RNNModel
from bptt_harness.probe import Probe, Sample
from bptt_harness.record import STATUSES, ProbeReport, StudyInfo, TrialRecord, TrialResult, columns_markdown, flatten, trial_columns
from bptt_harness.spec import ModelConfig, RunOptions, TrainConfig, TrialSpec
from bptt_harness.trainer import Budget, Diverged, DivergenceGuard, is_oom, run_trial

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(emsize=16, nhid=16, layers=1, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_study(path: Path, name: str, corpus_tokens: int, train: str, search: str) -> Path:
    """A grid study of a tiny model on a synthetic corpus, written to ``path/<name>.toml``."""
    study = path / f"{name}.toml"
    study.write_text(f'name = "{name}"\nsampler = "grid"\n'
                     f'[corpus]\nsource = "synthetic:k=4,vocab=8,noise=4,tokens={corpus_tokens}"\n'
                     "[model]\nemsize = 8\nnhid = 8\nlayers = 1\ndropout = 0.0\n"
                     f"[train]\n{textwrap.dedent(train)}\n[search]\n{textwrap.dedent(search)}\n")
    return study


def trial(corpus: Corpus, bptt: int = 10, bs: int = 8, model: ModelConfig = TINY, probe: Any = None,
          options: RunOptions | None = None, **train: Any):
    train = {"optimizer": "adamw", "lr": 1e-2, "tokens": 4_000, "checkpoints": 1, **train}
    return run_trial(TrialSpec(bptt=bptt, batch_size=bs, model=model, train=TrainConfig(**train)), corpus, "cpu",
                     probe=probe, options=options)


# --------------------------------------------------------------------------- 1. exact token budgets

@pytest.mark.parametrize("seq_len, bs, done, expected", [
    (35, 20, 0, (35, None)),          # a whole window fits
    (35, 20, 1000 - 700, (35, None)),  # exactly the remainder
    (35, 20, 1000 - 650, (33, 650)),   # 32 rows and 10 columns of a 33rd
    (35, 20, 999, (1, 1)),             # one target left
])
def test_budget_cuts_the_last_window_to_the_remainder(seq_len, bs, done, expected):
    assert Budget(tokens=1000, seconds=None, checkpoints=1).cut(seq_len, bs, done) == expected


def test_budget_checkpoints_are_due_once_each():
    b = Budget(tokens=100, seconds=None, checkpoints=4)
    due = [b.checkpoint_due(b.progress(t, 0.0)) for t in (10, 25, 30, 99, 100)]
    assert due == [False, True, False, True, True] and b.done  # 99 % crosses 50 % and 75 % at once


def test_variable_windows_keep_the_exact_budget(syn):
    r = trial(syn, bptt=9, bs=7, tokens=5_003, variable_bptt=True, checkpoints=3)
    assert r.status == "ok" and r.train_tokens == r.budget_tokens == 5_003


def test_a_sweep_trains_every_configuration_on_exactly_the_budget(tmp_path):
    """The default study's shape on a small corpus: every finished trial's train_tokens is the budget,
    for shapes that do not divide it, and the report header shows the budget as resolved."""
    study = tiny_study(tmp_path, "exact", 20_000, """
        optimizer = "adamw"
        lr = 0.01
        epochs = 1.3
        checkpoints = 2""", """
        bptt = [7, 35]
        batch_size = [3, 64]""")
    from bptt_harness.cli import main

    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "results")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results" / "exact" / "trials.csv")))
    budget = round(1.3 * (20_000 - 1))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {r["train_tokens"] for r in rows} == {r["resolved_budget_tokens"] for r in rows} == {str(budget)}
    assert {r["bptt"] for r in rows} == {"7", "35"}  # integer columns are written as integers
    html = (tmp_path / "results" / "exact" / "report.html").read_text()
    assert f"{budget:,} training tokens per trial (1.3 x the train split)" in html


# --------------------------------------------------------------------------- 2. per-trial memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from bptt_harness.corpus import CorpusSpec, load
    from bptt_harness.probe import make_probe
    from bptt_harness.spec import ModelConfig, RunOptions, TrainConfig, TrialSpec
    from bptt_harness.trainer import WARM_UP_STEPS, run_trial

    torch.set_num_threads(1)
    corpus = load(CorpusSpec("default", lower=True, split_punct=True, max_vocab=5000))
    model = ModelConfig(emsize=128, nhid=128, layers=2, dropout=0.1)
    out = []
    for i, cell in enumerate(sys.argv[1:]):
        bptt, bs = map(int, cell.split("x"))
        spec = TrialSpec(bptt=bptt, batch_size=bs, model=model,
                         train=TrainConfig(tokens=6 * bptt * bs, checkpoints=1, eval_bptt=140))
        options = RunOptions(warm_up_steps=WARM_UP_STEPS if i == 0 else 0)
        r = run_trial(spec, corpus, "cpu", probe=make_probe("cpu"), options=options)
        assert r.status == "ok", r.error
        out.append(r.probe.peak_mem_mib)
    print(json.dumps(out))
""")


def _peaks(*cells: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *cells], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_small_trial_after_a_large_one_reports_its_own_memory():
    """After bptt 140 x bs 80 the process has held ~1 GiB; bptt 35 x bs 20 must still report what it
    needs alone in a fresh process (within 10%), not the process's leftovers."""
    after_large = _peaks("140x80", "35x20")
    alone = _peaks("35x20")
    assert after_large[0] > 5 * alone[0]  # the large one really was large
    assert after_large[1] == pytest.approx(alone[0], rel=0.10), (after_large, alone)


# --------------------------------------------------------------------------- 3. validation apart

class TimedSource:
    """100 W exactly: the energy counter is 100 J per second of wall time."""

    kind, energy_kind = "cpu", "counter"

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def sample(self) -> Sample:
        return Sample(rss_mib=100.0)

    def energy_mj(self) -> float:
        return time.perf_counter() * 100_000.0

    def thread_interval_ms(self, requested: int) -> None:
        return None


def test_validation_energy_time_and_memory_are_not_charged_to_training(syn):
    probe = Probe(TimedSource(), "cpu")
    r = trial(syn, tokens=6_000, checkpoints=4, eval_bptt=2, eval_batch_size=2, probe=probe)  # slow validation
    assert r.status == "ok" and r.eval_s > 0.3 * r.train_s
    p = r.probe
    assert p.duration_s == pytest.approx(r.train_s, rel=0.05, abs=0.01)
    assert p.energy_j == pytest.approx(100.0 * r.train_s, rel=0.05, abs=1.0)
    assert p.eval_energy_j == pytest.approx(100.0 * p.eval_s, rel=0.05)
    assert p.eval_s == pytest.approx(r.eval_s, rel=0.1, abs=0.02)
    assert r.joules_per_ktok == pytest.approx(p.energy_j * 1000 / r.train_tokens)


def test_memory_peaks_are_split_between_training_and_validation(syn):
    """A validation that allocates 150 MiB shows in the validation's peak, not in training's."""
    import bptt_harness.trainer

    original = bptt_harness.trainer.TrialLoop.evaluate

    def hungry(*args: Any, **kwargs: Any) -> float:
        block = np.ones(150 * 2**20 // 8)
        try:
            return original(*args, **kwargs)
        finally:
            del block

    from bptt_harness.probe import make_probe

    mp = pytest.MonkeyPatch()
    mp.setattr(bptt_harness.trainer.TrialLoop, "evaluate", hungry)
    try:
        r = trial(syn, tokens=2_000, checkpoints=2, probe=make_probe("cpu"))
    finally:
        mp.undo()
    assert r.status == "ok"
    assert r.probe.eval_peak_mem_mib >= 140 and r.probe.peak_mem_mib < 100


# --------------------------------------------------------------------------- 4. warm-up and start-up

def test_warm_up_steps_are_excluded_and_a_too_short_trial_is_flagged(syn):
    r = trial(syn, tokens=40 * 80, warmup_steps=5)
    assert r.status == "ok" and r.warmup_steps == 5 and r.timing_includes_warmup is False
    short = trial(syn, tokens=3 * 80, warmup_steps=5)
    assert short.status == "ok" and short.steps == 3 and short.timing_includes_warmup is True
    assert short.tokens_per_s and short.tokens_per_s > 0


def test_the_report_marks_throughput_that_includes_the_warm_up(tmp_path):
    from synthetic import synthetic_records, write_optuna_study

    from bptt_harness.report import generate

    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20,))
    recs[0]["result"]["timing_includes_warmup"] = True
    out = tmp_path / "r"
    write_optuna_study(recs, f"sqlite:///{tmp_path / 's.db'}", "marks")
    paths = generate(f"sqlite:///{tmp_path / 's.db'}", study_name="marks", out_dir=out)
    configs = list(csv.DictReader(open(paths.configs_csv)))
    notes = {r["config_key"]: r["timing_note"] for r in configs}
    assert "warm-up" in notes["bptt=35,batch_size=20"] and notes["bptt=70,batch_size=20"] == ""
    assert "* timing: bptt 35 × bs 20" in paths.html.read_text()


def test_each_worker_process_warms_up_once_before_its_first_trial(tmp_path, monkeypatch):
    import bptt_harness.trainer

    calls: list[int] = []
    original = bptt_harness.trainer.TrialLoop.warm_up

    def counted(self: Any, steps: int) -> None:
        calls.append(steps)
        original(self, steps)

    monkeypatch.setattr(bptt_harness.trainer.TrialLoop, "warm_up", counted)
    study = tiny_study(tmp_path, "w", 5_000, """
        tokens = 500
        checkpoints = 1""", """
        bptt = [5, 10, 20]
        batch_size = [4]""")
    from bptt_harness.cli import main

    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "results"), "--no-report"]) == 0
    assert calls == [bptt_harness.trainer.WARM_UP_STEPS]   # the first of the three trials, and only it


# --------------------------------------------------------------------------- 5. finite blow-ups

def test_guard_catches_a_finite_loss_above_uniform_after_learning():
    g = DivergenceGuard(vocab_size=5000, spike_factor=3.0)  # uniform guess: 8.52 nats
    g.check_train(9.0, -1, 10)      # not learned yet: near-uniform losses are normal at the start
    g.check_train(6.0, -1, 20)      # learned
    with pytest.raises(Diverged, match="uniform guess"):
        g.check_train(10.0, -1, 30)  # 3 x 6.0 = 18 would not have caught it
    with pytest.raises(Diverged, match="uniform guess"):
        g.check_val(9.5, 40)
    g.check_val(7.0, 50)             # worse than before but not a blow-up


def test_a_real_finite_blow_up_after_learning_is_diverged(monkeypatch):
    """Training learns (loss ~3.5 against a uniform 5.3), then the decoder is knocked off at step 120:
    the loss jumps to ~6.7 nats, finite, under the old 3 x minimum rule (10.4), above a uniform guess."""
    corpus = load("synthetic:k=4,vocab=64,noise=64,tokens=20000")
    original = RNNModel.forward
    steps = {"n": 0}

    def forward(self: RNNModel, x: torch.Tensor, hidden: Any) -> Any:
        if self.training:
            steps["n"] += 1
            if steps["n"] == 120:
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    self.decoder.weight.add_(torch.randn(self.decoder.weight.shape, generator=g))
        return original(self, x, hidden)

    monkeypatch.setattr(RNNModel, "forward", forward)
    r = trial(corpus, model=ModelConfig(emsize=32, nhid=32, layers=1, dropout=0.0), clip=0.25, tokens=20_000,
              log_every=5)
    assert r.status == "diverged" and "uniform guess" in r.error
    blown = [p["loss"] for p in r.train_curve if p["step"] >= 120]
    assert blown and all(math.isfinite(v) for v in blown) and max(blown) < 3 * min(
        p["loss"] for p in r.train_curve)
    assert 120 <= r.diverged_step <= 130


# --------------------------------------------------------------------------- 6. torch before 2.5

def test_oom_detection_and_the_cpu_cap_without_torch_OutOfMemoryError(syn, monkeypatch):
    cuda_oom = torch.cuda.OutOfMemoryError
    monkeypatch.delattr(torch, "OutOfMemoryError")  # torch 2.3 / 2.4 have only torch.cuda.OutOfMemoryError
    assert is_oom(cuda_oom("CUDA out of memory")) and is_oom(MemoryError())
    assert not is_oom(ValueError("x"))
    r = trial(syn, options=RunOptions(memory_cap_mib=0.05))
    assert r.status == "oom" and "budget exceeded" in r.error


# --------------------------------------------------------------------------- 7. corpus order

def test_default_corpus_documents_are_shuffled_deterministically_and_kept_whole(tmp_path):
    titles = [f"title {i:04d}" for i in range(200)]
    order = document_order(titles)
    assert sorted(order) == sorted(titles) and order != sorted(titles)
    assert order == document_order(list(reversed(titles)))  # whatever order the file lists them in

    from bptt_harness.corpus import _default_lines, default_split_of

    articles = {t: {"extract": f"{t} first line\n{t} second line"} for t in titles}
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps(articles))
    lines = _default_lines(path)
    train_titles = [ln.rsplit(" first", 1)[0] for ln in lines["train"] if ln.endswith("first line")]
    assert train_titles == [t for t in order if default_split_of(t) == "train"]
    for i, ln in enumerate(lines["train"]):  # each document's lines stay together
        if ln.endswith("first line"):
            assert lines["train"][i + 1] == ln.replace("first", "second")


# --------------------------------------------------------------------------- 8. one typed record

def test_record_round_trips_and_flattens_to_exactly_the_documented_columns():
    from bptt_harness.report.frame import TRIAL_COLUMNS

    result = TrialResult(bptt=35, batch_size=20, tokens_per_s=1000.0, train_tokens=5000,
                         probe=ProbeReport(energy_j=10.0, peak_mem_mib=12.5))
    rec = TrialRecord(config_key="bptt=35,batch_size=20", status="ok", result=result,
                      study=StudyInfo(name="s", budget="tokens", budget_tokens=5000))
    stored = json.loads(json.dumps(rec.to_dict()))
    back = TrialRecord.from_dict(stored)
    assert back == rec
    row = flatten(back)
    assert list(row) == list(TRIAL_COLUMNS) == [c.name for c in trial_columns()]
    assert row["tokens_per_step"] == 700 and row["seconds_per_ktok"] == 1.0 and row["joules_per_ktok"] == 2.0
    assert row["study"] == "s" and row["peak_mem_mib"] == 12.5


def test_every_csv_column_has_a_meaning_and_the_readme_table_is_generated():
    assert all(c.doc for c in trial_columns())
    readme = (REPO / "bptt_harness" / "report" / "README.md").read_text()
    assert columns_markdown() in readme


def test_status_is_a_typed_literal_and_an_unknown_one_reads_as_failed():
    assert STATUSES == ("ok", "diverged", "oom", "pruned", "timeout", "failed")
    assert TrialRecord.from_dict({"status": "exploded"}).status == "failed"
    hints = dataclasses.fields(TrialRecord)
    assert any(f.name == "status" and "Literal" in str(f.type) or f.type == "Status" for f in hints)


def test_records_of_the_first_schema_still_read():
    old = {"status": "ok", "config_key": "bptt=35,batch_size=20",
           "config": {"bptt": 35, "batch_size": 20, "lr": 20.0},
           "result": {"val_ppl": 120.0, "tokens_per_s": 500.0, "train_tokens": 1000, "probe": {"energy_j": 4.0,
                                                                                              "samples": 3}},
           "hardware": {"cpu_model": "x"}, "study": {"name": "old", "budget_tokens": 1000}}
    row = flatten(TrialRecord.from_dict(old))
    assert (row["bptt"], row["val_ppl"], row["seconds_per_ktok"], row["joules_per_ktok"]) == (35, 120.0, 2.0, 4.0)


# --------------------------------------------------------------------------- 9. no process settings, no sampler

def test_importing_harness_changes_no_process_setting():
    code = "import os, bptt_harness, bptt_harness.trainer, bptt_harness.study; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "None"


def test_the_cpu_probe_runs_no_sampler_thread_while_training(syn):
    from bptt_harness.probe import make_probe

    probe = make_probe("cpu")
    if not probe.source.memory.reset_peak() or probe.source.energy_kind:
        pytest.skip("this kernel cannot reset VmHWM, or RAPL needs its wraparound sampler")
    seen: list[int] = []
    import bptt_harness.trainer

    original = bptt_harness.trainer.TrialLoop.evaluate
    mp = pytest.MonkeyPatch()
    mp.setattr(bptt_harness.trainer.TrialLoop, "evaluate",
               lambda *a, **k: seen.append(sum(t.name == "harness-probe" for t in threading.enumerate()))
               or original(*a, **k))
    try:
        r = trial(syn, tokens=2_000, checkpoints=2, probe=probe)
    finally:
        mp.undo()
    assert r.status == "ok" and seen == [0, 0] and r.probe.interval_ms is None
    assert r.probe.peak_mem_mib is not None and r.probe.peak_rss_mib >= r.probe.rss_start_mib


# --------------------------------------------------------------------------- 10. variable windows, shared CPU

@pytest.mark.parametrize("bptt", [2, 4, 6, 35, 70])
def test_variable_windows_scale_their_spread_with_bptt(bptt):
    v = VariableBptt.around(bptt)
    rng = np.random.default_rng(0)
    lengths = np.array([v.draw(rng) for _ in range(20_000)])
    # 95% of windows centre on bptt and 5% on bptt / 2: the mean is just under bptt.
    assert lengths.mean() == pytest.approx(0.975 * bptt, rel=0.06)
    assert lengths.max() <= v.cap <= bptt + 3 * bptt * 5 / 70 + 1
    assert np.mean([v.lr_factor(n) for n in lengths]) == pytest.approx(1.0, abs=0.06)
    if bptt == 70:
        assert (v.sd, v.min_len, v.cap) == (5.0, 5, 85)  # AWD-LSTM's own numbers at its own bptt


def test_cpu_workers_get_their_own_cores_and_say_they_shared_the_host():
    from bptt_harness.study.sweep import cpu_share

    assert cpu_share(0, 2, [0, 1]) == [0] and cpu_share(1, 2, [0, 1]) == [1]
    assert cpu_share(1, 2, [0, 1, 2, 3]) == [2, 3] and cpu_share(2, 3, [0, 1]) == [0]
    from synthetic import synthetic_records

    from bptt_harness.report.frame import aggregate_configs, records_to_frame

    recs = synthetic_records(bptts=(35,), batch_sizes=(20, 40), gpu_name=None)
    recs[0]["study"]["host_workers"] = 2
    configs = aggregate_configs(records_to_frame(recs)).set_index("config_key")
    assert "2 workers shared this CPU" in configs.loc["bptt=35,batch_size=20", "timing_note"]
    assert configs.loc["bptt=35,batch_size=40", "timing_note"] == ""


def test_train_clock_leaves_paused_time_out_and_marks_the_warm_up():
    from bptt_harness.trainer import TrainClock

    now = [100.0]   # an injected clock: the arithmetic, not this machine's speed
    clock = TrainClock(torch.device("cpu"), warmup_steps=2, clock=lambda: now[0])
    now[0] += 0.05
    with clock.paused():
        now[0] += 0.2
    assert clock.seconds() == pytest.approx(0.05) and clock.paused_s == pytest.approx(0.2)
    clock.after_step(1, 100)
    assert clock.warm_at is None
    clock.after_step(2, 200)
    warm_s, warm_tokens = clock.warm_at
    assert warm_tokens == 200
    tps, includes_warmup = clock.throughput(warm_s + 1.0, 1200)
    assert tps == pytest.approx(1000.0) and includes_warmup is False
    assert TrainClock(torch.device("cpu"), 5).throughput(2.0, 400) == (200.0, True)  # never warm: timed whole


def test_parsing_a_study_file_does_not_import_torch():
    code = "import sys, bptt_harness.config; bptt_harness.config.load_study('studies/default.toml'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
