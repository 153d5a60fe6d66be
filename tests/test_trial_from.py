"""Re-run one row (issue 14, item 3): ``bptt-harness trial --from results/<study> --config ...`` trains that
configuration with the study's settings, and ``bptt-harness trial`` takes every study key under its own name."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

import pandas as pd
import pytest

from bptt_harness import trial_cli
from bptt_harness.cli import build_parser, main
from bptt_harness.corpus import CorpusSpec
from bptt_harness.errors import HarnessError
from bptt_harness.fieldkind import field_kind
from bptt_harness.spec import ModelConfig, TrainConfig


def trial_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["trial"]


def options() -> set[str]:
    return {o for a in trial_parser()._actions for o in a.option_strings}


def test_a_row_of_the_report_is_reproduced(smoke_results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = pd.read_csv(smoke_results / "trials.csv").set_index("config_key").loc["bptt=12,batch_size=8"]
    assert main(["trial", "--from", str(smoke_results), "--config", "bptt=12,batch_size=8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["bptt"], result["batch_size"], result["seed"]) == (12, 8, int(row["seed"]))
    assert result["train_tokens"] == row["train_tokens"] == 6000  # the study's [train] tokens
    assert result["n_params"] == row["n_params"]                   # the study's [model]
    assert result["val_ppl"] == pytest.approx(row["val_ppl"], rel=1e-4)  # same corpus, seed, settings


def test_text_mode_names_what_the_study_measured(smoke_results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", "--from", str(smoke_results), "--config", "bptt=4,batch_size=16", "--tokens", "1500",
                 "--checkpoints", "1", "--no-probe"]) == 0
    out, err = capsys.readouterr()
    measured = pd.read_csv(smoke_results / "trials.csv").set_index("config_key").loc["bptt=4,batch_size=16",
                                                                                       "val_ppl"]
    assert f"study smoke: bptt=4,batch_size=16 measured val ppl {measured:.4g} (1 run(s))" in err
    assert "train_tokens     1500" in out  # an option given with --from overrides the study's value


@pytest.mark.parametrize("args, message", [
    ([], "--from needs --config"),
    (["--config", "bptt=4"], "misses batch_size"),
    (["--config", "bptt=4,batchsize=8"], "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    (["--config", "bptt=x,batch_size=8"], "bptt='x' must be an integer"),
    (["--config", "bptt 4"], "'bptt 4' is not key=value"),
])
def test_bad_from_arguments_are_one_line(smoke_results: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         message: str) -> None:
    assert main(["trial", "--from", str(smoke_results), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_from_a_folder_that_does_not_exist_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", "--from", str(tmp_path / "results" / "nope"), "--config", "bptt=4,batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_options_are_named_like_the_study_keys() -> None:
    have = options()
    for cls in (CorpusSpec, ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in have, f.name
    assert {"--max-memory-gib", "--repeats", "--type", "--timeout-s", "--source", "--from", "--config"} <= have
    assert "--memory-cap-mib" not in have


def _other(value: object, hint: object) -> object:
    """A valid value other than the default, for an option generated from a field."""
    kind, choices = field_kind(hint)
    if kind is None and any(typing.get_origin(a) is tuple for a in (hint, *typing.get_args(hint))):
        return (0.25, 0.5)   # a tuple of fractions (anneal_at): --anneal-at 0.25,0.5
    if kind == "bool":
        return not value
    if choices:
        return next(c for c in choices if c != value)
    if kind == "int":
        return (value or 1) + 2
    return (value or 1.0) + 1.5


def test_every_train_key_reaches_the_trial() -> None:
    hints = typing.get_type_hints(TrainConfig)
    argv, want = ["trial"], {}
    for f in dataclasses.fields(TrainConfig):
        value = _other(f.default, hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        argv += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, text]
        want[f.name] = value
    ts = trial_cli.setup(trial_parser().parse_args(argv[1:] + ["--max-memory-gib", "2"]))
    for name, value in want.items():
        assert getattr(ts.spec.train, name) == value, name
    assert ts.options.memory_cap_mib == 2048  # a run option, not a [train] key


def test_model_and_corpus_keys_reach_the_trial_and_old_names_still_work() -> None:
    args = trial_parser().parse_args(["--type", "gru", "--emsize", "12", "--nhid", "12", "--layers", "3",
                                      "--dropout", "0.4", "--tied", "--factory", "mymodels:small",
                                      "--source", "synthetic:k=5", "--tokenizer", "char", "--lower", "--split-punct",
                                      "--max-vocab", "99", "--config", "bptt=7,batch_size=3,lr=2.5"])
    ts = trial_cli.setup(args)
    assert ts.spec.model == ModelConfig(type="gru", emsize=12, nhid=12, layers=3, dropout=0.4, tied=True,
                                        factory="mymodels:small")
    assert ts.corpus == CorpusSpec(source="synthetic:k=5", tokenizer="char", lower=True, split_punct=True,
                                   max_vocab=99)
    assert (ts.spec.bptt, ts.spec.batch_size, ts.spec.train.lr) == (7, 3, 2.5)
    old = trial_cli.setup(trial_parser().parse_args(["--model", "gru", "--timeout", "9", "--corpus", "x.txt"]))
    assert (old.spec.model.type, old.spec.train.timeout_s, old.corpus.source) == ("gru", 9.0, "x.txt")


def test_repeats_run_with_consecutive_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["trial", "--source", "synthetic:k=4,vocab=6,tokens=5000", "--bptt", "8", "--batch-size", "4",
            "--emsize", "8", "--nhid", "8", "--layers", "1", "--optimizer", "adamw", "--lr", "0.01",
            "--tokens", "800", "--checkpoints", "1", "--device", "cpu", "--no-probe", "--json", "--repeats", "2",
            "--seed", "5"]
    assert main(args) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in runs] == [5, 6] and runs[0]["val_ppl"] != runs[1]["val_ppl"]


def test_setup_refuses_a_bad_memory_budget() -> None:
    with pytest.raises(HarnessError, match="--max-memory-gib nan must be a number of GiB > 0"):
        trial_cli.setup(trial_parser().parse_args(["--max-memory-gib", "nan"]))


def test_building_the_command_line_loads_no_torch() -> None:
    """The trial options come from the [corpus] keys too: ``bptt-harness report`` must not wait for torch."""
    import subprocess
    import sys

    code = "import sys, bptt_harness.cli; bptt_harness.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
