"""Bad input never costs more than one line (issue 7): fuzzed CLI arguments, and nothing unsafe is loaded."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bptt_harness.cli import main

REPO = Path(__file__).resolve().parent.parent

not_a_number = st.text(alphabet="abcxyz!%-_ ", min_size=1, max_size=6).filter(lambda s: s.strip() not in ("", "-"))
bad_positive_int = st.one_of(st.integers(-10**6, 0).map(str), not_a_number, st.just("1.5"))
bad_positive_float = st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr), st.sampled_from(["nan", "inf", "-inf"]),
                               not_a_number)
# Each option with values that must be refused before any training or file writing happens.
BAD_TRIAL_ARGS = {
    "--bptt": bad_positive_int,
    "--batch-size": bad_positive_int,
    "--emsize": bad_positive_int,
    "--nhid": bad_positive_int,
    "--layers": bad_positive_int,
    "--tokens": bad_positive_int,
    "--checkpoints": bad_positive_int,
    "--lr": bad_positive_float,
    "--timeout": bad_positive_float,
    "--max-memory-gib": bad_positive_float,
    "--epochs": bad_positive_float,
    "--seconds": bad_positive_float,
    "--clip": st.one_of(st.floats(max_value=-1e-9, allow_nan=False).map(repr), st.sampled_from(["nan", "inf"])),
    "--dropout": st.one_of(st.floats(min_value=1.0, allow_nan=False, allow_infinity=False).map(repr),
                           st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr)),
    "--device": st.sampled_from(["tpu", "gpu", "cuda", "cuda:0", "", "metal"]),
    "--model": st.sampled_from(["rnn", "transformers", ""]),
    "--optimizer": st.sampled_from(["adam", "lbfgs", ""]),
    "--tokenizer": st.sampled_from(["bpe", "WORD", ""]),
    "--corpus": st.one_of(st.sampled_from(["synthetic:k=1", "synthetic:q=3", "synthetic:k=x", "/no/such/dir",
                                           "synthetic:k=4,tokens=10"]),
                          st.text(alphabet="abc/._", min_size=1, max_size=8).map(lambda s: f"/no-such-{s}")),
    "--max-vocab": st.one_of(st.integers(-5, 1).map(str), not_a_number),
}


def _assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(sorted(BAD_TRIAL_ARGS)), data=st.data())
def test_fuzzed_trial_arguments_are_one_line_errors(option: str, data, capsys, corpus_cache: Path) -> None:
    value = data.draw(BAD_TRIAL_ARGS[option])
    argv = ["trial", "--corpus", "synthetic:k=4,tokens=2000", "--tokens", "100", "--json"]
    argv = [a for a in argv]  # the option under test, given last, wins over the defaults above
    code = _run(argv + [f"{option}={value}"])
    out, err = capsys.readouterr()
    _assert_one_line_error(code, err)
    assert out == ""
    assert not corpus_cache.exists()  # nothing written, not even the corpus cache


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.sampled_from([
    ["--trials", "0"], ["--trials", "-3"], ["--trials", "x"], ["--workers", "0"], ["--workers", "two"],
    ["--storage", "mongodb://h/db"], ["--storage", "journal:"], ["--storage", ""], ["--device", "tpu"],
    ["--storage", "ftp://user:pw@h/x"], ["--bogus"],
]))
def test_bad_sweep_arguments_are_one_line_errors(args: list[str], tmp_path_factory, capsys) -> None:
    results = tmp_path_factory.mktemp("r") / "results"
    code = _run(["sweep", str(REPO / "studies" / "smoke.toml"), "--results-dir", str(results), *args])
    _, err = capsys.readouterr()
    _assert_one_line_error(code, err)
    assert "pw@" not in err
    assert not results.exists()


def test_unknown_command_and_missing_study(capsys, tmp_path: Path) -> None:
    for argv in (["frobnicate"], ["sweep", str(tmp_path / "none.toml")], ["report", str(tmp_path / "none")], []):
        code = _run(argv)
        _assert_one_line_error(code, capsys.readouterr().err)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse exits for usage errors
        return int(e.code)


def test_nothing_is_loaded_with_unrestricted_pickle() -> None:
    """No pickle, and torch.load only with weights_only=True, anywhere in the package or benchmarks."""
    offenders = []
    for path in list((REPO / "bptt_harness").rglob("*.py")) + list((REPO / "benchmarks").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            offenders.append(f"{path}: imports pickle")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path}: {call.group(0)}")
        if re.search(r"allow_pickle\s*=\s*True", text):
            offenders.append(f"{path}: allow_pickle=True")
    assert not offenders, offenders
