"""``bptt-harness compare A B ...``: result sets side by side — the same study on several machines, two runs
on one machine (is it reproducible?), or an A/B change (another torch release, another setting).

A result set is what one source holds on one machine: trials are grouped by (source, hardware
fingerprint), so one PostgreSQL study run by several machines splits by machine, and two runs on one
machine stay two. Every trial is keyed by a hash of what it measures (its study's corpus, model and train
settings and the torch release, :mod:`bptt_harness.report.measured_setup`); the page says what differs between
the result sets (machine, torch, settings, dates) before any number, so a ratio is read as the effect
of those differences. ``only_matching`` keeps only the trials measured like the first source's.
Per configuration: throughput, peak memory and energy of each result set with ratios to the first;
each result set's feasible region; its best configuration.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from string import ascii_uppercase

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from bptt_harness.errors import HarnessError
from bptt_harness.fileio import write_files_atomic
from bptt_harness.report import ReportPaths, figures, numbers, safe_dirname
from bptt_harness.report.advice import near_best
from bptt_harness.report.frame import aggregate_configs, label, labels, records_to_frame, varying_fields
from bptt_harness.report.measured_setup import attach_setup, differences, like_with_like
from bptt_harness.report.page import Column, Drawn, esc, figure_block, meta_line, page, table
from bptt_harness.report.source import load_trials, resolve, shown_storage

log = logging.getLogger(__name__)

COMPARE_COLUMNS = {
    "config_key": "the configuration",
    "result_set": "the result set: its source and/or machine, as much as tells the result sets apart",
    "source": "the results folder (or storage) the trials came from",
    "machine": "machine label (GPU or CPU model, with a short id when two machines share a model)",
    "machine_id": "hardware fingerprint",
    "gpu_name": "GPU model",
    "bptt": "window length", "batch_size": "batch size", "tokens_per_step": "bptt x batch_size",
    "status": "ok, or why no run finished (oom, diverged, failed)",
    "n": "ok runs", "val_ppl": "mean validation perplexity",
    "tokens_per_s": "mean throughput, tokens/s", "peak_mem_mib": "mean peak memory, MiB",
    "joules_per_ktok": "mean energy per 1k tokens, J",
    "tokens_per_s_ratio": "tokens_per_s / the reference result set's (same configuration)",
    "peak_mem_ratio": "peak_mem_mib / the reference result set's",
    "joules_per_ktok_ratio": "joules_per_ktok / the reference result set's",
    "reference": "the result set the ratios are relative to (the first one given)",
    "setup": "hash of what the trials measure (corpus, model, train settings, torch release)",
}


def machine_labels(df: pd.DataFrame) -> pd.Series:
    """A readable, unique machine label per row: the GPU (or CPU) model, plus a short id if needed."""
    mid = df["machine_id"].fillna(df["hostname"]).fillna(df["gpu_name"]).fillna("unknown").astype(str)
    model = df["gpu_name"].fillna(df["cpu_model"]).fillna("unknown machine").astype(str)
    per_model = pd.DataFrame({"mid": mid, "model": model}).drop_duplicates().groupby("model")["mid"].nunique()
    shared = set(per_model[per_model > 1].index)
    return pd.Series([f"{m} [{i[:8]}]" if m in shared else m for m, i in zip(model, mid)], index=df.index)


def result_sets(trials: pd.DataFrame) -> pd.Series:
    """Per row, the name of its result set (source x machine): the machine where that tells them apart,
    else the source, else both."""
    machine = machine_labels(trials)
    source = trials["source"].astype(str) if "source" in trials else pd.Series("", index=trials.index)
    groups = pd.DataFrame({"source": source, "mid": trials["machine_id"].astype(str), "machine": machine})
    distinct = groups.drop_duplicates(["source", "mid"])
    for parts in (["machine"], ["source"]):
        if not distinct.duplicated(parts).any():
            return groups[parts[0]]
    return groups["source"] + " · " + groups["machine"]


def configuration_keys(trials: pd.DataFrame) -> pd.Series:
    """Per row, the configuration as the comparison lines it up: bptt, batch size and every field that varies
    over all the result sets (``bptt=4,batch_size=8,lr=0.01``). A study's own ``config_key`` names only what it
    searched, so a run that fixed lr 0.01 and one that searched lr would not line up by it."""
    extra = varying_fields(trials)
    cols = ["bptt", "batch_size", *extra]
    if trials[["bptt", "batch_size"]].isna().any(axis=None):
        return trials["config_key"].astype(str)
    return pd.Series([",".join(f"{c}={_value(v)}" for c, v in zip(cols, row))
                      for row in trials[cols].itertuples(index=False, name=None)], index=trials.index)


def _value(v: object) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{int(v)}" if v.is_integer() else f"{v:g}"
    return str(v)


def compare_frames(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(long per-result-set-per-configuration frame with ratios, per-result-set summary, result-set order)."""
    trials = trials.assign(machine=machine_labels(trials), result_set=result_sets(trials),
                           config_key=configuration_keys(trials))
    order = list(dict.fromkeys(trials["result_set"]))
    cfg = aggregate_configs(trials, by=("result_set", "config_key"))
    cfg["status"] = np.where(cfg["n"] > 0, "ok", np.where(cfg["n_oom"] > 0, "oom",
                                                          np.where(cfg["n_diverged"] > 0, "diverged", "failed")))
    first = trials.groupby("result_set").first()
    for col in ("machine", "machine_id", "gpu_name", "source"):
        if col in first:
            cfg[col] = cfg["result_set"].map(first[col])
    ref = order[0]
    cfg["reference"] = ref
    base = cfg[cfg["result_set"] == ref].set_index("config_key")
    for col, out in (("tokens_per_s", "tokens_per_s_ratio"), ("peak_mem_mib", "peak_mem_ratio"),
                     ("joules_per_ktok", "joules_per_ktok_ratio")):
        cfg[out] = cfg[col] / cfg["config_key"].map(base[col])
    cfg["_m"] = cfg["result_set"].map({m: i for i, m in enumerate(order)})
    cfg = cfg.sort_values(["tokens_per_step", "bptt", "config_key", "_m"], kind="mergesort").drop(columns="_m")
    summary = [_summary_row(cfg[cfg["result_set"] == m], m, first) for m in order]
    return cfg.reset_index(drop=True), pd.DataFrame(summary), order


