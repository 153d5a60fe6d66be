"""``bptt-harness sweep`` and ``bptt-harness worker``: run a study with a live progress display."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bptt_harness.errors import HarnessError
from bptt_harness.interrupt import StopRequest, deferred_signals
from bptt_harness.progress import Eta, EtaColumn, checkpoint_line
from bptt_harness.spec import LOG_HELP
from bptt_harness.urls import STORAGE_ENV, hides_password


class SweepInterrupted(HarnessError):
    exit_code = 130


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run (or resume) a study file and write its report")
    p.add_argument("study", help="a study file, e.g. studies/default.toml")
    p.add_argument("--trials", type=int, default=None, help="finish this many trials (default: the study's)")
    p.add_argument("--storage", default=None,
                   help="sqlite:///file.db, journal:file.log or postgresql://user@host/db (default: "
                        f"${STORAGE_ENV} if set, else results/<study>/study.db)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes on this host: one per visible GPU, or CPU workers sharing the cores")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's)")
    p.add_argument("--results-dir", default="results", help="where results/<study>/ goes")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="plan the token budget so the whole sweep fits this many seconds, from the study's "
                        "profile (run bptt-harness profile first); a resumed study keeps its planned budget")
    p.add_argument("--log", action="append", default=None, metavar="KIND:DIR", help=LOG_HELP)

    p = sub.add_parser("worker", help="join a running study from this machine (same storage and study name)")
    p.add_argument("--study-name", required=True)
    p.add_argument("--storage", default=None,
                   help=f"the study's storage URL (default: ${STORAGE_ENV}, which keeps a password out of `ps`)")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for this worker")
    p.add_argument("--cpus", default=None, help="pin this worker to these CPU cores, e.g. 0,1 (Linux)")
    p.add_argument("--host-workers", type=int, default=1,
                   help="workers running on this host at once (recorded with each trial)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines (the parent sweep prints them)")
    p.add_argument("--log", action="append", default=None, metavar="KIND:DIR", help=LOG_HELP)


class Display:
    """One line per finished trial, plus a live bar on a terminal: n/N, current config, ETA, best, counts.
    Trials expected to take ``checkpoint_after_s`` or more also get a line per validation checkpoint."""

    def __init__(self, total: int, quiet: bool = False, checkpoint_after_s: float = 10.0) -> None:
        from rich.console import Console

        self.total, self.quiet, self.checkpoint_after_s = total, quiet, checkpoint_after_s
        self.eta = Eta(total)
        self.params: dict[int, str] = {}
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal and not quiet
        self.started = time.monotonic()
        self.finished_here = 0
        self.bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                EtaColumn(self.eta), console=self.console, transient=True)
            self.task = self.bar.add_task("starting", total=total)
            self.bar.start()

    def set_done(self, done: int) -> None:
        self.eta.done = done
        if self.bar:
            self.bar.update(self.task, completed=done)

    def start(self, trial: Any, params: dict) -> None:
        self.eta.start_trial()
        self.params[trial.number] = _fmt_params(params)
        if self.bar:
            self.bar.update(self.task, description=f"trial {trial.number}: {_fmt_params(params)}")

    def checkpoint(self, trial: Any, point: dict) -> None:
        """Inside a trial: the ETA learns from it; a long trial prints its validation perplexity so far."""
        self.eta.checkpoint((point["index"] + 1) / point["of"])
        params = self.params.get(trial.number, "")
        if self.bar:
            self.bar.update(self.task, description=f"trial {trial.number}: {params}, checkpoint "
                                                   f"{point['index'] + 1}/{point['of']} val ppl {point['ppl']:.4g}")
        per = self.eta.per_trial()
        if not self.quiet and per is not None and per >= self.checkpoint_after_s:
            self.console.print(checkpoint_line(trial.number, params, point))

    def result(self, trial: Any, record: dict, study: Any = None) -> None:
        from bptt_harness.study import progress

        self.finished_here += 1
        p = progress(trial.study if study is None else study)
        if study is None:  # called from inside the trial, which is still RUNNING in the storage
            p.done += 1
            p.counts[record["status"]] = p.counts.get(record["status"], 0) + 1
        self.set_done(p.done)
        self.eta.finish_trial(p.done)
        if self.quiet:
            return
        r = record["result"]
        ppl = f"val_ppl {r['val_ppl']:.2f}" if r.get("val_ppl") else ""
        tps = f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""
        best = p.best.user_attrs["record"] if p.best else None
        if record["status"] == "ok" and r.get("val_ppl") and (best is None or r["val_ppl"] < best["result"]["val_ppl"]):
            best = record  # the trial just finished may be the new best
        best_s = f"best {best['result']['val_ppl']:.2f} ({best['config_key']})" if best else "best -"
        left = self.eta.seconds_left()
        eta = _fmt_s(left) if left is not None else "?"
        counts = " ".join(f"{k} {v}" for k, v in sorted(p.counts.items()))
        error = f" ({record['error'][:80]})" if record["status"] != "ok" and record.get("error") else ""
        self.console.print(f"[{p.done}/{self.total}] {record['config_key']}: {record['status']}{error} "
                           f"{ppl} {tps} {r.get('wall_s', 0):.1f}s | {best_s} | {counts} | ETA {eta}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _report(config: Any, storage_url: str) -> None:
    from bptt_harness.report import generate

    paths = generate(config.results_dir, storage=storage_url, study_name=config.name)
    print(paths.summary)
    print(f"\nreport: {paths.html}\ntrials: {paths.csv}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from bptt_harness.config import load_study, redact, with_log
    from bptt_harness.loggers import check_installed
    from bptt_harness.study import prepare, progress, resolve_storage, run_worker

    config = with_log(load_study(args.study, results_root=Path(args.results_dir)), args.log)
    check_installed(config.log)
    if args.trials is not None:
        if args.trials < 1:
            raise HarnessError(f"--trials {args.trials} must be >= 1")
        config = replace(config, trials=args.trials)
    workers = args.workers if args.workers is not None else config.workers
    if workers < 1:
        raise HarnessError(f"--workers {workers} must be >= 1")
    storage_url = resolve_storage(config, _given_storage(args), workers)
    if args.max_seconds is not None:
        from bptt_harness.study import plan_budget

        if not args.max_seconds > 0:
            raise HarnessError(f"--max-seconds {args.max_seconds:g} must be > 0")
        # Planned as if one worker ran every trial: with several GPU workers the sweep ends earlier.
        config, tokens, planned = plan_budget(config, storage_url, args.max_seconds)
        print(f"budget: {tokens:,} training tokens per trial "
              + (f"(planned from profile.csv to fit {args.max_seconds:g} s)" if planned else
                 "(planned when this study started)"), file=sys.stderr)
    if workers > 1 and storage_url.startswith("sqlite"):
        raise HarnessError(f"storage {redact(storage_url)} is SQLite, which does not take several workers; "
                           "use --storage journal:results/<study>/journal.log or a postgresql:// URL")
    with _storage_errors_as_one_line(storage_url):
        study, corpus, device = prepare(config, storage_url, args.device)
        n_target = config.n_trials()
        already = progress(study).done
        racing = config.race.trials if config.race else 0
        print(f"study {config.name}: {n_target} trials" + (f" + up to {racing} racing runs" if racing else "")
              + f" ({already} already done), {config.sampler} sampler, device {device}, storage {redact(storage_url)}",
              file=sys.stderr)
        display = Display(n_target + racing)
        display.set_done(already)
        try:
            # Slurm and kill send SIGTERM: like Ctrl-C, recorded wherever it lands and acted on at a safe point.
            with deferred_signals() as stop:
                if workers == 1:
                    run_worker(study, config, corpus, device, n_target, on_result=display.result,
                               on_start=display.start, on_checkpoint=display.checkpoint, stop=stop)
                else:
                    _run_pool(config, storage_url, workers, device, n_target, display, study, stop)
        except KeyboardInterrupt:
            display.close()
            p = progress(study)
            if not args.no_report and p.done:
                _report(config, storage_url)
            raise SweepInterrupted(
                f"interrupted: {p.done} of {n_target} trials finished and are stored; the running trial was "
                f"marked failed and will run again. Resume with: {resume_hint(args, storage_url)}") from None
        display.close()
        still = progress(study).running
        if still:
            print(f"note: {still} trial(s) are still running in other workers (or their worker died less than "
                  f"a minute ago: rerun this command later and they are run again)", file=sys.stderr)
        if not args.no_report:
            _report(config, storage_url)
    return 0


def cpu_share(index: int, workers: int, cores: list[int]) -> list[int]:
    """Worker ``index``'s own cores: CPU workers that float over the same cores slow each other down in
    ways that change from trial to trial; pinned, each trial's timing depends on its own work (memory
    bandwidth is still shared, which the record's ``host_workers`` says)."""
    per = max(1, len(cores) // workers)
    start = (index * per) % len(cores)
    return cores[start:start + per]


def _given_storage(args: argparse.Namespace) -> str | None:
    """--storage, else $BPTT_HARNESS_STORAGE (a URL with a password stays out of shell history and `ps`)."""
    return args.storage if args.storage is not None else (os.environ.get(STORAGE_ENV) or None)


def resume_hint(args: argparse.Namespace, storage_url: str) -> str:
    """The command that resumes this sweep: everything it was given that a plain rerun would not find
    by itself, and for a password, where it must come from (it is never printed)."""
    from bptt_harness.urls import redact

    parts = ["bptt-harness", "sweep", args.study]
    if args.results_dir != "results":
        parts += ["--results-dir", args.results_dir]
    note = ""
    if args.storage is not None:
        parts += ["--storage", redact(args.storage) or ""]
        if hides_password(redact(args.storage) or ""):
            note = (f" (the same --storage as before: put its password in place of ***, or leave --storage out and "
                    f"set {STORAGE_ENV} to the full URL)")
    elif os.environ.get(STORAGE_ENV):
        note = f" (with {STORAGE_ENV} set to the same storage URL as now)"
    for flag, value in (("--workers", args.workers), ("--device", args.device), ("--trials", args.trials)):
        if value is not None:
            parts += [flag, str(value)]
    if args.no_report:
        parts.append("--no-report")
    return " ".join(shlex.quote(p) for p in parts) + note


@contextlib.contextmanager
def _storage_errors_as_one_line(storage_url: str) -> Iterator[None]:
    """A storage that fails mid-run (full disk, read-only folder, damage found only now) is one line."""
    from bptt_harness.study import storage_failure

    try:
        yield
    except HarnessError:
        raise
    except Exception as e:
        failure = storage_failure(e, storage_url)
        if failure is None:
            raise
        raise failure from None


def _worker_env(index: int, device: Any, workers: int) -> tuple[dict, str, int]:
    """Pin worker ``index`` to one GPU, or give it its share of the CPU cores."""
    env = dict(os.environ)
    if device.type == "cuda":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(torch.cuda.device_count())]
        if workers > len(ids):
            raise HarnessError(f"--workers {workers} but only {len(ids)} GPU(s) are visible; "
                               "one trial per GPU at a time")
        env["CUDA_VISIBLE_DEVICES"] = ids[index]
        return env, "cuda", 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    return env, "cpu", threads


