"""One self-contained ``report.html`` (the page shell is :mod:`bptt_harness.report.page`).

Order on the page: the recommendation, the answers, the rankings and the verdict at every budget, then
one section per source of numbers: the trials (full training runs), the profile (a few timed steps per
cell) with how the two agree, and the memory model. Each section says where its numbers come from;
each figure's caption is computed from what it shows (:mod:`bptt_harness.report.figures`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from bptt_harness.profile_csv import walls_table
from bptt_harness.record import COST_LABELS
from bptt_harness.report import diagnostics, figures, numbers, space
from bptt_harness.report.budget import at_text
from bptt_harness.report.build import Report
from bptt_harness.report.crosscheck import DISAGREE
from bptt_harness.report.frame import label, varying_fields
from bptt_harness.report.page import Column, Drawn, esc, figure_block, meta_line, page, table
from bptt_harness.stats import COVERAGE

__all__ = ["render"]

# Significant figures per column kind.
PPL_DIGITS = 4
COST_DIGITS = 3


def _place(x: pd.Series, col: str, shared: set[float]) -> str:
    v = x[col]
    if pd.isna(v):
        return "not measured"
    return f"{int(v)}{'=' if v in shared else ''}"


def _shared(places: pd.Series) -> set[float]:
    """Places held by more than one row: ties, printed with '='."""
    counts = places.dropna().value_counts()
    return set(counts[counts > 1].index)


def _cell(col: str, digits: int = COST_DIGITS, spread: bool = True) -> Callable[[pd.Series], str]:
    """Mean ± standard deviation over the repeats (n > 1; mean alone without ``spread``), a star when its
    timing is marked."""
    def cell(x: pd.Series) -> str:
        sd = x.get(f"{col}_std") if spread and x.get("n", 1) > 1 else None
        return numbers.pm(x.get(col), sd, digits) + _timing_mark(x, col)
    return cell


def _timing_mark(x: pd.Series, col: str) -> str:
    """A star on a time-based figure whose timing is not clean (see configs.csv ``timing_note``)."""
    timed = col in ("tokens_per_s", "seconds_per_ktok", "joules_per_ktok")
    return " *" if timed and isinstance(x.get("timing_note"), str) and x.get("timing_note") else ""


def _first(t: pd.DataFrame, c: str) -> Any:
    return t[c].dropna().astype(str).mode().iloc[0] if c in t and t[c].notna().any() else None


def _budget_text(t: pd.DataFrame) -> str | None:
    budget = _first(t, "budget")
    resolved = t["resolved_budget_tokens"].dropna() if "resolved_budget_tokens" in t else pd.Series(dtype=float)
    declared = t["budget_tokens"].dropna()
    if budget == "tokens" and (len(resolved) or len(declared)):
        # What every trial was actually given: with `epochs` the declared tokens are not the budget.
        tokens = resolved.mode().iloc[0] if len(resolved) else declared.iloc[0]
        epochs = t["budget_epochs"].dropna() if "budget_epochs" in t else pd.Series(dtype=float)
        return f"{numbers.count(tokens)} training tokens per trial" + (
            f" ({numbers.num(epochs.iloc[0], 3)} x the train split)" if len(epochs) else "")
    if budget == "seconds" and t["budget_seconds"].notna().any():
        return f"{numbers.num(t['budget_seconds'].dropna().iloc[0], 3)} training seconds per trial"
    return None


def _meta(rep: Report) -> str:
    t = rep.trials
    counts = t["status"].value_counts()
    objectives = rep.info.get("objectives")
    return meta_line([
        ("trials", ", ".join(f"{int(n)} {s}" for s, n in counts.items())), ("corpus", _first(t, "corpus")),
        ("budget", _budget_text(t)), ("hardware", _first(t, "gpu_name") or _first(t, "cpu_model") or "unknown hardware"),
        ("device", _first(t, "device")),
        ("objectives", ", ".join(map(str, objectives)) if isinstance(objectives, list) else None),
        ("ranked against", rep.ranking.cost_label), ("lr", _first(t, "lr_rule_description")),
        ("storage", rep.storage_display), ("generated", rep.generated_at)])


def _ranking_section(rep: Report, limit: int = 40) -> str:
    r = rep.ranking
    t = r.table
    if t.empty:
        return "<p>No configuration finished ok, so nothing is ranked.</p>"
    extra = varying_fields(rep.configs)
    cost = r.cost
    rec = rep.advice.recommended
    shown = t.head(limit)
    cols: list[Column] = [
        ("", "place", lambda x: f"{int(x['place'])}{'=' if x['tie'] else ''}"),
        ("l", "configuration", lambda x: label(x, extra)),
        ("", "Pareto rank", lambda x: str(int(x["pareto_rank"]))),
        ("", "val ppl (mean ± sd)", _cell("val_ppl", PPL_DIGITS)),
        ("", "n", lambda x: str(int(x["n"])) + (" (single-seed)" if str(x.get("single_seed")) == "True" else "")),
        ("", f"{COVERAGE:.0%} t interval (df)",
         lambda x: numbers.interval(x.get("val_ppl_lo"), x.get("val_ppl_hi"), PPL_DIGITS)
         + (f" ({x.get('val_ppl_dof'):.0f})" if pd.notna(x.get("val_ppl_dof")) else "")),
        ("", f"{COST_LABELS.get(cost, cost)} (mean ± sd)", _cell(cost)),
    ]
    for col, head in (("tokens_per_s", "tokens/s"), ("peak_mem_mib", "peak MiB"), ("joules_per_ktok", "J / 1k tok")):
        if col != cost and t[col].notna().any():
            cols.append(("", head, _cell(col, spread=False)))
    if shown["reason"].fillna("").astype(str).str.len().any():
        cols.append(("wrap", "notes", lambda x: x.get("reason") or ""))
    rows = table(shown, cols, table_id="ranking",
                 row_class=lambda x: " ".join(c for c, on in (("front", x["pareto_rank"] == 1),
                                                                ("rec", x["config_key"] == rec)) if on))
    more = (f'<p class="small">Showing the top {limit} of {len(t)} ranked configurations; all are in configs.csv.</p>'
            if len(t) > limit else "")
    return _ranking_intro(rep, shown) + rows + more + _ranking_notes(rep, shown, extra)


def _ranking_intro(rep: Report, shown: pd.DataFrame) -> str:
    r = rep.ranking
    text = (f"From the trials: each configuration's mean over its seeds that finished. Pareto rank 1 = no other "
            f"configuration is better on both perplexity and {r.cost_label}; within a rank, lower perplexity first. "
            "“± sd” is the standard deviation over seeds (the spread of single runs); the interval is the "
            f"{COVERAGE:.0%} Student t interval of the mean on its degrees of freedom (df = n - 1 from its own seeds)")
    text += ("; a single-seed configuration borrows the study's pooled seed noise and its degrees of freedom."
             if (shown["n"] == 1).any() else ".")
    if shown["tie"].any():
        text += (" Places marked “=” are ties: Welch's test does not separate the perplexity from the row above at "
                 f"{COVERAGE:.0%} (Holm-adjusted over the neighbouring pairs), and the cost is within the spread of repeats.")
    if rep.advice.recommended is not None and (shown["config_key"] == rep.advice.recommended).any():
        text += " The highlighted row is the recommendation."
    return f'<p class="small">{esc(text)}</p>'


def _ranking_notes(rep: Report, shown: pd.DataFrame, extra: list[str]) -> str:
    marked = shown[shown["timing_note"].fillna("") != ""] if "timing_note" in shown else shown.iloc[:0]
    timing = [f"* timing: {label(x, extra)}: {x['timing_note']}" for _, x in marked.iterrows()]
    notes = "".join(f"<li>{esc(n)}</li>" for n in [*rep.ranking.notes, *timing])
    return f'<ul class="notes">{notes}</ul>' if notes else ""


def _equal_time_section(rep: Report, limit: int = 12) -> str:
    et = rep.equal_time
    if et.seconds is None or et.table.empty:
        return ""
    extra = varying_fields(rep.configs)
    shown = et.table.head(limit)
    time_ties, budget_ties = _shared(shown["place_time"]), _shared(shown["place"])
    cols: list[Column] = [
        ("", "place", lambda x: _place(x, "place_time", time_ties)),
        ("l", "configuration", lambda x: label(x, extra)),
        ("", f"ppl at {numbers.seconds(et.seconds)} (mean ± sd)",
         lambda x: numbers.pm(x["ppl_at_time"], x["ppl_at_time_std"], PPL_DIGITS)),
        ("l", "noise there", lambda x: x.get("ppl_at_time_interval") or "not measured"),
        ("", "ppl at the budget", lambda x: numbers.num(x["val_ppl"], PPL_DIGITS)),
        ("", "place at the budget", lambda x: _place(x, "place", budget_ties)),
    ]
    verdict = ("The two rankings disagree: the budget's best is separated from the best at that time, with the seed "
               "noise measured there." if et.disagree else
               "The two rankings agree on the best configuration." if et.comparable else
               "The study's best had no validation checkpoint by then, so the two cannot be compared.")
    how = ("measured on the study's common time grid" + (f" (each point within {numbers.seconds(et.max_offset_s, 2)} of it)"
                                                       if et.max_offset_s is not None else "")
           if et.on_grid else "interpolated between validation checkpoints (the study has no time grid)")
    ties = (" Places marked “=” are not separated from the row above by the seed noise (Welch, Holm-adjusted; at "
            "that time, the noise measured there)." if time_ties or budget_ties else "")
    return (f"<section id=\"equal-time-section\"><h2>Ranking at equal training time</h2><p>From the trials: perplexity "
            f"of each configuration after {esc(numbers.seconds(et.seconds))} of training — the latest time every "
            f"configuration reached — {esc(how)}; a configuration without a point there is not measured and not "
            f"ranked. {esc(verdict)}{esc(ties)}</p>" + table(shown, cols, table_id="equal-time") + "</section>")


def _budget_section(rep: Report) -> str:
    """The verdict at every budget: the sentences, one table per axis and the figure."""
    v = rep.budget
    legs = [leg for leg in (v.tokens, v.time) if leg is not None and not leg.table.empty]
    if not legs:
        return ""
    names = dict(zip(rep.ranking.table["config_key"], [label(r) for _, r in rep.ranking.table.iterrows()]))
    parts = [f"<section id=\"budget-section\"><h2>The verdict at every budget</h2><p>From the trials' validation "
             f"checkpoints. {esc(' '.join(v.sentences))}</p>"]
    for leg in legs:
        cols: list[Column] = [
            ("l", "at", _at_cell(leg)),
            ("l", "best there", lambda x: names.get(x["best"], x["best"])),
            ("", "ppl", lambda x: numbers.num(x["best_ppl"], PPL_DIGITS)),
            ("l", "runner-up", lambda x: names.get(x["runner"], x["runner"] or "")),
            ("", "ppl ", lambda x: numbers.num(x["runner_ppl"], PPL_DIGITS)),
            ("", "tie", lambda x: "yes" if x["tie"] else ""),
            ("", "best separated from all", lambda x: ("yes" if x["separated"] else "no") if x["noise_known"]
             else "noise unknown"),
            ("", "measured", lambda x: str(int(x["measured"]))),
        ]
        title = "at equal tokens" if leg.axis == "tokens" else "at equal training time (time grid)"
        parts.append(f"<h3>{esc(title)}</h3>" + table(leg.table, cols, table_id=f"budget-{leg.axis}"))
    drawn = figures.budget_verdict(v, rep.ranking.table)
    if drawn is not None:
        parts.append(figure_block("fig-budget", drawn))
    return "".join(parts) + "</section>"


def _at_cell(leg: Any) -> Callable[[pd.Series], str]:
    return lambda x: at_text(leg, x["at"])


def _not_ranked_section(rep: Report, limit: int = 60) -> str:
    parts = []
    extra = varying_fields(rep.configs)
    for df, title in ((rep.ranking.infeasible, "Infeasible: out of memory or diverged"),
                      (rep.ranking.unranked, "Not ranked: pruned, timed out or failed")):
        if df.empty:
            continue
        cols: list[Column] = [("l", "configuration", lambda x: label(x, extra)),
                              ("", "runs", lambda x: str(int(x["n_trials"]))),
                              ("wrap", "reason", lambda x: x.get("reason") or "")]
        more = f'<p class="small">{len(df) - limit} more in configs.csv.</p>' if len(df) > limit else ""
        parts.append(f"<h3>{esc(title)} ({len(df)})</h3>" + table(df.head(limit), cols) + more)
    return "".join(parts)


def _figures(items: list[tuple[str, Drawn | None]]) -> str:
    return "".join(figure_block(div_id, d) for div_id, d in items if d is not None)


def _searched_keys(rep: Report) -> list[str]:
    """The keys the study searched: bptt and batch size, and the configuration fields that vary."""
    return ["bptt", "batch_size", *varying_fields(rep.configs)]


def _trials_section(rep: Report) -> str:
    c = rep.configs
    items: list[tuple[str, Drawn | None]] = []
    if not space.is_grid(c):
        items.append(("fig-space", space.scatter(c)))
    items += [(f"fig-{short}", figures.heatmap(c, metric)) for short, metric in
              (("ppl", "val_ppl"), ("tps", "tokens_per_s"), ("mem", "peak_mem_mib"), ("energy", "joules_per_ktok"))]
    items += [("fig-parallel", figures.parallel(c, _searched_keys(rep))),
              ("fig-pareto", figures.pareto(rep.ranking, rep.advice.recommended)),
              ("fig-curves", figures.curves(rep.trials, rep.ranking, rep.equal_time)),
              ("fig-training", figures.training(rep.trials, rep.ranking))]
    body = _figures(items)
    if not body:
        return '<section id="figures"><h2>The trials</h2><p>No figures: no trial finished.</p></section>'
    budget = _budget_text(rep.trials)
    source = (f"Every number in this section comes from the study's trials: each configuration trained for the full "
              f"budget{f' ({budget})' if budget else ''}; values are means over its seeds that finished.")
    return (f'<section id="figures"><h2>The trials: full training runs</h2><p class="source">{esc(source)}</p>'
            f"{body}</section>")


def _profile_section(rep: Report) -> str:
    p = rep.profile
    if p is None or p.empty:
        return ""
    cells = figures.profile_cells(p)
    steps = cells["steps"].dropna() if "steps" in cells else pd.Series(dtype=float)
    few = f"{numbers.count(steps.median())} timed steps" if len(steps) else "a few timed steps"
    source = (f"Every number in this section comes from profile.csv (bptt-harness profile): {few} per cell after "
              "warm-up, not full training; the trials' numbers for the same cells are in the section above.")
    checks = "".join(f"<p>{esc(c.sentence)}</p>" for c in rep.crosschecks)
    if any(c.n_beyond for c in rep.crosschecks):
        checks += f"<p>{esc(DISAGREE)}</p>"
    if rep.crosscheck_note:
        checks += f"<p>{esc(rep.crosscheck_note)}</p>"
    body = _crosscheck_table(rep) + _figures([("fig-profile-tps", figures.heatmap(cells, "tokens_per_s", "profile")),
                                              ("fig-profile-mem", figures.heatmap(cells, "peak_mem_mib", "profile"))])
    return (f'<section id="profile"><h2>The profile: a few timed steps per cell</h2><p class="source">{esc(source)}</p>'
            f"{checks}{body}{_walls_section(rep)}</section>")


def _crosscheck_table(rep: Report) -> str:
    if not rep.crosschecks:
        return ""
    merged: pd.DataFrame | None = None
    for c in rep.crosschecks:
        part = c.cells[["bptt", "batch_size", "trials", "n", "profile", "ratio", "diff", "beyond"]].rename(
            columns={k: f"{c.metric}:{k}" for k in ("trials", "n", "profile", "ratio", "diff", "beyond")})
        merged = part if merged is None else merged.merge(part, on=["bptt", "batch_size"], how="outer")
    assert merged is not None
    merged = merged.sort_values(["bptt", "batch_size"])
    cols: list[Column] = [("", "bptt", lambda x: numbers.count(x["bptt"])),
                          ("", "batch size", lambda x: numbers.count(x["batch_size"]))]
    for c in rep.crosschecks:
        m = c.metric
        unit = "tokens/s" if m == "tokens_per_s" else "peak MiB"
        cols += [("", f"{unit}: trials (n)", _trials_n(m)), ("", f"{unit}: profile", _val(f"{m}:profile")),
                 ("", "trials / profile", _ratio(m))]
    legend = (" “≠” marks a cell where the two differ beyond the noise." if any(c.n_beyond for c in rep.crosschecks)
              else "")
    return (f'<h3>Where both measured a cell</h3><p class="small">Trials: mean over the runs that finished (n); '
            f"profile: one measurement.{esc(legend)}</p>" + table(merged, cols, table_id="profile-vs-trials"))


def _trials_n(metric: str) -> Callable[[pd.Series], str]:
    def cell(x: pd.Series) -> str:
        v = x[f"{metric}:trials"]
        return "" if pd.isna(v) else f"{numbers.num(v, 3)} ({int(x[f'{metric}:n'])})"
    return cell


def _ratio(metric: str) -> Callable[[pd.Series], str]:
    return lambda x: numbers.ratio(x[f"{metric}:ratio"]) + (" ≠" if x[f"{metric}:beyond"] is True else "")


def _val(col: str) -> Callable[[pd.Series], str]:
    return lambda x: numbers.num(x[col], 3)


def _memory_section(rep: Report) -> str:
    drawn = figures.memory(rep.trials, rep.fits[0] if rep.fits else None, rep.wall.card_mib, rep.profile)
    fig = figure_block("fig-memory", drawn) if drawn is not None else ""
    if not rep.fits:
        body = fig + '<p>Not enough memory measurements (two distinct shapes) for a fitted model.</p>' if fig else \
            "<p>Not enough memory measurements for a model.</p>"
        return f'<section id="memory-model"><h2>Memory model</h2>{body}</section>'
    f = rep.fits[0]
    err = (f"RMS error {numbers.mib(f.rmse_mib)}, largest error {numbers.mib(f.max_err_mib)}, R² {f.r2:.4f}, "
           f"slope ± {numbers.num(f.slope_se, 2)} MiB" if math.isfinite(f.rmse_mib)
           else "exact through two points, no error estimate")
    what = "profile cells" if f.source == "profile" else "trials"
    law = (f"{esc(numbers.mib(f.intercept_mib))} + {esc(numbers.num(f.slope_mib, 4))} MiB × the longest window × "
           "batch size" if f.linear else f"{esc(f.law())} MiB (window: the longest window; the terms its family declares)")
    text = (f"<p>Fitted on {f.n_points} {what} of the {esc(f.shape)} model: peak memory ≈ {law} ({esc(err)}); "
            f"measured range {numbers.count(f.x_min)}–{numbers.count(f.x_max)} tokens per "
            "step.</p>")
    if math.isfinite(f.loo_max_pct):
        verdict = "within the 5% goal" if f.loo_max_pct <= 5 else "above the 5% goal: treat predictions with care"
        text += (f"<p>Leave-one-out check: each of the {f.n_points} points predicted from the fit of the others is off "
                 f"by {numbers.num(f.loo_median_pct, 2)}% (median), {numbers.num(f.loo_max_pct, 2)}% at most, "
                 f"{verdict}.</p>")
    if len(rep.fits) > 1:
        text += (f'<p class="small">The study has {len(rep.fits)} fits; this one is for {esc(f.shape)} '
                 f"({what}).</p>")
    if rep.cards is not None and not rep.cards.empty:
        cards = [c for c in rep.cards.columns if c != "batch_size"]
        cols: list[Column] = [("", "batch size", lambda x: str(int(x["batch_size"])))]
        cols += [("", c, _card_cell(c)) for c in cards]
        over = f" and {numbers.mib(f.overhead_mib)} outside torch's pool (CUDA context)" if f.overhead_mib else ""
        text += (f"<h3>Predicted largest bptt per batch size, by card (predictions, not measurements)</h3>"
                 f"<p class=\"small\">Each card's memory as the driver reports it (less than its nominal size), the "
                 f"upper end of the fit's 95% prediction interval (it widens away from the measured range){esc(over)}; "
                 "0 means even bptt 1 is predicted not to fit. Check the edge on the real card before relying on it.</p>"
                 + table(rep.cards, cols, table_id="memory-predictions"))
    elif not f.gpu:
        text += ("<p class=\"small\">Measured on CPU (the bytes a step holds, counted), so no GPU card predictions "
                 "are made.</p>")
    return f'<section id="memory-model"><h2>Memory model</h2>{fig}{text}</section>'


def _card_cell(card: str) -> Callable[[pd.Series], str]:
    return lambda x: numbers.count(x[card])


def _walls_section(rep: Report) -> str:
    """The profile's memory wall: per bptt, the largest batch size that fit and the smallest that did not."""
    if rep.profile is None or rep.profile.empty or not (rep.profile["phase"] == "wall").any():
        return ""
    w = walls_table(rep.profile)
    cols: list[Column] = [("", "bptt", lambda x: str(int(x["bptt"]))),
                          ("", "largest batch size that fits", lambda x: numbers.count(x["largest_fit_bs"])),
                          ("", "smallest that ran out of memory", lambda x: numbers.count(x["smallest_oom_bs"])),
                          ("", "peak MiB at the fit", lambda x: numbers.num(x["peak_mib_at_fit"], 3))]
    return "<h3>The memory wall, measured (bptt-harness profile)</h3>" + table(w, cols, table_id="memory-wall")


