"""CLI commands of the report stage: ``bptt-harness report`` and ``bptt-harness compare`` (printing happens here)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write trials.csv, configs.csv and a self-contained report.html for a study",
                       description="Rank the trials of a study by perplexity against cost and write the report.")
    p.add_argument("source", metavar="SOURCE",
                   help="results folder (results/<study> with study.json), study file (.toml) or storage URL")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL to read instead of the one in study.json (sqlite:///..., "
                        "journal:/path, postgresql://...)")
    p.add_argument("--study-name", default=None, help="study to report when the storage holds several")
    p.add_argument("--out", type=Path, default=None, help="folder to write into (default: the results folder)")

    p = sub.add_parser("compare", help="compare result sets side by side: machines, runs, or an A/B change",
                       description="Put result sets side by side (one study on several machines, two runs on one "
                                   "machine, or an A/B change such as another torch release or setting): what differs "
                                   "between them, then throughput, memory, energy and the best configuration of each.")
    p.add_argument("sources", metavar="SOURCES", nargs="+",
                   help="results folders (or study files / storage URLs); one holding several machines is split by machine")
    p.add_argument("--name", default=None, help="output goes to <out>/compare-<name>/ (default: from the sources)")
    p.add_argument("--out", type=Path, default=Path("results"), help="parent folder of compare-<name>/ (default: results)")
    p.add_argument("--storage", action="append", default=[], metavar="URL",
                   help="the full URL (with its password) of a source's storage whose study.json shows it as ***; "
                        "once per storage (BPTT_HARNESS_STORAGE holds one)")
    p.add_argument("--only-matching", action="store_true",
                   help="when the sources measure different things (corpus, model, train settings, torch release), "
                        "compare only the trials measured like the first source and say what was left out "
                        "(default: compare all and name what differs)")


def cmd_report(args: argparse.Namespace) -> int:
    from bptt_harness.report import generate

    paths = generate(args.source, storage=args.storage, study_name=args.study_name, out_dir=args.out)
    print(paths.summary)
    print()
    print(f"report:  {paths.html}")
    print(f"trials:  {paths.csv}")
    if paths.configs_csv is not None:
        print(f"configs: {paths.configs_csv}")
    if paths.summary_json is not None:
        print(f"summary: {paths.summary_json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bptt_harness.report.compare import generate_compare

    paths = generate_compare(list(args.sources), name=args.name, out_root=args.out, only_matching=args.only_matching,
                             storages=args.storage)
    print(paths.summary)
    print()
    print(f"comparison: {paths.html}")
    print(f"table:      {paths.csv}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"report": cmd_report, "compare": cmd_compare}
