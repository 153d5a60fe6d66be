"""The diagnostics of a trial, as an observer: measured at its checkpoints and at the end of training, on the
validation split, with their time and energy booked apart from training (probe phase ``"diagnose"``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bptt_harness.diagnose.run import COLUMNS, Diagnosis, diagnose
from bptt_harness.diagnose_options import DiagnoseOptions
from bptt_harness.observers import TrialObserver
from bptt_harness.record import TrialResult

if TYPE_CHECKING:
    from bptt_harness.trainer import TrialLoop

__all__ = ["DiagnosticsObserver", "PHASE", "save_model"]

PHASE = "diagnose"


class DiagnosticsObserver(TrialObserver):
    """Measures ``options.measure`` at every ``options.every``-th checkpoint and at the end of training
    (and, with ``start_options``, on the model as built, with those options). ``longest_bptt``: the study's largest bptt, which sets the
    ladders (the same for every configuration). ``period``: the text's period (a synthetic corpus's
    segment length), else 1. ``model_dir``: where ``save_model`` keeps the trained weights."""

    def __init__(self, options: DiagnoseOptions, longest_bptt: int, *, period: int = 1,
                 start_options: DiagnoseOptions | None = None, model_dir: Path | None = None) -> None:
        self.options, self.longest, self.period = options, longest_bptt, period
        self.start_options, self.model_dir = start_options, model_dir
        self.points: list[dict[str, Any]] = []
        self.diagnoses: list[tuple[str, Diagnosis]] = []   # (phase, diagnosis), in order
        self.seconds = 0.0
        self.energy_j: float | None = None
        self.checkpoints = 0
        self.start: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.saved: str | None = None

    def on_start(self, loop: TrialLoop) -> None:
        if self.start_options is not None:
            self.measure(loop, "init", self.start_options)
            self.start = self.points[-1]

    def on_validate(self, loop: TrialLoop, point: dict) -> None:
        self.checkpoints += 1
        if self.checkpoints % self.options.every == 0:
            self.measure(loop, "checkpoint")

    def after_training(self, loop: TrialLoop) -> None:
        last = self.points[-1] if self.points else None
        if last is not None and last["step"] == loop.steps and last["phase"] == "checkpoint":
            last["phase"] = "end"   # the last checkpoint is the end of training: measured once
            self.diagnoses[-1] = ("end", self.diagnoses[-1][1])
        else:
            self.measure(loop, "end")
        self.end = self.points[-1]
        if self.options.save_model and self.model_dir is not None:
            self.saved = str(save_model(loop, self.model_dir))

    def measure(self, loop: TrialLoop, phase: str, options: DiagnoseOptions | None = None) -> None:
        t0 = time.perf_counter()
        with loop.measuring(PHASE):
            found = diagnose(loop.model, loop.family, loop.corpus.valid, loop.spec.bptt, self.longest,
                             options or self.options, period=self.period)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        cost = getattr(loop.probe, "phase_cost", None)
        measured = cost(PHASE) if callable(cost) else None
        if measured is not None and measured.energy_j is not None:
            self.energy_j = measured.energy_j
        self.diagnoses.append((phase, found))
        self.points.append({"phase": phase, "step": loop.steps, "tokens": loop.tokens, "seconds": seconds,
                            **found.summary(), "curves": found.curves()})

    def fill(self, result: TrialResult) -> None:
        result.diagnostics = self.points
        if self.points:
            result.diagnose_s = self.seconds
            result.diagnose_energy_j = self.energy_j
        if self.end is not None:
            for name in COLUMNS:
                setattr(result, name, self.end[name])
        if self.saved is not None:
            result.model_path = self.saved


def save_model(loop: TrialLoop, directory: Path) -> Path:
    """The trained weights and what builds them again (``model.pt``: state dict, model and train config,
    bptt, batch size, vocabulary), in ``directory/<bptt>x<bs>-seed<seed>/``."""
    spec = loop.spec
    folder = directory / f"bptt{spec.bptt}-bs{spec.batch_size}-seed{spec.train.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in loop.model.state_dict().items()}
    torch.save({"state_dict": state, "model": vars(spec.model), "train": vars(spec.train), "bptt": spec.bptt,
                "batch_size": spec.batch_size, "vocab": list(loop.corpus.vocab)}, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({"model": vars(spec.model), "bptt": spec.bptt,
                                                    "batch_size": spec.batch_size, "train": vars(spec.train),
                                                    "corpus": loop.corpus.name}, indent=1, default=str))
    return folder / "model.pt"
