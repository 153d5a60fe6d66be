"""``bptt-harness compare A B ...``: the same study on several machines, side by side.

Only like is compared with like: every trial is keyed by a hash of what it measures (its study's
corpus, model and train settings and the torch release, :mod:`bptt_harness.report.setup`), and result sets
that measure different things are refused with one line (or, with ``only_matching``, left out with a
visible warning). Trials are grouped by hardware fingerprint (``machine_id``), whatever result set they
came from, so one PostgreSQL study run by several machines splits correctly too. Per configuration: throughput,
peak memory and energy on each machine with ratios to the first machine; each machine's feasible
region; the best configuration per machine.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from bptt_harness.errors import HarnessError
from bptt_harness.report import ReportPaths, safe_dirname
from bptt_harness.report.advice import near_best
from bptt_harness.report.frame import aggregate_configs, label, labels, records_to_frame

log = logging.getLogger(__name__)

COMPARE_COLUMNS = {
    "config_key": "the configuration",
    "machine": "machine label (GPU or CPU model, with a short id when two machines share a model)",
    "machine_id": "hardware fingerprint",
    "gpu_name": "GPU model",
    "bptt": "window length", "batch_size": "batch size", "tokens_per_step": "bptt x batch_size",
    "status": "ok, or why no run finished (oom, diverged, failed)",
    "n": "ok runs", "val_ppl": "mean validation perplexity",
    "tokens_per_s": "mean throughput, tokens/s", "peak_mem_mib": "mean peak memory, MiB",
    "joules_per_ktok": "mean energy per 1k tokens, J",
    "tokens_per_s_ratio": "tokens_per_s / the reference machine's (same configuration)",
    "peak_mem_ratio": "peak_mem_mib / the reference machine's",
    "joules_per_ktok_ratio": "joules_per_ktok / the reference machine's",
    "reference_machine": "the machine the ratios are relative to (the first one given)",
    "setup": "hash of what the trials measure (corpus, model, train settings, torch release): the same in every row",
}


def machine_labels(df: pd.DataFrame) -> pd.Series:
    """A readable, unique machine label per row: the GPU (or CPU) model, plus a short id if needed."""
    mid = df["machine_id"].fillna(df["hostname"]).fillna(df["gpu_name"]).fillna("unknown").astype(str)
    model = df["gpu_name"].fillna(df["cpu_model"]).fillna("unknown machine").astype(str)
    per_model = pd.DataFrame({"mid": mid, "model": model}).drop_duplicates().groupby("model")["mid"].nunique()
    shared = set(per_model[per_model > 1].index)
    return pd.Series([f"{m} [{i[:8]}]" if m in shared else m for m, i in zip(model, mid)], index=df.index)


def compare_frames(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(long per-machine-per-configuration frame with ratios, per-machine summary, machine order)."""
    trials = trials.assign(machine=machine_labels(trials))
    order = list(dict.fromkeys(trials["machine"]))
    cfg = aggregate_configs(trials, by=("machine", "config_key"))
    cfg["status"] = np.where(cfg["n"] > 0, "ok", np.where(cfg["n_oom"] > 0, "oom",
                                                          np.where(cfg["n_diverged"] > 0, "diverged", "failed")))
    first = trials.groupby("machine").first()
    cfg["machine_id"] = cfg["machine"].map(first["machine_id"])
    cfg["gpu_name"] = cfg["machine"].map(first["gpu_name"])
    ref = order[0]
    cfg["reference_machine"] = ref
    base = cfg[cfg["machine"] == ref].set_index("config_key")
    for col, out in (("tokens_per_s", "tokens_per_s_ratio"), ("peak_mem_mib", "peak_mem_ratio"),
                     ("joules_per_ktok", "joules_per_ktok_ratio")):
        cfg[out] = cfg[col] / cfg["config_key"].map(base[col])
    cfg["_m"] = cfg["machine"].map({m: i for i, m in enumerate(order)})
    cfg = cfg.sort_values(["tokens_per_step", "bptt", "config_key", "_m"], kind="mergesort").drop(columns="_m")
    summary = []
    for m in order:
        c = cfg[cfg["machine"] == m]
        ok = c[(c["n"] > 0) & c["val_ppl"].notna()]
        row = {"machine": m, "gpu_memory_mib": first.at[m, "gpu_memory_mib"], "configs": len(c),
               "ok": int((c["n"] > 0).sum()), "oom": int(((c["n"] == 0) & (c["n_oom"] > 0)).sum()),
               "diverged": int(((c["n"] == 0) & (c["n_diverged"] > 0)).sum()),
               "largest_ok_tokens_per_step": ok["tokens_per_step"].max() if len(ok) else math.nan,
               "smallest_oom_tokens_per_step": c.loc[c["n_oom"] > 0, "tokens_per_step"].min()}
        pair = near_best(ok, "seconds_per_ktok") if len(ok) else None
        if pair is not None:
            best, cheap = pair
            row.update(best=label(best), best_ppl=best["val_ppl"], best_tokens_per_s=best["tokens_per_s"],
                       best_joules_per_ktok=best["joules_per_ktok"], recommended=label(cheap),
                       recommended_ppl=cheap["val_ppl"], recommended_tokens_per_s=cheap["tokens_per_s"])
        summary.append(row)
    return cfg.reset_index(drop=True), pd.DataFrame(summary), order