def _run_pool(config: Any, storage_url: str, workers: int, device: Any, n_target: int, display: Display,
              study: Any, stop: StopRequest) -> None:
    from bptt_harness.study import progress

    procs = []
    for i in range(workers):
        env, dev, threads = _worker_env(i, device, workers)
        # The URL (maybe with a password) goes in the environment: a command line is visible in `ps`.
        env[STORAGE_ENV] = storage_url
        cmd = [sys.executable, "-m", "bptt_harness", "worker", "--study-name", config.name,
               "--trials", str(n_target), "--device", dev, "--results-dir", str(config.results_root), "--quiet"]
        if threads:
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            cmd += ["--threads", str(threads)]
            if cores:
                cmd += ["--cpus", ",".join(map(str, cpu_share(i, workers, cores)))]
        cmd += ["--host-workers", str(workers)]
        for target in config.log:
            cmd += ["--log", str(target)]
        procs.append(subprocess.Popen(cmd, env=env))
    seen: set[int] = set()
    try:
        while True:
            alive = [p for p in procs if p.poll() is None]
            for t in study.get_trials(deepcopy=False):
                if t.number not in seen and "record" in t.user_attrs and t.state.is_finished():
                    seen.add(t.number)
                    display.result(t, t.user_attrs["record"], study)
            if not alive:
                break
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
    if failed and progress(study).done < n_target:
        raise HarnessError(f"{len(failed)} worker(s) exited with errors (codes {failed}); "
                           "the finished trials are stored; rerun the same command to resume")


