"""``bptt-harness compare`` compares like with like (issue 14, item 5): trials are keyed by a hash of what they
measure (corpus, model, train settings with precision, torch release); a mismatch is refused with one
line, or left out with a visible warning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest

from bptt_harness.cli import main
from bptt_harness.errors import HarnessError
from bptt_harness.report.compare import generate_compare
from bptt_harness.report.setup import study_setup, torch_release
from synthetic import SyntheticLaw, synthetic_records, write_optuna_study

STUDY = {"name": "gpu-study", "sampler": "grid", "objectives": ["val_ppl", "seconds_per_token"],
         "corpus": {"source": "default"}, "model": {"nhid": 650, "emsize": 650},
         "train": {"tokens": 250000, "amp": "bf16"}, "search": {"bptt": [35, 70], "batch_size": [20, 80]}}


def machine(gpu: str, mid: str, *, torch: str = "2.13.0+cu128", law: SyntheticLaw = SyntheticLaw()) -> list[dict]:
    records = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), law=law, machine_id=mid, gpu_name=gpu,
                                study="gpu-study")
    for r in records:
        r["hardware"]["torch_version"] = torch
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


def test_a_study_with_other_train_settings_is_refused_with_what_differs(tmp_path: Path) -> None:
    a = folder(tmp_path, "a", machine("GPU A", "aaaa"))
    b = folder(tmp_path, "b", machine("GPU B", "bbbb"), with_train(drop=("amp",), tokens=6000))
    with pytest.raises(HarnessError) as e:
        generate_compare([str(a), str(b)], out_root=tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "b does not measure what a measures" in msg
    assert "train.amp 'bf16' vs None" in msg and "train.tokens 250000 vs 6000" in msg and "--only-matching" in msg
    assert not (tmp_path / "out").exists()


def test_two_studies_on_one_machine_are_no_longer_averaged(tmp_path: Path) -> None:
    """Before: grouped by machine and configuration only, so these two studies became one set of repeats."""
    a = folder(tmp_path, "default", machine("GPU A", "aaaa"))
    calibration = copy.deepcopy(STUDY)
    calibration["corpus"] = {"source": "synthetic:k=8"}
    b = folder(tmp_path, "calibration", machine("GPU A", "aaaa"), calibration)
    with pytest.raises(HarnessError, match="corpus.source 'default' vs 'synthetic:k=8'"):
        generate_compare([str(a), str(b)], out_root=tmp_path)


def test_only_matching_compares_what_matches_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = folder(tmp_path, "a", machine("GPU A", "aaaa"))
    b = folder(tmp_path, "b", machine("GPU B", "bbbb", torch="2.12.1+cu126"))
    c = folder(tmp_path, "c", machine("GPU C", "cccc"))
    assert main(["compare", str(a), str(b), str(c), "--name", "abc", "--out", str(tmp_path / "out")]) == 2
    assert "torch '2.13.0' vs '2.12.1'" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), str(c), "--name", "abc", "--out", str(tmp_path / "out"),
                 "--only-matching"]) == 0
    out = capsys.readouterr().out
    assert "warning: left out 4 trial(s) of b" in out and "torch '2.13.0' vs '2.12.1'" in out
    out_dir = tmp_path / "out" / "compare-abc"
    assert set(pd.read_csv(out_dir / "compare.csv")["machine"]) == {"GPU A", "GPU C"}
    assert 'class="bad warning"' in (out_dir / "compare.html").read_text()


def test_without_a_stored_study_file_the_records_decide(tmp_path: Path) -> None:
    a = folder(tmp_path, "a", machine("GPU A", "aaaa"), None)
    other = machine("GPU B", "bbbb")
    for r in other:
        r["study"]["budget_tokens"] = 1000
    b = folder(tmp_path, "b", other, None)
    with pytest.raises(HarnessError, match="record.budget_tokens 2000000 vs 1000"):
        generate_compare([str(a), str(b)], out_root=tmp_path)
    c = folder(tmp_path, "c", machine("GPU C", "cccc"), None)
    assert set(pd.read_csv(generate_compare([str(a), str(c)], out_root=tmp_path).csv)["machine"]) == {"GPU A", "GPU C"}


def test_setup_fills_defaults_and_leaves_out_what_does_not_change_a_measurement() -> None:
    explicit = with_train(lr=20.0, seed=7, timeout_s=300.0)
    assert study_setup(explicit) == study_setup(STUDY)  # lr 20 is the default; seed and timeout are not measured
    assert study_setup(with_train(tf32=False)) != study_setup(STUDY)  # precision is
    assert torch_release("2.13.0+cpu") == torch_release("2.13.0+cu128") == "2.13.0"
