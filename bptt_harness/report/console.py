"""The console summary: the recommendation and a compact ranking table, as one string (the CLI prints it)."""

from __future__ import annotations

import io
import textwrap
from typing import Literal

from rich import box
from rich.console import Console
from rich.table import Table

from bptt_harness.report import numbers
from bptt_harness.report.build import Report
from bptt_harness.report.crosscheck import DISAGREE
from bptt_harness.report.frame import label, varying_fields


def summary(rep: Report, top: int = 10, width: int = 110) -> str:
    """Plain text (no colour codes), safe to print or log."""
    t = rep.ranking.table
    extra = varying_fields(rep.configs)
    counts = rep.trials["status"].value_counts()
    lines = [f"study {rep.study_name}: {len(rep.trials)} trials ("
             + ", ".join(f"{int(n)} {s}" for s, n in counts.items()) + ")"]
    if not t.empty:
        cost = rep.ranking.cost
        table = Table(box=box.SIMPLE_HEAD, title=f"top {min(top, len(t))} of {len(t)} configurations "
                      f"(perplexity against {rep.ranking.cost_label})", title_justify="left")
        justify: tuple[tuple[str, Literal["left", "right"]], ...] = (("#", "right"), ("configuration", "left"), ("Pareto", "right"), ("val ppl ± sd", "right"),
                           ("n", "right"), (rep.ranking.cost_label, "right"), ("tokens/s", "right"),
                           ("peak MiB", "right"))
        for name, just in justify:
            table.add_column(name, justify=just)
        for _, r in t.head(top).iterrows():
            ppl = numbers.pm(r["val_ppl"], r.get("val_ppl_std") if r["n"] > 1 else None, 4, missing="-")
            table.add_row(f"{int(r['place'])}{'=' if r['tie'] else ''}", label(r, extra), str(int(r["pareto_rank"])),
                          ppl, str(int(r["n"])), numbers.num(r.get(cost), 3, "-"), numbers.num(r.get("tokens_per_s"), 3, "-"),
                          numbers.num(r.get("peak_mem_mib"), 3, "-"))
        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False).print(table)
        lines.extend(line.rstrip() for line in buf.getvalue().rstrip().splitlines())
    n_inf = len(rep.ranking.infeasible)
    if n_inf:
        lines.append(f"{n_inf} configuration(s) infeasible (out of memory or diverged); see the report.")
    lines.append("")
    lines.extend(textwrap.wrap("Recommendation: " + rep.advice.headline, width))
    for f in rep.advice.findings:
        sep = "" if f.title.endswith("?") else ":"
        lines.extend(textwrap.wrap(f"- {f.title}{sep} {f.text}", width, subsequent_indent="  "))
    for n in rep.advice.notes:
        lines.extend(textwrap.wrap(f"note: {n}", width, subsequent_indent="  "))
    checks = [c.sentence for c in rep.crosschecks] + ([DISAGREE] if any(c.n_beyond for c in rep.crosschecks) else [])
    for text in checks + ([rep.crosscheck_note] if rep.crosscheck_note else []):
        lines.extend(textwrap.wrap(f"profile vs trials: {text}", width, subsequent_indent="  "))
    if rep.rules is not None:
        lines.append("The rules of thumb, checked:")
        for r in rep.rules.checks():
            lines.extend(textwrap.wrap(f"- {r.key} ({r.verdict}): {r.text}", width, subsequent_indent="  "))
    return "\n".join(lines)
