"""The Python API, for a notebook or a script: run a study, read its results back.

Neither ``import bptt_harness`` nor these functions change anything process-wide (threads, OpenMP policy,
allocator settings): a notebook runs as it did before.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bptt_harness.errors import HarnessError

if TYPE_CHECKING:
    import pandas as pd

    from bptt_harness.config import StudyConfig
    from bptt_harness.report import ReportPaths


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
    from bptt_harness.report.frame import csv_frame, records_to_frame
    from bptt_harness.report.source import load_trials, resolve

    loaded = load_trials(resolve(os.fspath(source), storage=storage, study_name=study_name))
    return csv_frame(records_to_frame(loaded.records)).reset_index(drop=True)


def run_study(study: str | os.PathLike | StudyConfig, *, results_dir: str | os.PathLike | None = None,
              storage: str | None = None, trials: int | None = None, device: str | None = None,
              quiet: bool = False) -> ReportPaths:
    """Run (or resume) a study in this process, as ``bptt-harness sweep`` does with one worker, and write its
    report; returns where the report is (``.html``, ``.csv``, ``.configs_csv``, ``.summary_json``).

    Args:
        study: a study file (``studies/default.toml``) or a :class:`bptt_harness.config.StudyConfig`.
        results_dir: the parent of ``<study>/`` (default ``results``, or the config's own).
        storage: an Optuna storage URL (default: the study's, else ``results/<study>/study.db``).
        trials: finish this many trials instead of the study's ``trials``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` instead of the study's.
        quiet: no line per finished trial.

    Raises:
        HarnessError: one line for a bad study, storage or device, before anything is trained.
        KeyboardInterrupt: the running trial is marked and runs again on the next call.
    """
    from bptt_harness.config import StudyConfig, load_study
    from bptt_harness.report import generate
    from bptt_harness.study import prepare, resolve_storage, run_worker
    from bptt_harness.study_cli import Display, _storage_errors_as_one_line

    if isinstance(study, StudyConfig):
        config = study if results_dir is None else replace(study, results_root=Path(results_dir))
    else:
        config = load_study(os.fspath(study), results_root=Path(results_dir if results_dir is not None else "results"))
    if trials is not None:
        if not isinstance(trials, int) or trials < 1:
            raise HarnessError(f"trials={trials!r} must be an integer >= 1")
        config = replace(config, trials=trials)
    storage_url = resolve_storage(config, storage, workers=1)
    with _storage_errors_as_one_line(storage_url), _optuna_quiet():
        optuna_study, corpus, dev = prepare(config, storage_url, device)
        display = Display(config.n_trials(), quiet=quiet)
        try:
            run_worker(optuna_study, config, corpus, dev, config.n_trials(), on_result=display.result,
                       on_start=display.start, on_checkpoint=display.checkpoint)
        finally:
            display.close()
        return generate(config.results_dir, storage=storage_url, study_name=config.name)


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """While the study runs, Optuna's per-trial log lines and experimental-API warnings repeat what the
    display says; both are put back as they were afterwards."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