def _rules_section(rep: Report) -> str:
    """The forum's rules of thumb with this study's verdicts (bptt_harness.report.rules)."""
    if rep.rules is None:
        return ""
    parts = []
    for r in rep.rules.checks():
        rows = ""
        if not r.table.empty:
            cols: list[Column] = [("l" if c in ("source", "short", "long", "call") else "", c.replace("_", " "),
                                   _column_cell(c)) for c in r.table.columns]
            rows = f"<details><summary>the {len(r.table)} rows compared</summary>{table(r.table, cols)}</details>"
        parts.append(f'<h3>{esc(r.title)}: <span class="verdict">{esc(r.verdict)}</span></h3>'
                     f'<p class="small">The rule: {esc(r.claim)}</p><p>{esc(r.text)}</p>{rows}')
    return (f'<section id="rules-of-thumb"><h2>The rules of thumb, checked</h2>{"".join(parts)}</section>')


def _column_cell(col: str) -> Callable[[pd.Series], str]:
    def cell(x: pd.Series) -> str:
        v = x[col]
        return numbers.num(v, 4) if isinstance(v, float) else "" if v is None else str(v)
    return cell


def _diagnostics_section(rep: Report) -> str:
    sizes = rep.trials["batch_size"].dropna().unique() if "batch_size" in rep.trials else []
    return diagnostics.section(rep.diagnostics, rep.trials, sizes)


