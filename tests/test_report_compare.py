"""``bptt-harness compare``: two result sets from machines with different hardware fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from synthetic import SyntheticLaw, synthetic_records, write_optuna_study

from bptt_harness.cli import main
from bptt_harness.errors import HarnessError
from bptt_harness.report.compare import compare_frames, generate_compare
from bptt_harness.report.frame import records_to_frame


def results_folder(root: Path, name: str, records: list[dict]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'study.db'}"
    write_optuna_study(records, url, "gpu-study")
    (folder / "study.json").write_text(json.dumps({"study_name": "gpu-study", "storage": url}))
    return folder


def two_machines() -> tuple[list[dict], list[dict]]:
    small = SyntheticLaw(card_mib=16_384.0, peak_tokens_per_s=200_000.0, power_w=300.0)
    big = SyntheticLaw(card_mib=81_920.0, peak_tokens_per_s=600_000.0, power_w=500.0)
    grid = dict(bptts=(35, 70, 140, 280), batch_sizes=(20, 80, 320))
    a = synthetic_records(**grid, law=small, machine_id="aaaa1111", gpu_name="GPU Small 16GB", study="gpu-study")
    b = synthetic_records(**grid, law=big, machine_id="bbbb2222", gpu_name="GPU Big 80GB", study="gpu-study")
    return a, b


def test_compare_frames_ratios_and_feasible_regions():
    a, b = two_machines()
    cfg, summary, order = compare_frames(records_to_frame(a + b))
    assert order == ["GPU Small 16GB", "GPU Big 80GB"]
    big = cfg[cfg["machine"] == "GPU Big 80GB"].set_index("config_key")
    small = cfg[cfg["machine"] == "GPU Small 16GB"].set_index("config_key")
    key = "bptt=35,batch_size=20"
    # Same law shape, peak throughput 3x: the ratio is ~3 (noise 1%).
    assert big.loc[key, "tokens_per_s_ratio"] == pytest.approx(3.0, rel=0.05)
    assert small.loc[key, "tokens_per_s_ratio"] == pytest.approx(1.0)
    assert big.loc[key, "peak_mem_ratio"] == pytest.approx(1.0)
    # Memory 600 + 0.3 * x MiB: on 16 GiB only bptt 280 x bs 320 (26,000 MiB) runs out; on 80 GiB nothing does.
    assert set(small.index[small["status"] == "oom"]) == {"bptt=280,batch_size=320"}
    assert (big["status"] == "ok").all()
    s = summary.set_index("machine")
    assert s.loc["GPU Small 16GB", "oom"] == 1 and s.loc["GPU Big 80GB", "oom"] == 0
    assert s.loc["GPU Big 80GB", "largest_ok_tokens_per_step"] == 280 * 320
    assert s.loc["GPU Small 16GB", "largest_ok_tokens_per_step"] == 140 * 320
    assert isinstance(s.loc["GPU Big 80GB", "best"], str)


def test_generate_compare_writes_html_and_csv(tmp_path: Path):
    a, b = two_machines()
    fa = results_folder(tmp_path / "results", "small-gpu", a)
    fb = results_folder(tmp_path / "results", "big-gpu", b)
    paths = generate_compare([str(fa), str(fb)], out_root=tmp_path / "results")
    assert paths.html == tmp_path / "results" / "compare-small-gpu-vs-big-gpu" / "compare.html"
    df = pd.read_csv(paths.csv)
    assert set(df["machine"]) == {"GPU Small 16GB", "GPU Big 80GB"}
    assert {"tokens_per_s_ratio", "peak_mem_ratio", "joules_per_ktok", "status"} <= set(df.columns)
    html = paths.html.read_text()
    assert 'id="machines"' in html and 'id="side-by-side-table"' in html and "OOM" in html
    assert "2 machine(s)" in paths.summary


def test_compare_splits_one_result_set_by_machine(tmp_path: Path):
    a, b = two_machines()
    folder = results_folder(tmp_path, "mixed", a + b)
    paths = generate_compare([str(folder)], name="mixed", out_root=tmp_path)
    assert set(pd.read_csv(paths.csv)["machine"]) == {"GPU Small 16GB", "GPU Big 80GB"}


def test_same_gpu_model_on_two_hosts_gets_distinct_labels():
    a = synthetic_records(bptts=(35,), batch_sizes=(20,), machine_id="host-one-id", gpu_name="Same GPU")
    b = synthetic_records(bptts=(35,), batch_sizes=(20,), machine_id="host-two-id", gpu_name="Same GPU")
    _, _, order = compare_frames(records_to_frame(a + b))
    assert order == ["Same GPU [host-one]", "Same GPU [host-two]"]


def test_compare_cli_and_bad_name(tmp_path: Path, capsys):
    a, b = two_machines()
    fa = results_folder(tmp_path, "a", a)
    fb = results_folder(tmp_path, "b", b)
    assert main(["compare", str(fa), str(fb), "--name", "ab", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "compare-ab" / "compare.html") in out
    with pytest.raises(HarnessError, match="not a plain folder name"):
        generate_compare([str(fa)], name="../x", out_root=tmp_path)
