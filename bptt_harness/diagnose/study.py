"""``bptt-harness diagnose STUDY``: the four measurements for a study's shapes, at initialisation and after a
short training run, before anyone runs a sweep -> ``diagnostics.csv`` (one row per shape and phase) and
``diagnostics.json`` (the curves, which the report draws)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bptt_harness.config import StudyConfig
from bptt_harness.corpus import Corpus
from bptt_harness.diagnose.observer import DiagnosticsObserver
from bptt_harness.diagnose.run import COLUMNS, text_period
from bptt_harness.diagnose_options import MEASUREMENTS, DiagnoseOptions
from bptt_harness.errors import HarnessError
from bptt_harness.fileio import write_files_atomic
from bptt_harness.spec import TrialSpec
from bptt_harness.study.objective import trial_spec
from bptt_harness.trainer import run_trial

__all__ = ["DiagnosticsRow", "StudyDiagnostics", "diagnose_study", "write_diagnostics", "study_bptts",
           "CSV_NAME", "JSON_NAME"]

CSV_NAME, JSON_NAME = "diagnostics.csv", "diagnostics.json"
SHARED_AT_INIT = ("effective_context_tokens", "gradient_reach_tokens", "truncation_bias_k")


@dataclass
class DiagnosticsRow:
    """One shape at one phase (``init``: as built; ``trained``: after the short run)."""

    model: str
    bptt: int
    batch_size: int
    phase: str
    tokens: int
    val_ppl: float | None
    effective_context_tokens: int | None
    gradient_reach_tokens: int | None
    truncation_bias_k: int | None
    noise_scale_tokens: float | None
    seconds: float
    context_tolerance: float
    reach_fraction: float
    bias_tolerance: float
    status: str = "ok"
    curves: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "curves"}


@dataclass
class StudyDiagnostics:
    study: str
    options: DiagnoseOptions
    tokens: int
    rows: list[DiagnosticsRow] = field(default_factory=list)


def study_bptts(config: StudyConfig) -> list[int]:
    """The study's bptt values (a list, or a range a grid can walk), or one line saying why not."""
    try:
        return sorted({int(v) for v in config.search["bptt"].grid()})
    except HarnessError:
        raise HarnessError("diagnose needs the study's bptt values as a list (or a range with log = true or "
                           f"step); got {config.search['bptt']}") from None


def _shape_batch(config: StudyConfig, batch_size: int | None) -> int:
    if batch_size is not None:
        if batch_size < 1:
            raise HarnessError(f"--batch-size {batch_size} must be >= 1")
        return batch_size
    sizes = sorted(int(v) for v in config.search["batch_size"].grid())
    return int(statistics.median_low(sizes))


def diagnose_study(config: StudyConfig, corpus: Corpus, device: torch.device, *, tokens: int = 40_000,
                   batch_size: int | None = None,
                   on_row: Callable[[DiagnosticsRow], None] | None = None) -> StudyDiagnostics:
    """For each of the study's bptt values (at ``batch_size``, default the median of the study's): the
    diagnostics of the model as built and after training it on ``tokens`` tokens (the study's training,
    cut short, its lr by the study's rule). The model as built is the same for every bptt (one seed), so
    its context use, reach and truncation bias are measured once, for the first shape, and shared; its
    noise scale is measured at every bptt."""
    if tokens < 1:
        raise HarnessError(f"--tokens {tokens} must be >= 1")
    # All four measurements, whatever the study's [diagnostics] picks for its trials (its tolerances and
    # sample sizes are kept): this command is the look before a sweep, and its per-trial choice is about cost.
    options = replace(config.diagnostics or DiagnoseOptions(), measure=MEASUREMENTS)
    bptts, bs = study_bptts(config), _shape_batch(config, batch_size)
    out = StudyDiagnostics(config.name, options, tokens)
    shared: dict[str, Any] = {}
    for i, bptt in enumerate(bptts):
        spec = trial_spec(config, {"bptt": bptt, "batch_size": bs}, 0)
        spec = TrialSpec(bptt=bptt, batch_size=bs, model=spec.model, train=spec.train.short(tokens=tokens))
        # As built, the model is the same for every bptt (one seed): only the noise scale, a function of the
        # bptt, is measured again; the first shape's other measurements are shared.
        at_start = options if i == 0 else replace(options, measure=("noise",))
        observer = DiagnosticsObserver(options, max(bptts), period=text_period(corpus.extra), start_options=at_start)
        result = run_trial(spec, corpus, device, observers=[observer])
        for phase, point in (("init", observer.start), ("trained", observer.end)):
            if point is None:
                continue
            if phase == "init":
                point = {**shared, **{k: v for k, v in point.items() if v is not None or k not in shared}}
                if i == 0:
                    shared = {k: point[k] for k in SHARED_AT_INIT}
                    shared["curves"] = {k: v for k, v in point["curves"].items() if k != "noise"}
                else:
                    point["curves"] = {**shared.get("curves", {}), **point["curves"]}
            row = DiagnosticsRow(
                model=spec.model.describe(), bptt=bptt, batch_size=bs, phase=phase, tokens=point["tokens"],
                val_ppl=result.val_ppl if phase == "trained" else None,
                **{c: point.get(c) for c in COLUMNS}, seconds=round(point["seconds"], 3),
                context_tolerance=options.context_tolerance, reach_fraction=options.reach_fraction,
                bias_tolerance=options.bias_tolerance,
                status=result.status if phase == "trained" else "ok", curves=point["curves"])
            out.rows.append(row)
            if on_row is not None:
                on_row(row)
        if result.status != "ok" and observer.end is None:
            row = DiagnosticsRow(model=spec.model.describe(), bptt=bptt, batch_size=bs, phase="trained",
                                 tokens=result.train_tokens, val_ppl=None, effective_context_tokens=None,
                                 gradient_reach_tokens=None, truncation_bias_k=None, noise_scale_tokens=None,
                                 seconds=0.0, context_tolerance=options.context_tolerance,
                                 reach_fraction=options.reach_fraction, bias_tolerance=options.bias_tolerance,
                                 status=result.status)
            out.rows.append(row)
            if on_row is not None:
                on_row(row)
    return out


def write_diagnostics(found: StudyDiagnostics, results_dir: Path) -> tuple[Path, Path]:
    """``diagnostics.csv`` (flat, one row per shape and phase) and ``diagnostics.json`` (with the curves and
    the options), written together or not at all."""
    csv_path, json_path = results_dir / CSV_NAME, results_dir / JSON_NAME
    frame = pd.DataFrame([r.flat() for r in found.rows])
    doc = {"study": found.study, "tokens": found.tokens, "options": asdict(found.options),
           "rows": [asdict(r) for r in found.rows]}
    results_dir.mkdir(parents=True, exist_ok=True)
    write_files_atomic({csv_path: frame.to_csv(index=False), json_path: json.dumps(doc, indent=1, default=str)})
    return csv_path, json_path
