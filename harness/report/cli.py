"""CLI commands of the report stage: ``harness report`` and ``harness compare``."""

from __future__ import annotations

import argparse

COMMANDS: dict = {}


def add_commands(sub: argparse._SubParsersAction) -> None:
    pass
