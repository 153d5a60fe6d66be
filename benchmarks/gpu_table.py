"""``make gpu-table``: the published bptt x batch-size table on this machine's GPU, from package features.

    .venv/bin/python benchmarks/gpu_table.py [--max-seconds 450] [--study studies/gpu-table.toml] [--out DIR]
    .venv/bin/python benchmarks/gpu_table.py --allow-cpu --tiny --out /tmp/rehearsal   # CPU rehearsal

1. ``bptt-harness profile``: every cell's training memory and speed from a few timed steps, and the memory
   wall (the largest batch size that fits) per bptt.
2. ``bptt-harness sweep --max-seconds``: the grid trained on the largest equal token budget that fits what
   is left of the time, planned from the profile; cells the profile saw run out of memory are
   recorded as ``oom`` without training.
3. The study's files (profile.csv, trials.csv, configs.csv, report.html, study.db) and the machine's
   fingerprint go to ``results/published/<device label>/<study>/``, as the tool wrote them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

STARTED = time.monotonic()   # --max-seconds counts from here, imports included
ROOT = Path(__file__).resolve().parents[1]
REPORT_RESERVE_S = 30.0      # kept for the report at the end
FILES = ("profile.csv", "trials.csv", "configs.csv", "report.html", "study.db", "study.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="The published bptt x batch-size table on one GPU (make gpu-table).")
    ap.add_argument("--study", type=Path, default=None, help="default studies/gpu-table.toml "
                    "(studies/gpu-table-tiny.toml with --tiny)")
    ap.add_argument("--max-seconds", type=float, default=450.0, help="cap on the whole run (default 450)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU is visible (a rehearsal)")
    ap.add_argument("--tiny", action="store_true", help="the tiny rehearsal study: not a measurement")
    ap.add_argument("--out", type=Path, default=None, help="default results/published/<device label>")
    args = ap.parse_args(argv)
    if not args.max_seconds > 0:
        ap.error(f"--max-seconds {args.max_seconds:g} must be > 0")
    args.study = args.study or ROOT / "studies" / ("gpu-table-tiny.toml" if args.tiny else "gpu-table.toml")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bptt_harness.cli import main as harness
    from bptt_harness.config import load_study
    from bptt_harness.hardware import device_label, fingerprint

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA GPU is visible; run this on a GPU machine (or --allow-cpu --tiny to rehearse)",
              file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp = fingerprint(device)
    out = args.out or ROOT / "results" / "published" / device_label(fp)
    work = out / "_work"
    config = load_study(args.study, results_root=work)
    common = ["--results-dir", str(work), "--device", device]
    rc = harness(["profile", str(args.study), *common])
    if rc:
        return rc
    left = args.max_seconds - (time.monotonic() - STARTED) - REPORT_RESERVE_S
    print(f"gpu-table: profile done; {left:.0f} s left for the trained grid", file=sys.stderr)
    rc = harness(["sweep", str(args.study), *common, "--max-seconds", f"{max(left, 1.0):.0f}"])
    if rc:
        return rc
    dest = out / config.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (config.results_dir / name).is_file():
            shutil.copy2(config.results_dir / name, dest / name)
    (dest / "fingerprint.json").write_text(json.dumps(fp, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu-table: {dest} ({time.monotonic() - STARTED:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