def _summary_row(c: pd.DataFrame, name: str, first: pd.DataFrame) -> dict:
    ok = c[(c["n"] > 0) & c["val_ppl"].notna()]
    row = {"result_set": name, "machine": first.at[name, "machine"], "gpu_memory_mib": first.at[name, "gpu_memory_mib"],
           "configs": len(c), "ok": int((c["n"] > 0).sum()), "oom": int(((c["n"] == 0) & (c["n_oom"] > 0)).sum()),
           "diverged": int(((c["n"] == 0) & (c["n_diverged"] > 0)).sum()),
           "largest_ok_tokens_per_step": ok["tokens_per_step"].max() if len(ok) else math.nan,
           "smallest_oom_tokens_per_step": c.loc[c["n_oom"] > 0, "tokens_per_step"].min()}
    pair = near_best(ok, "seconds_per_ktok") if len(ok) else None
    if pair is not None:
        best, cheap = pair
        extra = varying_fields(c)
        row.update(best=label(best, extra), best_ppl=best["val_ppl"], best_tokens_per_s=best["tokens_per_s"],
                   best_joules_per_ktok=best["joules_per_ktok"], recommended=label(cheap, extra),
                   recommended_ppl=cheap["val_ppl"], recommended_tokens_per_s=cheap["tokens_per_s"])
    return row


