"""Search spaces that are not a grid (TPE over ranges): a scatter of the configurations over bptt x
batch size, where a heatmap would be a sparse checkerboard of mostly empty cells."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from bptt_harness.report import numbers
from bptt_harness.report.frame import labels
from bptt_harness.report.page import Drawn

GRID_FILL = 0.5  # below this share of filled (bptt, batch size) cells the space is read as scattered


def is_grid(configs: pd.DataFrame) -> bool:
    """True when the configurations fill at least half of the bptt x batch-size table they span."""
    cells = configs.dropna(subset=["bptt", "batch_size"])[["bptt", "batch_size"]].drop_duplicates()
    if cells.empty:
        return True
    return len(cells) >= GRID_FILL * cells["bptt"].nunique() * cells["batch_size"].nunique()


def scatter(configs: pd.DataFrame) -> Drawn | None:
    """Each configuration at (batch size, bptt) on log axes, coloured by perplexity; the ones that ran
    out of memory or diverged as crosses."""
    c = configs.dropna(subset=["bptt", "batch_size"])
    ok = c[(c["n"] > 0) & c["val_ppl"].notna()]
    bad = c[(c["n"] == 0) & ((c["n_oom"] > 0) | (c["n_diverged"] > 0))]
    if ok.empty and bad.empty:
        return None
    fig = go.Figure()
    if len(ok):
        fig.add_trace(go.Scatter(
            x=ok["batch_size"], y=ok["bptt"], mode="markers", name="finished",
            marker=dict(size=13, color=ok["val_ppl"], colorscale="Viridis_r", showscale=True,
                        colorbar=dict(title="val ppl", thickness=14), line=dict(color="#333", width=0.5)),
            text=[f"{name}: ppl {numbers.num(p, 4)} (n={int(n)})" for name, p, n in zip(labels(ok), ok["val_ppl"], ok["n"])],
            hovertemplate="%{text}<extra></extra>"))
    if len(bad):
        fig.add_trace(go.Scatter(
            x=bad["batch_size"], y=bad["bptt"], mode="markers", name="out of memory or diverged",
            marker=dict(symbol="x", size=12, color="#d62728"),
            text=[f"{name}: {'OOM' if o else 'diverged'}" for name, o in zip(labels(bad), bad["n_oom"] > 0)],
            hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(template="plotly_white", height=460, margin=dict(l=70, r=30, t=30, b=60),
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title="batch size", type="log")
    fig.update_yaxes(title="bptt", type="log")
    caption = ("The sampled configurations over bptt × batch size (log axes, trials): the search space is not a "
               "grid, so a heatmap would be mostly empty cells.")
    if len(ok):
        caption += " Colour is validation perplexity (yellow is better)."
    if len(bad):
        caption += f" Red crosses: the {len(bad)} configuration(s) that ran out of memory or diverged."
    return Drawn(fig, "Validation perplexity over the sampled bptt × batch size", caption)
