"""The report's diagnostics: what bptt does to the model (``bptt-harness diagnose``'s diagnostics.json, or the
trials' own end-of-training columns when the study has a ``[diagnostics]`` table).

Figures: context use (loss increase against n, one line per configuration, its bptt marked), gradient reach,
the truncation-bias ladder, the noise scale against bptt with the batch sizes swept. Sentences, each computed
from the rows and said only where its number was measured: "trained with bptt B, the model uses about N
tokens of context", "gradients reach about R tokens back", "a bptt above K changes the gradient by less than
d%", "batches above about B tokens per step gain little per token at this loss".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from bptt_harness.diagnose_options import DiagnoseOptions
from bptt_harness.report import numbers
from bptt_harness.report.page import Drawn, esc, figure_block

__all__ = ["load_diagnostics", "diagnostics_sentences", "context_figure", "reach_figure", "bias_figure",
           "noise_figure", "token_costs", "section", "JSON_NAME"]

log = logging.getLogger(__name__)
JSON_NAME = "diagnostics.json"
LAYOUT = dict(template="plotly_white", height=430, margin=dict(l=70, r=30, t=30, b=60),
              legend=dict(orientation="h", y=-0.2))


def load_diagnostics(directory: Path) -> dict | None:
    """``bptt-harness diagnose``'s diagnostics.json in ``directory``, or None (none, or unreadable)."""
    path = Path(directory) / JSON_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("rows"), list) else None


def _number(v: Any) -> float | None:
    """A measured value: finite and above zero (a diagnostic of 0 tokens was not measured)."""
    x = numbers.finite(v)
    return x if x is not None and x > 0 else None


def _tokens(n: float) -> str:
    return f"{numbers.count(n)} token{'' if n == 1 else 's'}"


def diagnostics_sentences(rows: Iterable[Mapping[str, Any]], options: DiagnoseOptions | None = None) -> list[str]:
    """The four sentences for each row (a trained shape: bptt, batch_size and the four columns), each only
    where its number was measured; the tolerance is the row's (``bias_tolerance``) or ``options``'."""
    o = options or DiagnoseOptions()
    rows = list(rows)
    seen = [r.get("bptt") for r in rows]
    out: list[str] = []
    for r in rows:
        bptt, bs = _number(r.get("bptt")), _number(r.get("batch_size"))
        prefix = f"trained with bptt {numbers.count(bptt)}" if bptt else ""
        if prefix and bs and seen.count(r.get("bptt")) > 1:   # shapes that differ in batch size alone
            prefix += f" and batch size {numbers.count(bs)}"
        parts = []
        context = _number(r.get("effective_context_tokens"))
        if context is not None:
            parts.append(f"{prefix + ', ' if prefix else ''}the model uses about {_tokens(context)} of context")
        reach = _number(r.get("gradient_reach_tokens"))
        if reach is not None:
            parts.append(f"gradients reach about {_tokens(reach)} back")
        k = _number(r.get("truncation_bias_k"))
        tol = _number(r.get("bias_tolerance")) or o.bias_tolerance
        if k is not None:
            parts.append(f"a bptt above {numbers.count(k)} changes the gradient by less than {numbers.num(100 * tol)}%")
        noise = _number(r.get("noise_scale_tokens"))
        if noise is not None:
            parts.append(f"batches above about {numbers.num(noise, 2)} tokens per step gain little per token at "
                         "this loss")
        if parts:
            text = "; ".join(parts)
            if context is None and prefix:
                text = f"{prefix}: {text}"
            out.append(text[0].upper() + text[1:] + ".")
    return out


def _trained(doc: dict) -> list[dict]:
    return [r for r in doc.get("rows", []) if r.get("phase") == "trained" and r.get("curves")]


def _with_curve(doc: dict, kind: str, points: str) -> list[tuple[dict, dict]]:
    """(row, its ``kind`` curve) for each trained shape whose curve has ``points``."""
    return [(r, r["curves"][kind]) for r in _trained(doc) if (r["curves"].get(kind) or {}).get(points)]


def _measured(rows: Iterable[Mapping[str, Any]], column: str) -> list[str]:
    """``bptt 20: 16`` for each row where ``column`` was measured."""
    return [f"bptt {r['bptt']}: {numbers.count(r[column])}" for r in rows if _number(r.get(column)) is not None]


