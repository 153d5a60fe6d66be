"""Plotly figures of a report, each with the caption computed from what it draws.

A caption describes only what is on the figure: marks that appear (OOM and diverged cells, a
recommendation star, an equal-time line, a reference configuration), the panels that exist, and where
its numbers come from (the trials, or the profile's few timed steps). Figure text is generated here
(numbers and fixed words), never user text: plotly renders some HTML-like tags in its labels, so study
names and errors stay out of figures. Numbers are formatted by :mod:`bptt_harness.report.numbers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bptt_harness.record import COST_LABELS
from bptt_harness.report import numbers
from bptt_harness.report.budget import BudgetVerdict, Leg, at_text
from bptt_harness.report.frame import CURVE, TRAIN_CURVE, label, labels, varying_fields
from bptt_harness.report.memory import MemoryFit, profile_points, trial_points, window_x
from bptt_harness.report.page import Drawn
from bptt_harness.report.rank import EqualTime, Ranking
from bptt_harness.report.space import is_grid

__all__ = ["HEATMAPS", "SOURCES", "budget_verdict", "curves", "heatmap", "memory", "parallel", "pareto",
           "profile_cells", "training"]

LAYOUT = dict(template="plotly_white", height=430, margin=dict(l=70, r=30, t=30, b=60),
              font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=13))
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf"]
_MARK = {"oom": "OOM", "diverged": "diverged", "failed": "failed"}
# The shape of the PyTorch word-language-model example, drawn beside the best as a reference.
REFERENCE = (35, 20)

# metric -> (name, which end is good, colour scale with yellow at the good end, significant figures)
HEATMAPS = {
    "val_ppl": ("Validation perplexity", "lower is better", "Viridis_r", 4),
    "tokens_per_s": ("Training throughput, tokens/s", "higher is better", "Viridis", 3),
    "peak_mem_mib": ("Peak training memory, MiB", "lower is better", "Cividis_r", 3),
    "joules_per_ktok": ("Energy, joules per 1k training tokens", "lower is better", "Viridis_r", 3),
}
# Where a heatmap's numbers come from, as its title and caption say it.
SOURCES = {
    "trials": ("trials", "each configuration's mean over its seeds that finished, from full training runs"),
    "profile": ("profile", "a few timed steps per cell after warm-up (bptt-harness profile), not full training"),
}


def _cell_choice(configs: pd.DataFrame) -> pd.DataFrame:
    """One configuration per (bptt, batch size) cell: the best-perplexity ok one, else any."""
    c = configs.dropna(subset=["bptt", "batch_size"]).copy()
    c["_ok"] = c["n"] > 0
    c = c.sort_values(["_ok", "val_ppl"], ascending=[False, True], na_position="last", kind="mergesort")
    return c.drop_duplicates(["bptt", "batch_size"], keep="first")


def _status(r: pd.Series) -> str:
    return "oom" if r["n_oom"] else "diverged" if r["n_diverged"] else "failed"


def heatmap(configs: pd.DataFrame, metric: str, source: str = "trials", title: str | None = None) -> Drawn | None:
    """bptt (rows) x batch size (columns); OOM, diverged and failed cells are marked, not coloured."""
    name, direction, scale, digits = HEATMAPS[metric]
    cells = _cell_choice(configs)
    if cells.empty or metric not in cells or cells[metric].notna().sum() == 0 or not is_grid(cells):
        return None  # a scattered search space gets bptt_harness.report.space.scatter instead
    bptts = sorted(cells["bptt"].unique())
    bss = sorted(cells["batch_size"].unique())
    yi = {b: i for i, b in enumerate(bptts)}
    xi = {b: i for i, b in enumerate(bss)}
    z = np.full((len(bptts), len(bss)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    hover = np.full(z.shape, "not run", dtype=object)
    marks: set[str] = set()
    starred = False
    for _, r in cells.iterrows():
        i, j = yi[r["bptt"]], xi[r["batch_size"]]
        v = r[metric]
        if r["n"] > 0 and pd.notna(v):
            z[i, j] = v
            star = bool(r["n_oom"] + r["n_diverged"] + r["n_other"])
            starred |= star
            text[i, j] = numbers.num(v, digits) + ("*" if star else "")
            hover[i, j] = f"{label(r)}: {numbers.num(v, digits)} (n={int(r['n'])})"
        elif r["n"] == 0:
            status = _status(r)
            marks.add(status)
            text[i, j] = _MARK[status]
            hover[i, j] = f"{label(r)}: {_MARK[status]}"
    xs, ys = [str(int(b)) for b in bss], [str(int(b)) for b in bptts]
    fig = go.Figure(go.Heatmap(
        z=z, x=xs, y=ys, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text", colorscale=scale,
        hoverongaps=False, colorbar=dict(thickness=14), xgap=2, ygap=2))
    # Cells that did not finish: a grey background so a missing colour reads as "did not run to the end".
    bad = np.where(np.isnan(z) & (text != ""), 1.0, np.nan)
    if np.isfinite(bad).any():
        fig.add_trace(go.Heatmap(z=bad, x=xs, y=ys, colorscale=[[0, "#d9d9d9"], [1, "#d9d9d9"]], showscale=False,
                                 hoverinfo="skip", xgap=2, ygap=2, text=np.where(np.isfinite(bad), text, ""),
                                 texttemplate="%{text}", textfont=dict(color="#b00020")))
    fig.update_layout(**LAYOUT)
    fig.update_xaxes(title="batch size", type="category")
    fig.update_yaxes(title="bptt", type="category")
    short, where = SOURCES[source]
    caption = [f"Each cell is one bptt × batch size: {name[0].lower()}{name[1:]} ({direction}; yellow is the good "
               f"end), {where}."]
    for status, words in (("oom", "ran out of memory" + (" — the memory wall" if metric == "peak_mem_mib" else "")),
                          ("diverged", "diverged in every run"), ("failed", "did not finish (pruned, timed out or failed)")):
        if status in marks:
            caption.append(f"Grey cells marked {_MARK[status]} {words}.")
    if starred:
        caption.append("* marks cells where some runs did not finish; the value is the mean of those that did.")
    if source == "trials" and len(configs.dropna(subset=["bptt", "batch_size"])) > len(cells):
        caption.append("Where several configurations share a cell (other searched keys), the one with the lowest "
                       "perplexity is shown.")
    return Drawn(fig, title or f"{name} — {short}", " ".join(caption))


def pareto(ranking: Ranking, recommended: str | None) -> Drawn | None:
    t = ranking.table
    cost = ranking.cost
    if t.empty or cost not in t or t[cost].notna().sum() == 0:
        return None
    extra = varying_fields(t)
    names = labels(t, extra)
    fig = go.Figure()
    front = t["pareto_rank"] == 1
    bars = False
    for mask, name, color, size in ((~front, "dominated", "#9e9e9e", 8), (front, "Pareto front (rank 1)", "#1f77b4", 11)):
        d = t[mask]
        if d.empty:
            continue
        visible = bool(d["val_ppl_std"].notna().any())
        bars |= visible
        fig.add_trace(go.Scatter(
            x=d[cost], y=d["val_ppl"], mode="markers", name=name, marker=dict(color=color, size=size),
            error_y=dict(type="data", array=d["val_ppl_std"].fillna(0), visible=visible, thickness=1),
            text=[f"{names[i]}<br>perplexity {numbers.num(p, 4)}<br>{numbers.cost(c, cost)}" for i, p, c in
                  zip(np.flatnonzero(mask.to_numpy()), d["val_ppl"], d[cost])],
            hovertemplate="%{text}<extra>rank %{customdata}</extra>", customdata=d["pareto_rank"]))
    f = t[front].sort_values(cost)
    if len(f) > 1:
        fig.add_trace(go.Scatter(x=f[cost], y=f["val_ppl"], mode="lines", line=dict(color="#1f77b4", dash="dot"),
                                 showlegend=False, hoverinfo="skip"))
    starred = recommended is not None and bool((t["config_key"] == recommended).any())
    if starred:
        r = t[t["config_key"] == recommended].iloc[0]
        fig.add_trace(go.Scatter(x=[r[cost]], y=[r["val_ppl"]], mode="markers", name="recommended",
                                 marker=dict(symbol="star", size=20, color="#ff7f0e", line=dict(color="black", width=1)),
                                 hovertemplate=label(r, extra) + "<extra>recommended</extra>"))
    fig.update_layout(**LAYOUT, legend=dict(orientation="h", y=-0.2))
    pos = t[cost][np.isfinite(t[cost].astype(float))]
    fig.update_xaxes(title=COST_LABELS.get(cost, cost), type="log" if len(pos) and pos.min() > 0
                     and pos.max() / pos.min() > 20 else "linear")
    fig.update_yaxes(title="validation perplexity")
    caption = [f"Each point is a configuration (trials); the blue ones are not beaten on both perplexity and "
               f"{ranking.cost_label}: left is cheaper, down is better."]
    if len(f) > 1:
        caption.append("The dotted line joins the front.")
    if starred:
        caption.append("The star is the recommendation.")
    if bars:
        caption.append("Bars: ± 1 standard deviation of perplexity over seeds.")
    return Drawn(fig, f"Perplexity against {ranking.cost_label}: the Pareto front", " ".join(caption))


def _top_keys(t: pd.DataFrame, top: int) -> tuple[list[str], bool]:
    """The best ``top`` configurations, plus the reference shape when it was run and is not among them."""
    keys = list(t["config_key"].head(top))
    ref = t[(t["bptt"] == REFERENCE[0]) & (t["batch_size"] == REFERENCE[1])]
    if len(ref) and ref.iloc[0]["config_key"] not in keys:
        keys.append(ref.iloc[0]["config_key"])
        return keys, True
    return keys, False


def _points(curve: object, y: str) -> list[dict]:
    if not isinstance(curve, list):
        return []
    return [p for p in curve if isinstance(p, dict) and isinstance(p.get(y), int | float) and math.isfinite(p[y])]


def _ref_words(added: bool) -> str:
    return f", and bptt {REFERENCE[0]} × bs {REFERENCE[1]} (the PyTorch example's shape) for reference" if added else ""


def curves(trials: pd.DataFrame, ranking: Ranking, equal_time: EqualTime | None, top: int = 6) -> Drawn | None:
    """Validation perplexity against training tokens (and seconds, where recorded) for the best configurations."""
    t = ranking.table
    if t.empty:
        return None
    keys, ref_added = _top_keys(t, top)
    extra = varying_fields(t)
    names = dict(zip(t["config_key"], labels(t, extra)))
    ok = trials[(trials["status"] == "ok") & trials["config_key"].isin(keys)]
    runs = {k: [pts for c in ok.loc[ok["config_key"] == k, CURVE].head(5) if (pts := _points(c, "ppl"))] for k in keys}
    drawn_keys = [k for k in keys if runs[k]]
    if not drawn_keys:
        return None
    timed = any(p.get("seconds") is not None for k in drawn_keys for pts in runs[k] for p in pts)
    axes = [("tokens", "training tokens")] + ([("seconds", "training seconds")] if timed else [])
    # No subplot titles: the axis titles say what each panel is, and a title there runs into plotly's toolbar.
    fig = make_subplots(rows=1, cols=len(axes), horizontal_spacing=0.08)
    for ci, key in enumerate(drawn_keys):
        for n, pts in enumerate(runs[key]):
            for col, (xk, _) in enumerate(axes, start=1):
                xy = [(p[xk], p["ppl"]) for p in pts if p.get(xk) is not None]
                fig.add_trace(go.Scatter(
                    x=[a for a, _ in xy], y=[b for _, b in xy], mode="lines+markers", name=names.get(key, key),
                    legendgroup=key, showlegend=n == 0 and col == 1, line=dict(color=PALETTE[ci % len(PALETTE)], width=2),
                    marker=dict(size=5), text=[f"{numbers.num(a, 4)} {xk}: ppl {numbers.num(b, 4)}" for a, b in xy],
                    hovertemplate=names.get(key, key) + "<br>%{text}<extra></extra>"), row=1, col=col)
    line = timed and equal_time is not None and bool(equal_time.seconds)
    if line:
        assert equal_time is not None and equal_time.seconds is not None
        fig.add_vline(x=equal_time.seconds, line=dict(color="#555", dash="dash"), row=1, col=2)
        # At the foot of the panel, where it cannot run into the panel's title.
        fig.add_annotation(x=equal_time.seconds, y=0.0, yref="y2 domain", xref="x2", text="equal time",
                           showarrow=False, xanchor="left", yanchor="bottom", font=dict(size=11, color="#555"))
    fig.update_layout(**{**LAYOUT, "height": 460}, legend=dict(orientation="h", y=-0.22))
    fig.update_yaxes(type="log")
    fig.update_yaxes(title="validation perplexity", row=1, col=1)
    for col, (_, words) in enumerate(axes, start=1):
        fig.update_xaxes(title=words, row=1, col=col)
    shown = len([k for k in drawn_keys if not (ref_added and k == keys[-1])])
    panels = "against training tokens (left) and training seconds (right)" if timed else "against training tokens"
    caption = (f"Validation perplexity at each checkpoint of the {shown} best configuration(s){_ref_words(ref_added and keys[-1] in drawn_keys)}, "
               f"{panels}; one line per run (trials).")
    if line:
        assert equal_time is not None
        caption += f" The dashed line is the equal-time comparison point ({numbers.seconds(equal_time.seconds)})."
    return Drawn(fig, "Validation perplexity during training", caption)


# Per log point of the training curve: key -> (axis title, caption words).
TRAIN_SERIES = {"loss": ("training loss (nats/token)", "training loss (mean over each log interval)"),
                "grad_norm": ("gradient norm", "gradient norm before clipping"),
                "lr": ("learning rate", "learning rate")}


def training(trials: pd.DataFrame, ranking: Ranking, top: int = 6) -> Drawn | None:
    """The training curves the trials recorded (loss; gradient norm and learning rate where the trainer logged
    them) against training tokens, for the best configurations."""
    t = ranking.table
    if t.empty or TRAIN_CURVE not in trials:
        return None
    keys, ref_added = _top_keys(t, top)
    ok = trials[(trials["status"] == "ok") & trials["config_key"].isin(keys)]
    series = [s for s in TRAIN_SERIES if any(_points(c, s) for c in ok[TRAIN_CURVE])]
    if not series:
        return None
    names = dict(zip(t["config_key"], labels(t, varying_fields(t))))
    # Each panel's quantity as a title above it: y-axis titles of three side-by-side panels run into the
    # neighbouring panel on a narrow page.
    fig = make_subplots(rows=1, cols=len(series), horizontal_spacing=0.07,
                        subplot_titles=[TRAIN_SERIES[s][0] for s in series])
    drawn: list[str] = []
    highest: dict[str, float] = {}
    for ci, key in enumerate(keys):
        for n, c in enumerate(ok.loc[ok["config_key"] == key, TRAIN_CURVE].head(5)):
            for col, s in enumerate(series, start=1):
                pts = [p for p in _points(c, s) if p.get("tokens") is not None]
                if not pts:
                    continue
                if key not in drawn:
                    drawn.append(key)
                highest[s] = max(highest.get(s, 0.0), *(float(p[s]) for p in pts if p.get(s) is not None))
                fig.add_trace(go.Scatter(
                    x=[p["tokens"] for p in pts], y=[p[s] for p in pts], mode="lines", name=names.get(key, key),
                    legendgroup=key, showlegend=n == 0 and col == 1, line=dict(color=PALETTE[ci % len(PALETTE)], width=1.5),
                    text=[f"{numbers.num(p['tokens'], 4)} tokens: {s} {numbers.num(p[s], 4)}" for p in pts],
                    hovertemplate=names.get(key, key) + "<br>%{text}<extra></extra>"), row=1, col=col)
    for col, s in enumerate(series, start=1):
        fig.update_xaxes(title="training tokens", row=1, col=col)
        # The lr from 0 up: a constant lr would otherwise sit on an axis centred on it, reading as 0.
        fig.update_yaxes(type="log" if s != "lr" else "linear", row=1, col=col,
                         **({"range": [0, 1.15 * highest[s]]} if s == "lr" and highest.get(s, 0) > 0 else {}))
    fig.update_annotations(font=dict(size=13))
    # Room above the panels for their titles below plotly's toolbar.
    fig.update_layout(**{**LAYOUT, "height": 470, "margin": dict(l=70, r=30, t=70, b=60)},
                      legend=dict(orientation="h", y=-0.24))
    words = [TRAIN_SERIES[s][1] for s in series]
    what = words[0] if len(words) == 1 else "from left to right: " + ", ".join(words)
    shown = len([k for k in drawn if not (ref_added and k == keys[-1])])
    caption = (f"What the trials logged while training, against training tokens, for the {shown} best "
               f"configuration(s){_ref_words(ref_added and keys[-1] in drawn)}; one line per run; {what}.")
    missing = [TRAIN_SERIES[s][1] for s in ("grad_norm", "lr") if s not in series]
    if missing:
        caption += f" The trials did not log the {' or the '.join(missing)} per log point, so they are not drawn."
    return Drawn(fig, "Training curves", caption)


def _dimension(values: pd.Series, name: str) -> dict:
    """One axis of a parallel-coordinates plot: numbers as they are (log for spans over 20x), words as codes."""
    v = values.dropna()
    if v.map(lambda x: isinstance(x, bool | str)).any() or not pd.api.types.is_numeric_dtype(values):
        cats = sorted(v.astype(str).unique())
        codes = values.astype(str).map({c: i for i, c in enumerate(cats)})
        return dict(label=name, values=codes, tickvals=list(range(len(cats))), ticktext=cats)
    x = values.astype(float)
    if len(v) and v.min() > 0 and v.max() / v.min() > 20:
        ticks = sorted(v.unique())
        ticks = ticks if len(ticks) <= 8 else [ticks[int(i)] for i in np.linspace(0, len(ticks) - 1, 8)]
        return dict(label=f"{name} (log)", values=np.log10(x), tickvals=[math.log10(t) for t in ticks],
                    ticktext=[numbers.num(t, 3) for t in ticks])
    return dict(label=name, values=x)


def parallel(configs: pd.DataFrame, keys: Sequence[str]) -> Drawn | None:
    """One line per finished configuration through its searched keys to its perplexity: for searches of
    more than two keys, where a heatmap over bptt x batch size hides the others."""
    ok = configs[(configs["n"] > 0) & configs["val_ppl"].notna()]
    keys = [k for k in keys if k in ok.columns]
    if len(keys) <= 2 or len(ok) < 2:
        return None
    dims = [_dimension(ok[k], k.replace("_", " ")) for k in keys]
    dims.append(dict(label="val ppl", values=ok["val_ppl"].astype(float)))
    fig = go.Figure(go.Parcoords(line=dict(color=ok["val_ppl"].astype(float), colorscale="Viridis_r", showscale=True,
                                           colorbar=dict(title="val ppl", thickness=14)), dimensions=dims))
    fig.update_layout(**{**LAYOUT, "margin": dict(l=60, r=60, t=50, b=40)})
    caption = (f"One line per configuration that finished ({len(ok)}, trials) through the {len(keys)} searched keys "
               f"({', '.join(k.replace('_', ' ') for k in keys)}) to its validation perplexity; colour is perplexity, "
               "yellow is better. Drag along an axis to keep a range.")
    return Drawn(fig, "The searched keys and perplexity", caption)


def profile_cells(profile: pd.DataFrame) -> pd.DataFrame:
    """The profile's grid cells shaped like configs.csv rows, so :func:`heatmap` draws them."""
    g = profile[profile["phase"] == "grid"].copy()
    fits = g["status"].isin(("ok", "diverged"))
    return g.assign(n=fits.astype(int), n_oom=(g["status"] == "oom").astype(int), n_diverged=0, val_ppl=float("nan"),
                    n_other=(~fits & (g["status"] != "oom")).astype(int),
                    config_key=[f"bptt={int(b)},batch_size={int(s)}" for b, s in zip(g["bptt"], g["batch_size"])])


