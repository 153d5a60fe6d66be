"""``bptt-harness compare`` says what it compares (issue 14 item 5, issue 23): trials are keyed by a hash of what
they measure (corpus, model, train settings with precision, torch release); result sets are never pooled, what
differs between them is named on the page and in the console, and ``--only-matching`` leaves the rest out with a
visible warning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
from synthetic import SyntheticLaw, synthetic_records, write_optuna_study

from bptt_harness.cli import main
from bptt_harness.report.compare import generate_compare
from bptt_harness.report.measured_setup import study_setup, torch_release

STUDY = {"name": "gpu-study", "sampler": "grid", "objectives": ["val_ppl", "seconds_per_token"],
         "corpus": {"source": "default"}, "model": {"nhid": 650, "emsize": 650},
         "train": {"tokens": 250000, "amp": "bf16"}, "search": {"bptt": [35, 70], "batch_size": [20, 80]}}


def machine(gpu: str, mid: str, *, torch: str = "2.13.0+cu128", law: SyntheticLaw | None = None,
            malloc: str | None = None) -> list[dict]:
    records = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), law=law or SyntheticLaw(), machine_id=mid, gpu_name=gpu,
                                study="gpu-study")
    for r in records:
        r["hardware"]["torch_version"] = torch
        r["hardware"]["malloc"] = malloc
    return records


def folder(root: Path, name: str, records: list[dict], study_config: dict | None = STUDY) -> Path:
    path = root / name
    path.mkdir(parents=True)
    url = f"sqlite:///{path / 'study.db'}"
    write_optuna_study(records, url, "gpu-study")
    if study_config is not None:
        optuna.load_study(study_name="gpu-study", storage=url).set_user_attr("study_config", study_config)
    (path / "study.json").write_text(json.dumps({"study_name": "gpu-study", "storage": url}))
    return path


def with_train(drop: tuple[str, ...] = (), **changes: object) -> dict:
    study = copy.deepcopy(STUDY)
    study["train"].update(changes)
    for key in drop:
        del study["train"][key]
    return study


def test_one_study_on_two_machines_is_compared_under_one_setup(tmp_path: Path) -> None:
    a = folder(tmp_path / "published" / "gpu-a", "wikitext2-gpu", machine("GPU A", "aaaa"))
    b = folder(tmp_path / "published" / "gpu-b", "wikitext2-gpu", machine("GPU B", "bbbb", torch="2.13.0+cu126"))
    paths = generate_compare([str(a), str(b)], out_root=tmp_path / "out")
    # results/published/<machine>/<study>: named after the machines, not twice the study.
    assert paths.csv == tmp_path / "out" / "compare-gpu-a-vs-gpu-b" / "compare.csv"
    df = pd.read_csv(paths.csv)
    assert set(df["machine"]) == {"GPU A", "GPU B"} and df["setup"].nunique() == 1
    assert "warning" not in paths.summary


def test_a_study_with_other_train_settings_is_compared_with_what_differs_named(tmp_path: Path) -> None:
    """An A/B change (here: precision and budget) is what a user wants compared; the page says what differs."""
    a = folder(tmp_path, "a", machine("GPU A", "aaaa"))
    b = folder(tmp_path, "b", machine("GPU B", "bbbb"), with_train(drop=("amp",), tokens=6000))
    paths = generate_compare([str(a), str(b)], out_root=tmp_path / "out")
    assert "GPU B differs from GPU A: train.amp 'bf16' vs None, train.tokens 250000 vs 6000" in paths.summary
    assert "The machines and the setups both differ" in paths.summary
    html = paths.html.read_text()
    differs = html.split('id="what-differs"')[1].split("</table>")[0]
    assert "train.amp &#x27;bf16&#x27; vs None" in differs and "(reference)" in differs
    df = pd.read_csv(paths.csv)
    assert df.groupby("result_set")["setup"].nunique().max() == 1 and df["setup"].nunique() == 2


def test_two_studies_on_one_machine_are_two_result_sets_not_averaged(tmp_path: Path) -> None:
    """Before issue 14: grouped by machine and configuration only, so these two studies became one set of
    repeats; before issue 23: refused. Now: side by side, named by their folders, the difference said."""
    a = folder(tmp_path, "default", machine("GPU A", "aaaa"))
    calibration = copy.deepcopy(STUDY)
    calibration["corpus"] = {"source": "synthetic:k=8"}
    b = folder(tmp_path, "calibration", machine("GPU A", "aaaa"), calibration)
    paths = generate_compare([str(a), str(b)], out_root=tmp_path)
    df = pd.read_csv(paths.csv)
    assert set(df["result_set"]) == {"default", "calibration"} and set(df["machine"]) == {"GPU A"}
    assert (df.groupby(["result_set", "config_key"])["n"].max() == 1).all()  # one run each, never pooled
    assert "calibration differs from default: corpus.source 'default' vs 'synthetic:k=8'" in paths.summary
    assert "Same machine; the setups differ" in paths.summary


def test_only_matching_compares_what_matches_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = folder(tmp_path, "a", machine("GPU A", "aaaa"))
    b = folder(tmp_path, "b", machine("GPU B", "bbbb", torch="2.12.1+cu126"))
    c = folder(tmp_path, "c", machine("GPU C", "cccc"))
    assert main(["compare", str(a), str(b), str(c), "--name", "abc", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "GPU B differs from GPU A: torch '2.13.0' vs '2.12.1'" in out and "warning" not in out
    assert main(["compare", str(a), str(b), str(c), "--name", "abc", "--out", str(tmp_path / "out"),
                 "--only-matching"]) == 0
    out = capsys.readouterr().out
    assert "warning: left out 4 trial(s) of b" in out and "torch '2.13.0' vs '2.12.1'" in out
    out_dir = tmp_path / "out" / "compare-abc"
    assert set(pd.read_csv(out_dir / "compare.csv")["machine"]) == {"GPU A", "GPU C"}
    assert 'class="bad warning"' in (out_dir / "compare.html").read_text()


def test_the_allocator_setting_is_part_of_the_setup_where_recorded(tmp_path: Path) -> None:
    """CPU throughput depends on it (bptt_harness/allocator.py); a record older than the column says nothing."""
    a = folder(tmp_path, "a", machine("GPU A", "aaaa", malloc="kept"))
    b = folder(tmp_path, "b", machine("GPU B", "bbbb", malloc="default (BPTT_HARNESS_MALLOC=default)"))
    paths = generate_compare([str(a), str(b)], out_root=tmp_path / "ab")
    assert "GPU B differs from GPU A: malloc 'kept' vs 'default (BPTT_HARNESS_MALLOC=default)'" in paths.summary
    differs = paths.html.read_text().split('id="what-differs"')[1].split("</table>")[0]
    assert "kept" in differs and "BPTT_HARNESS_MALLOC=default" in differs
    old = folder(tmp_path, "old", machine("GPU C", "cccc"))
    paths = generate_compare([str(a), str(old)], out_root=tmp_path / "ac")
    assert "differs from" not in paths.summary
    assert "not recorded" in paths.html.read_text().split('id="what-differs"')[1].split("</table>")[0]


def test_results_of_two_revisions_of_a_familys_model_are_different_setups(tmp_path: Path) -> None:
    """A record older than the column is revision 1; a family whose code changed its results is named."""
    old = folder(tmp_path, "old", machine("GPU A", "aaaa"))
    new = machine("GPU A", "aaaa")
    for r in new:
        r["config"]["model_revision"] = 2
    paths = generate_compare([str(old), str(folder(tmp_path, "new", new))], out_root=tmp_path / "out")
    assert "new differs from old: model_revision 1 vs 2" in paths.summary
    same = machine("GPU A", "aaaa")
    for r in same:
        r["config"]["model_revision"] = 1
    paths = generate_compare([str(old), str(folder(tmp_path, "same", same))], out_root=tmp_path / "out2")
    assert "differs from" not in paths.summary


def test_without_a_stored_study_file_the_records_decide(tmp_path: Path) -> None:
    a = folder(tmp_path, "a", machine("GPU A", "aaaa"), None)
    other = machine("GPU B", "bbbb")
    for r in other:
        r["study"]["budget_tokens"] = 1000
    b = folder(tmp_path, "b", other, None)
    assert "record.budget_tokens 2000000 vs 1000" in generate_compare([str(a), str(b)], out_root=tmp_path).summary
    c = folder(tmp_path, "c", machine("GPU C", "cccc"), None)
    paths = generate_compare([str(a), str(c)], out_root=tmp_path)
    assert set(pd.read_csv(paths.csv)["machine"]) == {"GPU A", "GPU C"}
    assert "Same setup on different machines" in paths.summary and "differs from" not in paths.summary


def test_setup_fills_defaults_and_leaves_out_what_does_not_change_a_measurement() -> None:
    explicit = with_train(lr=20.0, seed=7, timeout_s=300.0)
    assert study_setup(explicit) == study_setup(STUDY)  # lr 20 is the default; seed and timeout are not measured
    assert study_setup(with_train(tf32=False)) != study_setup(STUDY)  # precision is
    assert torch_release("2.13.0+cpu") == torch_release("2.13.0+cu128") == "2.13.0"