def _source_name(src: str) -> str:
    p = Path(src)
    return p.stem if p.suffix == ".toml" else p.name or "source"


def _source_names(sources: list[str]) -> list[str]:
    """Short names of the sources: their folders, or for one study on several machines
    (``results/published/<machine>/<study>``) the machines' folders."""
    names = [_source_name(str(s)) for s in sources]
    parents = [Path(str(s)).parent.name for s in sources]
    if len(sources) > 1 and len(set(names)) == 1 and len(set(parents)) == len(parents) and all(parents):
        return parents
    return names


def generate_compare(sources: list[str], name: str | None = None, out_root: Path = Path("results"), *,
                     storage: str | None = None, only_matching: bool = False) -> ReportPaths:
    """Write ``<out_root>/compare-<name>/compare.html`` and ``compare.csv`` for the given result sets.

    Result sets that measure different things are refused with one line; with ``only_matching`` the
    trials measured like the first source's are compared and the rest left out with a warning."""
    from bptt_harness.report.setup import attach_setup, like_with_like
    from bptt_harness.report.source import load_trials, resolve

    if not sources:
        raise HarnessError("compare needs at least one results folder; pass results/<study> on each machine")
    if name is not None and (not name or safe_dirname(name) != name):
        raise HarnessError(f"compare name {name!r} is not a plain folder name; use letters, digits, '.', '_' or '-'")
    frames = []
    displays = []
    setups: dict[str, dict] = {}
    for src_text, short in zip(sources, _source_names(list(sources))):
        src = resolve(src_text, storage=storage)
        loaded = load_trials(src)
        if not loaded.records:
            raise HarnessError(f"study {loaded.study_name!r} in {src_text!r} has no finished trials; nothing to compare")
        frame, found = attach_setup(records_to_frame(loaded.records), loaded.study_config)
        frames.append(frame.assign(source=short))
        setups.update(found)
        displays.append(loaded.storage_display)
    trials, warnings = like_with_like(pd.concat(frames, ignore_index=True), setups, only_matching)
    name = name or safe_dirname("-vs-".join(dict.fromkeys(_source_names(list(sources)))))[:80]
    return write_compare(trials, name=name, out_root=out_root, storages=displays, warnings=warnings)


def write_compare(trials: pd.DataFrame, *, name: str, out_root: Path, storages: list[str] | None = None,
                  warnings: list[str] | None = None) -> ReportPaths:
    from bptt_harness.fileio import write_files_atomic

    cfg, summary, order = compare_frames(trials)
    if "setup" in trials:
        cfg["setup"] = trials["setup"].iloc[0]
    out = Path(out_root) / f"compare-{name}"
    csv_cols = [c for c in COMPARE_COLUMNS if c in cfg.columns]
    text = "".join(f"warning: {w}\n" for w in warnings or []) + summary_text(summary, order)
    paths = ReportPaths(csv=out / "compare.csv", html=out / "compare.html", summary=text)
    write_files_atomic({paths.csv: cfg[csv_cols].to_csv(index=False, lineterminator="\n"),
                        paths.html: render_compare(trials, cfg, summary, order, name, storages or [], warnings)})
    return paths


