"""The Python API, for a notebook or a script: read a study's results back (without torch); running one is
:func:`bptt_harness.study.sweep.run_study`.

Neither ``import bptt_harness`` nor these functions change anything process-wide (threads, OpenMP policy,
allocator settings): a notebook runs as it did before.
"""

from __future__ import annotations

import os

import pandas as pd

from bptt_harness.report.frame import csv_frame, records_to_frame
from bptt_harness.report.source import load_trials, resolve

__all__ = ["load_results"]


def load_results(source: str | os.PathLike, *, storage: str | None = None,
                 study_name: str | None = None) -> pd.DataFrame:
    """The ``trials.csv`` frame of a study, read from its storage: one row per trial, the same rows and
    columns as ``trials.csv`` (documented in ``bptt_harness/report/README.md``).

    Args:
        source: a results folder (``results/<study>``), a study file (``.toml``) or an Optuna storage URL.
        storage: open this storage instead of the one the folder records (a PostgreSQL password).
        study_name: the study, when the storage holds several.

    Raises:
        HarnessError: one line naming a missing folder, storage or study.
    """
    loaded = load_trials(resolve(os.fspath(source), storage=storage, study_name=study_name))
    return csv_frame(records_to_frame(loaded.records)).reset_index(drop=True)