def _name(r: Mapping[str, Any]) -> str:
    return f"bptt {r.get('bptt')} × bs {r.get('batch_size')}"


def context_figure(doc: dict) -> Drawn | None:
    """Loss increase over the carried state against n (log axis), one line per shape, its bptt marked."""
    curves = _with_curve(doc, "context", "n")
    if not curves:
        return None
    fig = go.Figure()
    for r, c in curves:
        inc = [None if v is None else v - c["carried_loss"] for v in c["loss"]]
        fig.add_trace(go.Scatter(x=c["n"], y=inc, mode="lines+markers", name=_name(r)))
        fig.add_vline(x=r["bptt"], line_dash="dot", line_color="gray", opacity=0.5)
    fig.update_layout(**LAYOUT, xaxis=dict(title="n: real tokens before each prediction", type="log"),
                      yaxis=dict(title="loss increase over the carried state (nats)"))
    tol = curves[0][1].get("tolerance")
    found = _measured((r for r, _ in curves), "effective_context_tokens")
    caption = (f"After {numbers.count(doc.get('tokens'))} training tokens per shape. Each point: the mean loss at the "
               "same sampled targets when only the last n tokens are real (the state warmed on text from elsewhere), "
               "minus the loss with the state carried; dotted lines mark each shape's training bptt. Effective "
               f"context (within {numbers.num(100 * tol) if tol else '?'}% of the carried loss): "
               + (", ".join(found) if found else "not reached within the ladder") + ".")
    return Drawn(fig, "Context use: how many tokens the model reads", caption)


def reach_figure(doc: dict) -> Drawn | None:
    curves = _with_curve(doc, "reach", "norm")
    if not curves:
        return None
    fig = go.Figure()
    for r, c in curves:
        fig.add_trace(go.Scatter(x=list(range(len(c["norm"]))), y=c["norm"], mode="lines", name=_name(r)))
    fig.update_layout(**LAYOUT, xaxis=dict(title="lag k (tokens back)"),
                      yaxis=dict(title="|d loss / d embedding at lag k|", type="log"))
    frac = curves[0][1].get("fraction")
    found = _measured((r for r, _ in curves), "gradient_reach_tokens")
    caption = ("Mean gradient norm of the loss at sampled targets with respect to the input embedding k tokens back. "
               f"Reach (the last lag at {numbers.num(100 * frac) if frac else '?'}% of the largest norm): "
               + (", ".join(found) if found else "none measured") + ".")
    return Drawn(fig, "Gradient reach", caption)


def bias_figure(doc: dict) -> Drawn | None:
    curves = _with_curve(doc, "bias", "k")
    if not curves:
        return None
    fig = go.Figure()
    for r, c in curves:
        fig.add_trace(go.Scatter(x=c["k"], y=c["bias"], mode="lines+markers", name=_name(r)))
    c0 = curves[0][1]
    fig.add_hline(y=c0["tolerance"], line_dash="dot", line_color="gray")
    fig.update_layout(**LAYOUT, xaxis=dict(title="truncation length K (tokens)", type="log"),
                      yaxis=dict(title="||E[g_K − g_long]|| / ||E g_long||", type="log"))
    caption = (f"The gradient of truncated BPTT with windows of K tokens against backpropagation through "
               f"{numbers.count(c0['long'])} tokens, over the same text; the dotted line is the tolerance "
               f"({numbers.num(100 * c0['tolerance'])}%).")
    return Drawn(fig, "Truncation bias: what a longer bptt changes in the gradient", caption)


