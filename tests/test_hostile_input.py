"""Bad corpus parameters and special files are one line, never a traceback or a hang (issue 15), and the
small things: stale report temporaries, the corpus cache order, the grid's largest point, the study
description in the report, the truly most common error."""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import studyfiles

from bptt_harness.cli import main

REPO = Path(__file__).resolve().parent.parent
# Enough for Python and torch; far less than the sizes below would allocate, so code that tries
# fails fast (MemoryError) instead of swapping the machine.
ADDRESS_SPACE = 6 * 1024**3



def write_study(tmp_path: Path, name: str, **kw: object) -> Path:
    return studyfiles.write_study(tmp_path, name, **{"search": "bptt = [4]\nbatch_size = [2]", "tokens": 1000,  # type: ignore[arg-type]
                                                     **kw})


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def corpus_info(source: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bptt_harness", "corpus", "info", "--corpus", source], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory)


def one_line_error(code: int, err: str) -> str:
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --------------------------------------------------------------------------- corpus parameters and files

@pytest.mark.parametrize("source, says", [
    ("synthetic:k=6,seed=-1", "seed"),
    ("synthetic:k=6,tokens=1e11", "memory"),
    ("synthetic:k=6,tokens=100000000000", "memory"),
    ("synthetic:k=6,vocab=1e9", "memory"),
    ("synthetic:k=6,vocab=1000000000", "memory"),
    ("synthetic:k=6,noise=1000000000", "memory"),
    ("synthetic:k=6,tokens=2.5", "integer"),
])
def test_bad_synthetic_parameters_are_one_line(source: str, says: str, corpus_cache: Path) -> None:
    result = corpus_info(source)
    line = one_line_error(result.returncode, result.stderr)
    assert says in line and source.split(":", 1)[1].split(",")[-1] in line
    assert not corpus_cache.exists()


def test_scientific_notation_that_is_a_whole_number_is_accepted() -> None:
    from bptt_harness.corpus import SyntheticSpec

    assert SyntheticSpec.parse("synthetic:k=6,tokens=2e4").tokens == 20000


def test_a_device_is_refused_without_reading_it(corpus_cache: Path) -> None:
    result = corpus_info("/dev/zero")
    line = one_line_error(result.returncode, result.stderr)
    assert "/dev/zero" in line and "not a regular file" in line


def test_a_fifo_without_a_writer_is_refused_instead_of_hanging(tmp_path: Path, corpus_cache: Path) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    result = corpus_info(str(fifo), timeout=30)
    line = one_line_error(result.returncode, result.stderr)
    assert str(fifo) in line and "not a regular file" in line


def test_a_split_that_is_a_fifo_or_socket_is_refused(tmp_path: Path, corpus_cache: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("a b c\n" * 50)
    (d / "valid.txt").write_text("a b c\n" * 5)
    os.mkfifo(d / "test.txt")
    result = corpus_info(str(d), timeout=30)
    line = one_line_error(result.returncode, result.stderr)
    assert "test.txt" in line and "not a regular file" in line
    (d / "test.txt").unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "test.txt"))
        result = corpus_info(str(d), timeout=30)
    assert "not a regular file" in one_line_error(result.returncode, result.stderr)


def test_what_is_read_from_a_corpus_file_is_capped(tmp_path: Path, corpus_cache: Path, monkeypatch) -> None:
    import bptt_harness.corpus as corpus
    from bptt_harness.errors import HarnessError

    monkeypatch.setattr(corpus, "MAX_TEXT_BYTES", 4096)
    big = tmp_path / "big.txt"
    big.write_text("some words here\n" * 1000)
    with pytest.raises(HarnessError, match=r"big\.txt' is .* larger than the 4,096 bytes"):
        corpus.load(str(big))
    assert not corpus_cache.exists()


# --------------------------------------------------------------------------- the corpus cache

