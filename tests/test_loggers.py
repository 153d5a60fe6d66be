"""bptt_harness.loggers: each trial's curves in TensorBoard, MLflow and W&B, read back with the real packages (issue 23)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from studyfiles import write_study

from bptt_harness.cli import main
from bptt_harness.config import parse_study, with_log
from bptt_harness.corpus import Corpus
from bptt_harness.errors import HarnessError
from bptt_harness.loggers import RunInfo, check_installed, hparams_of, mlflow_uri, trial_loggers
from bptt_harness.model import ModelConfig
from bptt_harness.spec import LogTarget, parse_log_targets
from bptt_harness.trainer import TrainConfig, TrialResult, TrialSpec, run_trial

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(emsize=8, nhid=16, layers=1, dropout=0.0)
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="the wandb extra is not installed (pip install -e '.[wandb]')")
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")


def spec(**train: Any) -> TrialSpec:
    train = {"optimizer": "adamw", "lr": 1e-2, "tokens": 3_200, "checkpoints": 2, "log_every": 10, **train}
    return TrialSpec(bptt=10, batch_size=8, model=TINY, train=TrainConfig(**train))


def logged_trial(corpus: Corpus, targets: list[LogTarget], s: TrialSpec | None = None, name: str = "run") -> TrialResult:
    s = s or spec()
    return run_trial(s, corpus, "cpu", observers=trial_loggers(targets, RunInfo("tiny", name, hparams_of(s, repeat=0))))


# --------------------------------------------------------------------------- which tool, where


def test_targets_parse_and_name_what_is_wrong() -> None:
    assert parse_log_targets(["tensorboard:runs", "mlflow:ml", "tensorboard:runs"]) == (
        LogTarget("tensorboard", "runs"), LogTarget("mlflow", "ml"))
    assert str(LogTarget.parse("wandb:/tmp/w")) == "wandb:/tmp/w"
    with pytest.raises(HarnessError, match=r"unknown tool 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        LogTarget.parse("tensorbord:runs")
    with pytest.raises(HarnessError, match="is not KIND:DIR"):
        LogTarget.parse("runs")
    with pytest.raises(HarnessError, match="names no folder"):
        LogTarget.parse("mlflow:")


def test_study_key_log(tmp_path: Path) -> None:
    from bptt_harness.config import load_study

    config = load_study(write_study(tmp_path, top='log = ["tensorboard:runs"]'))
    assert config.log == (LogTarget("tensorboard", "runs"),)
    assert with_log(config, ["mlflow:ml", "tensorboard:runs"]).log == (LogTarget("tensorboard", "runs"),
                                                                       LogTarget("mlflow", "ml"))
    raw = dict(config.raw)
    for bad, words in (("tensorboard:runs", "must be a list"), (["tensorflow:runs"], "did you mean 'tensorboard'")):
        with pytest.raises(HarnessError, match=words):
            parse_study({**raw, "log": bad})


def test_a_missing_package_is_one_line_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    check_installed([LogTarget("tensorboard", "x")] if real("tensorboard") else [])
    with pytest.raises(HarnessError, match=r"log target mlflow:ml: the mlflow package is not installed; .*\[mlflow\]"):
        check_installed([LogTarget("mlflow", "ml")])


def test_hparams_are_the_configuration_flat() -> None:
    h = hparams_of(spec(lr=0.02), trial=3, note=None)
    assert (h["bptt"], h["batch_size"], h["train.lr"], h["model.nhid"], h["trial"]) == (10, 8, 0.02, 16, 3)
    assert "note" not in h and all(isinstance(v, bool | int | float | str) for v in h.values())


# --------------------------------------------------------------------------- TensorBoard, read back


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tb_hparams(folder: Path) -> dict[str, Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value")
            else v.bool_value for k, v in info.hparams.items()}


@needs_tensorboard
def test_tensorboard_gets_every_log_point(syn: Corpus, tmp_path: Path) -> None:
    r = logged_trial(syn, [LogTarget("tensorboard", str(tmp_path / "tb"))])
    assert r.status == "ok"
    run = tmp_path / "tb" / "tiny" / "run"
    got = _tb_scalars(run)
    curve = r.train_curve
    assert [s for s, _ in got["train/loss"]] == [p["step"] for p in curve] == list(range(10, 41, 10))
    for key in ("loss", "grad_norm", "lr"):
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([p[key] for p in curve], rel=1e-6)
    # tokens/s between log points, from the curve's training seconds; memory as peak_mem_mib counts it (CPU)
    first = curve[0]["tokens"] / curve[0]["seconds"]
    assert got["train/tokens_per_s"][0][1] == pytest.approx(first, rel=1e-5)
    memory = [v for _, v in got["train/memory_mib"]]
    assert all(0 < m <= r.probe.peak_mem_mib + 1e-6 for m in memory) and memory == sorted(memory)
    assert [(s, v) for s, v in got["val/ppl"]] == [(p["step"], pytest.approx(p["ppl"], rel=1e-6)) for p in r.val_curve]
    assert got["final/val_ppl"] == [(r.steps, pytest.approx(r.val_ppl, rel=1e-6))]
    hp = _tb_hparams(run)
    assert (hp["bptt"], hp["batch_size"], hp["train.lr"], hp["model.type"]) == (10, 8, pytest.approx(0.01), "lstm")


@needs_tensorboard
def test_tensorboard_closes_a_diverged_trial_and_keeps_runs_apart(syn: Corpus, tmp_path: Path) -> None:
    target = LogTarget("tensorboard", str(tmp_path / "tb"))
    r = logged_trial(syn, [target], spec(optimizer="sgd", lr=1e6, clip=0.0))
    assert r.status == "diverged"
    got = _tb_scalars(tmp_path / "tb" / "tiny" / "run")
    # the point that showed the blow-up was logged too, though no step finished after it
    assert [s for s, _ in got["train/grad_norm"]] == [p["step"] for p in r.train_curve] != []
    assert "final/val_ppl" not in got
    logged_trial(syn, [target], spec(tokens=800))   # the same run name again: a run of its own beside it
    assert sorted(p.name for p in (tmp_path / "tb" / "tiny").iterdir()) == ["run", "run-2"]


def test_a_broken_tool_never_costs_the_trial(syn: Corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def __init__(self) -> None:
            self.calls = 0

        def scalars(self, step: int, values: dict) -> None:
            self.calls += 1
            raise OSError("disk full")

        def finish(self, step: int, final: dict, status: str) -> None:
            raise AssertionError("a sink that failed is not called again")

    broken = Broken()
    [logger] = trial_loggers([LogTarget("tensorboard", "unused")], RunInfo("tiny", "run", {}))
    logger.sinks = {LogTarget("tensorboard", "unused"): broken}   # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="bptt_harness.loggers"):
        r = run_trial(spec(), syn, "cpu", observers=[logger])
    assert r.status == "ok" and broken.calls == 1
    assert "stopped logging run run: disk full" in caplog.text


# --------------------------------------------------------------------------- MLflow, read back


@needs_mlflow
def test_mlflow_run_per_trial_with_parameters_and_curves(syn: Corpus, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    r = logged_trial(syn, [LogTarget("mlflow", str(tmp_path / "ml"))], name="0001-bptt=10,batch_size=8-seed0")
    assert r.status == "ok"
    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "ml"))
    experiment = client.get_experiment_by_name("tiny")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "0001-bptt=10,batch_size=8-seed0" and run.info.status == "FINISHED"
    assert (run.data.params["bptt"], run.data.params["train.optimizer"], run.data.tags["status"]) == ("10", "adamw", "ok")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (p["step"], pytest.approx(p["loss"], rel=1e-9)) for p in r.train_curve]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ppl")] == [p["step"] for p in r.val_curve]
    assert run.data.metrics["final/val_ppl"] == pytest.approx(r.val_ppl)
    assert run.data.metrics["final/peak_mem_mib"] == pytest.approx(r.probe.peak_mem_mib)
    assert math.isfinite(run.data.metrics["train/tokens_per_s"])


@needs_mlflow
def test_two_workers_open_one_fresh_mlflow_store_together(tmp_path: Path) -> None:
    """MLflow creates its tables when the first client opens the store: two workers doing it at once lost a run."""
    import subprocess

    from mlflow.tracking import MlflowClient

    code = ("import sys; from pathlib import Path; from bptt_harness.loggers import MlflowSink, RunInfo; "
            "s = MlflowSink(Path(sys.argv[1]), RunInfo('pool', sys.argv[2], {'bptt': 4})); s.finish(1, {'x': 1.0}, 'ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ml"), f"run{i}"], stderr=subprocess.PIPE)
             for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert not any(b"could not" in p.stderr.read() for p in procs)
    client = MlflowClient(tracking_uri=mlflow_uri(tmp_path / "ml"))
    runs = client.search_runs([client.get_experiment_by_name("pool").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("run0", "FINISHED"), ("run1", "FINISHED")]


# --------------------------------------------------------------------------- W&B offline, read back


def _wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's ``.wandb`` file (wandb ships no reader for it): a 7-byte file header
    (``:W&B``, magic, version), then records in 32 KiB blocks, each chunk behind a 7-byte header (checksum,
    length, type: 1 full, 2 first, 3 middle, 4 last), a block's tail shorter than a header left empty."""
    from wandb.proto import wandb_internal_pb2

    data, out, pos, chunk = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return out


