"""Trials -> DataFrame -> Pareto ranking -> CSV, self-contained HTML and a console table.

The public entry points are :func:`generate` (one study) and
:func:`bptt_harness.report.compare.generate_compare` (result sets side by side). No torch: a report
needs pandas, plotly and optuna only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bptt_harness.errors import HarnessError
from bptt_harness.fileio import write_files_atomic
from bptt_harness.profile_csv import load_profile
from bptt_harness.report import console, html
from bptt_harness.report.build import Report, build
from bptt_harness.report.diagnostics import load_diagnostics
from bptt_harness.report.frame import CONFIG_COLUMNS, csv_frame, records_to_frame
from bptt_harness.report.source import load_trials, resolve, shown_storage
from bptt_harness.report.summary import summary_json

log = logging.getLogger(__name__)

__all__ = ["ReportPaths", "generate", "generate_from_records"]


@dataclass(frozen=True)
class ReportPaths:
    """What a report wrote.

    Attributes:
        csv: ``trials.csv``, one row per trial.
        html: ``report.html`` (or ``compare.html``), self-contained.
        summary: the console table and the recommendation, as text.
        configs_csv: ``configs.csv``, one row per configuration (mean, std and n over repeats).
        summary_json: ``summary.json``, the verdict as data (:mod:`bptt_harness.report.summary`).
    """

    csv: Path
    html: Path
    summary: str
    configs_csv: Path | None = None
    summary_json: Path | None = None


def generate(source: str | Path, *, storage: str | None = None, study_name: str | None = None,
             out_dir: Path | None = None) -> ReportPaths:
    """Write ``trials.csv``, ``configs.csv`` and ``report.html`` for one study; return their paths.

    Args:
        source: a results folder (``results/<study>`` with ``study.json``), a study file (``.toml``),
            or an Optuna storage URL.
        storage: open this storage instead of the one the folder names (needed when ``study.json``
            holds a password-redacted PostgreSQL URL).
        study_name: the study to report (needed when the storage holds several).
        out_dir: where to write; default the results folder (``results/<study>`` for a URL).

    Raises:
        HarnessError: a one-line message for a missing folder or study, an unreadable storage, a
            study without finished trials, or a failed write (the previous report is then intact).
    """
    src = resolve(source, storage=storage, study_name=study_name, out_dir=out_dir)
    loaded = load_trials(src)
    if not loaded.records:
        extra = f" ({loaded.n_running} still running)" if loaded.n_running else ""
        raise HarnessError(f"study {loaded.study_name!r} in storage {loaded.storage_display} has no finished "
                           f"trials{extra}; run 'bptt-harness sweep' first")
    out = src.out_dir if src.out_dir is not None else Path("results") / safe_dirname(loaded.study_name)
    # A results folder reported elsewhere (--out): its storage and its profile.csv are still the folder's.
    folder = Path(source) if Path(source).is_dir() else out
    where = "in this results folder" if folder.resolve() == out.resolve() else f"in the results folder {folder.name}"
    return generate_from_records(loaded.records, study_name=loaded.study_name, out_dir=out,
                                 storage_display=shown_storage(loaded.storage_display, folder, where), info=loaded.info,
                                 n_running=loaded.n_running, profile_dir=folder)


def safe_dirname(name: str) -> str:
    """A study name as one folder name: a name from a storage must not climb out of ``results/``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
    return cleaned


def generate_from_records(records: list[dict], *, study_name: str, out_dir: Path, storage_display: str | None = None,
                          info: dict | None = None, n_running: int = 0, profile_dir: Path | None = None) -> ReportPaths:
    """The report of already-loaded records (what :func:`generate` does after reading the storage); the study's
    ``profile.csv`` is read from ``profile_dir`` (default: ``out_dir``)."""
    if not records:
        raise HarnessError(f"study {study_name!r} has no finished trials; run 'bptt-harness sweep' first")
    trials = records_to_frame(records)
    out_dir = Path(out_dir)
    source_dir = Path(profile_dir) if profile_dir is not None else out_dir   # where the study's own files are
    rep = build(trials, study_name=study_name, storage_display=storage_display, info=info, n_running=n_running,
                profile=load_profile(source_dir), diagnostics=load_diagnostics(source_dir))
    configs_csv, summary_path = out_dir / "configs.csv", out_dir / "summary.json"
    paths = ReportPaths(csv=out_dir / "trials.csv", html=out_dir / "report.html", summary=console.summary(rep),
                        configs_csv=configs_csv, summary_json=summary_path)
    write_files_atomic({
        paths.csv: csv_frame(trials).to_csv(index=False, lineterminator="\n"),
        configs_csv: _configs_csv(rep),
        paths.html: html.render(rep),
        summary_path: summary_json(rep),
    })
    log.info("report written to %s", out_dir)
    return paths


def _configs_csv(rep: Report) -> str:
    """Per-configuration rows, ranked ones first in ranking order, then the rest."""
    ranked = rep.ranking.table
    rest = rep.configs[~rep.configs["config_key"].isin(ranked["config_key"])]
    df = pd.concat([ranked, rest], ignore_index=True) if len(ranked) else rest.copy()
    cols = [c for c in ("place", "pareto_rank", "tie") if c in df.columns]
    cols += [c for c in CONFIG_COLUMNS if c in df.columns and c not in cols]
    return csv_frame(df[cols]).to_csv(index=False, lineterminator="\n")