def test_a_corpus_too_short_for_one_window_is_refused_before_it_is_cached(tmp_path: Path, corpus_cache: Path,
                                                                          capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("".join(f"line {i} has a few words\n" for i in range(60)))
    code = main(["trial", "--corpus", str(text), "--bptt", "500", "--batch-size", "2", "--tokens", "100"])
    line = one_line_error(code, capsys.readouterr().err)
    assert "too short for one window" in line
    assert not corpus_cache.exists()
    study = write_study(tmp_path, "short", corpus=str(text), search="bptt = [500]\nbatch_size = [2]")
    code = main(["sweep", str(study), "--results-dir", str(tmp_path / "results")])
    assert "too short for one window" in one_line_error(code, capsys.readouterr().err)
    assert not corpus_cache.exists()
    # A corpus that fits is cached as before.
    assert main(["corpus", "info", "--corpus", str(text)]) == 0
    assert corpus_cache.exists()


def test_the_corpus_fit_check_uses_the_largest_grid_point_not_the_range_high(tmp_path: Path) -> None:
    from bptt_harness.config import load_study
    from bptt_harness.corpus import load
    from bptt_harness.errors import HarnessError
    from bptt_harness.study import check_corpus_fits

    # Doublings 4, 8, 16, 32, 64 (high = 100 is never run); the train split holds 81 rows of 16: 65 fit, 101 not.
    corpus = "synthetic:k=4,vocab=6,noise=2,tokens=1300"
    grid = load_study(write_study(tmp_path, "grid", corpus=corpus, train="eval_batch_size = 1",
                                  search="bptt = { low = 4, high = 100, log = true }\nbatch_size = [16]"))
    check_corpus_fits(grid, load(corpus))
    # A sampled range can draw 100, so there `high` is the right bound.
    with pytest.raises(HarnessError, match="bptt=100"):
        check_corpus_fits(dataclasses.replace(grid, sampler="tpe"), load(corpus))


# --------------------------------------------------------------------------- the report

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_report_temporaries_are_cleaned_and_live_ones_kept(tmp_path: Path, capsys) -> None:
    study = write_study(tmp_path, "tmps")
    results = tmp_path / "results"
    assert main(["sweep", str(study), "--results-dir", str(results)]) == 0
    folder = results / "tmps"
    host = socket.gethostname()
    stale_old = folder / ".report.html.k3j2h1g0.tmp"  # as an interrupted write leaves it
    stale_dead = folder / f".trials.csv.{host}-{_dead_pid()}.a1b2c3d4.tmp"
    live_new = folder / ".configs.csv.q9w8e7r6.tmp"  # may be another process writing right now
    live_pid = folder / f".report.html.{host}-{os.getpid()}.z9y8x7w6.tmp"
    for p in (stale_old, stale_dead, live_new, live_pid):
        p.write_text("half a report")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale_old, (hours_ago, hours_ago))
    assert main(["report", str(folder)]) == 0
    assert not stale_old.exists() and not stale_dead.exists()
    assert live_new.exists() and live_pid.exists()
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".tmp") == sorted([live_new.name, live_pid.name])


def test_the_study_description_is_in_the_report_header(tmp_path: Path) -> None:
    study = write_study(tmp_path, "described", top='description = "Does <b>bptt</b> & batch matter on the A40?"')
    results = tmp_path / "results"
    assert main(["sweep", str(study), "--results-dir", str(results)]) == 0
    html = (results / "described" / "report.html").read_text()
    header = html[html.index("<h1>"):html.index('<section id="recommendation"')]
    assert "Does &lt;b&gt;bptt&lt;/b&gt; &amp; batch matter on the A40?" in header


def test_most_common_error_is_the_most_common_kind_of_failure() -> None:
    from bptt_harness.report.advice import _nothing_finished

    trials = pd.DataFrame({
        "status": ["diverged", "diverged", "diverged", "timeout", "timeout"],
        "error": ["loss is nan at step 12", "loss is nan at step 40", "loss spiked to 1e9 at step 7",
                  "trial exceeded timeout_s = 8 s", "trial exceeded timeout_s = 8 s"],
    })
    text = _nothing_finished(trials)
    common = text.split("Most common error: ", 1)[1]
    assert common.startswith("diverged (3 of 5 trials)"), text
    assert "timeout" not in common.split(".")[0]