@needs_wandb
def test_wandb_offline_run_and_the_process_as_found(syn: Corpus, tmp_path: Path) -> None:
    hook, service = sys.excepthook, os.environ.get("WANDB_SERVICE")
    r = logged_trial(syn, [LogTarget("wandb", str(tmp_path / "wb"))])
    assert r.status == "ok"
    assert sys.excepthook is hook and os.environ.get("WANDB_SERVICE") == service
    [path] = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(path)
    [run] = [x.run for x in records if x.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert (run.project, run.display_name, config["bptt"], config["train.lr"]) == ("tiny", "run", 10, 0.01)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in x.history.item} for x in records
               if x.WhichOneof("record_type") == "history"]
    train = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train] == [p["step"] for p in r.train_curve]
    assert [h["train/grad_norm"] for h in train] == pytest.approx([p["grad_norm"] for p in r.train_curve])
    assert [h["val/ppl"] for h in history if "val/ppl" in h] == pytest.approx([p["ppl"] for p in r.val_curve])
    [exit_record] = [x.exit for x in records if x.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


# --------------------------------------------------------------------------- the commands


@needs_tensorboard
def test_trial_command_logs_and_refuses_an_unknown_tool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["trial", "--source", "synthetic:k=4,vocab=8,noise=4,tokens=20000", "--bptt", "8", "--batch-size", "4",
            "--nhid", "8", "--emsize", "8", "--layers", "1", "--tokens", "640", "--checkpoints", "1", "--no-probe",
            "--json", "--device", "cpu"]
    assert main([*args, "--log", "tensorbaord:" + str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'tensorboard'" in err
    assert main([*args, "--log", f"tensorboard:{tmp_path / 'tb'}"]) == 0
    [run] = (tmp_path / "tb" / "trial").iterdir()
    assert run.name == "bptt=8,batch_size=4-seed0"
    record = json.loads(capsys.readouterr().out)
    assert [s for s, _ in _tb_scalars(run)["val/ppl"]] == [p["step"] for p in record["val_curve"]]


@needs_tensorboard
def test_sweep_logs_one_run_per_trial(tmp_path: Path) -> None:
    study = write_study(tmp_path, top=f'log = ["tensorboard:{tmp_path / "tb"}"]', tokens=640)
    assert main(["sweep", str(study), "--results-dir", str(tmp_path / "results"), "--no-report",
                 "--log", f"tensorboard:{tmp_path / 'tb2'}"]) == 0
    for folder in ("tb", "tb2"):
        runs = sorted(p.name for p in (tmp_path / folder / "tiny").iterdir())
        assert runs == ["0000-bptt=4,batch_size=4-seed0", "0001-bptt=8,batch_size=4-seed0"]
    assert _tb_hparams(tmp_path / "tb" / "tiny" / runs[1])["config_key"] == "bptt=8,batch_size=4"
