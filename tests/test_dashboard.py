"""optuna-dashboard reads our studies (issue 14, item 1): named objectives in the CSV's units, flat user
attributes, constraints for every sampler, checkpoint values as intermediate values, and the dashboard's
own HTTP API on a finished smoke study."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bptt_harness.cli import main
from bptt_harness.record import trial_columns
from bptt_harness.study import open_storage

WALLS = """
name = "walls"
sampler = "grid"
max_memory_gib = 0.001

[corpus]
source = "synthetic:k=4,vocab=6,noise=2,tokens=60000"

[model]
emsize = 8
nhid = 16
layers = 1
dropout = 0.0

[train]
optimizer = "adamw"
lr = 0.01
clip = 1.0
tokens = 3000
checkpoints = 2
eval_bptt = 64

[search]
bptt = [8]
batch_size = [2, 512]
lr = [0.003, 5000.0]
"""


def load(results: Path) -> optuna.Study:
    url = f"sqlite:///{results / 'study.db'}"
    return optuna.load_study(study_name=results.name, storage=open_storage(url))


@pytest.fixture(scope="module")
def walls(tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    """A single-objective grid with an out-of-memory cell (bs 512 under a 1 MiB budget) and a diverging
    one (lr 5000)."""
    root = tmp_path_factory.mktemp("walls")
    (root / "walls.toml").write_text(WALLS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BPTT_HARNESS_CACHE", str(root / "cache"))
        assert main(["sweep", str(root / "walls.toml"), "--results-dir", str(root / "results"), "--no-report"]) == 0
    return load(root / "results" / "walls")


def test_objectives_are_named_like_the_csv_columns_and_in_their_units(smoke_results: Path) -> None:
    study = load(smoke_results)
    assert study.metric_names == ["val_ppl", "seconds_per_ktok"]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        r = t.user_attrs["record"]["result"]
        assert t.values == pytest.approx([r["val_ppl"], 1000.0 / r["tokens_per_s"]])
        assert t.values[1] == pytest.approx(r["seconds_per_ktok"])


def test_main_metrics_are_flat_user_attributes_declared_by_the_schema(smoke_results: Path) -> None:
    flat = [c.name for c in trial_columns() if c.attr]
    assert {"status", "val_ppl", "tokens_per_s", "peak_mem_mib", "joules_per_ktok", "lr", "test_ppl"} <= set(flat)
    for t in load(smoke_results).get_trials():
        rec = t.user_attrs["record"]
        assert set(flat) <= set(t.user_attrs)
        assert t.user_attrs["status"] == rec["status"] == "ok"
        assert t.user_attrs["val_ppl"] == rec["result"]["val_ppl"]
        assert t.user_attrs["peak_mem_mib"] == rec["result"]["probe"]["peak_mem_mib"] > 0
        assert t.user_attrs["joules_per_ktok"] is None or t.user_attrs["joules_per_ktok"] > 0  # no RAPL: unknown
        assert t.user_attrs["config_key"] == rec["config_key"]
        assert t.user_attrs["lr"] == rec["config"]["lr"] > 0 and t.user_attrs["test_ppl"] == rec["result"]["test_ppl"]


def test_the_diagnostics_headline_numbers_are_flat_where_a_record_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import bptt_harness.record as record

    rec = record.TrialRecord(config_key="bptt=8,batch_size=4", status="ok")
    assert not set(record.HEADLINE_DIAGNOSTICS) & set(record.user_attrs(rec))   # none measured: none shown
    flatten = record.flatten
    monkeypatch.setattr(record, "flatten", lambda r: {**flatten(r), "effective_context_tokens": 16,
                                                      "noise_scale_tokens": float("inf"), "unrelated": 1})
    attrs = record.user_attrs(rec)
    assert (attrs["effective_context_tokens"], attrs["noise_scale_tokens"]) == (16, None) and "unrelated" not in attrs


def test_grid_trials_store_constraints_and_the_best_trial_is_feasible(walls: optuna.Study) -> None:
    by_cfg = {(t.params["batch_size"], t.params["lr"]): t for t in walls.get_trials()}
    assert {k: t.user_attrs["status"] for k, t in by_cfg.items()} == {
        (2, 0.003): "ok", (2, 5000.0): "diverged", (512, 0.003): "oom", (512, 5000.0): "oom"}
    for key, t in by_cfg.items():
        assert list(t.system_attrs["constraints"]) == ([0.0] if key == (2, 0.003) else [1.0]), key
    assert walls.best_trial.number == by_cfg[(2, 0.003)].number


def test_checkpoints_are_intermediate_values_in_the_objective_unit(walls: optuna.Study) -> None:
    assert walls.metric_names == ["val_ppl"]
    ok = next(t for t in walls.get_trials() if t.user_attrs["status"] == "ok")
    curve = ok.user_attrs["record"]["result"]["val_curve"]
    assert ok.intermediate_values == pytest.approx({i: p["ppl"] for i, p in enumerate(curve)})
    assert ok.intermediate_values[len(curve) - 1] == pytest.approx(ok.value)


def test_a_study_from_before_named_objectives_keeps_its_units(tmp_path: Path) -> None:
    from bptt_harness.config import parse_study
    from bptt_harness.study import create_study, metric_names

    raw = {"name": "old", "sampler": "tpe", "objectives": ["val_ppl", "seconds_per_token"],
           "search": {"bptt": [4], "batch_size": [4]}}
    config = parse_study(raw)
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}")
    old = optuna.create_study(study_name="old", storage=storage, directions=["minimize", "minimize"])
    old.add_trial(optuna.trial.create_trial(values=[10.0, 0.001]))  # seconds per token, unnamed
    assert create_study(config, storage).metric_names is None
    fresh = parse_study({**raw, "name": "fresh"})
    assert create_study(fresh, storage).metric_names == metric_names(fresh) == ["val_ppl", "seconds_per_ktok"]


def test_cost_values_are_in_the_csv_units_and_per_token_for_old_studies() -> None:
    from bptt_harness.record import ProbeReport, TrialResult
    from bptt_harness.study import cost_value

    r = TrialResult(tokens_per_s=2000.0, train_tokens=1000, probe=ProbeReport(energy_j=4.0, peak_mem_mib=100.0))
    assert cost_value(r, "seconds_per_token") == pytest.approx(0.5)   # seconds per 1k tokens
    assert cost_value(r, "joules_per_token") == pytest.approx(4.0)    # joules per 1k tokens
    assert cost_value(r, "peak_memory") == 100.0
    assert cost_value(r, "seconds_per_token", per_ktok=False) == pytest.approx(0.0005)
    assert cost_value(r, "joules_per_token", per_ktok=False) == pytest.approx(0.004)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - 127.0.0.1 only
        return json.loads(r.read())


def test_optuna_dashboard_serves_the_study_with_names_attributes_and_constraints(smoke_results: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason="the 'dashboard' extra (pip install optuna-dashboard) is not "
                                                   "installed: make installs it where pip can reach it")
    exe = Path(sys.executable).with_name("optuna-dashboard")
    command = [str(exe)] if exe.exists() else [shutil.which("optuna-dashboard") or "optuna-dashboard"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*command, f"sqlite:///{smoke_results / 'study.db'}", "--host", "127.0.0.1",
                             "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        studies = None
        for _ in range(120):  # up to ~60 s for the server to come up on a loaded machine
            if proc.poll() is not None:
                pytest.fail(f"optuna-dashboard exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                studies = _get(f"{base}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer on 127.0.0.1"
        (summary,) = studies["study_summaries"]
        assert summary["study_name"] == "smoke"
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert detail["objective_names"] == ["val_ppl", "seconds_per_ktok"]
    assert len(detail["trials"]) == 4
    sortable = {a["key"]: a["sortable"] for a in detail["union_user_attrs"]}
    assert all(sortable[k] for k in ("val_ppl", "tokens_per_s", "seconds_per_ktok", "peak_mem_mib"))
    for t in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert attrs["status"] == "ok" and math.isfinite(float(attrs["val_ppl"]))
        assert float(attrs["val_ppl"]) == pytest.approx(t["values"][0])
        assert t["constraints"] == [0.0]
