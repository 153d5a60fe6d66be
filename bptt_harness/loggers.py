"""Each trial's curves in the tools people already read: TensorBoard, MLflow and Weights & Biases, offline.

A :class:`TrialLogger` is a trial observer (:mod:`bptt_harness.observers`) that sends, at every training log
point (``[train] log_every``), the training loss, the gradient norm before clipping, the learning rate, the
throughput since the previous point (tokens/s) and the training peak memory so far (MiB, measured as the
record's ``peak_mem_mib``); at every checkpoint the validation loss and perplexity; and at the end the
trial's status and final numbers. The configuration goes with each run as its hyperparameters.

Every tool writes files under the folder it was given, with no server and no network:

* ``tensorboard:DIR``: event files in ``DIR/<study>/<run>/`` (``tensorboard --logdir DIR``), the
  configuration as hyperparameters (the HParams tab) and as a text summary;
* ``mlflow:DIR``: an MLflow store in the SQLite file ``DIR/mlflow.db`` (``mlflow ui --backend-store-uri
  sqlite:///DIR/mlflow.db``), one experiment per study, one run per trial, the configuration as parameters;
* ``wandb:DIR``: an offline Weights & Biases run under ``DIR/wandb/`` (``wandb sync`` uploads it later).

Each is an optional extra (``pip install -e '.[tensorboard]'``, ``'.[mlflow]'``, ``'.[wandb]'``; ``make``
installs the first two). :func:`check_installed` says before a study starts which package is missing. A
tool that fails while a trial runs loses its own run, never the trial: the failure is logged as a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bptt_harness.errors import HarnessError
from bptt_harness.observers import CpuMemoryCounter, TrialObserver
from bptt_harness.record import TrialResult
from bptt_harness.spec import LogTarget, TrialSpec

if TYPE_CHECKING:
    from bptt_harness.trainer import TrialLoop

__all__ = ["RunInfo", "mlflow_uri", "Sink", "TrialLogger", "check_installed", "hparams_of", "open_sink", "trial_loggers",
           "PACKAGES", "TRAIN_KEYS", "VAL_KEYS", "FINAL_KEYS"]

log = logging.getLogger(__name__)

# The Python package each tool needs, and the pip extra that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
# The metric names every tool gets.
TRAIN_KEYS = ("train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/memory_mib")
VAL_KEYS = ("val/loss", "val/ppl")
# At the end of the trial (step: its last optimiser step): the record's own columns.
FINAL_KEYS = {"final/val_ppl": "val_ppl", "final/best_val_ppl": "best_val_ppl", "final/test_ppl": "test_ppl",
              "final/tokens_per_s": "tokens_per_s", "final/train_s": "train_s", "final/steps": "steps"}


def check_installed(targets: Iterable[LogTarget]) -> None:
    """One line naming the first tool whose package is not installed, and how to install it."""
    for target in targets:
        module, extra = PACKAGES[target.kind]
        if importlib.util.find_spec(module) is None:
            raise HarnessError(f"log target {target}: the {module} package is not installed; install it with "
                               f".venv/bin/pip install -e '.[{extra}]' (make venv tries to), or leave it out of --log and the study's log")


@dataclass(frozen=True)
class RunInfo:
    """One trial as the tools name it: its study (an experiment or project), its run name, its configuration."""

    study: str
    name: str
    hparams: dict[str, Any]


def hparams_of(spec: TrialSpec, **extra: Any) -> dict[str, Any]:
    """The configuration as flat hyperparameters (numbers, words and booleans; unset values left out):
    ``bptt``, ``batch_size``, ``model.<key>`` and ``train.<key>``, and ``extra`` as given."""
    out: dict[str, Any] = {"bptt": spec.bptt, "batch_size": spec.batch_size}
    for prefix, part in (("model", spec.model), ("train", spec.train)):
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, bool | int | float | str) and not (isinstance(value, float) and not math.isfinite(value)):
                out[f"{prefix}.{f.name}"] = value
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


class Sink(Protocol):
    """One tool's run for one trial."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Metrics at an optimiser step."""

    def finish(self, step: int, final: dict[str, float], status: str) -> None:
        """The trial is over: its final numbers, its status; the run is closed."""


