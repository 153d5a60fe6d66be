"""Plotly figures of a report. Figure text is generated here (numbers and fixed words), never user
text: plotly renders some HTML-like tags in its labels, so study names and errors stay out of figures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bptt_harness.report.frame import COST_LABELS, CURVE, label, labels, varying_fields
from bptt_harness.report.memory import MemoryFit
from bptt_harness.report.rank import EqualTime, Ranking
from bptt_harness.report.space import is_grid

_LAYOUT = dict(template="plotly_white", height=430, margin=dict(l=70, r=30, t=50, b=60),
               font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=13))
_MARK = {"oom": "OOM", "diverged": "diverged", "failed": "failed", "timeout": "timeout", "pruned": "pruned"}

HEATMAPS = {
    "val_ppl": ("Validation perplexity (lower is better)", "Viridis_r", "{:.4g}"),
    "tokens_per_s": ("Training throughput, tokens/s (higher is better)", "Viridis", "{:,.0f}"),
    "peak_mem_mib": ("Peak memory, MiB (lower is better)", "Cividis_r", "{:,.0f}"),
    "joules_per_ktok": ("Energy, joules per 1k tokens (lower is better)", "Viridis_r", "{:.3g}"),
}


def _cell_choice(configs: pd.DataFrame) -> pd.DataFrame:
    """One configuration per (bptt, batch size) cell: the best-perplexity ok one, else any."""
    c = configs.dropna(subset=["bptt", "batch_size"]).copy()
    c["_ok"] = c["n"] > 0
    c = c.sort_values(["_ok", "val_ppl"], ascending=[False, True], na_position="last", kind="mergesort")
    return c.drop_duplicates(["bptt", "batch_size"], keep="first")


def heatmap(configs: pd.DataFrame, metric: str) -> go.Figure | None:
    """bptt (rows) x batch size (columns); OOM and diverged cells are marked, not coloured."""
    title, scale, fmt = HEATMAPS[metric]
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
    for _, r in cells.iterrows():
        i, j = yi[r["bptt"]], xi[r["batch_size"]]
        v = r[metric]
        if r["n"] > 0 and pd.notna(v):
            z[i, j] = v
            text[i, j] = fmt.format(v) + ("*" if r["n_oom"] + r["n_diverged"] + r["n_other"] else "")
            hover[i, j] = f"{label(r)}: {fmt.format(v)} (n={int(r['n'])})"
        else:
            status = "oom" if r["n_oom"] else "diverged" if r["n_diverged"] else "failed"
            text[i, j] = _MARK[status]
            hover[i, j] = f"{label(r)}: {_MARK[status]}"
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(int(b)) for b in bss], y=[str(int(b)) for b in bptts], text=text, texttemplate="%{text}",
        hovertext=hover, hoverinfo="text", colorscale=scale, hoverongaps=False,
        colorbar=dict(thickness=14), xgap=2, ygap=2))
    # OOM / diverged cells: a grey background so a missing colour reads as "did not run to the end".
    bad = np.where(np.isnan(z) & (text != ""), 1.0, np.nan)
    if np.isfinite(bad).any():
        fig.add_trace(go.Heatmap(z=bad, x=[str(int(b)) for b in bss], y=[str(int(b)) for b in bptts],
                                 colorscale=[[0, "#d9d9d9"], [1, "#d9d9d9"]], showscale=False, hoverinfo="skip",
                                 xgap=2, ygap=2, text=np.where(np.isfinite(bad), text, ""), texttemplate="%{text}",
                                 textfont=dict(color="#b00020")))
    fig.update_layout(**_LAYOUT, title=dict(text=title, x=0.01))
    fig.update_xaxes(title="batch size", type="category")
    fig.update_yaxes(title="bptt", type="category")
    return fig


def pareto(ranking: Ranking, recommended: str | None) -> go.Figure | None:
    t = ranking.table
    cost = ranking.cost
    if t.empty or cost not in t or t[cost].notna().sum() == 0:
        return None
    extra = varying_fields(t)
    names = labels(t, extra)
    fig = go.Figure()
    front = t["pareto_rank"] == 1
    for mask, name, color, size in ((~front, "dominated", "#9e9e9e", 8), (front, "Pareto front (rank 1)", "#1f77b4", 11)):
        d = t[mask]
        if d.empty:
            continue
        fig.add_trace(go.Scatter(
            x=d[cost], y=d["val_ppl"], mode="markers", name=name, marker=dict(color=color, size=size),
            error_y=dict(type="data", array=d["val_ppl_std"].fillna(0), visible=bool(d["val_ppl_std"].notna().any()),
                         thickness=1),
            text=[names[i] for i in np.flatnonzero(mask.to_numpy())],
            hovertemplate="%{text}<br>perplexity %{y:.4g}<br>cost %{x:.4g}<extra>rank %{customdata}</extra>",
            customdata=d["pareto_rank"]))
    f = t[front].sort_values(cost)
    fig.add_trace(go.Scatter(x=f[cost], y=f["val_ppl"], mode="lines", line=dict(color="#1f77b4", dash="dot"),
                             showlegend=False, hoverinfo="skip"))
    if recommended is not None and (t["config_key"] == recommended).any():
        r = t[t["config_key"] == recommended].iloc[0]
        fig.add_trace(go.Scatter(x=[r[cost]], y=[r["val_ppl"]], mode="markers", name="recommended",
                                 marker=dict(symbol="star", size=20, color="#ff7f0e", line=dict(color="black", width=1)),
                                 hovertemplate=label(r, extra) + "<extra>recommended</extra>"))
    fig.update_layout(**_LAYOUT, title=dict(text="Perplexity against cost: the Pareto front", x=0.01),
                      legend=dict(orientation="h", y=-0.2))
    pos = t[cost][np.isfinite(t[cost].astype(float))]
    fig.update_xaxes(title=COST_LABELS.get(cost, cost), type="log" if len(pos) and pos.min() > 0
                     and pos.max() / pos.min() > 20 else "linear")
    fig.update_yaxes(title="validation perplexity")
    return fig


def curves(trials: pd.DataFrame, ranking: Ranking, equal_time: EqualTime | None, top: int = 6) -> go.Figure | None:
    """Validation perplexity against tokens and against seconds for the best configurations."""
    t = ranking.table
    if t.empty:
        return None
    keys = list(t["config_key"].head(top))
    canon = t[(t["bptt"] == 35) & (t["batch_size"] == 20)]
    if len(canon) and canon.iloc[0]["config_key"] not in keys:
        keys.append(canon.iloc[0]["config_key"])  # the canonical recipe as the reference
    extra = varying_fields(t)
    top_rows = t[t["config_key"].isin(keys)]
    names = dict(zip(top_rows["config_key"], labels(top_rows, extra)))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against training tokens", "against training seconds"),
                        horizontal_spacing=0.08)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]
    ok = trials[(trials["status"] == "ok") & trials["config_key"].isin(keys)]
    any_curve = False
    for ci, key in enumerate(keys):
        first = True
        for c in ok.loc[ok["config_key"] == key, CURVE].head(5):
            pts = [p for p in c if isinstance(p, dict) and p.get("ppl") is not None and math.isfinite(p["ppl"])]
            if not pts:
                continue
            any_curve = True
            color = palette[ci % len(palette)]
            for col, xk in ((1, "tokens"), (2, "seconds")):
                fig.add_trace(go.Scatter(x=[p.get(xk) for p in pts], y=[p["ppl"] for p in pts], mode="lines+markers",
                                         name=names.get(key, key), legendgroup=key, showlegend=first and col == 1,
                                         line=dict(color=color, width=2), marker=dict(size=5),
                                         hovertemplate=names.get(key, key) + "<br>%{x:.4g}: ppl %{y:.4g}<extra></extra>"),
                              row=1, col=col)
            first = False
    if not any_curve:
        return None
    if equal_time is not None and equal_time.seconds:
        fig.add_vline(x=equal_time.seconds, line=dict(color="#555", dash="dash"), row=1, col=2)
        fig.add_annotation(x=equal_time.seconds, y=1.0, yref="y2 domain", xref="x2", text="equal time",
                           showarrow=False, yanchor="bottom", font=dict(size=11, color="#555"))
    fig.update_layout(**{**_LAYOUT, "height": 460}, title=dict(text="Validation perplexity of the top configurations",
                                                                x=0.01),
                      legend=dict(orientation="h", y=-0.22))
    fig.update_yaxes(title="validation perplexity", type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title="tokens", row=1, col=1)
    fig.update_xaxes(title="seconds", row=1, col=2)
    return fig


def profile_cells(profile: pd.DataFrame) -> pd.DataFrame:
    """The profile's grid cells shaped like configs.csv rows, so :func:`heatmap` draws them."""
    g = profile[profile["phase"] == "grid"].copy()
    fits = g["status"].isin(("ok", "diverged"))
    return g.assign(n=fits.astype(int), n_oom=(g["status"] == "oom").astype(int), n_diverged=0, val_ppl=float("nan"),
                    n_other=(~fits & (g["status"] != "oom")).astype(int),
                    config_key=[f"bptt={int(b)},batch_size={int(s)}" for b, s in zip(g["bptt"], g["batch_size"])])