def summary_text(summary: pd.DataFrame, order: list[str]) -> str:
    lines = [f"{len(order)} machine(s): " + ", ".join(order)]
    for _, r in summary.iterrows():
        best = r.get("recommended")
        tail = (f"recommended {best} (ppl {r['recommended_ppl']:.4g}, {r['recommended_tokens_per_s']:,.0f} tokens/s)"
                if isinstance(best, str) else "no configuration finished")
        lines.append(f"- {r['machine']}: {r['ok']} ok, {r['oom']} oom, {r['diverged']} diverged; {tail}")
    if len(order) == 1:
        lines.append("Only one machine in these results: nothing to put side by side.")
    return "\n".join(lines)


def _bars(cfg: pd.DataFrame, order: list[str], col: str, title: str, axis: str) -> go.Figure | None:
    d = cfg[cfg[col].notna()]
    if d.empty:
        return None
    fig = go.Figure()
    keys = list(dict.fromkeys(d["config_key"]))
    uniq = d.drop_duplicates("config_key")
    names = dict(zip(uniq["config_key"], labels(uniq)))
    for m in order:
        dm = d[d["machine"] == m].set_index("config_key")
        # Plotly renders a few HTML tags in legend text: escape the machine name so it shows as written.
        fig.add_trace(go.Bar(x=[names[k] for k in keys], y=[dm[col].get(k, np.nan) for k in keys],
                             name=html.escape(m)))
    fig.update_layout(template="plotly_white", height=430, barmode="group", margin=dict(l=70, r=30, t=50, b=110),
                      title=dict(text=title, x=0.01), legend=dict(orientation="h", y=1.08),
                      font=dict(family="system-ui, sans-serif", size=13))
    fig.update_yaxes(title=axis)
    return fig