def _fresh(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``, ... where it is taken: TensorBoard merges every event file of a
    folder into one run, so a configuration run again must not write beside its earlier run."""
    n, out = 1, folder
    while out.exists():
        n += 1
        out = folder.with_name(f"{folder.name}-{n}")
    return out


class TensorBoardSink:
    """Event files in ``DIR/<study>/<run>/`` through torch's ``SummaryWriter`` (which needs the tensorboard package)."""

    def __init__(self, directory: Path, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.writer = SummaryWriter(log_dir=str(_fresh(directory / run.study / run.name)))
        self.writer.add_text("config", "    " + json.dumps(run.hparams, indent=1, sort_keys=True).replace("\n", "\n    "))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, step: int, final: dict[str, float], status: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.scalars(step, final)
        # The HParams tab: the configuration against the final numbers of this run (its scalars above).
        events = self.writer.get_logdir() and self.writer.file_writer
        assert events is not None   # SummaryWriter opens it in its constructor
        for summary in hparams(self.run.hparams, dict(final)):
            events.add_summary(summary)
        self.writer.add_text("status", status)
        self.writer.close()


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Inside, no other process holds ``lock`` (an advisory lock on the file; it is left in place, empty)."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mlflow_uri(directory: Path) -> str:
    """MLflow's tracking store in ``directory``: one SQLite file (MLflow 3 refuses its old folder-of-files store
    unless a process-wide environment variable allows it; SQLite is what it asks for instead)."""
    return f"sqlite:///{(directory.resolve() / 'mlflow.db').as_posix()}"


class MlflowSink:
    """A run in the MLflow store ``DIR/mlflow.db`` through ``MlflowClient`` (no active run, no process-wide state)."""

    def __init__(self, directory: Path, run: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        # Several workers may open the store at once: MLflow creates and migrates its tables when a client
        # first opens it, which two processes must not do together; its migrations also warn about SQLite.
        with _exclusive(directory / "mlflow.db.lock"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client = MlflowClient(tracking_uri=mlflow_uri(directory))
            experiment = self.client.get_experiment_by_name(run.study)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
                run.study, artifact_location=(directory.resolve() / "artifacts").as_uri())
            self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(run.hparams.items())]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, step: int, final: dict[str, float], status: str) -> None:
        self.scalars(step, final)
        self.client.set_tag(self.run_id, "status", status)
        self.client.set_terminated(self.run_id, "FINISHED" if status == "ok" else "FAILED")


class WandbSink:
    """An offline Weights & Biases run under ``DIR/wandb/`` (nothing is sent; ``wandb sync`` uploads it).

    wandb starts a service process, names it in the environment (``WANDB_SERVICE``) and replaces
    ``sys.excepthook``; :meth:`leave_process_as_found` stops the service and puts both back once the trial's
    runs are closed."""

    def __init__(self, directory: Path, run: RunInfo) -> None:
        import wandb

        self.excepthook, self.service_env = sys.excepthook, os.environ.get("WANDB_SERVICE")
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode="offline", dir=str(directory), project=run.study, name=run.name,
                              config=run.hparams, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, step: int, final: dict[str, float], status: str) -> None:
        self.run.log(final, step=step)
        self.run.summary.update({**final, "status": status})
        self.run.finish(exit_code=0 if status == "ok" else 1)

    def leave_process_as_found(self) -> None:
        import wandb

        wandb.teardown()
        sys.excepthook = self.excepthook
        if self.service_env is None:
            os.environ.pop("WANDB_SERVICE", None)
        else:
            os.environ["WANDB_SERVICE"] = self.service_env


