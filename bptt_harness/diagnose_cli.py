"""``bptt-harness diagnose STUDY``: the command's arguments and printing (the work is
:mod:`bptt_harness.diagnose.study`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "cmd_diagnose", "COMMANDS"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="what bptt does to the study's model: context use, gradient reach, "
                                        "truncation bias and gradient noise scale, at initialisation and after a "
                                        "short training run (writes results/<study>/diagnostics.csv)")
    p.add_argument("study", help="a study file, e.g. studies/default.toml")
    p.add_argument("--tokens", type=int, default=40_000, help="training tokens of the short run per shape")
    p.add_argument("--batch-size", type=int, default=None, help="the shapes' batch size (default: the median of "
                                                                  "the study's)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's)")
    p.add_argument("--results-dir", default="results", help="where results/<study>/diagnostics.csv goes")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from bptt_harness.config import load_study
    from bptt_harness.diagnose.study import diagnose_study, write_diagnostics
    from bptt_harness.hardware import resolve_device
    from bptt_harness.report.diagnostics import diagnostics_sentences
    from bptt_harness.study import load_corpus

    config = load_study(args.study, results_root=Path(args.results_dir))
    device = resolve_device(args.device or config.device)
    corpus = load_corpus(config)
    started = time.monotonic()
    print(f"diagnose {config.name}: {config.model.describe()} on {corpus.name}, each bptt at initialisation and "
          f"after {args.tokens:,} training tokens; device {device}", file=sys.stderr)

    def show(row: Any) -> None:
        def v(x: Any) -> str:
            return "-" if x is None else f"{x:,.0f}"
        print(f"  bptt {row.bptt:>5} x bs {row.batch_size:<4} {row.phase:<8} context {v(row.effective_context_tokens):>6}"
              f"  reach {v(row.gradient_reach_tokens):>5}  bias K {v(row.truncation_bias_k):>5}  noise scale "
              f"{v(row.noise_scale_tokens):>8} tok  ({row.seconds:.1f} s; {time.monotonic() - started:.0f} s)",
              file=sys.stderr)

    found = diagnose_study(config, corpus, device, tokens=args.tokens, batch_size=args.batch_size, on_row=show)
    csv_path, _ = write_diagnostics(found, config.results_dir)
    for sentence in diagnostics_sentences([r.flat() for r in found.rows if r.phase == "trained"], found.options):
        print(sentence)
    print(f"diagnostics: {csv_path} ({time.monotonic() - started:.0f} s)")
    return 0


COMMANDS = {"diagnose": cmd_diagnose}
