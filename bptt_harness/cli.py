"""The ``harness`` command: wires the modules together; all printing happens here."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, NoReturn

from bptt_harness import __version__, allocator
from bptt_harness.errors import HarnessError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 2 (no usage dump), with the closest option or
    subcommand for a typo, pointing at the help of the subcommand it was given to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subcommands: Mapping[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            message += _closest(choice[1], re.findall(r"'([^']*)'", choice[2]))
        self.exit(2, f"error: {self.prog}: {message}; see '{self.prog} --help'\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """Unknown options are reported by the subcommand that got them (argparse reports them at the top)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.subcommands.get(getattr(parsed, "command", None) or "", self)
            unknown = [a for a in extras if a.startswith("-")]
            # argparse keeps every option in one map per parser, its argument groups' included.
            hint = _closest(unknown[0].split("=")[0], list(command._option_string_actions)) if unknown else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


def _closest(word: str, allowed: list[str]) -> str:
    match = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", "--corpus", dest="corpus", default="default",
                   help="'default' (embedded Wikipedia text), a text file, a directory with train/valid/test, "
                        "or 'synthetic:k=12'")
    p.add_argument("--tokenizer", choices=("word", "char"), default="word")
    p.add_argument("--lower", action="store_true", help="lower-case the text")
    p.add_argument("--split-punct", action="store_true", help="split punctuation off words")
    p.add_argument("--max-vocab", type=int, default=None, help="cap the vocabulary; the rest becomes <unk>")


def _corpus_spec(args: argparse.Namespace):
    from bptt_harness.corpus import CorpusSpec

    return CorpusSpec(source=args.corpus, tokenizer=args.tokenizer, lower=args.lower,
                      split_punct=args.split_punct, max_vocab=args.max_vocab)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bptt-harness", description="Measure which bptt and batch size to use on this machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"bptt-harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.subcommands = sub.choices

    p = sub.add_parser("corpus", help="show a corpus: tokens per split, vocabulary, source, licence")
    p.add_argument("action", choices=("info",))
    _add_corpus_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("trial", help="train and evaluate one configuration, or re-run one row of a study "
                                     "(--from results/<study> --config bptt=35,batch_size=5)")
    from bptt_harness import trial_cli

    trial_cli.add_arguments(p)

    p = sub.add_parser("doctor", help="show the device, probe and hardware fingerprint")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("profile", help="the memory and speed map of a study: a few timed steps per "
                                       "(bptt, batch size) cell and the memory wall per bptt")
    p.add_argument("study", help="a study file, e.g. studies/default.toml")
    p.add_argument("--steps", type=int, default=5, help="timed steps per cell, after 2 untimed ones")
    p.add_argument("--wall", choices=("auto", "yes", "no"), default="auto",
                   help="search the largest batch size that fits per bptt (auto: on a GPU or under max_memory_gib)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's)")
    p.add_argument("--results-dir", default="results", help="where results/<study>/profile.csv goes")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when the study already has its profile.csv (make sweep profiles this way)")

    from bptt_harness import diagnose_cli, study_cli
    from bptt_harness.report import cli as report_cli

    study_cli.add_commands(sub)
    diagnose_cli.add_commands(sub)
    report_cli.add_commands(sub)
    return parser


