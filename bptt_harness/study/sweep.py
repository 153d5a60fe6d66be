"""One sweep, however it is started: ``bptt-harness sweep`` and :func:`run_study` (the Python API) both open a
:class:`Sweep` and run it. One worker runs in this process; several are ``bptt-harness worker`` processes,
one per GPU or each on its share of the CPU cores, while this process shows their results.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from bptt_harness.config import StudyConfig, load_study
from bptt_harness.corpus import Corpus
from bptt_harness.errors import HarnessError
from bptt_harness.interrupt import StopRequest
from bptt_harness.progress import Display
from bptt_harness.report import ReportPaths, generate
from bptt_harness.storage import resolve_storage, storage_failure
from bptt_harness.stored import progress
from bptt_harness.study.run import prepare, run_worker
from bptt_harness.urls import STORAGE_ENV, redact

__all__ = ["Sweep", "cpu_share", "die_with_parent", "run_study", "storage_errors_as_one_line"]


@dataclass
class Sweep:
    """A prepared sweep: the study created or resumed in its storage, the corpus loaded, the device chosen."""

    config: StudyConfig
    storage_url: str
    study: optuna.Study
    corpus: Corpus
    device: Any
    workers: int = 1

    @classmethod
    def open(cls, config: StudyConfig, storage_url: str, device_name: str | None, workers: int = 1) -> Sweep:
        """Check what can be checked before training, create or resume the study, load the corpus."""
        if workers < 1:
            raise HarnessError(f"--workers {workers} must be >= 1")
        if workers > 1 and storage_url.startswith("sqlite"):
            raise HarnessError(f"storage {redact(storage_url)} is SQLite, which does not take several workers; "
                               "use --storage journal:results/<study>/journal.log or a postgresql:// URL")
        study, corpus, device = prepare(config, storage_url, device_name)
        return cls(config, storage_url, study, corpus, device, workers)

    def run(self, display: Display, stop: StopRequest | None = None) -> None:
        """Run trials until the study holds its ``n_trials()`` final ones (and any racing rounds). ``stop``: a
        recorded Ctrl-C or SIGTERM (:func:`bptt_harness.interrupt.deferred_signals`), acted on at safe points."""
        n_target = self.config.n_trials()
        if self.workers == 1:
            run_worker(self.study, self.config, self.corpus, self.device, n_target, on_result=display.result,
                       on_start=display.start, on_checkpoint=display.checkpoint, stop=stop)
        else:
            self._run_pool(n_target, display, stop)

    def _run_pool(self, n_target: int, display: Display, stop: StopRequest | None) -> None:
        procs = [subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent if sys.platform == "linux" else None)
                 for cmd, env in (self._worker_command(i, n_target) for i in range(self.workers))]
        # Trials finished before this run are not this run's lines (a resumed sweep does not print them again).
        seen = {t.number for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()}
        try:
            while True:
                alive = [p for p in procs if p.poll() is None]
                for t in self.study.get_trials(deepcopy=False):
                    if t.number not in seen and "record" in t.user_attrs and t.state.is_finished():
                        seen.add(t.number)
                        display.result(t, t.user_attrs["record"], self.study)
                if not alive:
                    break
                if stop is not None:
                    stop.check()
                time.sleep(1.0)
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            raise
        failed = [p.returncode for p in procs if p.returncode not in (0, None)]
        if failed and progress(self.study).done < n_target:
            raise HarnessError(f"{len(failed)} worker(s) exited with errors (codes {failed}); "
                               "the finished trials are stored; rerun the same command to resume")

    def _worker_command(self, index: int, n_target: int) -> tuple[list[str], dict[str, str]]:
        env, dev, threads = worker_env(index, self.device, self.workers)
        # The URL (maybe with a password) goes in the environment: a command line is visible in `ps`.
        env[STORAGE_ENV] = self.storage_url
        cmd = [sys.executable, "-m", "bptt_harness", "worker", "--study-name", self.config.name,
               "--trials", str(n_target), "--device", dev, "--results-dir", str(self.config.results_root), "--quiet"]
        if threads:
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            cmd += ["--threads", str(threads)]
            if cores:
                cmd += ["--cpus", ",".join(map(str, cpu_share(index, self.workers, cores)))]
        cmd += ["--host-workers", str(self.workers)]
        for target in self.config.log:
            cmd += ["--log", str(target)]
        return cmd, env


def die_with_parent() -> None:
    """In a pool's worker, before it runs (Linux): the kernel sends it SIGTERM when the sweep that started it
    dies, even by SIGKILL, and the worker stops as on Ctrl-C (its running trial marked, run again on resume)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def cpu_share(index: int, workers: int, cores: list[int]) -> list[int]:
    """Worker ``index``'s own cores: CPU workers that float over the same cores slow each other down in
    ways that change from trial to trial; pinned, each trial's timing depends on its own work (memory
    bandwidth is still shared, which the record's ``host_workers`` says)."""
    per = max(1, len(cores) // workers)
    start = (index * per) % len(cores)
    return cores[start:start + per]


def worker_env(index: int, device: Any, workers: int) -> tuple[dict[str, str], str, int]:
    """Pin worker ``index`` to one GPU, or give it its share of the CPU cores: (environment, device, threads)."""
    env = dict(os.environ)
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(torch.cuda.device_count())]
        if workers > len(ids):
            raise HarnessError(f"--workers {workers} but only {len(ids)} GPU(s) are visible; "
                               "one trial per GPU at a time")
        env["CUDA_VISIBLE_DEVICES"] = ids[index]
        return env, "cuda", 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    return env, "cpu", threads


@contextlib.contextmanager
def storage_errors_as_one_line(storage_url: str) -> Iterator[None]:
    """A storage that fails mid-run (full disk, read-only folder, damage found only now) is one line."""
    try:
        yield
    except HarnessError:
        raise
    except Exception as e:
        failure = storage_failure(e, storage_url)
        if failure is None:
            raise
        raise failure from None


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

    if isinstance(study, StudyConfig):
        config = study if results_dir is None else replace(study, results_root=Path(results_dir))
    else:
        config = load_study(os.fspath(study), results_root=Path(results_dir if results_dir is not None else "results"))
    if trials is not None:
        if not isinstance(trials, int) or trials < 1:
            raise HarnessError(f"trials={trials!r} must be an integer >= 1")
        config = replace(config, trials=trials)
    storage_url = resolve_storage(config, storage, workers=1)
    with storage_errors_as_one_line(storage_url), _optuna_quiet():
        sweep = Sweep.open(config, storage_url, device)
        display = Display(config.n_trials(), quiet=quiet)
        try:
            sweep.run(display)
        finally:
            display.close()
        return generate(config.results_dir, storage=storage_url, study_name=config.name)


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """While the study runs, Optuna's per-trial log lines and experimental-API warnings repeat what the
    display says; both are put back as they were afterwards."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
