"""One self-contained ``report.html``: plotly.js inlined once, no network, every user string escaped.

Order on the page: the recommendation, the answers, the ranking table, then the figures, each with
a one-line caption saying what to read from it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from bptt_harness.report import budget, figures, space
from bptt_harness.report.build import Report
from bptt_harness.report.frame import COST_LABELS, label, varying_fields

Column = tuple[str, str, Callable[[pd.Series], str]]

CSS = """
:root { --fg:#1d2228; --muted:#5b6570; --line:#e3e6ea; --accent:#1f6feb; --bad:#b00020; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:#fafbfc; }
main { max-width:1180px; margin:0 auto; padding:24px 28px 60px; background:#fff; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:34px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
.meta { color:var(--muted); font-size:13px; margin:0 0 18px; }
.description { font-size:16px; margin:2px 0 8px; }
.meta span { margin-right:14px; white-space:nowrap; }
.headline { border-left:5px solid var(--accent); background:#eef5ff; padding:14px 18px; font-size:17px; margin:12px 0; }
.headline b { display:block; font-size:13px; text-transform:uppercase; letter-spacing:.04em; color:var(--accent); }
.notes { color:var(--muted); font-size:13px; margin:6px 0 0 0; padding-left:18px; }
dl.answers dt { font-weight:600; margin-top:10px; }
dl.answers dd { margin:2px 0 0 0; }
table { border-collapse:collapse; width:100%; font-size:13.5px; margin:8px 0; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f3f5f7; position:sticky; top:0; }
td.l, th.l { text-align:left; }
td.wrap, th.wrap { white-space:normal; text-align:left; max-width:520px; }
tr.front td:first-child { border-left:3px solid var(--accent); }
tr.rec td { background:#fff6e5; }
.bad { color:var(--bad); }
figure { margin:18px 0 26px; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:2px; }
.plot { width:100%; min-height:430px; }
.small { color:var(--muted); font-size:12.5px; }
details summary { cursor:pointer; color:var(--accent); }
footer { margin-top:40px; color:var(--muted); font-size:12px; }
"""


def esc(value: object) -> str:
    """Escape anything for HTML text or attribute values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(str(value), quote=True)


@lru_cache(maxsize=1)
def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _json_for_script(text: str) -> str:
    """JSON inside <script>: no '</script>' breakout, no HTML parsing surprises."""
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def figure_block(div_id: str, fig: go.Figure, caption: str) -> str:
    spec = _json_for_script(pio.to_json(fig, validate=False))
    return (f'<figure><div id="{esc(div_id)}" class="plot"></div><figcaption>{esc(caption)}</figcaption>'
            f'<script>(function(){{var f={spec};Plotly.newPlot("{esc(div_id)}",f.data,f.layout,'
            '{responsive:true,displaylogo:false});})();</script></figure>')


def table(rows: pd.DataFrame, columns: Sequence[Column], *, row_class: Callable[[pd.Series], str] | None = None,
          table_id: str | None = None) -> str:
    head = "".join(f'<th class="{klass}">{esc(h)}</th>' for klass, h, _ in columns)
    body = []
    for _, r in rows.iterrows():
        cls = row_class(r) if row_class else ""
        cells = "".join(f'<td class="{klass}">{esc(fn(r))}</td>' for klass, _, fn in columns)
        body.append(f'<tr class="{esc(cls)}">{cells}</tr>')
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _num(v: object, fmt: str = "{:.4g}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return fmt.format(v)


def _pm(r: pd.Series, col: str, fmt: str = "{:.4g}") -> str:
    v = r.get(col)
    if v is None or not math.isfinite(v):
        return ""
    s = r.get(f"{col}_std")
    text = fmt.format(v)
    if r.get("n", 1) > 1 and s is not None and math.isfinite(s):
        text += " ± " + (f"{s:,.0f}" if fmt == "{:,.0f}" else f"{s:.2g}")
    return text


def _at_cell(leg: Any) -> Callable[[pd.Series], str]:
    return lambda x: budget.at_text(leg, x["at"])


def _card_cell(card: str) -> Callable[[pd.Series], str]:
    return lambda x: _int(x[card])


def _cost_cell(col: str, fmt: str) -> Callable[[pd.Series], str]:
    def cell(x: pd.Series) -> str:
        return _num(x.get(col), fmt) + _timing_mark(x, col)
    return cell


def _timing_mark(x: pd.Series, col: str) -> str:
    """A star on a time-based figure whose timing is not clean (see configs.csv ``timing_note``)."""
    timed = col in ("tokens_per_s", "seconds_per_ktok", "joules_per_ktok")
    return " *" if timed and isinstance(x.get("timing_note"), str) and x.get("timing_note") else ""


def _meta(rep: Report) -> str:
    t = rep.trials
    info = rep.info
    first = lambda c: (t[c].dropna().astype(str).mode().iloc[0] if c in t and t[c].notna().any() else None)  # noqa: E731
    counts = t["status"].value_counts()
    hw = first("gpu_name") or first("cpu_model") or "unknown hardware"
    budget = first("budget")
    resolved = t["resolved_budget_tokens"].dropna() if "resolved_budget_tokens" in t else pd.Series(dtype=float)
    declared = t["budget_tokens"].dropna()
    if budget == "tokens" and (len(resolved) or len(declared)):
        # What every trial was actually given: with `epochs` the declared tokens are not the budget.
        tokens = resolved.mode().iloc[0] if len(resolved) else declared.iloc[0]
        epochs = t["budget_epochs"].dropna() if "budget_epochs" in t else pd.Series(dtype=float)
        budget_text = f"{int(tokens):,} training tokens per trial" + (
            f" ({epochs.iloc[0]:g} x the train split)" if len(epochs) else "")
    elif budget == "seconds" and t["budget_seconds"].notna().any():
        budget_text = f"{t['budget_seconds'].dropna().iloc[0]:g} training seconds per trial"
    else:
        budget_text = None
    objectives = info.get("objectives")
    items = [("trials", ", ".join(f"{int(n)} {s}" for s, n in counts.items())),
             ("corpus", first("corpus")), ("budget", budget_text), ("hardware", hw),
             ("device", first("device")), ("objectives", ", ".join(map(str, objectives)) if isinstance(objectives, list) else None),
             ("ranked against", rep.ranking.cost_label), ("lr", first("lr_rule_description")),
             ("storage", rep.storage_display),
             ("generated", rep.generated_at)]
    return "\n".join(f"<span><b>{esc(k)}:</b> {esc(v)}</span>" for k, v in items if v)


def _description(rep: Report) -> str:
    """The study file's one-line ``description``, under the title."""
    text = rep.info.get("description")
    return f'<p class="description">{esc(text)}</p>\n' if isinstance(text, str) and text.strip() else ""


def _ranking_section(rep: Report, limit: int = 40) -> str:
    r = rep.ranking
    t = r.table
    if t.empty:
        return "<p>No configuration finished ok, so nothing is ranked.</p>"
    extra = varying_fields(rep.configs)
    cost = r.cost
    rec = rep.advice.recommended
    cols: list[Column] = [
        ("", "place", lambda x: f"{int(x['place'])}{'=' if x['tie'] else ''}"),
        ("l", "configuration", lambda x: label(x, extra)),
        ("", "Pareto rank", lambda x: str(int(x["pareto_rank"]))),
        ("", "val ppl", lambda x: _pm(x, "val_ppl")),
        ("", "n", lambda x: str(int(x["n"])) + (" (single-seed)" if str(x.get("single_seed")) == "True" else "")),
        ("", "interval", lambda x: f"{x['val_ppl_lo']:.4g}–{x['val_ppl_hi']:.4g}"
         if pd.notna(x.get("val_ppl_lo")) and pd.notna(x.get("val_ppl_hi")) else ""),
        ("", COST_LABELS.get(cost, cost), lambda x: _pm(x, cost, "{:.3g}" if cost != "peak_mem_mib" else "{:,.0f}")),
    ]
    for col, head, fmt in (("tokens_per_s", "tokens/s", "{:,.0f}"), ("peak_mem_mib", "peak MiB", "{:,.0f}"),
                           ("joules_per_ktok", "J / 1k tok", "{:.3g}")):
        if col != cost and t[col].notna().any():
            cols.append(("", head, _cost_cell(col, fmt)))
    cols.append(("wrap", "notes", lambda x: x.get("reason") or ""))
    rows = table(t.head(limit), cols, table_id="ranking",
                 row_class=lambda x: " ".join(c for c, on in (("front", x["pareto_rank"] == 1),
                                                                ("rec", x["config_key"] == rec)) if on))
    more = (f'<p class="small">Showing the top {limit} of {len(t)} ranked configurations; all are in configs.csv.</p>'
            if len(t) > limit else "")
    intro = ("<p class=\"small\">Pareto rank 1 = no other configuration is better on both perplexity and "
             f"{esc(r.cost_label)}; within a rank, lower perplexity first. Places marked “=” are ties: the "
             "configurations differ by less than 2 standard errors of the difference over seeds in perplexity "
             "(the interval is the mean ± 2 standard errors; a single-seed configuration borrows the study's pooled "
             "seed noise) and by less than the spread of repeats in cost. The highlighted row is the "
             "recommendation.</p>")
    marked = t[t["timing_note"].fillna("") != ""] if "timing_note" in t else t.iloc[:0]
    timing = [f"{label(x, extra)}: {x['timing_note']}" for _, x in marked.head(limit).iterrows()]
    notes = "".join(f"<li>{esc(n)}</li>" for n in [*r.notes, *(f"* timing: {n}" for n in timing)])
    return intro + rows + more + (f'<ul class="notes">{notes}</ul>' if notes else "")


def _equal_time_section(rep: Report, limit: int = 12) -> str:
    et = rep.equal_time
    if et.seconds is None or et.table.empty:
        return ""
    extra = varying_fields(rep.configs)
    cols: list[Column] = [
        ("", "place", lambda x: "not measured" if pd.isna(x["place_time"]) else str(int(x["place_time"]))),
        ("l", "configuration", lambda x: label(x, extra)),
        ("", f"ppl at {et.seconds:.3g} s", lambda x: _pm(x.rename({"ppl_at_time": "v", "ppl_at_time_std": "v_std"}), "v")),
        ("", "ppl at the budget", lambda x: _num(x["val_ppl"])),
        ("", "place at the budget", lambda x: str(int(x["place"]))),
    ]
    verdict = ("The two rankings disagree." if et.disagree else
               "The two rankings agree on the best configuration." if et.comparable else
               "The study's best had no validation checkpoint by then, so the two cannot be compared.")
    how = ("measured on the study's common time grid" + (f" (each point within {et.max_offset_s:.2g} s of it)"
                                                       if et.max_offset_s is not None else "")
           if et.on_grid else "interpolated between validation checkpoints (the study has no time grid)")
    return (f"<h2>Ranking at equal training time</h2><p>Perplexity of each configuration after {et.seconds:.3g} s of "
            f"training — the latest time every configuration reached — {esc(how)}; a configuration without a point "
            f"there is not measured and not ranked. {esc(verdict)}</p>" + table(et.table.head(limit), cols,
                                                                              table_id="equal-time"))


def _budget_section(rep: Report) -> str:
    """The verdict at every budget: the sentences and one table per axis (the figure is with the others)."""
    v = rep.budget
    legs = [leg for leg in (v.tokens, v.time) if leg is not None and not leg.table.empty]
    if not legs:
        return ""
    names = dict(zip(rep.ranking.table["config_key"], [label(r) for _, r in rep.ranking.table.iterrows()]))
    parts = [f"<h2>The verdict at every budget</h2><p>{esc(' '.join(v.sentences))}</p>"]
    for leg in legs:
        cols: list[Column] = [
            ("l", "at", _at_cell(leg)),
            ("l", "best there", lambda x: names.get(x["best"], x["best"])),
            ("", "ppl", lambda x: _num(x["best_ppl"])),
            ("l", "runner-up", lambda x: names.get(x["runner"], x["runner"] or "")),
            ("", "ppl ", lambda x: _num(x["runner_ppl"])),
            ("", "tie", lambda x: "yes" if x["tie"] else ""),
            ("", "measured", lambda x: str(int(x["measured"]))),
        ]
        title = "at equal tokens" if leg.axis == "tokens" else "at equal training time (time grid)"
        parts.append(f"<h3>{esc(title)}</h3>" + table(leg.table, cols, table_id=f"budget-{leg.axis}"))
    return "".join(parts)


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


def _memory_section(rep: Report) -> str:
    if not rep.fits:
        return _walls_section(rep)
    f = rep.fits[0]
    err = (f"RMS error {f.rmse_mib:,.1f} MiB, largest error {f.max_err_mib:,.1f} MiB, R² {f.r2:.4f}, slope ± "
           f"{f.slope_se:.2g} MiB" if math.isfinite(f.rmse_mib) else "exact through two points, no error estimate")
    what = "profiled cells" if f.source == "profile" else "trials"
    text = (f"<p>Fitted on {f.n_points} {what} of the {esc(f.shape)} model: peak memory ≈ "
            f"{f.intercept_mib:,.1f} MiB + {f.slope_mib:.4g} MiB × the longest window × batch size ({esc(err)}); "
            f"measured range {f.x_min:,.0f}–{f.x_max:,.0f} tokens per step.</p>")
    if math.isfinite(f.loo_max_pct):
        verdict = "within the 5% goal" if f.loo_max_pct <= 5 else "above the 5% goal: treat predictions with care"
        text += (f"<p>Leave-one-out check: each of the {f.n_points} points predicted from the fit of the others is off "
                 f"by {f.loo_median_pct:.1f}% (median), {f.loo_max_pct:.1f}% at most, {verdict}.</p>")
    if len(rep.fits) > 1:
        text += (f'<p class="small">The study has {len(rep.fits)} fits; this one is for {esc(f.shape)} '
                 f"({what}).</p>")
    if rep.cards is not None and not rep.cards.empty:
        cards = [c for c in rep.cards.columns if c != "batch_size"]
        cols: list[Column] = [("", "batch size", lambda x: str(int(x["batch_size"])))]
        cols += [("", c, _card_cell(c)) for c in cards]
        over = f" and {f.overhead_mib:,.0f} MiB outside torch's pool (CUDA context)" if f.overhead_mib else ""
        text += (f"<h3>Predicted largest bptt per batch size, by card (predictions, not measurements)</h3>"
                 f"<p class=\"small\">Each card's memory as the driver reports it (less than its nominal size), the "
                 f"upper end of the fit's 95% prediction interval (it widens away from the measured range){esc(over)}; "
                 "0 means even bptt 1 is predicted not to fit. Check the edge on the real card before relying on it.</p>"
                 + table(rep.cards, cols, table_id="memory-predictions"))
    elif not f.gpu:
        text += ("<p class=\"small\">Measured on CPU (the bytes a step holds, counted), so no GPU card predictions "
                 "are made.</p>")
    return text + _walls_section(rep)


def _walls_section(rep: Report) -> str:
    """The profile's memory wall: per bptt, the largest batch size that fit and the smallest that did not."""
    from bptt_harness.profile import walls_table

    if rep.profile is None or rep.profile.empty or not (rep.profile["phase"] == "wall").any():
        return ""
    w = walls_table(rep.profile)
    cols: list[Column] = [("", "bptt", lambda x: str(int(x["bptt"]))),
                          ("", "largest batch size that fits", lambda x: _int(x["largest_fit_bs"])),
                          ("", "smallest that ran out of memory", lambda x: _int(x["smallest_oom_bs"])),
                          ("", "peak MiB at the fit", lambda x: _num(x["peak_mib_at_fit"], "{:,.1f}"))]
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
        if isinstance(v, float):
            return _num(v, "{:,.0f}" if abs(v) >= 1000 else "{:.4g}")
        return "" if v is None else str(v)
    return cell


def _int(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{int(v):,}"


def render(rep: Report) -> str:
    adv = rep.advice
    findings = "".join(f"<dt>{esc(f.title)}</dt><dd>{esc(f.text)}</dd>" for f in adv.findings)
    notes = "".join(f"<li>{esc(n)}</li>" for n in adv.notes)
    figs: list[str] = []

    def add(div_id: str, fig: go.Figure | None, caption: str) -> None:
        if fig is not None:
            figs.append(figure_block(div_id, fig, caption))

    if not space.is_grid(rep.configs):
        add("fig-space", space.scatter(rep.configs),
            "The sampled configurations over bptt × batch size (log axes), coloured by validation perplexity: the "
            "search space is not a grid, so a heatmap would be mostly empty cells; red crosses ran out of memory or "
            "diverged.")
    add("fig-ppl", figures.heatmap(rep.configs, "val_ppl"),
        "Validation perplexity per bptt × batch size: yellow cells are the best models at this budget (in every "
        "heatmap here yellow is the good end); grey "
        "cells ran out of memory (OOM) or diverged, * marks cells where some repeats did.")
    add("fig-tps", figures.heatmap(rep.configs, "tokens_per_s"),
        "Throughput: how fast each shape trains on this machine; bigger bptt × batch size usually fills the device "
        "better until memory runs out.")
    add("fig-mem", figures.heatmap(rep.configs, "peak_mem_mib"),
        "Peak memory: it grows with bptt × batch size; the OOM cells are the memory wall.")
    add("fig-energy", figures.heatmap(rep.configs, "joules_per_ktok"),
        "Energy per 1,000 training tokens: the cost of the same amount of learning in joules.")
    add("fig-pareto", figures.pareto(rep.ranking, adv.recommended),
        f"Each point is a configuration; the blue ones are not beaten on both perplexity and {rep.ranking.cost_label}. "
        "Pick along the dotted front: left is cheaper, down is better; the star is the recommendation.")
    add("fig-curves", figures.curves(rep.trials, rep.ranking, rep.equal_time),
        "Validation perplexity during training for the best configurations (and bptt 35 × bs 20 as the reference): "
        "left at equal tokens, right at equal time; the dashed line is the equal-time ranking point.")
    add("fig-budget", budget.figure(rep.budget, rep.ranking.table),
        "The verdict at every budget: perplexity of the top configurations at each checkpoint fraction of the token "
        "budget (left) and on the common time grid (right); the star marks the best at each point. A star that "
        "still moves at the right end means a longer run may change the verdict.")
    if rep.profile is not None and len(rep.profile):
        cells = figures.profile_cells(rep.profile)
        add("fig-profile-tps", figures.heatmap(cells, "tokens_per_s"),
            "The profile (bptt-harness profile): throughput of every cell from a few timed steps after warm-up, "
            "without full training. Grey cells ran out of memory.")
        add("fig-profile-mem", figures.heatmap(cells, "peak_mem_mib"),
            "The profile: training peak memory of every cell; the table below gives the wall per bptt.")
    add("fig-memory", figures.memory(rep.trials, rep.fits[0] if rep.fits else None, rep.wall.card_mib),
        "Measured peak memory against tokens per step with the fitted line: points far from the line mean the "
        "linear model does not hold; red crosses are OOM trials.")
    title = f"Which bptt and batch size? — {rep.study_name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style>
<script>{_plotlyjs()}</script></head>
<body><main>
<h1>{esc(title)}</h1>
{_description(rep)}<p class="meta">{_meta(rep)}</p>
<section id="recommendation"><div class="headline"><b>Recommendation</b>{esc(adv.headline)}</div>
{f'<ul class="notes">{notes}</ul>' if notes else ''}</section>
<section id="answers"><h2>What the data says</h2><dl class="answers">{findings}</dl></section>
<section id="ranking-section"><h2>Ranking: perplexity against {esc(rep.ranking.cost_label)}</h2>{_ranking_section(rep)}
{_not_ranked_section(rep)}</section>
{_equal_time_section(rep)}
{_budget_section(rep)}
{_rules_section(rep)}
<section id="figures"><h2>Figures</h2>{''.join(figs) if figs else '<p>No figures: no trial finished.</p>'}</section>
<section id="memory-model"><h2>Memory model</h2>{_memory_section(rep) or '<p>Not enough memory measurements for a model.</p>'}</section>
<footer>Generated by bptt-harness on {esc(rep.generated_at)}. Per-trial data: trials.csv; per-configuration means and
spreads: configs.csv (columns documented in bptt_harness/report/README.md).</footer>
</main></body></html>
"""