def noise_figure(doc: dict, batch_sizes: Iterable[float] = ()) -> Drawn | None:
    """The noise scale (tokens per step) against bptt, with the tokens per step of the batch sizes swept."""
    rows = [r for r in _trained(doc) if _number(r.get("noise_scale_tokens")) is not None]
    if not rows:
        return None
    rows.sort(key=lambda r: r["bptt"])
    fig = go.Figure(go.Scatter(x=[r["bptt"] for r in rows], y=[r["noise_scale_tokens"] for r in rows],
                               mode="lines+markers", name="noise scale B (tokens per step)"))
    bptts = [r["bptt"] for r in rows]
    for bs in sorted({int(b) for b in batch_sizes}):
        fig.add_trace(go.Scatter(x=bptts, y=[bs * b for b in bptts], mode="lines", line=dict(dash="dot"),
                                 name=f"bs {bs}: tokens per step"))
    fig.update_layout(**LAYOUT, xaxis=dict(title="bptt", type="log"), yaxis=dict(title="tokens per step", type="log"))
    caption = ("B_simple = tr(Σ)/|G|² from gradients at two batch sizes (McCandlish et al. 2018), in tokens per step, "
               "after the short training run. A step of B tokens costs about 1 + B/B_noise times the tokens of a "
               "small batch to reach the same loss: batch sizes whose tokens per step (dotted) lie above the noise "
               "scale gain little per token.")
    return Drawn(fig, "Gradient noise scale against the batch sizes swept", caption)


def token_costs(rows: Iterable[Mapping[str, Any]], batch_sizes: Iterable[float]) -> list[tuple[int, int, float]]:
    """(bptt, batch size, predicted token cost 1 + B/B_noise) for each row with a noise scale and each batch
    size: the tokens a shape needs to reach the loss of the measurement, relative to a small batch."""
    out = []
    for r in rows:
        noise, bptt = _number(r.get("noise_scale_tokens")), _number(r.get("bptt"))
        if noise is None or bptt is None:
            continue
        out += [(int(bptt), int(bs), 1.0 + bs * bptt / noise) for bs in sorted({float(b) for b in batch_sizes})]
    return out


def _costs_table(rows: list[dict], batch_sizes: Iterable[float]) -> str:
    costs = token_costs(rows, batch_sizes)
    if not costs:
        return ""
    sizes = sorted({bs for _, bs, _ in costs})
    by = {(b, bs): c for b, bs, c in costs}
    head = "".join(f'<th class="num">bs {bs}</th>' for bs in sizes)
    body = "".join(f"<tr><td>bptt {b}</td>" + "".join(f'<td class="num">{esc(numbers.num(by.get((b, bs)), 2))}×</td>'
                                                      for bs in sizes) + "</tr>"
                   for b in sorted({b for b, _, _ in costs}))
    return ('<p>Predicted tokens to reach the measured loss, relative to a small batch (1 + B/B_noise, B = bptt × '
            f'batch size in tokens per step):</p><div class="table-wrap"><table><thead><tr><th></th>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table></div>")


def section(doc: dict | None, trials: pd.DataFrame | None = None, batch_sizes: Iterable[float] = ()) -> str:
    """The report's diagnostics section: from diagnostics.json where there is one, and the trials' own
    end-of-training diagnostics where they have them; empty when neither has any."""
    parts: list[str] = []
    if doc is not None:
        sentences = diagnostics_sentences(r for r in doc.get("rows", []) if r.get("phase") == "trained")
        figs = [d for d in (context_figure(doc), reach_figure(doc), bias_figure(doc), noise_figure(doc, batch_sizes))
                if d is not None]
        source = (f"From diagnostics.json (bptt-harness diagnose): each bptt trained for "
                  f"{numbers.count(doc.get('tokens'))} tokens, then measured on the validation split.")
        parts.append(f'<p class="source">{esc(source)}</p>')
        if sentences:
            parts.append("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>")
        parts += [figure_block(f"diag-{i}", d) for i, d in enumerate(figs)]
        parts.append(_costs_table(_trained(doc), batch_sizes))
    if trials is not None and "effective_context_tokens" in trials:
        cols = ["effective_context_tokens", "gradient_reach_tokens", "truncation_bias_k", "noise_scale_tokens"]
        measured = trials[trials[cols].notna().any(axis=1)] if all(c in trials for c in cols) else trials.iloc[:0]
        if len(measured):
            per = measured.groupby(["bptt", "batch_size"], as_index=False)[cols].median()
            sentences = diagnostics_sentences(per.to_dict("records"))
            parts.append('<p class="source">From the trials: the diagnostics at the end of each full training run '
                         "(median over repeats).</p>")
            parts.append("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>")
    if not parts:
        return ""
    return f'<section id="diagnostics"><h2>What bptt does to the model</h2>{"".join(parts)}</section>'