def render_compare(trials: pd.DataFrame, cfg: pd.DataFrame, summary: pd.DataFrame, order: list[str], name: str,
                   storages: list[str], warnings: list[str] | None = None) -> str:
    from bptt_harness.report import figures
    from bptt_harness.report.html import CSS, _plotlyjs, esc, figure_block, table

    def num(v: object, fmt: str) -> str:
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)

    scols = [("l", "machine", lambda r: r["machine"]),
             ("", "GPU MiB", lambda r: num(r.get("gpu_memory_mib"), "{:,.0f}")),
             ("", "ok", lambda r: str(r["ok"])), ("", "oom", lambda r: str(r["oom"])),
             ("", "diverged", lambda r: str(r["diverged"])),
             ("", "largest ok bptt×bs", lambda r: num(r.get("largest_ok_tokens_per_step"), "{:,.0f}")),
             ("", "smallest OOM bptt×bs", lambda r: num(r.get("smallest_oom_tokens_per_step"), "{:,.0f}")),
             ("l", "best perplexity", lambda r: f"{r['best']} ({r['best_ppl']:.4g})" if isinstance(r.get("best"), str) else ""),
             ("l", "recommended (cheapest within 2%)", lambda r: f"{r['recommended']} ({r['recommended_tokens_per_s']:,.0f} tok/s)"
              if isinstance(r.get("recommended"), str) else ""),
             ("", "J / 1k tok at best", lambda r: num(r.get("best_joules_per_ktok"), "{:.3g}"))]
    ref = order[0]
    # Side by side: one row per configuration, a column group per machine.
    wide = cfg.pivot_table(index="config_key", columns="machine", values=["tokens_per_s", "peak_mem_mib"],
                           aggfunc="first", dropna=False) if len(cfg) else pd.DataFrame()
    status = cfg.pivot_table(index="config_key", columns="machine", values="status", aggfunc="first") if len(cfg) else None
    keys = list(dict.fromkeys(cfg["config_key"]))
    first = cfg.drop_duplicates("config_key").set_index("config_key")
    rows = pd.DataFrame({"config_key": keys})
    cols = [("l", "configuration", lambda r: label(first.loc[r["config_key"]]))]
    for m in order:
        def cell(r, m=m, what="tokens_per_s", fmt="{:,.0f}"):
            k = r["config_key"]
            st = status.at[k, m] if status is not None and k in status.index and m in status.columns else None
            if st is None or (isinstance(st, float) and math.isnan(st)):
                return "not run"
            if st != "ok":
                return st.upper() if st == "oom" else st
            v = wide[(what, m)].get(k) if (what, m) in wide.columns else None
            text = num(v, fmt)
            if m != ref and (what, ref) in wide.columns:
                base = wide[(what, ref)].get(k)
                if base and v and math.isfinite(base) and math.isfinite(v):
                    text += f" ({v / base:.2f}×)"
            return text
        cols.append(("", f"{m}: tokens/s", cell))
        def peak(r: pd.Series, c: Any = cell) -> str:
            return c(r, what="peak_mem_mib", fmt="{:,.0f}")

        cols.append(("", f"{m}: peak MiB", peak))
    figs = []
    f = _bars(cfg[cfg["status"] == "ok"], order, "tokens_per_s", "Throughput per configuration and machine", "tokens/s")
    if f is not None:
        figs.append(figure_block("fig-cmp-tps", f, "Taller is faster; configurations missing for a machine ran out "
                                 "of memory, diverged or were not run there."))
    f = _bars(cfg[cfg["status"] == "ok"], order, "peak_mem_mib", "Peak memory per configuration and machine", "MiB")
    if f is not None:
        figs.append(figure_block("fig-cmp-mem", f, "The same configuration can need different memory on different "
                                 "GPUs (cuDNN workspaces, allocator); the card size sets the wall."))
    f = _bars(cfg[cfg["status"] == "ok"], order, "joules_per_ktok", "Energy per 1k tokens", "J per 1k tokens")
    if f is not None:
        figs.append(figure_block("fig-cmp-energy", f, "Lower is cheaper in energy for the same amount of training."))
    for i, m in enumerate(order):
        f = figures.heatmap(cfg[cfg["machine"] == m], "tokens_per_s")
        if f is not None:
            f.update_layout(title=dict(text=f"Feasible region and throughput: machine {i + 1}"))
            figs.append(figure_block(f"fig-cmp-region-{i}", f, f"Machine {i + 1} = {m}: coloured cells ran; OOM and "
                                     "diverged cells are marked — the edge of them is this machine's feasible region."))
    note = "<p>Only one machine in these results: nothing to put side by side.</p>" if len(order) == 1 else ""
    note += "".join(f'<p class="bad warning"><b>warning:</b> {esc(w)}</p>' for w in warnings or [])
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    src = "".join(f"<li>{esc(s)}</li>" for s in storages)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc("GPU comparison — " + name)}</title><style>{CSS}</style><script>{_plotlyjs()}</script></head>
<body><main><h1>{esc("GPU comparison — " + name)}</h1>
<p class="meta"><span><b>machines:</b> {esc(", ".join(order))}</span><span><b>trials:</b> {len(trials)}</span>
<span><b>ratios relative to:</b> {esc(ref)}</span><span><b>generated:</b> {esc(now)}</span></p>{note}
<section id="machines"><h2>Per machine: feasible region and best configuration</h2>{table(summary, scols, table_id="machines")}</section>
<section id="side-by-side"><h2>Per configuration, side by side</h2><p class="small">Ratios in brackets are relative
to {esc(ref)}; OOM / diverged mark configurations that did not finish on that machine.</p>
{table(rows, cols, table_id="side-by-side-table")}</section>
<section id="figures"><h2>Figures</h2>{''.join(figs)}</section>
<footer>Sources:<ul>{src}</ul>Columns of compare.csv: bptt_harness/report/README.md.</footer></main></body></html>
"""