def what_differs(trials: pd.DataFrame, setups: dict[str, dict]) -> pd.DataFrame:
    """Per result set: machine, torch, the C allocator's setting, setup hash(es), the settings that differ from
    the first result set's, and when its trials ran."""
    trials = trials.assign(machine=machine_labels(trials), result_set=result_sets(trials))
    order = list(dict.fromkeys(trials["result_set"]))
    ref_setup = trials["setup"].iloc[0] if "setup" in trials else None
    ref_malloc = _recorded(trials[trials["result_set"] == order[0]], "malloc") if order else ""
    rows = []
    for name in order:
        g = trials[trials["result_set"] == name]
        hashes = list(dict.fromkeys(g["setup"].astype(str))) if "setup" in g else []
        differ = [differences(setups[ref_setup], setups[h]) for h in hashes
                  if ref_setup is not None and h != ref_setup and h in setups and ref_setup in setups]
        malloc = _recorded(g, "malloc")
        # Throughput depends on the allocator (bptt_harness/allocator.py); a record older than the column says
        # nothing, so only two recorded settings can differ.
        if malloc and ref_malloc and malloc != ref_malloc:
            differ.append(f"malloc {ref_malloc!r} vs {malloc!r}")
        rows.append({"result_set": name, "source": g["source"].iloc[0] if "source" in g else "",
                     "machine": g["machine"].iloc[0], "torch": _recorded(g, "torch_version") or "unknown",
                     "malloc": malloc or "not recorded", "setup": ", ".join(hashes),
                     "differs": "; ".join(d for d in differ if d), "ran": _dates(g), "trials": len(g)})
    return pd.DataFrame(rows)


def _recorded(g: pd.DataFrame, col: str) -> str:
    """The values of ``col`` in a result set, each once, or "" where none was recorded."""
    return ", ".join(dict.fromkeys(g[col].dropna().astype(str))) if col in g else ""


def _dates(g: pd.DataFrame) -> str:
    start = pd.to_datetime(g["started_at"], errors="coerce", utc=True).dropna()
    end = pd.to_datetime(g["finished_at"], errors="coerce", utc=True).dropna()
    if start.empty and end.empty:
        return ""
    lo = (start if len(start) else end).min()
    hi = (end if len(end) else start).max()
    first = lo.strftime("%Y-%m-%d %H:%M")
    if lo.date() == hi.date():
        last = hi.strftime("%H:%M")
        return first if last == lo.strftime("%H:%M") else f"{first}–{last}"
    return f"{first} – {hi.strftime('%Y-%m-%d %H:%M')}"


def _source_name(src: str) -> str:
    p = Path(src)
    return p.stem if p.suffix == ".toml" else p.name or "source"


def _source_names(sources: list[str]) -> list[str]:
    """Short names of the sources: their folders, or for one study on several machines
    (``results/published/<machine>/<study>``) the machines' folders; unique in any case."""
    names = [_source_name(str(s)) for s in sources]
    parents = [Path(str(s)).parent.name for s in sources]
    if len(sources) > 1 and len(set(names)) == 1 and len(set(parents)) == len(parents) and all(parents):
        return parents
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same folder name twice (runs/a/default, runs/b/default): number them
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}-{seen[n]}")
    return out


def generate_compare(sources: list[str], name: str | None = None, out_root: Path = Path("results"), *,
                     storage: str | None = None, only_matching: bool = False,
                     storages: Sequence[str] = ()) -> ReportPaths:
    """Write ``<out_root>/compare-<name>/compare.html`` and ``compare.csv`` for the given result sets.

    Result sets that measure different things are compared with what differs named; with
    ``only_matching`` only the trials measured like the first source's are compared and the rest left
    out with a warning. ``storage`` is read instead of every source's recorded storage; ``storages`` are
    full URLs (with passwords) for the sources whose study.json records the same storage redacted."""
    if not sources:
        raise HarnessError("compare needs at least one results folder; pass results/<study> of each run or machine")
    if name is not None and (not name or safe_dirname(name) != name):
        raise HarnessError(f"compare name {name!r} is not a plain folder name; use letters, digits, '.', '_' or '-'")
    frames = []
    displays = []
    setups: dict[str, dict] = {}
    short_names = _source_names(list(sources))
    for src_text, short in zip(sources, short_names):
        src = resolve(src_text, storage=storage, passwords_from=storages)
        loaded = load_trials(src)
        if not loaded.records:
            raise HarnessError(f"study {loaded.study_name!r} in {src_text!r} has no finished trials; nothing to compare")
        frame, found = attach_setup(records_to_frame(loaded.records), loaded.study_config)
        frames.append(frame.assign(source=short))
        setups.update(found)
        shown = shown_storage(loaded.storage_display, src.out_dir, where="in its results folder")
        displays.append(f"{short}: {shown}" if shown else short)
    trials, warnings = like_with_like(pd.concat(frames, ignore_index=True), setups, only_matching)
    name = name or safe_dirname("-vs-".join(dict.fromkeys(short_names)))[:80]
    return write_compare(trials, name=name, out_root=out_root, storages=displays, warnings=warnings, setups=setups)


