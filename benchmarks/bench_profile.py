"""How fast `bptt-harness profile` maps a study: cells per second, with the memory wall under a CPU cap.

    .venv/bin/python benchmarks/bench_profile.py [--study studies/default.toml] [--cap-gib 0.25] [--steps 5]

Runs the profile of the study (every cell of its grid, one full validation timing, then the wall per
bptt under a memory cap standing in for a card) into a temporary folder and prints the attempts, the
seconds and cells per second, and the memory model's leave-one-out error on the profiled cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=Path("studies/default.toml"))
    ap.add_argument("--cap-gib", type=float, default=0.25, help="CPU memory cap standing in for a card")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import pandas as pd

    from bptt_harness.config import load_study
    from bptt_harness.hardware import resolve_device
    from bptt_harness.profile import run_profile
    from bptt_harness.profile_csv import walls_table
    from bptt_harness.report.memory import make_fit
    from bptt_harness.study import load_corpus

    with tempfile.TemporaryDirectory() as tmp:
        config = load_study(args.study, results_root=Path(tmp))
        config = dataclasses.replace(config, max_memory_gib=args.cap_gib)
        device = resolve_device("cpu")
        corpus = load_corpus(config)
        t0 = time.perf_counter()
        profile = run_profile(config, corpus, device, steps=args.steps, wall=True)
        seconds = time.perf_counter() - t0
    df = pd.DataFrame([vars(r) for r in profile.rows])
    cells = df[df["phase"] != "eval"]
    print(f"{config.name}: {len(cells)} cells ({(df['phase'] == 'grid').sum()} grid, {(df['phase'] == 'wall').sum()} "
          f"wall) in {seconds:.1f} s: {len(cells) / seconds:.2f} cells/s, cap {args.cap_gib:g} GiB")
    print(walls_table(df).to_string(index=False))
    fit_rows = cells[cells["status"].isin(("ok", "diverged")) & cells["peak_mem_mib"].notna()]
    f = make_fit(fit_rows["tokens_per_step"], fit_rows["peak_mem_mib"], config.name, False, 0.0, "profile")
    print(f"memory model on {f.n_points} cells: {f.intercept_mib:.1f} MiB + {f.slope_mib:.5f} MiB x tokens/step; "
          f"leave-one-out error median {f.loo_median_pct:.2f}%, max {f.loo_max_pct:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
