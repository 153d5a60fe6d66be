"""``bptt-harness sweep`` and ``bptt-harness worker``: run a study with a live progress display."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bptt_harness.config import check_storage_url
from bptt_harness.errors import HarnessError
from bptt_harness.interrupt import deferred_signals
from bptt_harness.spec import LOG_HELP
from bptt_harness.urls import STORAGE_ENV, hides_password, redact


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




def _report(config: Any, storage_url: str) -> None:
    from bptt_harness.report import generate

    paths = generate(config.results_dir, storage=storage_url, study_name=config.name)
    print(paths.summary)
    print(f"\nreport: {paths.html}\ntrials: {paths.csv}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from bptt_harness.config import load_study, with_log
    from bptt_harness.loggers import check_installed
    from bptt_harness.progress import Display
    from bptt_harness.stored import progress
    from bptt_harness.study import plan_budget, resolve_storage
    from bptt_harness.study.sweep import Sweep, storage_errors_as_one_line

    config = with_log(load_study(args.study, results_root=Path(args.results_dir)), args.log)
    check_installed(config.log)
    if args.trials is not None:
        if args.trials < 1:
            raise HarnessError(f"--trials {args.trials} must be >= 1")
        config = replace(config, trials=args.trials)
    workers = args.workers if args.workers is not None else config.workers
    storage_url = resolve_storage(config, _given_storage(args), workers)
    if args.max_seconds is not None:
        if not args.max_seconds > 0:
            raise HarnessError(f"--max-seconds {args.max_seconds:g} must be > 0")
        # Planned as if one worker ran every trial: with several GPU workers the sweep ends earlier.
        config, tokens, planned = plan_budget(config, storage_url, args.max_seconds)
        print(f"budget: {tokens:,} training tokens per trial "
              + (f"(planned from profile.csv to fit {args.max_seconds:g} s)" if planned else
                 "(planned when this study started)"), file=sys.stderr)
    with storage_errors_as_one_line(storage_url):
        sweep = Sweep.open(config, storage_url, args.device, workers)
        n_target = config.n_trials()
        already = progress(sweep.study).done
        racing = config.race.trials if config.race else 0
        print(f"study {config.name}: {n_target} trials" + (f" + up to {racing} racing runs" if racing else "")
              + f" ({already} already done), {config.sampler} sampler, device {sweep.device}, "
                f"storage {redact(storage_url)}", file=sys.stderr)
        display = Display(n_target + racing)
        display.set_done(already)
        try:
            # Slurm and kill send SIGTERM: like Ctrl-C, recorded wherever it lands and acted on at a safe point.
            with deferred_signals() as stop:
                sweep.run(display, stop)
        except KeyboardInterrupt:
            display.close()
            p = progress(sweep.study)
            if not args.no_report and p.done:
                _report(config, storage_url)
            raise SweepInterrupted(
                f"interrupted: {p.done} of {n_target} trials finished and are stored; the running trial was "
                f"marked failed and will run again. Resume with: {resume_hint(args, storage_url)}") from None
        display.close()
        still = progress(sweep.study).running
        if still:
            print(f"note: {still} trial(s) are still running in other workers (or their worker died less than "
                  f"a minute ago: rerun this command later and they are run again)", file=sys.stderr)
        if not args.no_report:
            _report(config, storage_url)
    return 0


def _given_storage(args: argparse.Namespace) -> str | None:
    """--storage, else $BPTT_HARNESS_STORAGE (a URL with a password stays out of shell history and `ps`)."""
    if args.storage is not None:
        return args.storage
    url = os.environ.get(STORAGE_ENV) or None
    if url is not None:
        try:
            check_storage_url(url)
        except HarnessError as e:
            raise HarnessError(f"${STORAGE_ENV}: {e}") from None
    return url


def invoked_as(argv0: str | None = None) -> list[str]:
    """The command that started this tool, as the user can type it again: ``bptt-harness`` when that is
    what PATH finds, else the path used (``.venv/bin/bptt-harness``), or ``python -m bptt_harness``; plain
    ``bptt-harness`` when it was not started as a command (a notebook, a test runner)."""
    path = Path(argv0 if argv0 is not None else sys.argv[0])
    if path.name == "__main__.py" and path.parent.name == "bptt_harness":
        return [_typed(Path(sys.executable)), "-m", "bptt_harness"]
    if not path.name.startswith("bptt-harness"):
        return ["bptt-harness"]
    return [_typed(path)]


def _typed(path: Path) -> str:
    """``path`` as a user types it: its bare name when PATH finds this very file, else relative to the
    current folder when it lies inside it, else absolute."""
    found = shutil.which(path.name)
    try:
        if found and Path(found).resolve() == path.resolve():
            return path.name
        # Not resolved: a virtual environment's python is a link, and the user typed the link.
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(Path.cwd())))
    except (OSError, ValueError):
        return str(path)


def resume_hint(args: argparse.Namespace, storage_url: str) -> str:
    """The command that resumes this sweep: everything it was given that a plain rerun would not find
    by itself, and for a password, where it must come from (it is never printed)."""
    from bptt_harness.urls import redact

    parts = [*invoked_as(), "sweep", args.study]
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


def cmd_worker(args: argparse.Namespace) -> int:
    from bptt_harness.config import with_log
    from bptt_harness.hardware import resolve_device
    from bptt_harness.loggers import check_installed
    from bptt_harness.progress import Display
    from bptt_harness.stored import progress
    from bptt_harness.study import check_same_corpus, config_from_storage, load_corpus, run_worker
    from bptt_harness.study.sweep import storage_errors_as_one_line

    for flag, value in (("--threads", args.threads), ("--host-workers", args.host_workers), ("--trials", args.trials)):
        if value is not None and value < 1:
            raise HarnessError(f"{flag} {value} must be >= 1")
    storage_url = _given_storage(args)
    if storage_url is None:
        raise HarnessError(f"bptt-harness worker needs the study's storage: pass --storage URL or set {STORAGE_ENV}")
    if args.cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
        except (AttributeError, ValueError, OSError) as e:
            raise HarnessError(f"--cpus {args.cpus!r} cannot be used here ({e}); give cores this process may "
                               "use, e.g. 0,1, or leave it out") from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    with storage_errors_as_one_line(storage_url):
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