def write_compare(trials: pd.DataFrame, *, name: str, out_root: Path, storages: list[str] | None = None,
                  warnings: list[str] | None = None, setups: dict[str, dict] | None = None) -> ReportPaths:
    cfg, summary, order = compare_frames(trials)
    if "setup" in trials:
        cfg["setup"] = cfg["result_set"].map(trials.assign(result_set=result_sets(trials))
                                             .groupby("result_set")["setup"].first())
    differ = what_differs(trials, setups or {})
    out = Path(out_root) / f"compare-{name}"
    csv_cols = [c for c in COMPARE_COLUMNS if c in cfg.columns]
    text = "".join(f"warning: {w}\n" for w in warnings or []) + summary_text(summary, order, differ)
    paths = ReportPaths(csv=out / "compare.csv", html=out / "compare.html", summary=text)
    write_files_atomic({paths.csv: cfg[csv_cols].to_csv(index=False, lineterminator="\n"),
                        paths.html: render_compare(trials, cfg, summary, order, name, storages or [], warnings, differ)})
    return paths


def _kind(trials: pd.DataFrame) -> str:
    """``GPU``, ``CPU`` or ``machine``: what the compared hardware is, in the page's words."""
    gpu = trials["gpu_name"].notna() if "gpu_name" in trials else pd.Series(False, index=trials.index)
    return "GPU" if gpu.all() else "CPU" if not gpu.any() else "machine"


def _what(order: list[str], differ: pd.DataFrame) -> str:
    """``2 result sets on one CPU``, ``3 machines``: the comparison in a few words."""
    machines = differ["machine"].nunique()
    sets = len(order)
    if sets == machines:
        return f"{sets} machine(s)"
    return f"{sets} result sets on {'one machine' if machines == 1 else f'{machines} machines'}"


def _alike(differ: pd.DataFrame) -> str | None:
    """One sentence on what the result sets share or do not: the machine, the setup."""
    if len(differ) < 2:
        return None
    same_machine = differ["machine"].nunique() == 1
    changed = [d for d in differ["differs"] if d]
    if same_machine and not changed:
        return ("Same machine and same setup (corpus, model, train settings, torch release, allocator where "
                "recorded): differences between these result sets are run-to-run variation.")
    if same_machine:
        return "Same machine; the setups differ as listed: differences between the result sets are their effect."
    if not changed:
        return "Same setup on different machines: differences between the result sets are the hardware's."
    return ("The machines and the setups both differ: differences between the result sets mix the two "
            "(compare one change at a time to tell them apart).")


def summary_text(summary: pd.DataFrame, order: list[str], differ: pd.DataFrame | None = None) -> str:
    differ = differ if differ is not None else pd.DataFrame({"machine": summary["machine"], "differs": ""})
    lines = [f"{_what(order, differ)}: " + ", ".join(order)]
    alike = _alike(differ)
    if alike:
        lines.append(alike)
    for d in differ.itertuples():
        if d.differs:
            lines.append(f"- {d.result_set} differs from {order[0]}: {d.differs}")
    for _, r in summary.iterrows():
        best = r.get("recommended")
        tail = (f"recommended {best} (ppl {numbers.num(r['recommended_ppl'], 4)}, "
                f"{numbers.num(r['recommended_tokens_per_s'], 3)} tokens/s)" if isinstance(best, str)
                else "no configuration finished")
        lines.append(f"- {r['result_set']}: {r['ok']} ok, {r['oom']} oom, {r['diverged']} diverged; {tail}")
    if len(order) == 1:
        lines.append("One result set on one machine: nothing to put side by side.")
    return "\n".join(lines)


