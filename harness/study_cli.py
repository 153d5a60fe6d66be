"""CLI commands of the study and report stages (sweep, worker, report, compare)."""

from __future__ import annotations

import argparse

COMMANDS: dict = {}


def add_commands(sub: argparse._SubParsersAction) -> None:
    pass