def _memory_sources(trials: pd.DataFrame, fit: MemoryFit | None,
                    profile: pd.DataFrame | None) -> list[tuple[str, pd.DataFrame, bool]]:
    """(name, points with x/y/text, fitted) per source of peak-memory measurements, the fitted one first."""
    out = []
    prof = profile_points(profile) if profile is not None else None
    tri = trial_points(trials, fit.shape if fit is not None and fit.source == "trials" else None)
    fitted = fit.source if fit is not None else None
    if prof is not None and len(prof):
        out.append(("profile cells", prof, fitted == "profile"))
    if len(tri):
        out.append(("trials", tri, fitted == "trials"))
    out.sort(key=lambda s: not s[2])
    return out


def memory(trials: pd.DataFrame, fit: MemoryFit | None, card_mib: float | None,
           profile: pd.DataFrame | None = None) -> Drawn | None:
    """Peak memory against the longest window x batch size: the points the line is fitted on, and any other
    source of the same measurement drawn apart and named."""
    sources = _memory_sources(trials, fit, profile)
    if not sources:
        return None
    fig = go.Figure()
    for name, d, fitted in sources:
        filled = fitted or (fit is None and name == "trials")
        fig.add_trace(go.Scatter(
            x=d["x"], y=d["y"], mode="markers",
            name=name if fit is None else f"{name} (fitted)" if fitted else f"{name} (not fitted)",
            marker=dict(size=8 if filled else 9, color="#1f77b4" if filled else "#6a3d9a",
                        symbol="circle" if filled else "diamond-open", line=dict(width=1.5)),
            text=[f"{n}: {numbers.count(x)} tokens/step, {numbers.mib(y)}" for n, x, y in zip(d["text"], d["x"], d["y"])],
            hovertemplate="%{text}<extra></extra>"))
    oom = trials[(trials["status"] == "oom") & trials["bptt"].notna() & trials["batch_size"].notna()]
    x_hi = max(float(d["x"].max()) for _, d, _ in sources)
    if len(oom):
        x_hi = max(x_hi, float(window_x(oom).max()))
    caption = []
    if fit is not None:
        xs = np.linspace(0, x_hi * 1.05, 50)
        ys = np.asarray(fit.predict(xs), dtype=float)
        if fit.margin_mib:
            half = np.array([fit.upper(x) for x in xs]) - ys   # widens away from the measured range
            fig.add_trace(go.Scatter(x=np.r_[xs, xs[::-1]], y=np.r_[ys + half, (ys - half)[::-1]],
                                     fill="toself", fillcolor="rgba(255,127,14,0.15)", line=dict(width=0),
                                     name="95% prediction interval", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#ff7f0e"),
                                 name=f"fit: {numbers.num(fit.intercept_mib, 3)} + {numbers.num(fit.slope_mib, 4)} × bptt × bs"
                                 if fit.linear else f"fit at bs {numbers.num(fit.bs_ref, 3)}: {fit.law()}"))
        fitted_name = sources[0][0] if sources[0][2] else fit.source
        caption.append(f"The line is fitted on the {fit.n_points} {fitted_name} (filled points)"
                       + (" with its 95% prediction interval" if fit.margin_mib else "")
                       + ": fitted points far from the line mean the linear model does not hold.")
    for name, d, fitted in sources:
        if fitted or fit is None:
            continue
        resid = d["y"].to_numpy(dtype=float) - np.asarray(fit.predict(d["x"].to_numpy(dtype=float)), dtype=float)
        med = float(np.median(resid))
        side = "above" if med > 0 else "below"
        caption.append(f"Open diamonds: the {len(d)} {name}, not fitted — they measure peak memory in another run, "
                       f"and sit {numbers.mib(abs(med))} {side} the line (median).")
    if fit is None:
        caption.append("Measured peak memory against tokens per step; too few distinct shapes for a fitted line.")
    if len(oom):
        y_oom = card_mib or max(float(d["y"].max()) for _, d, _ in sources)
        fig.add_trace(go.Scatter(x=window_x(oom), y=[y_oom] * len(oom), mode="markers", name="out of memory",
                                 marker=dict(symbol="x", size=11, color="#d62728"), text=labels(oom),
                                 hovertemplate="%{text}: OOM<extra></extra>"))
        caption.append(f"Red crosses: the {len(oom)} trial(s) that ran out of memory"
                       + (", drawn at the card's size." if card_mib else ", drawn at the largest measured peak."))
    if card_mib:
        fig.add_hline(y=card_mib, line=dict(color="#d62728", dash="dash"),
                      annotation_text=f"this card: {numbers.mib(card_mib)}", annotation_position="top left")
        caption.append("The dashed line is this card's memory.")
    fig.update_layout(**LAYOUT, legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title="longest window × batch size (tokens per step)")
    fig.update_yaxes(title="peak memory (MiB)")
    return Drawn(fig, "Memory model: peak memory against bptt × batch size", " ".join(caption))


