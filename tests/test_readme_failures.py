"""The README's "What happens when things go wrong" table names every case issue 24 made hold, each with
the test that holds it to what the row says (a row removed or reworded away from the behaviour fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# A phrase of the row -> the test file whose tests make it true.
ROWS = {
    "even while a trial's memory is being released": "test_signals.py",
    "as you invoked the tool": "test_hints.py",
    "the database server goes away in the middle of a sweep": "test_database_lost.py",
    "the corpus changed since the study started": "test_study_truth.py",
    "relative to the folder, so the copy uses its own database": "test_study_truth.py",
    "is failed in Optuna and in `trials.csv` alike, and runs again": "test_study_truth.py",
    "`sqlite:///:memory:`, `postgresql://` without a database, or a bad `BPTT_HARNESS_STORAGE`": "test_clean_failures.py",
    "into a results folder it cannot write": "test_clean_failures.py",
    "chosen from the error code": "test_clean_failures.py",
    "`--threads`, `--host-workers` or `--trials` below 1": "test_worker_checks.py",
    "exactly the study's trials run": "test_worker_checks.py",
    "its workers get SIGTERM and stop as on Ctrl-C": "test_small_truths.py",
    "calls `sys.exit`, or builds a model with no trainable parameters": "test_small_truths.py",
    "more than 10,000 passes over the corpus, or `tokens` and `epochs` both set": "test_small_truths.py",
    "only where it stands alone": "test_small_truths.py",
}


def _table() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## What happens when things go wrong")
    return text[start:text.index("\n## ", start + 1)]


@pytest.mark.parametrize("phrase", list(ROWS))
def test_the_failure_table_has_the_row_and_its_test_exists(phrase: str) -> None:
    assert phrase in _table(), phrase
    assert (Path(__file__).parent / ROWS[phrase]).is_file()


def test_the_budget_bound_in_the_table_is_the_code_s() -> None:
    from bptt_harness.study.run import MAX_PASSES

    assert f"more than {MAX_PASSES:,} passes over the corpus" in _table()
