"""Benchmark: the full report (frame, ranking, advice, figures, HTML, CSV) for 10,000 synthetic trials.

Goal: under 10 s. Run: ``PYTHONPATH=tests .venv/bin/python benchmarks/bench_report.py [--trials N] [--storage]``
(the synthetic records are a test fixture, ``tests/synthetic.py``).
``--storage`` also times reading the same trials back from an Optuna journal file.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from synthetic import synthetic_records

from bptt_harness.report import generate_from_records

GOAL_S = 10.0


def records(n: int, unique: bool = False) -> list[dict]:
    """About ``n`` trials: 5 bptt x 6 batch sizes x k learning rates x repeats (a large grid with repeats), or
    with ``unique`` every trial its own configuration (a long TPE study over a continuous lr)."""
    if unique:
        lrs = tuple(1.0 + 39.0 * i / math.ceil(n / 30) for i in range(math.ceil(n / 30)))
        return synthetic_records(lrs=lrs, seed=1)[:n]
    lrs = tuple(float(x) for x in (5, 10, 15, 20, 25, 30, 35, 40)[: max(1, min(8, math.ceil(n / 1000)))])
    per_rep = 5 * 6 * len(lrs)
    recs = synthetic_records(repeats=math.ceil(n / per_rep), lrs=lrs, seed=1)
    return recs[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--unique", action="store_true", help="every trial a different configuration (worst case)")
    ap.add_argument("--storage", action="store_true", help="also time loading the trials from a journal storage")
    args = ap.parse_args()
    recs = records(args.trials, args.unique)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = generate_from_records(recs, study_name="bench", out_dir=Path(tmp))
        dt = time.perf_counter() - t0
        size = paths.html.stat().st_size / 2**20
        print(f"report for {len(recs):,} trials ({len(set(r['config_key'] for r in recs)):,} configurations): "
              f"{dt:.2f} s (goal < {GOAL_S:g} s) -> report.html {size:.1f} MiB, "
              f"trials.csv {paths.csv.stat().st_size / 2**20:.1f} MiB")
        if args.storage:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend
            from synthetic import write_optuna_study

            from bptt_harness.report.source import StudySource, load_trials

            log = Path(tmp) / "journal.log"
            t1 = time.perf_counter()
            write_optuna_study(recs, JournalStorage(JournalFileBackend(str(log))), "bench")
            t2 = time.perf_counter()
            loaded = load_trials(StudySource(name="bench", storage_url=f"journal:{log}", out_dir=Path(tmp)))
            t3 = time.perf_counter()
            print(f"journal storage: writing {len(recs):,} trials {t2 - t1:.1f} s (setup), "
                  f"reading them back {t3 - t2:.2f} s ({len(loaded.records):,} records)")
    if dt > GOAL_S:
        raise SystemExit(f"slower than the {GOAL_S:g} s goal")


if __name__ == "__main__":
    main()