def _leg_figure_ok(leg: Leg | None) -> bool:
    return leg is not None and len(leg.table) >= 2


def budget_verdict(verdict: BudgetVerdict, ranked: pd.DataFrame, top: int = 6) -> Drawn | None:
    """Perplexity of the top configurations at every budget fraction and grid time; the leader at each point
    is starred. An axis with one point only is left to the table (a one-point axis says nothing)."""
    legs = [leg for leg in (verdict.tokens, verdict.time) if leg is not None and _leg_figure_ok(leg)]
    single = [leg for leg in (verdict.tokens, verdict.time) if leg is not None and len(leg.table) == 1]
    if not legs:
        return None
    words = {"tokens": "each checkpoint fraction of the token budget", "time": "each point of the common time grid"}
    fig = make_subplots(rows=1, cols=len(legs), horizontal_spacing=0.08)
    keys = list(ranked["config_key"].head(top))
    for leg in legs:
        keys += [k for k in leg.table["best"] if k not in keys]
    rows = ranked.set_index("config_key")
    for col, leg in enumerate(legs, start=1):
        for i, key in enumerate(keys):
            if key not in leg.values.index:
                continue
            s = leg.values.loc[key].dropna()
            name = label(rows.loc[key]) if key in rows.index else key
            fig.add_trace(go.Scatter(x=list(s.index), y=list(s.values), mode="lines+markers", name=name,
                                     legendgroup=key, showlegend=col == 1, marker=dict(size=5),
                                     line=dict(color=PALETTE[i % len(PALETTE)], width=2),
                                     text=[f"{at_text(leg, a)}: ppl {numbers.num(p, 4)}" for a, p in s.items()],
                                     hovertemplate=name + "<br>%{text}<extra></extra>"), row=1, col=col)
        t = leg.table
        fig.add_trace(go.Scatter(x=list(t["at"]), y=list(t["best_ppl"]), mode="markers", name="best there",
                                 legendgroup="best", showlegend=col == 1,
                                 marker=dict(symbol="star", size=14, color="#ffd700", line=dict(color="black", width=1)),
                                 text=[label(rows.loc[k]) if k in rows.index else k for k in t["best"]],
                                 hovertemplate="best: %{text}<br>ppl %{y:.4g}<extra></extra>"), row=1, col=col)
        if leg.axis == "tokens":
            fig.update_xaxes(tickformat=".0%", title="fraction of the token budget (equal tokens)", row=1, col=col)
        else:
            fig.update_xaxes(title="training seconds (equal time)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_yaxes(title="validation perplexity", row=1, col=1)
    fig.update_layout(**{**LAYOUT, "height": 460}, legend=dict(orientation="h", y=-0.22))
    places = [words[leg.axis] + ("" if len(legs) == 1 else " (left)" if i == 0 else " (right)")
              for i, leg in enumerate(legs)]
    caption = (f"Perplexity of the top configurations at {' and at '.join(places)} (trials); the star marks the best "
               "at each point. A star that moves at the last point means a longer run may change the verdict.")
    for leg in single:
        caption += (f" The {'time grid' if leg.axis == 'time' else 'token budget'} has one comparison point only "
                    f"({at_text(leg, float(leg.table.iloc[0]['at']))}): it is in the table above, not drawn.")
    return Drawn(fig, "The verdict at every budget", caption)