def cmd_worker(args: argparse.Namespace) -> int:
    from bptt_harness.config import with_log
    from bptt_harness.hardware import resolve_device
    from bptt_harness.loggers import check_installed
    from bptt_harness.study import check_same_corpus, config_from_storage, load_corpus, progress, run_worker

    storage_url = _given_storage(args)
    if storage_url is None:
        raise HarnessError(f"bptt-harness worker needs the study's storage: pass --storage URL or set {STORAGE_ENV}")
    if args.cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
        except (AttributeError, ValueError, OSError) as e:
            raise HarnessError(f"--cpus {args.cpus!r} cannot be used here ({e}); give cores this process may "
                               "use, e.g. 0,1, or leave it out") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with _storage_errors_as_one_line(storage_url):
        config, study = config_from_storage(args.study_name, storage_url)
        config = with_log(replace(config, results_root=Path(args.results_dir)), args.log)
        check_installed(config.log)
        if args.trials is not None:
            config = replace(config, trials=args.trials)
        device = resolve_device(args.device or config.device)
        corpus = load_corpus(config)
        check_same_corpus(study, config, corpus)
        n_target = config.n_trials()
        display = Display(n_target, quiet=args.quiet)
        try:
            with deferred_signals() as stop:
                run_worker(study, config, corpus, device, n_target, on_result=display.result, on_start=display.start,
                           host_workers=args.host_workers, on_checkpoint=display.checkpoint, stop=stop)
        except KeyboardInterrupt:
            display.close()
            raise SweepInterrupted(
                f"worker interrupted; {progress(study).done} of {n_target} trials are stored") from None
        display.close()
    return 0


COMMANDS = {"sweep": cmd_sweep, "worker": cmd_worker}
