"""The page shell of ``report.html`` and ``compare.html``: one stylesheet, header, footer, tables and figure
blocks, with plotly.js inlined once (the page works offline, no CDN) and every user string escaped.

Tables sit in a scrolling wrapper, so a wide table scrolls inside the page instead of being clipped
on a narrow screen; figure titles are HTML headings above the plot, so they wrap instead of running
under plotly's toolbar.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

__all__ = ["CSS", "Column", "Drawn", "esc", "figure_block", "meta_line", "page", "plotlyjs", "table"]

# (css class of the cells, header, cell text from a row)
Column = tuple[str, str, Callable[[pd.Series], str]]

CSS = """
:root { --fg:#1d2228; --muted:#5b6570; --line:#e3e6ea; --accent:#1f6feb; --bad:#b00020; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:#fafbfc; }
main { max-width:1180px; margin:0 auto; padding:24px 28px 60px; background:#fff; }
h1 { font-size:26px; margin:0 0 4px; overflow-wrap:anywhere; }
h2 { font-size:19px; margin:34px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
h3 { font-size:16px; margin:22px 0 6px; }
.meta { color:var(--muted); font-size:13px; margin:0 0 18px; }
.description { font-size:16px; margin:2px 0 8px; }
.meta span { margin-right:14px; display:inline-block; }
.headline { border-left:5px solid var(--accent); background:#eef5ff; padding:14px 18px; font-size:17px; margin:12px 0; }
.headline b { display:block; font-size:13px; text-transform:uppercase; letter-spacing:.04em; color:var(--accent); }
.notes { color:var(--muted); font-size:13px; margin:6px 0 0 0; padding-left:18px; }
.source { color:var(--muted); font-size:13.5px; margin:0 0 8px; }
dl.answers dt { font-weight:600; margin-top:10px; }
dl.answers dd { margin:2px 0 0 0; }
.table-wrap { overflow-x:auto; margin:8px 0; max-width:100%; }
table { border-collapse:collapse; width:100%; font-size:13.5px; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { background:#f3f5f7; position:sticky; top:0; white-space:normal; vertical-align:bottom; }
@media (max-width: 900px) { main { padding:16px 14px 40px; } th, td { padding:4px 5px; } table { font-size:12.5px; } }
td.l, th.l { text-align:left; }
td.wrap, th.wrap { white-space:normal; text-align:left; min-width:220px; max-width:520px; }
tr.front td:first-child { border-left:3px solid var(--accent); }
tr.rec td { background:#fff6e5; }
.bad { color:var(--bad); }
figure { margin:18px 0 26px; }
figure h3 { margin:0 0 2px; font-weight:600; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:2px; }
.plot { width:100%; min-height:430px; }
.small { color:var(--muted); font-size:12.5px; }
details summary { cursor:pointer; color:var(--accent); }
footer { margin-top:40px; color:var(--muted); font-size:12px; }
"""


@dataclass(frozen=True)
class Drawn:
    """A figure with its title and the caption computed from what the figure shows (never from what
    it might have shown)."""

    fig: go.Figure
    title: str
    caption: str


def esc(value: object) -> str:
    """Escape anything for HTML text or attribute values (None and NaN are empty)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(str(value), quote=True)


@lru_cache(maxsize=1)
def plotlyjs() -> str:
    from plotly.offline import get_plotlyjs  # the library's own bundle: no network at view time

    return get_plotlyjs()


def _json_for_script(text: str) -> str:
    """JSON inside <script>: no '</script>' breakout, no HTML parsing surprises."""
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def figure_block(div_id: str, drawn: Drawn) -> str:
    """A figure: its title as a heading, the plot, and its caption."""
    spec = _json_for_script(pio.to_json(drawn.fig, validate=False))
    return (f'<figure><h3>{esc(drawn.title)}</h3><div id="{esc(div_id)}" class="plot"></div>'
            f'<figcaption>{esc(drawn.caption)}</figcaption>'
            f'<script>(function(){{var f={spec};Plotly.newPlot("{esc(div_id)}",f.data,f.layout,'
            '{responsive:true,displaylogo:false});})();</script></figure>')


def table(rows: pd.DataFrame, columns: Sequence[Column], *, row_class: Callable[[pd.Series], str] | None = None,
          table_id: str | None = None) -> str:
    """An HTML table in a horizontally scrolling wrapper."""
    head = "".join(f'<th class="{klass}">{esc(h)}</th>' for klass, h, _ in columns)
    body = []
    for _, r in rows.iterrows():
        cls = row_class(r) if row_class else ""
        cells = "".join(f'<td class="{klass}">{esc(fn(r))}</td>' for klass, _, fn in columns)
        body.append(f'<tr class="{esc(cls)}">{cells}</tr>')
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return f'<div class="table-wrap"><table{tid}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def meta_line(items: Iterable[tuple[str, object]]) -> str:
    """``key: value`` pairs under the title; empty values are left out."""
    return "\n".join(f"<span><b>{esc(k)}:</b> {esc(v)}</span>" for k, v in items if v)


def page(title: str, body: str, *, footer: str, description: str = "", meta: str = "") -> str:
    """The whole document: head with the stylesheet and plotly.js, the title, ``body``, the footer (HTML)."""
    desc = f'<p class="description">{esc(description)}</p>\n' if description.strip() else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style>
<script>{plotlyjs()}</script></head>
<body><main>
<h1>{esc(title)}</h1>
{desc}<p class="meta">{meta}</p>
{body}
<footer>{footer}</footer>
</main></body></html>
"""
