"""benchmarks/gpu_table.py (make gpu-table): the memory-wall search, the time budget, and a tiny CPU run end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_table.py"


def load_gpu_table():
    """Imported by path: benchmarks/ is not a package."""
    spec = importlib.util.spec_from_file_location("gpu_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gt = load_gpu_table()


# --------------------------------------------------------------------------- the search

def fake_device(threshold: int, tried: list[int] | None = None):
    """A device on which every batch size up to ``threshold`` fits."""
    def try_fn(bs: int, phase: str) -> bool:
        if tried is not None:
            tried.append(bs)
        return bs <= threshold
    return try_fn


@pytest.mark.parametrize("threshold", [1, 2, 31, 100, 255, 256, 257, 700, 1300, 2500, 40_000])
def test_search_brackets_the_threshold(threshold: int) -> None:
    tried: list[int] = []
    s = gt.find_max_fitting(fake_device(threshold, tried), start=256, resolution=32, rel_resolution=0.05,
                            max_attempts=40)
    assert s.resolved, s.reason
    assert s.largest_fit <= threshold < s.smallest_fail
    assert s.smallest_fail - s.largest_fit <= max(32, 0.05 * s.largest_fit)
    assert len(tried) == len(set(tried)) == len(s.attempts)  # never the same batch size twice
    assert all((bs <= threshold) == fit for bs, _, fit in s.attempts)


def test_search_phases_double_then_bisect_in_few_attempts() -> None:
    # An H100-like wall at bptt 280: 256, 512, 1024 fit, 2048 does not, then 3 bisections to 5%.
    s = gt.find_max_fitting(fake_device(1300), start=256)
    assert [a[:2] for a in s.attempts[:4]] == [(256, "double"), (512, "double"), (1024, "double"), (2048, "double")]
    assert {p for _, p, _ in s.attempts[4:]} == {"bisect"}
    assert len(s.attempts) <= 8 and (s.largest_fit, s.smallest_fail) == (1280, 1344)


def test_search_halves_when_the_start_does_not_fit() -> None:
    s = gt.find_max_fitting(fake_device(40), start=256, resolution=4)
    assert [a[:2] for a in s.attempts[:3]] == [(256, "double"), (128, "halve"), (64, "halve")]
    assert s.resolved and s.largest_fit <= 40 < s.smallest_fail


def test_search_limits() -> None:
    nothing = gt.find_max_fitting(fake_device(0), start=8)
    assert nothing.largest_fit is None and nothing.smallest_fail == 1 and nothing.reason == "batch size 1 does not fit"

    capped = gt.find_max_fitting(fake_device(100_000), start=256, max_attempts=3)
    assert capped.reason == "attempt cap" and len(capped.attempts) == 3 and capped.smallest_fail is None

    above = gt.find_max_fitting(fake_device(10**9), start=256, upper=1024, max_attempts=50)
    assert above.reason.startswith("no OOM up to bs 1024") and above.largest_fit == 1024

    answers = iter([True, False, None, True])
    stopped = gt.find_max_fitting(lambda bs, phase: next(answers), start=256)
    assert stopped.reason == "stopped" and (stopped.largest_fit, stopped.smallest_fail) == (256, 512)
    assert len(stopped.attempts) == 3 and not stopped.resolved


# --------------------------------------------------------------------------- the time budget

def test_choose_tokens() -> None:
    assert gt.choose_tokens(100.0, 1e-4, 10.0, lo=100_000, hi=2_000_000, step=10_000) == 900_000
    assert gt.choose_tokens(1e6, 1e-4, 10.0, lo=100_000, hi=2_000_000, step=10_000) == 2_000_000
    assert gt.choose_tokens(5.0, 1e-4, 10.0, lo=100_000, hi=2_000_000, step=10_000) == 100_000  # nothing fits
    assert gt.choose_tokens(50.0, 0.0, 10.0, lo=1, hi=7, step=1) == 7


def test_rates_are_conservative_between_calibrated_batch_sizes() -> None:
    r = gt.Rates({20: 40_000.0, 80: 150_000.0, 320: 300_000.0})
    assert r.at(80) == 150_000 and r.at(256) == 150_000 and r.at(4096) == 300_000 and r.at(10) == 20_000
    assert r.trial_s(20, 1_000_000, 4) > 1_000_000 / 40_000


def test_full_plan_fits_the_cap_with_h100_like_rates() -> None:
    """The default plan: 12 configurations, equal budget, estimate inside the grid's share of 450 s."""
    from harness.config import load_study

    plan = gt.full_plan()
    base = load_study(REPO / gt.STUDY_FILE)
    config = gt.table_config(base, plan, None, 1800.0, torch.device("cuda"))
    clock = gt.Clock(gt.DEFAULT_MAX_SECONDS, started=time.monotonic() - 20.0)  # 20 s of start-up spent
    rates = gt.Rates({20: 40_000.0, 80: 150_000.0, 320: 250_000.0}, setup_s=2.0, eval_s=0.5)
    tokens, seconds, est = gt.plan_tokens(plan, rates, config, clock)
    assert 4 * 280 * 320 <= tokens <= config.train.tokens and tokens % plan.token_step == 0
    assert est <= seconds < gt.DEFAULT_MAX_SECONDS - plan.wall_reserve_s - plan.report_reserve_s


