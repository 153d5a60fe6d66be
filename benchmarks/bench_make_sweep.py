"""How long `make sweep` takes here: `bptt-harness sweep studies/default.toml` end to end, as on a fresh
clone (empty corpus cache, new results folder; the venv already installed), with its racing runs.

Prints the wall-clock time, the trials (first pass and racing), their summed training and validation
seconds, and the recommendation. The budget is 10 minutes on 2 cores. On a machine shared with other
jobs, run it with ``--threads 1``: torch's two threads then do not wait on each other's descheduled cores
(which makes validation several times slower), and the sweep's CPU time is an upper bound for its wall
time on a quiet 2-core machine.

    .venv/bin/python benchmarks/bench_make_sweep.py [--study studies/default.toml] [--threads 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_S = 600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=str(REPO / "studies" / "default.toml"))
    parser.add_argument("--keep", default=None, help="write the results here instead of a temporary folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the sweep (default: torch's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(args.keep) if args.keep else Path(tmp) / "results"
        env = {**os.environ, "BPTT_HARNESS_CACHE": str(Path(tmp) / "cache")}  # a fresh clone tokenises once
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "bptt_harness", "sweep", args.study, "--results-dir", str(results)],
                             cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        if out.returncode != 0:
            sys.exit(f"sweep failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        name = next(p for p in results.iterdir() if (p / "trials.csv").is_file())
        with open(name / "trials.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    raced = sum(1 for r in rows if r.get("repeat") not in (None, "", "0"))
    train = sum(float(r["train_s"] or 0) for r in rows)
    evals = sum(float(r["eval_s"] or 0) for r in rows)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"study {args.study}: {len(rows)} trials ({len(rows) - raced} first pass, {raced} more seeds), "
          f"{cores} cores")
    # The sweep keeps about one core busy (cpu_util_pct ~100%), so on a quiet machine its wall time is about
    # its CPU time; on a shared one the wall time is longer and the CPU time is the better estimate.
    print(f"wall {wall:.0f} s ({wall / 60:.1f} min; limit {LIMIT_S / 60:.0f} min), CPU time {cpu:.0f} s "
          f"({cpu / wall:.0%} of one core): training {train:.0f} s, validation {evals:.0f} s summed over trials")
    lines = out.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Recommendation:")), len(lines))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("- ", "note:"))), len(lines))
    print(" ".join(lines[start:end]))
    if wall > LIMIT_S:
        print(f"over the {LIMIT_S / 60:.0f}-minute budget", file=sys.stderr)


if __name__ == "__main__":
    main()