def cmd_corpus(args: argparse.Namespace) -> int:
    from bptt_harness.corpus import load

    info = load(_corpus_spec(args)).info()
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_trial(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bptt_harness import trial_cli
    from bptt_harness.corpus import check_fits, load
    from bptt_harness.hardware import resolve_device
    from bptt_harness.loggers import RunInfo, check_installed, hparams_of, trial_loggers
    from bptt_harness.model import check_model
    from bptt_harness.probe import make_probe
    from bptt_harness.trainer import WARM_UP_STEPS, run_trial

    ts = trial_cli.setup(args)
    check_installed(ts.log)
    spec, model, train = ts.spec, ts.spec.model, ts.spec.train
    device = resolve_device(ts.device)
    corpus = load(ts.corpus, check=lambda c: check_fits(c, spec.batch_size, spec.bptt, train.eval_batch_size))
    check_model(model, corpus.vocab_size)
    if not args.json:
        print(f"trial: {model.describe()} on {corpus.name} ({corpus.vocab_size} tokens "
              f"in vocabulary), bptt={spec.bptt} bs={spec.batch_size}, device {device}", file=sys.stderr)
        measured = trial_cli.study_measured(ts)
        if measured:
            print(measured, file=sys.stderr)

    def on_checkpoint(i: int, point: dict) -> bool:
        if not args.json:
            print(f"  checkpoint {i + 1}/{train.checkpoints}: {point['tokens']:,} tokens, "
                  f"{point['seconds']:.1f} s, val ppl {point['ppl']:.2f}", file=sys.stderr)
        return False

    ok = True
    for r in range(ts.repeats):  # --repeats: seeds seed, seed + 1, ... as a study's repeats
        run = replace(spec, train=replace(train, seed=train.seed + r))
        if ts.repeats > 1 and not args.json:
            print(f"repeat {r}, seed {run.train.seed}", file=sys.stderr)
        probe = None if args.no_probe else make_probe(device)
        # A fresh process: the first run warms up first, so start-up is not the trial's.
        options = replace(ts.options, warm_up_steps=0 if r else WARM_UP_STEPS)
        name = f"{ts.config_key or f'bptt={run.bptt},batch_size={run.batch_size}'}-seed{run.train.seed}"
        loggers = trial_loggers(ts.log, RunInfo(ts.name, name, hparams_of(run, repeat=r)))
        result = run_trial(run, corpus, device, probe=probe, on_checkpoint=on_checkpoint, options=options,
                           observers=loggers)
        ok = ok and result.status == "ok"
        if args.json:
            from bptt_harness.record import finite_or_none

            print(json.dumps(finite_or_none(result.to_dict())), flush=True)
        else:
            print(format_result(result), flush=True)
    return 0 if ok else 1


def format_result(result: Any) -> str:
    skip = {"train_curve", "val_curve", "probe"}
    lines = []
    for f in fields(result):
        if f.name in skip:
            continue
        value = getattr(result, f.name)
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{f.name:<16} {value}")
    for key, value in sorted(asdict(result.probe).items()):
        if value is not None and not isinstance(value, (dict, list)):
            lines.append(f"{'probe.' + key:<16} {value:.4g}" if isinstance(value, float) else f"{'probe.' + key:<16} {value}")
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from bptt_harness.config import load_study
    from bptt_harness.fileio import check_writable_dir
    from bptt_harness.hardware import fingerprint, resolve_device
    from bptt_harness.profile import run_profile, write_profile
    from bptt_harness.profile_csv import PROFILE_CSV, cells, walls_table
    from bptt_harness.study import load_corpus

    if args.steps < 1:
        raise HarnessError(f"--steps {args.steps} must be >= 1")
    config = load_study(args.study, results_root=Path(args.results_dir))
    if args.if_missing and (config.results_dir / PROFILE_CSV).is_file():
        print(f"profile: {config.results_dir / PROFILE_CSV} exists; kept (delete it to measure again)", file=sys.stderr)
        return 0
    check_writable_dir(config.results_dir)  # before the work: profile.csv is written at the end
    device = resolve_device(args.device or config.device)
    corpus = load_corpus(config)
    started = time.monotonic()
    print(f"profile {config.name}: {len(cells(config))} cells of the search space, then the wall per bptt "
          f"where there is one; device {device}", file=sys.stderr)

    def show(row: Any) -> None:
        mem = row.memory_mib
        print(f"  {row.phase:<4} bptt {row.bptt:>5} x bs {row.batch_size:>6}: {row.status:<8} "
              + (f"{row.tokens_per_s:>10,.0f} tok/s " if row.tokens_per_s else " " * 17)
              + (f"{mem:>9,.1f} MiB" if mem is not None else "") + f"  ({time.monotonic() - started:.0f} s)",
              file=sys.stderr)

    wall = None if args.wall == "auto" else args.wall == "yes"
    profile = run_profile(config, corpus, device, steps=args.steps, wall=wall, on_row=show)
    path = write_profile(profile, config.results_dir, fingerprint(device))
    n = len(profile.rows)
    elapsed = time.monotonic() - started
    print(f"{n} cells measured in {elapsed:.0f} s ({n / elapsed:.2f} cells/s)")
    import pandas as pd

    df = pd.DataFrame([vars(r) for r in profile.rows])
    grid = df[df["phase"] == "grid"]
    for col, title in (("tokens_per_s", "tokens/s"), ("peak_mem_mib", "training peak memory, MiB")):
        table = grid.pivot_table(index="bptt", columns="batch_size", values=col, aggfunc="median")
        print(f"\n{title} (rows: bptt, columns: batch size)\n{table.to_string(float_format=lambda v: f'{v:,.0f}')}")
    walls = walls_table(df)
    if profile.walls:
        print("\nmemory wall per bptt\n" + walls.to_string(index=False))
    print(f"\nprofile: {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from bptt_harness.hardware import doctor_report

    print(doctor_report(args.device, as_json=args.json))
    return 0


COMMANDS = {"corpus": cmd_corpus, "trial": cmd_trial, "doctor": cmd_doctor, "profile": cmd_profile}


def _quiet_libraries(verbose: bool) -> None:
    """Optuna logs every trial and warns about experimental APIs; our own display says what matters."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)


def entry() -> int:
    """``bptt-harness`` and ``python -m bptt_harness``: a process of its own, so its allocator keeps freed
    memory for the next step (:mod:`bptt_harness.allocator`); :func:`main` (also called in-process, by
    tests and scripts) leaves the allocator alone."""
    try:
        allocator.keep_freed_memory()
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    from bptt_harness import diagnose_cli, study_cli
    from bptt_harness.report import cli as report_cli

    handler = (COMMANDS.get(args.command) or study_cli.COMMANDS.get(args.command)
               or diagnose_cli.COMMANDS.get(args.command) or report_cli.COMMANDS[args.command])
    try:
        return handler(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception:  # a bug: its traceback helps, a storage password in it must not be shown
        import os
        import traceback

        from bptt_harness.urls import STORAGE_ENV, scrub

        urls = [getattr(args, "storage", None), getattr(args, "source", None), os.environ.get(STORAGE_ENV),
                *(getattr(args, "sources", None) or [])]
        print(scrub(traceback.format_exc(), *urls), file=sys.stderr, end="")
        return 1