def open_sink(target: LogTarget, run: RunInfo) -> Sink:
    """The run of ``run`` in the tool ``target`` names (its package must be installed: :func:`check_installed`)."""
    directory = Path(target.directory).expanduser()
    if target.kind == "tensorboard":
        return TensorBoardSink(directory, run)
    if target.kind == "mlflow":
        return MlflowSink(directory, run)
    return WandbSink(directory, run)


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class TrialLogger(TrialObserver):
    """Sends one trial's curves to each of ``targets`` (see the module's docstring for what is sent when).

    Runs are opened when the model is built (or at the end, for a trial that never got that far) and closed
    when the trial is over, whatever its status. It reads only what the loop already has on the host, plus
    the allocator's peak on CUDA, at log points: the step loop stays free of host synchronisation."""

    def __init__(self, targets: Sequence[LogTarget], run: RunInfo) -> None:
        self.targets, self.run = tuple(targets), run
        self.sinks: dict[LogTarget, Sink] | None = None
        self.opened: list[Sink] = []   # every run opened, including those a failure took out of ``sinks``
        self.sent = 0          # train_curve points already sent
        self.memory_mib: float | None = None

    def open(self) -> dict[LogTarget, Sink]:
        if self.sinks is None:
            self.sinks = {}
            for target in self.targets:
                try:
                    self.sinks[target] = open_sink(target, self.run)
                    self.opened.append(self.sinks[target])
                except Exception as e:  # noqa: BLE001 - a logging tool must not cost the trial
                    log.warning("--log %s: could not open run %s: %s", target, self.run.name, e)
        return self.sinks

    def send(self, step: int, values: dict[str, Any]) -> None:
        values = _finite(values)
        for target, sink in list(self.open().items()):
            try:
                sink.scalars(step, values)
            except Exception as e:  # noqa: BLE001
                log.warning("--log %s: stopped logging run %s: %s", target, self.run.name, e)
                self.open().pop(target, None)

    # Inside the trial, writing is measured apart (phase "log"): the training clock does not count it.

    def on_start(self, loop: TrialLoop) -> None:
        with loop.measuring("log"):
            self.open()

    def on_step(self, loop: TrialLoop) -> None:
        if len(loop.result.train_curve) > self.sent:
            now = _peak_memory_mib(loop)
            self.memory_mib = now if self.memory_mib is None or now is None else max(self.memory_mib, now)
            with loop.measuring("log"):
                self.send_train(loop.result.train_curve)

    def send_train(self, curve: list[dict]) -> None:
        for i in range(self.sent, len(curve)):
            p, before = curve[i], curve[i - 1] if i else {"tokens": 0, "seconds": 0.0}
            span = p["seconds"] - before["seconds"]
            self.send(p["step"], {"train/loss": p.get("loss"), "train/grad_norm": p.get("grad_norm"),
                                  "train/lr": p.get("lr"), "train/memory_mib": self.memory_mib,
                                  "train/tokens_per_s": (p["tokens"] - before["tokens"]) / span if span > 0 else None})
        self.sent = len(curve)

    def on_validate(self, loop: TrialLoop, point: dict) -> None:
        with loop.measuring("log"):
            self.send(point["step"], {"val/loss": point["loss"], "val/ppl": point["ppl"]})

    def fill(self, result: TrialResult) -> None:
        # Points the trial logged after the last step it finished (the one that diverged, say).
        self.send_train(result.train_curve)
        final = {key: getattr(result, name) for key, name in FINAL_KEYS.items()}
        final["final/peak_mem_mib"] = result.probe.peak_mem_mib
        for target, sink in self.open().items():
            try:
                sink.finish(result.steps, _finite(final), result.status)
            except Exception as e:  # noqa: BLE001
                log.warning("--log %s: could not close run %s: %s", target, self.run.name, e)
        # The first W&B run opened saw the process as the caller had it (several W&B folders share one service).
        first_wandb = next((sink for sink in self.opened if isinstance(sink, WandbSink)), None)
        if first_wandb is not None:
            first_wandb.leave_process_as_found()


def _peak_memory_mib(loop: TrialLoop) -> float | None:
    """The training peak memory so far, as the record's ``peak_mem_mib`` will give it: the CUDA allocator's
    reserved peak (the probe resets it at each phase switch; the caller keeps the running maximum, and
    reserved memory stays cached, so the reading is the peak), or on CPU the trainer's exact count. Host-side
    reads only."""
    if loop.device.type == "cuda":
        return torch.cuda.max_memory_reserved(loop.device) / 2**20
    counter = next((o for o in loop.observers if isinstance(o, CpuMemoryCounter)), None)
    return counter.peak / 2**20 if counter is not None and counter.started else None


def trial_loggers(targets: Sequence[LogTarget], run: RunInfo) -> list[TrialObserver]:
    """The observers to pass to ``run_trial(observers=...)``: none without targets."""
    return [TrialLogger(targets, run)] if targets else []