def test_table_config_is_the_gpu_study_as_a_grid() -> None:
    from harness.config import load_study
    from harness.study import grid_points

    base = load_study(REPO / gt.STUDY_FILE)
    config = gt.table_config(base, gt.full_plan(), 1_230_000, 600.0, torch.device("cuda"))
    assert config.name == "wikitext2-gpu-table" and config.sampler == "grid" and config.n_trials() == 12
    assert config.train.tokens == 1_230_000 and config.train.timeout_s == 600.0
    assert (config.model, config.corpus) == (base.model, base.corpus)  # 2x650 LSTM, embedded corpus
    assert {k: v for k, v in vars(config.train).items() if k not in ("tokens", "timeout_s")} == \
        {k: v for k, v in vars(base.train).items() if k not in ("tokens", "timeout_s")}
    assert grid_points(config)[0][0] == {"bptt": 35, "batch_size": 20}  # the canonical point first
    assert config.raw["train"]["tokens"] == 1_230_000  # the stored study file says what ran


def wall_context(tmp_path: Path, clock=None):
    from harness.config import load_study
    from harness.corpus import load
    from harness.hardware import fingerprint

    device = torch.device("cpu")
    plan = gt.tiny_plan(device)
    config = gt.table_config(load_study(REPO / gt.STUDY_FILE), plan, None, 60.0, device)
    clock = clock or gt.Clock(600.0)
    return gt.WallContext(config, load(config.corpus), device, fingerprint(device), plan,
                          gt.Rates({8: 10_000.0}), clock, gt.Log(clock), tmp_path / "memory-wall.csv")


