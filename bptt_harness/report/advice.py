"""The recommendation in words, computed from the data: which configuration to use and why, and the
questions people ask about bptt (does longer help, where is the memory wall, where does training
become unstable, how does batch size interact, what is the cheapest near-best configuration).

Sentences are plain text; the HTML escapes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bptt_harness.report import numbers
from bptt_harness.report.budget import BudgetVerdict
from bptt_harness.report.confounds import BpttEvidence, Confounds
from bptt_harness.report.frame import CURVE, label, varying_fields
from bptt_harness.report.memory import MemoryFit, MemoryWall
from bptt_harness.report.noise import PPL_TOL, interval_text, table_means
from bptt_harness.report.rank import EqualTime, Ranking
from bptt_harness.seeds import Leaders, leaders, seed_means
from bptt_harness.stats import COVERAGE

NEAR_BEST = 0.02  # "within 2% of the best perplexity"
RISE = 0.01  # a validation perplexity more than 1% above the previous checkpoint's is a rise


@dataclass(frozen=True)
class Finding:
    key: str
    title: str
    text: str


@dataclass
class Advice:
    """``headline``: the configuration to use and why. ``recommended``: its config key (None when
    nothing finished). ``findings``: one answer per question. ``notes``: caveats about the data."""

    headline: str
    recommended: str | None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def as_text(v: float, digits: int = 4) -> str:
    """A number for a sentence: ``123.4``, ``0.3612``, ``45,210`` (bptt_harness.report.numbers)."""
    return numbers.num(v, digits, missing="n/a")


def fmt_cost(v: float, cost: str) -> str:
    return numbers.cost(v, cost)


def _ppl(row: pd.Series) -> str:
    text = as_text(row["val_ppl"])
    if "val_ppl_lo" in row.index:  # n and the interval over seeds (bptt_harness.report.noise)
        return f"{text} [{interval_text(row)}]"
    std, n = row.get("val_ppl_std"), row.get("n", 1)
    if n and n > 1 and std is not None and math.isfinite(std):
        text += f" ± {as_text(std, 2)}"
    return text


def near_best(table: pd.DataFrame, cost: str, tol: float = NEAR_BEST) -> tuple[pd.Series, pd.Series] | None:
    """(best-perplexity row, cheapest row whose perplexity is within ``tol`` of the best)."""
    if table.empty:
        return None
    best = table.loc[table["val_ppl"].idxmin()]
    within = table[table["val_ppl"] <= best["val_ppl"] * (1 + tol)]
    c = within[cost].fillna(np.inf) if cost in within else pd.Series(np.inf, index=within.index)
    # Cheapest; among equal costs the lower perplexity.
    cheapest = within.assign(_c=c).sort_values(["_c", "val_ppl"], kind="mergesort").iloc[0].drop("_c")
    return best, cheapest


def advise(trials: pd.DataFrame, configs: pd.DataFrame, ranking: Ranking, equal_time: EqualTime | None,
           fits: list[MemoryFit], wall: MemoryWall, n_running: int = 0, budget: BudgetVerdict | None = None,
           confounds: Confounds | None = None, evidence: BpttEvidence | None = None) -> Advice:
    table, cost = ranking.table, ranking.cost
    extra = varying_fields(configs)
    notes = list(ranking.notes) + _data_notes(trials, n_running)
    if table.empty:
        return Advice(_nothing_finished(trials), None, [f for f in (_instability(trials, configs, extra),
                                                                  _memory(wall, fits, extra)) if f], notes)
    pair = near_best(table, cost)
    assert pair is not None
    best, cheap = pair
    rec = cheap
    name = label(rec, extra) + _lr_note(rec)
    if len(table) == 1:
        headline = (f"Use {name}: it is the only configuration that finished "
                    f"(perplexity {_ppl(rec)}); there is nothing to compare it with yet — add trials to the study.")
    elif cheap["config_key"] == best["config_key"]:
        headline = (f"Use {name}: it reaches the lowest validation perplexity ({_ppl(best)}) "
                    f"and no configuration within {NEAR_BEST:.0%} of it costs less "
                    f"({fmt_cost(best.get(cost), cost)}).")
    else:
        gap = rec["val_ppl"] / best["val_ppl"] - 1
        ratio = best.get(cost) / rec.get(cost) if rec.get(cost) else math.nan
        headline = (f"Use {name}: its perplexity {_ppl(rec)} is within {gap:.1%} of the best "
                    f"({_ppl(best)}, {label(best, extra)}) at "
                    + (f"{ratio:.2g}x lower cost ({fmt_cost(rec.get(cost), cost)} "
                       f"against {fmt_cost(best.get(cost), cost)})." if math.isfinite(ratio) else "lower cost."))
    if PPL_TOL in table:
        headline += _seed_noise_clause(table, rec, extra)
    else:
        place = table[table["config_key"] == rec["config_key"]]
        if len(place) and bool(place.iloc[0]["tie"]):
            tied = table[(table["place"] == place.iloc[0]["place"]) & (table["config_key"] != rec["config_key"])]
            if len(tied):
                headline += (" Within the measured spread it ties with "
                             + ", ".join(label(r, extra) for _, r in tied.head(3).iterrows()) + ".")
    headline += _failed_seeds(rec) + _test_clause(rec, best, extra)
    if confounds is not None and len(table) > 1:
        headline += confounds.caution()
    findings = [f for f in (
        _cheapest(table, cost, best, cheap, extra),
        _bptt_helps(evidence),
        _confounds(confounds),
        _memory(wall, fits, extra),
        _instability(trials, configs, extra),
        _interaction(table, rec, extra, trials),
        _equal_time(equal_time, table, extra),
        _by_budget(budget),
        _lr_rule(trials, table),
    ) if f is not None]
    return Advice(headline, str(rec["config_key"]), findings, notes)


def _lr_note(row: pd.Series) -> str:
    """`` (lr 5.35 by the sqrt rule)``: the lr this configuration used and why (empty for old records)."""
    rule, lr = row.get("lr_rule"), row.get("lr")
    if not isinstance(rule, str) or not rule or lr is None or pd.isna(lr):
        return ""
    if rule == "fixed":
        return f" (lr {as_text(lr, 3)}, the same for every shape)"
    return f" (lr {as_text(lr, 3)}, {'tuned' if rule == 'tuned' else f'by the {rule} rule'})"


def _tests_text(lead: Leaders) -> str:
    k = lead.comparisons
    text = f"Welch tests at {COVERAGE:.0%}, Holm-adjusted over {k} comparison{'s' if k != 1 else ''}"
    if lead.borrowed:
        text += (f"; {lead.borrowed} single-seed configuration{'s' if lead.borrowed > 1 else ''} borrow"
                 f"{'' if lead.borrowed > 1 else 's'} the pooled seed noise of the others")
    return text


def _seed_noise_clause(table: pd.DataFrame, rec: pd.Series, extra: list[str]) -> str:
    """Whether the recommendation's perplexity is distinguishable from the others' (bptt_harness.seeds)."""
    means = table_means(table)
    if all(m.se is None for m in means.values()):
        return (" Every configuration ran with one seed, so the seed noise is unknown and small gaps may not be "
                "real (add repeats or a [race] table).")
    lead = leaders(means, anchor=str(rec["config_key"]))
    if lead.separated:
        return f" Its perplexity is separated from every other configuration's ({_tests_text(lead)})."
    rows = table.set_index(table["config_key"].astype(str))
    ties = [rows.loc[k] for k in lead.tied]
    return (f" Within the seed noise ({_tests_text(lead)}) its perplexity ties with "
            + ", ".join(f"{label(r, extra)} ({as_text(r['val_ppl'])})" for r in ties[:4])
            + (f" and {len(ties) - 4} more" if len(ties) > 4 else "") + ".")


def _failed_seeds(rec: pd.Series) -> str:
    bad = [(int(rec.get(c, 0) or 0), word) for c, word in (("n_diverged", "diverged"), ("n_oom", "ran out of memory"))]
    said = [f"{word} on {n} of {int(rec['n_trials'])} seeds" for n, word in bad if n]
    return (f" Caution: it {' and '.join(said)}; its perplexity is the mean of the seeds that finished."
            if said else "")


def _test_clause(rec: pd.Series, best: pd.Series, extra: list[str]) -> str:
    t_rec, t_best = rec.get("test_ppl"), best.get("test_ppl")
    if t_rec is None or pd.isna(t_rec):
        return ""
    if rec["config_key"] == best["config_key"] or t_best is None or pd.isna(t_best):
        return f" Test perplexity: {as_text(t_rec)}."
    return f" Test perplexity: {as_text(t_rec)}; the best by validation, {label(best, extra)}, {as_text(t_best)}."


def _by_budget(budget: BudgetVerdict | None) -> Finding | None:
    if budget is None or not budget.sentences:
        return None
    return Finding("budget", "Would the verdict hold with a longer run?", " ".join(budget.sentences))


def _lr_rule(trials: pd.DataFrame, table: pd.DataFrame) -> Finding | None:
    """Which lr rule the study used, the lr range it gave, and what tuning cost."""
    text = trials["lr_rule_description"].dropna() if "lr_rule_description" in trials else pd.Series(dtype=object)
    if text.empty or "lr" not in table:
        return None
    lrs = table["lr"].dropna()
    out = f"{text.iloc[0][0].upper()}{text.iloc[0][1:]}."
    if len(lrs) and lrs.nunique() > 1:
        out += f" The configurations used lr {as_text(lrs.min(), 3)} to {as_text(lrs.max(), 3)} (configs.csv has each one)."
    tune = pd.to_numeric(trials["lr_tune_tokens"], errors="coerce").fillna(0) if "lr_tune_tokens" in trials else None
    trained = trials["train_tokens"].fillna(0).sum()
    if tune is not None and tune.sum() > 0 and trained > 0:
        seconds = pd.to_numeric(trials["lr_tune_s"], errors="coerce").fillna(0).sum()
        out += (f" Tuning cost {int(tune.sum()):,} training tokens ({tune.sum() / trained:.0%} on top of the "
                f"{int(trained):,} the trials trained on) and {as_text(seconds, 3)} s.")
    return Finding("lr", "How was the learning rate set?", out)


def _nothing_finished(trials: pd.DataFrame) -> str:
    counts = trials["status"].value_counts()
    parts = ", ".join(f"{int(n)} {s}" for s, n in counts.items())
    common = _most_common_error(trials)
    return (f"No configuration finished ok ({parts}), so there is nothing to recommend yet.{common}"
            + (" Try smaller bptt x batch size." if counts.get("oom", 0) else "")
            + (" Try a lower learning rate." if counts.get("diverged", 0) else ""))


def _most_common_error(trials: pd.DataFrame) -> str:
    """The kind of failure most trials had, with one of its messages. Counted by status, not by message
    text: every diverged trial names its own step, while timeouts all read the same."""
    failed = trials[trials["status"] != "ok"]
    if failed.empty:
        return ""
    status = str(failed["status"].value_counts().index[0])
    of_kind = failed[failed["status"] == status]
    errors = of_kind["error"].dropna().astype(str)
    example = f", e.g. {errors.value_counts().index[0].splitlines()[0][:200].rstrip('. ')}" if len(errors) else ""
    return f" Most common error: {status} ({len(of_kind)} of {len(trials)} trials){example}."


# How each evaluation rule (a model family's, stored per trial as ``evaluation``) scores validation.
EVALUATION_TEXT = {
    "carried": "fixed windows of eval_bptt with the state carried through the whole split, so every target "
               "sees all the text before it whatever bptt the model trained with",
    "sliding": "overlapping windows of eval_bptt tokens moving by half a window, each target scored once with "
               "no state carried: every target gets the same context, the span the model trained on (for a "
               "model that carries nothing, bptt is its whole context)",
}


def evaluation_note(trials: pd.DataFrame) -> str | None:
    """Which rule scored validation, per model family, from the trials' ``evaluation`` column (None when no
    trial recorded one)."""
    if "evaluation" not in trials or "model" not in trials:
        return None
    known = trials[trials["evaluation"].isin(list(EVALUATION_TEXT))]
    parts = [f"{', '.join(sorted(map(str, g['model'].dropna().unique()))) or 'the model'}: {EVALUATION_TEXT[rule]}"
             for rule, g in known.groupby("evaluation", sort=True)]
    return ("Validation perplexity is scored by each model family's rule; " + "; ".join(parts) + ".") if parts \
        else None


def _data_notes(trials: pd.DataFrame, n_running: int) -> list[str]:
    notes = [n for n in (evaluation_note(trials),) if n]
    if n_running:
        notes.append(f"{n_running} trial(s) were still running and are not in this report.")
    ok = trials[trials["status"] == "ok"]
    if len(ok) and not (ok["probe_kind"] == "nvml").any():
        notes.append("No GPU telemetry: memory is what a CPU training step holds, counted by the trainer "
                     "(weights, gradients, optimiser state, saved activations), and energy was measured only where "
                     "RAPL is readable.")
    elif len(ok) and ok["energy_j"].isna().all():
        notes.append("Energy was not measured on this hardware.")
    dead = trials[trials["error"].astype(str).str.contains("worker died", na=False)]
    if len(dead):
        notes.append(f"{len(dead)} trial(s) lost their worker before storing a result (shown as failed).")
    if trials["machine_id"].dropna().nunique() > 1:
        notes.append(f"Trials ran on {trials['machine_id'].dropna().nunique()} machines; throughput and memory mix "
                     "hardware. Use 'bptt-harness compare' to split them.")
    return notes


def _cheapest(table: pd.DataFrame, cost: str, best: pd.Series, cheap: pd.Series, extra: list[str]) -> Finding | None:
    if len(table) < 2:
        return None
    within = int((table["val_ppl"] <= best["val_ppl"] * (1 + NEAR_BEST)).sum())
    if within == 1:
        text = (f"No other configuration comes within {NEAR_BEST:.0%} of the best perplexity "
                f"({label(best, extra)}, {fmt_cost(best.get(cost), cost)}).")
    elif cheap["config_key"] == best["config_key"]:
        text = (f"The best configuration is also the cheapest of the {within} within {NEAR_BEST:.0%} of the best "
                f"perplexity: {label(best, extra)} at {fmt_cost(best.get(cost), cost)}.")
    else:
        text = (f"{label(cheap, extra)} (perplexity {_ppl(cheap)}, {fmt_cost(cheap.get(cost), cost)}) is the cheapest "
                f"of the {within} configurations within {NEAR_BEST:.0%} of the best perplexity; the best, "
                f"{label(best, extra)}, costs {fmt_cost(best.get(cost), cost)}.")
    return Finding("cheapest", f"Cheapest configuration within {NEAR_BEST:.0%} of the best", text)


def _same_family(table: pd.DataFrame, rec: pd.Series, extra: list[str]) -> pd.DataFrame:
    """Rows that differ from ``rec`` only in bptt and batch size."""
    t = table
    for f in extra:
        t = t[t[f].astype(str) == str(rec[f])]
    return t


def _bptt_helps(evidence: BpttEvidence | None) -> Finding | None:
    """The bptt verdict: only from configurations that differ only in bptt, and only when nothing else
    (bptt_harness.report.confounds) could explain their order."""
    title = "Does a longer bptt help at this budget?"
    if evidence is None:
        return None
    found = evidence.confounds.found()
    piece = evidence.slice
    if piece is None:
        return Finding("bptt", title, "Cannot tell: no configurations of this study differ only in bptt (the same "
                       "tokens per step, lr, steps and model settings), so nothing here says what bptt does."
                       + (" Between the configurations compared, " + "; ".join(c.text for c in found) + "."
                          if found else ""))
    cells = ", ".join(f"bptt {int(r['bptt'])}: {as_text(r['val_ppl'])} [{interval_text(r)}]" for _, r in piece.iterrows())
    measured = f"Among {evidence.confounds.scope}, perplexity was {cells}."
    if found:
        return Finding("bptt", title, f"Inconclusive at this budget: {'; '.join(c.text for c in found)}. {measured}")
    lead = evidence.leaders
    by_key = piece.set_index(piece["config_key"].astype(str))
    if lead is None or not lead.noise_known:
        best = piece.loc[piece["val_ppl"].idxmin()]
        return Finding("bptt", title, f"Cannot tell yet: bptt {int(best['bptt'])} had the lowest perplexity, but with "
                       f"one seed each the seed noise is unknown, so no difference is called real. {measured}")
    best_bptt = int(by_key.loc[lead.best, "bptt"])
    if not lead.separated:
        tied = ", ".join(f"bptt {int(by_key.loc[k, 'bptt'])}" for k in lead.tied)
        return Finding("bptt", title, f"No difference beyond the seed noise: bptt {best_bptt} had the lowest perplexity "
                       f"but is not separated from {tied} ({_tests_text(lead)}). {measured}")
    shorter, longer = bool((piece["bptt"] < best_bptt).any()), bool((piece["bptt"] > best_bptt).any())
    worse = " and ".join(w for w, on in (("shorter", shorter), ("longer", longer)) if on)
    return Finding("bptt", title, f"bptt {best_bptt} is best: {worse} windows are worse beyond the seed noise "
                   f"({_tests_text(lead)}). {measured}")


def _confounds(confounds: Confounds | None) -> Finding | None:
    if confounds is None or not confounds.items:
        return None
    title = "What else differs between the compared configurations?"
    found = confounds.found()
    unknown = [c for c in confounds.items if c.applies is None]
    text = ("Besides the searched knobs: " + "; ".join(f"{c.name}: {c.text}" for c in found) + "."
            if found else "Nothing found besides the searched knobs (steps, lr, schedule, data seen, grid edge and "
            "the leader's stability over the budget were checked).")
    if unknown:
        text += " " + " ".join(f"{c.name}: {c.text[0].upper()}{c.text[1:]}." for c in unknown)
    return Finding("confounds", title, text)


def _memory(wall: MemoryWall, fits: list[MemoryFit], extra: list[str]) -> Finding | None:
    title = "Where is the memory wall?"
    parts = []
    if wall.largest_ok is not None:
        r = wall.largest_ok
        mem = r.get("peak_mem_mib")
        card = f" of {numbers.mib(wall.card_mib)}" if wall.card_mib else ""
        parts.append(f"The largest configuration that ran is {label(r)} ({numbers.count(r['tokens_per_step'])} tokens per step)"
                     + (f", peaking at {numbers.mib(mem)}{card}" if mem is not None and math.isfinite(mem) else "") + ".")
    if wall.smallest_oom is not None:
        r = wall.smallest_oom
        parts.append(f"The smallest that ran out of memory is {label(r)} ({numbers.count(r['tokens_per_step'])} tokens per step).")
    elif wall.largest_ok is not None:
        parts.append("No configuration ran out of memory, so the wall lies beyond the grid.")
    if fits:
        f = fits[0]
        err = f" (fit error: RMS {numbers.mib(f.rmse_mib, 2)}, R² {f.r2:.3f})" if math.isfinite(f.rmse_mib) else \
            " (fitted through two points: no error estimate)"
        law = f"{numbers.mib(f.intercept_mib, 4)} + {numbers.num(f.slope_mib, 4)} MiB × the longest window × bs" if f.linear else \
            f"{f.law()} MiB, window being the longest window"
        parts.append(f"Fitted memory model: peak ≈ {law}{err}.")
        if not f.gpu:
            parts.append("Measured on CPU as the bytes a training step holds (no allocator caches or CUDA context), "
                         "so it is a lower bound for a GPU, not a prediction of one.")
        if f.gpu and wall.card_mib and f.slope_mib > 0:
            x = f.max_tokens_per_step(wall.card_mib)
            at = "" if f.linear else f" at batch size {numbers.num(f.bs_ref, 4)}"
            if x > 0:
                parts.append(f"Predicted to fit this card: bptt × bs up to about {numbers.num(x, 3)}{at} (a prediction).")
    if not parts:
        return Finding("memory", title, "No configuration finished, so there is no memory measurement.")
    return Finding("memory", title, " ".join(parts))


def _instability(trials: pd.DataFrame, configs: pd.DataFrame, extra: list[str]) -> Finding | None:
    title = "Where does training become unstable?"
    div = configs[configs["n_diverged"] > 0]
    ok = trials[trials["status"] == "ok"]
    clip = ok["clipped_frac"].dropna()
    clip_text = (f" Gradient clipping was active on {clip.mean():.0%} of steps on average." if len(clip) else "")
    rises = _rises_text(trials, configs, extra)
    if div.empty:
        if rises:
            return Finding("stability", title, f"No configuration diverged, but {rises}" + clip_text)
        return Finding("stability", title, f"No configuration diverged, and no validation perplexity rose by more "
                       f"than {RISE:.0%} between checkpoints." + clip_text)
    # Configurations that only ran out of memory say nothing about stability.
    ran = configs[configs["n_oom"] < configs["n_trials"]]
    all_div = ran[(ran["n_diverged"] > 0) & (ran["n_diverged"] == ran["n_trials"] - ran["n_oom"])]
    pattern = _threshold(ran, all_div)
    listed = ", ".join(
        label(r, extra) + (f" at step {int(s)}" if pd.notna(s := _first_step(trials, r["config_key"])) else "")
        + ("" if r["n_diverged"] == r["n_trials"] else f" ({int(r['n_diverged'])}/{int(r['n_trials'])} runs)")
        for _, r in div.head(8).iterrows())
    more = f" and {len(div) - 8} more" if len(div) > 8 else ""
    text = f"{len(div)} configuration(s) diverged: {listed}{more}."
    if pattern:
        text += f" {pattern}"
    if rises:
        text += f" Of the runs that finished, {rises}"
    return Finding("stability", title, text + clip_text)


def _largest_rise(curve: object) -> float:
    """The largest relative rise of validation perplexity from one checkpoint to the next (0: none)."""
    losses = [float(p["loss"]) for p in curve if isinstance(p, dict) and p.get("loss") is not None] \
        if isinstance(curve, list) else []
    steps = [b - a for a, b in zip(losses, losses[1:]) if math.isfinite(a) and math.isfinite(b)]
    return math.expm1(max(steps)) if steps and max(steps) > 0 else 0.0


def _rises_text(trials: pd.DataFrame, configs: pd.DataFrame, extra: list[str]) -> str:
    """``validation perplexity rose ... in 4 runs (...)``: ok runs whose validation got worse on the way."""
    ok = trials[trials["status"] == "ok"]
    if ok.empty or CURVE not in ok:
        return ""
    rise = ok[CURVE].map(_largest_rise)
    bad = ok.assign(_rise=rise)[rise > RISE]
    if bad.empty:
        return ""
    names = {r["config_key"]: label(r, extra) for _, r in configs.iterrows()}
    worst = bad.groupby("config_key")["_rise"].max().sort_values(ascending=False)
    listed = ", ".join(f"{names.get(k, k)} (+{v:.0%})" for k, v in worst.head(6).items())
    return (f"validation perplexity rose by more than {RISE:.0%} between checkpoints in {len(bad)} run(s) of "
            f"{len(worst)} configuration(s): {listed}{' …' if len(worst) > 6 else ''}.")


def _first_step(trials: pd.DataFrame, key: str) -> float:
    s = trials.loc[(trials["config_key"] == key) & (trials["status"] == "diverged"), "diverged_step"].dropna()
    return float(s.min()) if len(s) else math.nan


def _threshold(configs: pd.DataFrame, diverged: pd.DataFrame) -> str | None:
    """A one-field threshold that separates always-diverging configurations from the others, if any."""
    if len(diverged) < 2:
        return None  # one diverged configuration is an incident, not an edge
    names = {"lr": "learning rate", "bptt": "bptt", "tokens_per_step": "bptt × bs", "batch_size": "batch size"}
    for f, word in names.items():
        if f not in configs or configs[f].nunique() < 2:
            continue
        is_div = configs["config_key"].isin(diverged["config_key"])
        lo = diverged[f].min()
        if (configs[f] >= lo).sum() and is_div[configs[f] >= lo].all() and not is_div.all():
            return f"Every configuration with {word} ≥ {as_text(lo)} diverged: that is the stability edge."
        hi = diverged[f].max()
        if (configs[f] <= hi).sum() and is_div[configs[f] <= hi].all() and not is_div.all():
            return f"Every configuration with {word} ≤ {as_text(hi)} diverged: that is the stability edge."
    return None


def _pair_outcome(a: str, b: str, means: dict) -> str:
    """``lower`` / ``higher`` (b against a, beyond the noise), ``tie`` (not separated) or ``untested``."""
    if a not in means or b not in means:
        return "untested"
    lead = leaders({a: means[a], b: means[b]}, anchor=a)
    if not lead.noise_known:
        return "untested"
    if not lead.separated:
        return "tie"
    return "lower" if means[b].estimate < means[a].estimate else "higher"


def _counts_text(outcomes: list[str], lower: str, higher: str, noise: str) -> str:
    n = {k: outcomes.count(k) for k in ("lower", "higher", "tie", "untested")}
    parts = [f"{lower} in {n['lower']}", f"{higher} in {n['higher']}", f"no difference beyond the {noise} in {n['tie']}"]
    if n["untested"]:
        parts.append(f"untested in {n['untested']} (no repeats, so the {noise} is unknown)")
    return ", ".join(parts)


def _interaction(table: pd.DataFrame, rec: pd.Series, extra: list[str], trials: pd.DataFrame) -> Finding | None:
    title = "How does batch size interact with bptt?"
    fam = _same_family(table, rec, extra)
    groups = [grp.sort_values("bptt") for _, grp in fam.groupby("tokens_per_step") if len(grp) >= 2]
    if groups:
        # The example: the group of equal tokens per step with most members (ties: nearest the recommendation).
        groups.sort(key=lambda grp: (-len(grp), abs(math.log(grp["tokens_per_step"].iloc[0] / rec["tokens_per_step"]))))
        ex = groups[0]
        cells = "; ".join(f"bptt {int(r['bptt'])} × bs {int(r['batch_size'])}: {as_text(r['tokens_per_s'])} tokens/s, "
                          f"perplexity {as_text(r['val_ppl'])}" for _, r in ex.head(5).iterrows())
        ppl_means = table_means(table)
        ok = trials[(trials["status"] == "ok") & trials["tokens_per_s"].notna()]
        # Throughput noise is run-to-run, measured like perplexity's: own spread at n >= 2, else pooled.
        tps_means = seed_means({str(k): [float(v) for v in grp] for k, grp in ok.groupby("config_key")["tokens_per_s"]})
        ppl_out, tps_out = [], []
        for grp in groups:
            short, long_ = str(grp.iloc[0]["config_key"]), str(grp.iloc[-1]["config_key"])  # long window, small batch
            ppl_out.append(_pair_outcome(short, long_, ppl_means))
            tps_out.append(_pair_outcome(long_, short, tps_means))
        n = len(groups)
        text = (f"At the same tokens per step ({int(ex['tokens_per_step'].iloc[0]):,}) — {cells}. "
                f"Over the {n} tokens-per-step value(s) run with several shapes, the longer window with the smaller "
                f"batch against the shorter window with the wider batch: perplexity "
                + _counts_text(ppl_out, "lower", "higher", "seed noise")
                + "; the shorter window with the wider batch against the longer one: throughput "
                + _counts_text(tps_out, "lower", "higher", "run-to-run spread")
                + f" (Welch tests at {COVERAGE:.0%}).")
        return Finding("interaction", title, text)
    # No shared products: how throughput scales with batch size at the recommended bptt.
    same_b = fam[fam["bptt"] == rec["bptt"]].sort_values("batch_size")
    if len(same_b) >= 2:
        a, b = same_b.iloc[0], same_b.iloc[-1]
        text = (f"At bptt {int(rec['bptt'])}, going from batch size {int(a['batch_size'])} to {int(b['batch_size'])} "
                f"changes throughput from {as_text(a['tokens_per_s'])} to {as_text(b['tokens_per_s'])} tokens/s "
                f"({b['tokens_per_s'] / a['tokens_per_s']:.2g}x) and perplexity from {as_text(a['val_ppl'])} to "
                f"{as_text(b['val_ppl'])}. No two configurations share bptt × bs, so shapes cannot be compared "
                "at fixed tokens per step.")
        return Finding("interaction", title, text)
    return Finding("interaction", title, "Cannot tell: the study has too few batch sizes per bptt.")


def _equal_time(et: EqualTime | None, table: pd.DataFrame, extra: list[str]) -> Finding | None:
    title = "Same verdict at equal training time?"
    if et is None or et.seconds is None or et.best_time is None or len(table) < 2:
        return None
    if not et.comparable:
        have = int(et.table["ppl_at_time"].notna().sum())
        return Finding("equal_time", title,
                       f"Cannot tell: by {et.seconds:.3g} s of training, the latest time every configuration reached, "
                       f"only {have} of {len(et.table)} configurations had a validation checkpoint, and the study's "
                       f"best ({label(table.set_index('config_key').loc[et.best_budget], extra)}) was not one of them. "
                       "A time grid ([train] time_grid_s) makes this comparison possible.")
    by_key = table.set_index("config_key")
    tb, bb = by_key.loc[et.best_time], by_key.loc[et.best_budget]
    at = et.table.set_index("config_key")["ppl_at_time"]
    rho = f" (rank correlation {et.spearman:.2f})" if et.spearman is not None else ""
    missing = int(et.table["ppl_at_time"].isna().sum())
    tail = (f" {missing} configuration(s) had no validation point at that time: shown as not measured, not ranked."
            if missing else "")
    if et.on_grid:
        tail += (" Every value is a measured validation point of the study's time grid"
                 + (f" (taken within {et.max_offset_s:.2g} s of it)" if et.max_offset_s is not None else "") + ".")
    else:
        tail += " Values are interpolated between validation checkpoints (set [train] time_grid_s to measure them)."
    lead = et.leaders
    noise = ""
    if lead is not None and lead.noise_known:
        noise = f" with the seed noise measured at that time ({_tests_text(lead)})"
    elif lead is not None:
        noise = " (no configuration has two runs there: the seed noise at that time is unknown, so this may not be real)"
    interval = et.table.set_index("config_key")["ppl_at_time_interval"] if "ppl_at_time_interval" in et.table else {}
    if et.disagree:
        text = (f"No. At the study's budget the best is {label(bb, extra)} (perplexity {as_text(bb['val_ppl'])}); "
                f"at equal training time — {et.seconds:.3g} s, the latest time every configuration reached — it is "
                f"{label(tb, extra)} (perplexity {as_text(at[et.best_time])}, {interval.get(et.best_time) or 'n/a'}){rho}, "
                f"and the budget's best is separated from it{noise}.")
    elif et.best_time == et.best_budget:
        sep = " and separated from every other configuration" if lead is not None and lead.separated else ""
        text = (f"Yes. At equal training time — {et.seconds:.3g} s, the latest time every configuration reached — "
                f"the study's best, {label(bb, extra)}, is still best{sep} (perplexity {as_text(at[et.best_budget])}){rho}"
                f"{noise if sep else ''}.")
    else:
        text = (f"Yes, within the noise. At equal training time — {et.seconds:.3g} s, the latest time every "
                f"configuration reached — {label(tb, extra)} is lowest (perplexity {as_text(at[et.best_time])}), and the "
                f"study's best, {label(bb, extra)} (perplexity {as_text(at[et.best_budget])}), is not separated from it"
                f"{noise}{rho}.")
    return Finding("equal_time", title, text + tail)
