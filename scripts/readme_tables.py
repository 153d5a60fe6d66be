"""Rewrite the column tables of ``bptt_harness/report/README.md`` (trials.csv, configs.csv, profile.csv) from
their declarations.

    python scripts/readme_tables.py           # rewrite the trials.csv and configs.csv tables in place
    python scripts/readme_tables.py --check   # exit 1 when the README disagrees with the schema

A test (tests/test_report_output.py) fails when the README's tables are not what this writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bptt_harness.profile_csv import profile_columns_markdown
from bptt_harness.record import columns_markdown
from bptt_harness.report.frame import configs_markdown

README = Path(__file__).resolve().parents[1] / "bptt_harness" / "report" / "README.md"


def replace_table(text: str, header: str, table: str) -> str:
    """``text`` with the markdown table that starts at the line ``header`` replaced by ``table``."""
    lines = text.split("\n")
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[:start], *table.split("\n"), *lines[end:]])


def replace_after(text: str, heading: str, table: str) -> str:
    """``text`` with the first ``| column | meaning |`` table after ``heading`` replaced by ``table``."""
    head, sep, tail = text.partition(heading)
    return head + sep + replace_table(tail, "| column | meaning |", table)


def regenerated(text: str) -> str:
    text = replace_table(text, "| column | unit | meaning |", columns_markdown())
    text = replace_after(text, "## `configs.csv`", configs_markdown())
    return replace_after(text, "## `profile.csv`", profile_columns_markdown())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the README is up to date")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new = regenerated(text)
    if args.check:
        if new != text:
            print(f"{README}: column tables differ from the schema; run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