def test_wall_attempt_outcomes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ok fits; OOM and a non-OOM error on a working device are the limit; a timeout is inconclusive."""
    import harness.trainer
    from harness.trainer import TrialResult

    answers = iter([("ok", None), ("oom", "CUDA out of memory"), ("failed", "RuntimeError: too large"),
                    ("timeout", "trial exceeded its timeout")])

    def fake_run_trial(spec, corpus, device, probe=None, on_checkpoint=None):
        assert corpus.train.numel() == (spec.bptt * gt.WALL_STEPS + 2) * spec.batch_size  # tiled to fit
        assert spec.train.checkpoints == 1 and spec.train.tokens == spec.bptt * spec.batch_size * gt.WALL_STEPS
        status, error = next(answers)
        return TrialResult(status=status, error=error, bptt=spec.bptt, batch_size=spec.batch_size, steps=3)

    monkeypatch.setattr(harness.trainer, "run_trial", fake_run_trial)
    ctx = wall_context(tmp_path)
    assert [gt.wall_attempt(ctx, 16, bs, "double", deadline=1e9) for bs in (64, 128, 96, 80)] == \
        [True, False, False, None]
    rows = list(csv.DictReader(ctx.path.open()))
    assert [r["status"] for r in rows] == ["ok", "oom", "failed", "timeout"]
    assert rows[2]["error"] == "RuntimeError: too large" and not ctx.broken


def test_wall_attempt_is_not_tried_past_its_deadline(tmp_path: Path) -> None:
    ctx = wall_context(tmp_path)
    assert gt.wall_attempt(ctx, 16, 64, "double", deadline=ctx.clock.elapsed()) is None
    assert ctx.rows == [] and not ctx.path.exists()
    assert "not tried" in ctx.log.lines[-1]


# --------------------------------------------------------------------------- the script

def run_script(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BPTT_HARNESS_CACHE": str(cache)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=180, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    if torch.cuda.is_available():
        pytest.skip("the tiny rehearsal is the CPU path; on a GPU machine run make gpu-table")
    out = tmp_path_factory.mktemp("gpu-table") / "out"
    proc = run_script(["--allow-cpu", "--tiny", "--out", str(out)], tmp_path_factory.mktemp("cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_tiny_run_writes_a_normal_study_and_report(tiny_run) -> None:
    import optuna

    out, _ = tiny_run
    for name in ("study.db", "study.json", "trials.csv", "configs.csv", "report.html", "fingerprint.json",
                 "memory-wall.csv", "gpu-table.json", "gpu-table.log"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    info = json.loads((out / "study.json").read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    records = [t.user_attrs["record"] for t in study.get_trials()]
    assert {(r["config"]["bptt"], r["config"]["batch_size"]) for r in records} == {(4, 8), (4, 16), (12, 8), (12, 16)}
    assert all(r["status"] == "ok" and r["result"]["val_ppl"] for r in records)
    assert len({r["study"]["budget_tokens"] for r in records}) == 1  # an equal token budget per configuration
    assert all(r["hardware"]["machine_id"] for r in records)
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["machine_id"] == records[0]["hardware"]["machine_id"] and fp["device_label"].startswith("cpu-")
    run = json.loads((out / "gpu-table.json").read_text())
    assert run["tokens_per_config"] == records[0]["study"]["budget_tokens"] and run["grid"]["done"] == 4
    assert run["rates_measured"] and not run["grid"]["skipped"]


def test_tiny_run_maps_the_memory_wall(tiny_run) -> None:
    out, _ = tiny_run
    rows = list(csv.DictReader((out / "memory-wall.csv").open()))
    wanted = {"machine_id", "torch_version", "gpu_name", "started_at", "torch_reserved_mib", "nvml_device_mib"}
    assert wanted <= set(rows[0])
    for bptt in ("8", "16"):
        mine = [r for r in rows if r["bptt"] == bptt]
        ok = [int(r["batch_size"]) for r in mine if r["status"] == "ok"]
        oom = [int(r["batch_size"]) for r in mine if r["status"] == "oom"]
        assert ok and oom, mine
        assert max(ok) < min(oom)  # the largest fitting batch size is consistent
        assert all(r["started_at"] and r["machine_id"] for r in mine)
        assert all(r["nvml_device_mib"] == "" for r in mine)  # no invented GPU numbers on CPU
    run = json.loads((out / "gpu-table.json").read_text())
    for w in run["memory_wall"]:
        mine = [r for r in rows if int(r["bptt"]) == w["bptt"]]
        assert w["result"] == "resolved"
        assert w["largest_fit_bs"] == max(int(r["batch_size"]) for r in mine if r["status"] == "ok")
        assert w["smallest_fail_bs"] == min(int(r["batch_size"]) for r in mine if r["status"] == "oom")
        assert w["fail_status"] == "oom"


def test_tiny_run_logs_progress_and_prints_the_ranking_last(tiny_run) -> None:
    out, proc = tiny_run
    assert "grid trial 1/4" in proc.stderr and "elapsed" in proc.stderr and "left]" in proc.stderr
    assert "token budget" in proc.stderr and "memory wall bptt=16" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.index("memory wall on") < proc.stdout.index("study gpu-table-tiny: 4 trials")
    assert proc.stdout.rstrip().splitlines()[-1] in (out / "gpu-table.log").read_text()


def test_tiny_run_report_rebuilds_from_the_folder(tiny_run, tmp_path: Path) -> None:
    from harness.report import generate

    out, _ = tiny_run
    paths = generate(out, out_dir=tmp_path)  # what `harness report <folder>` does
    assert paths.html.is_file() and "gpu-table-tiny" in paths.summary


def test_rerun_with_another_budget_is_refused_before_writing(tiny_run, capsys) -> None:
    out, _ = tiny_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".csv", ".log")}
    assert gt.main(["--allow-cpu", "--tiny", "--out", str(out), "--tokens", "1234"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[-1].startswith("error: ") and "already ran with" in err[-1]  # [0] is the start line
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".csv", ".log")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("args", [[], ["--tiny"], ["--tokens", "1000"]])
def test_refuses_without_cuda(args: list[str], tmp_path: Path, corpus_cache: Path, capsys) -> None:
    out = tmp_path / "out"
    assert gt.main([*args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no CUDA GPU" in lines[0], captured.err
    assert captured.out == "" and not out.exists() and not corpus_cache.exists()


def test_cuda_is_chosen_whenever_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for argv in ([], ["--allow-cpu"], ["--allow-cpu", "--tiny"], ["--device", "cuda:1"]):
        device = gt.pick_device(gt.parse_args(argv))
        assert device.type == "cuda", argv
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gt.pick_device(gt.parse_args(["--allow-cpu"])).type == "cpu"
    assert gt.pick_device(gt.parse_args([])) is None