def memory(trials: pd.DataFrame, fit: MemoryFit | None, card_mib: float | None) -> go.Figure | None:
    d = trials[trials["peak_mem_mib"].notna() & trials["tokens_per_step"].notna() & (trials["status"] != "oom")]
    if d.empty:
        return None
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=d["tokens_per_step"], y=d["peak_mem_mib"], mode="markers", name="measured",
                             marker=dict(size=8, color="#1f77b4"),
                             text=labels(d),
                             hovertemplate="%{text}<br>%{x:,} tokens/step: %{y:,.0f} MiB<extra></extra>"))
    oom = trials[(trials["status"] == "oom") & trials["tokens_per_step"].notna()]
    x_hi = float(max(d["tokens_per_step"].max(), oom["tokens_per_step"].max() if len(oom) else 0))
    if fit is not None:
        xs = np.linspace(0, x_hi * 1.05, 50)
        ys = fit.predict(xs)
        if fit.margin_mib:
            half = np.array([fit.upper(x) for x in xs]) - ys   # widens away from the measured range
            fig.add_trace(go.Scatter(x=np.r_[xs, xs[::-1]], y=np.r_[ys + half, (ys - half)[::-1]],
                                     fill="toself", fillcolor="rgba(255,127,14,0.15)", line=dict(width=0),
                                     name="95% prediction interval", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"fit: {fit.intercept_mib:,.0f} + "
                                 f"{fit.slope_mib:.4g} × bptt × bs", line=dict(color="#ff7f0e")))
    if len(oom):
        y_oom = card_mib or float(d["peak_mem_mib"].max())
        fig.add_trace(go.Scatter(x=oom["tokens_per_step"], y=[y_oom] * len(oom), mode="markers", name="out of memory",
                                 marker=dict(symbol="x", size=11, color="#d62728"),
                                 text=labels(oom),
                                 hovertemplate="%{text}: OOM<extra></extra>"))
    if card_mib:
        fig.add_hline(y=card_mib, line=dict(color="#d62728", dash="dash"),
                      annotation_text=f"this card: {card_mib:,.0f} MiB", annotation_position="top left")
    fig.update_layout(**_LAYOUT, title=dict(text="Memory model: peak memory against bptt × batch size", x=0.01),
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title="bptt × batch size (tokens per step)")
    fig.update_yaxes(title="peak memory (MiB)")
    return fig