def _bars(cfg: pd.DataFrame, order: list[str], col: str, axis: str) -> go.Figure | None:
    d = cfg[cfg[col].notna()]
    if d.empty:
        return None
    fig = go.Figure()
    keys = list(dict.fromkeys(d["config_key"]))
    uniq = d.drop_duplicates("config_key")
    names = dict(zip(uniq["config_key"], labels(uniq, varying_fields(d))))
    for m in order:
        dm = d[d["result_set"] == m].set_index("config_key")
        # Plotly renders a few HTML tags in legend text: escape the name so it shows as written.
        fig.add_trace(go.Bar(x=[names[k] for k in keys], y=[dm[col].get(k, np.nan) for k in keys],
                             name=html.escape(m)))
    fig.update_layout(**{**figures.LAYOUT, "margin": dict(l=70, r=30, t=30, b=110)}, barmode="group",
                      legend=dict(orientation="h", y=1.12))
    fig.update_yaxes(title=axis)
    fig.update_xaxes(automargin=True)  # long configuration names turn and need the room
    return fig


def _letters(order: list[str]) -> dict[str, str]:
    """Short column keys for the side-by-side tables: A, B, ..., Z, AA, ..."""
    def key(i: int) -> str:
        return ascii_uppercase[i] if i < 26 else key(i // 26 - 1) + ascii_uppercase[i % 26]
    return {m: key(i) for i, m in enumerate(order)}


def _side_cell(cfg: pd.DataFrame, m: str, ref: str, what: str) -> Callable[[pd.Series], str]:
    rows = cfg[cfg["result_set"] == m].set_index("config_key")
    base = cfg[cfg["result_set"] == ref].set_index("config_key")[what]

    def cell(r: pd.Series) -> str:
        k = r["config_key"]
        if k not in rows.index:
            return "not run"
        st = rows.at[k, "status"]
        if st != "ok":
            return "OOM" if st == "oom" else str(st)
        v = rows.at[k, what]
        text = numbers.num(v, 3)
        b = base.get(k)
        if m != ref and b is not None and pd.notna(b) and b and pd.notna(v):
            text += f" ({numbers.ratio(v / b)})"
        return text
    return cell


def _side_table(cfg: pd.DataFrame, order: list[str], what: str, table_id: str) -> str:
    keys = list(dict.fromkeys(cfg["config_key"]))
    first = cfg.drop_duplicates("config_key").set_index("config_key")
    rows = pd.DataFrame({"config_key": keys})
    letters = _letters(order)
    extra = varying_fields(cfg)
    cols: list[Column] = [("l", "configuration", lambda r: label(first.loc[r["config_key"]], extra))]
    cols += [("", letters[m], _side_cell(cfg, m, order[0], what)) for m in order]
    return table(rows, cols, table_id=table_id)


def _differ_table(differ: pd.DataFrame, letters: dict[str, str]) -> str:
    cols: list[Column] = [("", "key", lambda r: letters[r["result_set"]]),
                          ("l", "result set", lambda r: r["result_set"]),
                          ("l", "machine", lambda r: r["machine"]), ("l", "torch", lambda r: r["torch"]),
                          ("l", "allocator", lambda r: r["malloc"]),
                          ("l", "setup", lambda r: r["setup"]),
                          ("wrap", "differs from the first in", lambda r: r["differs"] or ("—" if r.name else "(reference)")),
                          ("l", "ran (UTC)", lambda r: r["ran"]), ("", "trials", lambda r: str(r["trials"]))]
    return table(differ, cols, table_id="what-differs")


def _summary_table(summary: pd.DataFrame) -> str:
    gpu = summary["gpu_memory_mib"].notna().any()
    cols: list[Column] = [("l", "result set", lambda r: r["result_set"])]
    if gpu:
        cols.append(("", "GPU MiB", lambda r: numbers.count(r.get("gpu_memory_mib"))))
    cols += [("", "ok", lambda r: str(r["ok"])), ("", "oom", lambda r: str(r["oom"])),
             ("", "diverged", lambda r: str(r["diverged"])),
             ("", "largest ok bptt×bs", lambda r: numbers.count(r.get("largest_ok_tokens_per_step"))),
             ("", "smallest OOM bptt×bs", lambda r: numbers.count(r.get("smallest_oom_tokens_per_step"))),
             ("wrap", "best perplexity", lambda r: f"{r['best']} ({numbers.num(r['best_ppl'], 4)})"
              if isinstance(r.get("best"), str) else ""),
             ("wrap", "recommended (cheapest within 2%)",
              lambda r: f"{r['recommended']} ({numbers.num(r['recommended_tokens_per_s'], 3)} tokens/s)"
              if isinstance(r.get("recommended"), str) else "")]
    if "best_joules_per_ktok" in summary and summary["best_joules_per_ktok"].notna().any():
        cols.append(("", "J / 1k tok at best", lambda r: numbers.num(r.get("best_joules_per_ktok"), 3)))
    return table(summary, cols, table_id="machines")


def _compare_figures(cfg: pd.DataFrame, order: list[str]) -> str:
    ok = cfg[cfg["status"] == "ok"]
    n_missing = int((cfg["status"] != "ok").sum())
    gone = (" Bars missing for a result set mean the configuration ran out of memory, diverged or was not run there."
            if n_missing or cfg.groupby("config_key")["result_set"].nunique().min() < len(order) else "")
    parts = []
    for div_id, col, title, axis, what in (
            ("fig-cmp-tps", "tokens_per_s", "Throughput per configuration", "tokens/s", "Taller is faster."),
            ("fig-cmp-mem", "peak_mem_mib", "Peak memory per configuration", "MiB",
             "The same configuration can need different memory in another result set: another machine's allocator "
             "and cuDNN workspaces, or another setting."),
            ("fig-cmp-energy", "joules_per_ktok", "Energy per 1k training tokens", "J per 1k tokens",
             "Lower is cheaper in energy for the same amount of training.")):
        f = _bars(ok, order, col, axis)
        if f is not None:
            parts.append(figure_block(div_id, Drawn(f, f"{title}, by result set", f"One bar per result set. {what}{gone}")))
    for i, m in enumerate(order):
        d = figures.heatmap(cfg[cfg["result_set"] == m], "tokens_per_s", title=f"Feasible region and throughput — {m}")
        if d is not None:
            parts.append(figure_block(f"fig-cmp-region-{i}", Drawn(d.fig, d.title, d.caption + " The edge of the "
                                                                   "coloured cells is this result set's feasible region.")))
    return "".join(parts)


def render_compare(trials: pd.DataFrame, cfg: pd.DataFrame, summary: pd.DataFrame, order: list[str], name: str,
                   storages: list[str], warnings: list[str] | None = None, differ: pd.DataFrame | None = None) -> str:
    differ = differ if differ is not None else what_differs(trials, {})
    kind = _kind(trials)
    ref = order[0]
    letters = _letters(order)
    alike = _alike(differ)
    note = "<p>One result set on one machine: nothing to put side by side.</p>" if len(order) == 1 else ""
    note += "".join(f'<p class="bad warning"><b>warning:</b> {esc(w)}</p>' for w in warnings or [])
    key = "; ".join(f"{letters[m]} = {m}" for m in order)
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{kind} comparison — {name}" if len(set(differ["machine"])) > 1 else f"Comparison of runs — {name}"
    body = f"""{note}
<section id="differs"><h2>What differs between the result sets</h2>{f'<p>{esc(alike)}</p>' if alike else ''}
{_differ_table(differ, letters)}</section>
<section id="machines"><h2>Per result set: feasible region and best configuration</h2>{_summary_table(summary)}</section>
<section id="side-by-side"><h2>Per configuration, side by side</h2><p class="small">{esc(key)}. Means over the runs that
finished; ratios in brackets are relative to {esc(letters[ref])} ({esc(ref)}); OOM / diverged mark configurations that did
not finish in that result set.</p>
<h3>Throughput, tokens/s</h3>{_side_table(cfg, order, "tokens_per_s", "side-by-side-table")}
<h3>Peak memory, MiB</h3>{_side_table(cfg, order, "peak_mem_mib", "side-by-side-memory")}</section>
<section id="figures"><h2>Figures</h2>{_compare_figures(cfg, order)}</section>"""
    meta = meta_line([("compared", _what(order, differ)), ("trials", len(trials)),
                      ("ratios relative to", ref), ("generated", now)])
    src = "".join(f"<li>{esc(s)}</li>" for s in storages)
    footer = f"Sources:<ul>{src}</ul>Columns of compare.csv: bptt_harness/report/README.md."
    return page(title, body, footer=footer, meta=meta)
