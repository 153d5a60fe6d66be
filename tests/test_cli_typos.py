"""The command line for a newcomer (issue 23): --version, and a typo gets the closest option and the help of the
subcommand it was given to, in one line."""

from __future__ import annotations

import pytest

from bptt_harness import __version__
from bptt_harness.cli import main


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"bptt-harness {__version__}\n"


@pytest.mark.parametrize("argv, words", [
    (["trial", "--bptx", "35"], "bptt-harness trial: unrecognized arguments: --bptx 35 (did you mean --bptt?); "
                                "see 'bptt-harness trial --help'"),
    (["trial", "--batchsize=3"], "(did you mean --batch-size?); see 'bptt-harness trial --help'"),
    (["sweep", "s.toml", "--trails", "3"], "(did you mean --trials?); see 'bptt-harness sweep --help'"),
    (["report", "results/x", "--out-dir", "y"], "bptt-harness report: unrecognized arguments: --out-dir y (did you mean "
                                                "--out?); see 'bptt-harness report --help'"),
    (["doctor", "--zzz"], "bptt-harness doctor: unrecognized arguments: --zzz; see 'bptt-harness doctor --help'"),
    (["sweeep", "s.toml"], "invalid choice: 'sweeep' (choose from"),
])
def test_a_typo_is_one_line_with_the_closest_option(argv: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert ("did you mean sweep?" in err) == (argv[0] == "sweeep")
    assert "did you mean" not in err or argv[0] != "doctor"   # nothing close: no guess