def render(rep: Report) -> str:
    adv = rep.advice
    findings = "".join(f"<dt>{esc(f.title)}</dt><dd>{esc(f.text)}</dd>" for f in adv.findings)
    notes = "".join(f"<li>{esc(n)}</li>" for n in adv.notes)
    body = f"""<section id="recommendation"><div class="headline"><b>Recommendation</b>{esc(adv.headline)}</div>
{f'<ul class="notes">{notes}</ul>' if notes else ''}</section>
<section id="answers"><h2>What the data says</h2><dl class="answers">{findings}</dl></section>
<section id="ranking-section"><h2>Ranking: perplexity against {esc(rep.ranking.cost_label)}</h2>{_ranking_section(rep)}
{_not_ranked_section(rep)}</section>
{_equal_time_section(rep)}
{_budget_section(rep)}
{_rules_section(rep)}
{_trials_section(rep)}
{_profile_section(rep)}
{_memory_section(rep)}
{_diagnostics_section(rep)}"""
    footer = (f"Generated by bptt-harness on {esc(rep.generated_at)}. Per-trial data: trials.csv; per-configuration "
              "means and spreads: configs.csv (columns documented in bptt_harness/report/README.md).")
    description = rep.info.get("description")
    return page(f"Which bptt and batch size? — {rep.study_name}", body, footer=footer, meta=_meta(rep),
                description=description if isinstance(description, str) else "")
