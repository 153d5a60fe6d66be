"""What a user sees in report.html and compare.html (issue 23): captions computed from what is shown (each fed data
where its words must not appear), sections that say where numbers come from, the profile against the trials,
one source per memory fit, the page shell, paths relative to the results folder, whole numbers in summary.json,
result sets in compare."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from synthetic import SyntheticLaw, synthetic_records, write_optuna_study

from bptt_harness.report import figures, generate, generate_from_records, html
from bptt_harness.report.build import Report, build
from bptt_harness.report.compare import generate_compare, write_compare
from bptt_harness.report.crosscheck import profile_vs_trials
from bptt_harness.report.frame import records_to_frame
from bptt_harness.report.page import table
from bptt_harness.report.source import shown_storage

SMALL_CARD = SyntheticLaw(card_mib=16_384.0)  # bptt 280 x bs 320 runs out of memory on it


def report(records: list[dict], profile: pd.DataFrame | None = None) -> Report:
    return build(records_to_frame(records), study_name="t", profile=profile)


def profile_of(records: list[dict], tps_factor: float = 1.0, mem_offset: float = 0.0, wall: bool = False) -> pd.DataFrame:
    """A profile.csv of the records' cells: throughput x ``tps_factor``, peak memory + ``mem_offset``."""
    rows = []
    for r in records:
        res = r["result"]
        if r["status"] != "ok" or r["config"]["seed"]:
            continue
        b, s = r["config"]["bptt"], r["config"]["batch_size"]
        rows.append({"bptt": b, "batch_size": s, "phase": "grid", "status": "ok", "steps": 7, "tokens_per_step": b * s,
                     "tokens_per_s": res["tokens_per_s"] * tps_factor,
                     "peak_mem_mib": res["probe"]["peak_mem_mib"] + mem_offset, "device": "cpu"})
    if wall:
        rows.append({"bptt": 35, "batch_size": 4096, "phase": "wall", "status": "oom", "steps": 0,
                     "tokens_per_step": 35 * 4096, "device": "cpu"})
    return pd.DataFrame(rows)


def words(drawn: figures.Drawn | None) -> str:
    assert drawn is not None
    return drawn.caption


# --- captions: said only where it is so -------------------------------------------------------------------

def test_heatmap_caption_names_oom_cells_only_when_there_are_some() -> None:
    fine = report(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)))
    text = words(figures.heatmap(fine.configs, "peak_mem_mib"))
    assert "OOM" not in text and "memory wall" not in text and "ran out of memory" not in text and "*" not in text
    walled = report(synthetic_records(bptts=(140, 280), batch_sizes=(80, 320), law=SMALL_CARD))
    text = words(figures.heatmap(walled.configs, "peak_mem_mib"))
    assert "Grey cells marked OOM ran out of memory — the memory wall" in text
    assert "memory wall" not in words(figures.heatmap(walled.configs, "tokens_per_s"))  # only memory's wall


def test_heatmap_says_its_source_and_stars_only_partial_cells() -> None:
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), repeats=2)
    rep = report(recs)
    assert "trials" in figures.heatmap(rep.configs, "tokens_per_s").title
    assert "full training runs" in words(figures.heatmap(rep.configs, "tokens_per_s"))
    prof = figures.heatmap(figures.profile_cells(profile_of(recs)), "tokens_per_s", "profile")
    assert prof is not None and "profile" in prof.title and "not full training" in prof.caption
    assert prof.title != figures.heatmap(rep.configs, "tokens_per_s").title  # two figures, two titles
    recs[0]["status"] = recs[0]["result"]["status"] = "diverged"  # one of two seeds of one cell
    assert "* marks cells where some runs did not finish" in words(figures.heatmap(report(recs).configs, "val_ppl"))


def test_curves_caption_mentions_the_reference_only_when_it_was_drawn_apart() -> None:
    without = report(synthetic_records(bptts=(70, 140), batch_sizes=(40, 80)))
    text = words(figures.curves(without.trials, without.ranking, without.equal_time))
    assert "35 × bs 20" not in text and "reference" not in text
    few = report(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)))  # 35 x 20 is among the top 6 already
    assert "reference" not in words(figures.curves(few.trials, few.ranking, few.equal_time))
    many = report(synthetic_records(bptts=(35, 70, 140, 280), batch_sizes=(5, 10, 20)))
    assert many.ranking.table["config_key"].head(6).ne("bptt=35,batch_size=20").all()
    assert "bptt 35 × bs 20 (the PyTorch example's shape) for reference" in words(
        figures.curves(many.trials, many.ranking, many.equal_time))


def test_curves_caption_has_left_and_right_only_with_two_panels() -> None:
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80))
    rep = report(recs)
    assert "(left)" in words(figures.curves(rep.trials, rep.ranking, rep.equal_time))
    for r in recs:
        for p in r["result"]["val_curve"]:
            p["seconds"] = None  # a run that recorded no training time at its checkpoints
    rep = report(recs)
    drawn = figures.curves(rep.trials, rep.ranking, rep.equal_time)
    text = words(drawn)
    assert "(left)" not in text and "(right)" not in text and "dashed" not in text
    assert len({t.xaxis for t in drawn.fig.data}) == 1


def test_budget_figure_leaves_a_one_point_axis_to_the_table() -> None:
    rep = report(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)))
    drawn = figures.budget_verdict(rep.budget, rep.ranking.table)
    assert "(left)" not in words(drawn) and "(right)" not in drawn.caption
    time_leg = rep.budget.tokens
    assert time_leg is not None and len(time_leg.table) == 4
    single = type(rep.budget)(tokens=time_leg, time=type(time_leg)("time", time_leg.table.head(1).assign(at=4.0),
                                                                   time_leg.values.iloc[:, :1].set_axis([4.0], axis=1)))
    drawn = figures.budget_verdict(single, rep.ranking.table)
    assert "one comparison point only (4 s): it is in the table above, not drawn" in words(drawn)
    assert all(t.xaxis in (None, "x") for t in drawn.fig.data)  # one panel: no axis with a single point


def test_pareto_caption_promises_no_star_without_a_recommendation() -> None:
    rep = report(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)))
    assert "star" in words(figures.pareto(rep.ranking, rep.advice.recommended))
    text = words(figures.pareto(rep.ranking, None))
    assert "star" not in text and "Bars" not in text  # single seeds: no error bars either


def test_memory_figure_draws_the_fitted_source_and_names_the_other() -> None:
    recs = synthetic_records(bptts=(35, 70, 140), batch_sizes=(20, 80), gpu_name=None)
    prof = profile_of(recs, mem_offset=-6.0)
    rep = report(recs, prof)
    assert rep.fits[0].source == "profile"
    drawn = figures.memory(rep.trials, rep.fits[0], rep.wall.card_mib, rep.profile)
    names = [t.name for t in drawn.fig.data]
    assert "profile cells (fitted)" in names and "trials (not fitted)" in names
    assert "fitted on the 6 profile cells" in drawn.caption and "6 MiB above the line (median)" in drawn.caption
    assert "Red crosses" not in drawn.caption and "card" not in drawn.caption  # no OOM, no card on CPU
    alone = report(recs)  # no profile: the trials are fitted, and nothing is drawn apart
    drawn = figures.memory(alone.trials, alone.fits[0], None, None)
    assert [t.name for t in drawn.fig.data if t.mode == "markers"] == ["trials (fitted)"]
    assert "not fitted" not in drawn.caption and "Open diamonds" not in drawn.caption
    gpu = report(synthetic_records(bptts=(140, 280), batch_sizes=(80, 320), law=SMALL_CARD))
    drawn = figures.memory(gpu.trials, gpu.fits[0], gpu.wall.card_mib, None)
    assert "Red crosses: the 1 trial(s) that ran out of memory, drawn at the card's size." in drawn.caption


def test_small_memory_keeps_its_figures_everywhere(tmp_path: Path) -> None:
    """0.4-0.65 MiB peaks: no cell, legend, sentence or table rounds them to 0 or 1."""
    law = SyntheticLaw(mem_base_mib=0.3, mem_slope_mib=0.0001)
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 40), law=law, gpu_name=None)
    page = generate_from_records(recs, study_name="tiny", out_dir=tmp_path).html.read_text()
    rep = report(recs)
    heat = figures.heatmap(rep.configs, "peak_mem_mib")
    assert sorted(t for t in heat.fig.data[0].text.ravel() if t) == ["0.37", "0.44", "0.44", "0.58"]
    legend = [t.name for t in figures.memory(rep.trials, rep.fits[0], None, None).fig.data if t.name.startswith("fit")]
    assert legend == ["fit: 0.3 + 0.0001 × bptt × bs"]
    assert "peak memory ≈ 0.3 MiB + 0.0001 MiB" in page
    # The answers too: "fit error: RMS 0 MiB" and "peaking at 0 MiB" were advice.py's own formatting.
    answers = page.split('<section id="answers">')[1].split("</section>")[0]
    assert re.search(r"peaking at 0\.\d+ MiB", answers) and "Fitted memory model: peak ≈ 0.3 MiB + 0.0001 MiB" in answers
    assert not re.search(r"[^.\d]0 MiB|[^.\d]1 MiB", page)


def test_the_memory_answer_keeps_a_small_fit_error(tmp_path: Path) -> None:
    """"fit error: RMS 0 MiB" was 0.36 MiB printed with ``:,.0f``."""
    recs = synthetic_records(bptts=(35, 70, 140), batch_sizes=(20, 40), law=SyntheticLaw(mem_base_mib=5.0, mem_slope_mib=0.001),
                             gpu_name=None)
    for i, r in enumerate(recs):
        r["result"]["probe"]["peak_mem_mib"] += 0.4 if i % 2 else -0.4
    page = generate_from_records(recs, study_name="tiny", out_dir=tmp_path).html.read_text()
    rms = re.search(r"fit error: RMS ([\d.,]+) MiB", page)
    assert rms and 0.1 < float(rms[1]) < 1 and rms[1].startswith("0.")


def test_training_curves_draw_what_was_logged() -> None:
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80))
    rep = report(recs)
    assert figures.training(rep.trials, rep.ranking) is None  # nothing logged: no empty figure
    for r in recs:
        r["result"]["train_curve"] = [{"step": k, "tokens": 1000 * k, "seconds": k / 10, "loss": 6 - k / 10}
                                      for k in range(1, 6)]
    rep = report(recs)
    text = words(figures.training(rep.trials, rep.ranking))
    assert "training loss" in text and "did not log the gradient norm before clipping or the learning rate" in text
    assert "left to right" not in text
    for r in recs:
        for p in r["result"]["train_curve"]:
            p.update(grad_norm=2.0 + p["step"], lr=0.5)
    rep = report(recs)
    drawn = figures.training(rep.trials, rep.ranking)
    assert "from left to right: training loss" in words(drawn) and "did not log" not in drawn.caption
    assert {t.xaxis for t in drawn.fig.data} == {"x", "x2", "x3"}
    # Quantities as titles above the panels (y-axis titles ran into the next panel at 800 px), and a
    # constant lr drawn on an axis from 0, not centred on it.
    assert [a.text for a in drawn.fig.layout.annotations] == ["training loss (nats/token)", "gradient norm", "learning rate"]
    assert not any(drawn.fig.layout[f"yaxis{i}"].title.text for i in ("", "2", "3"))
    assert drawn.fig.layout.yaxis3.range[0] == 0 and drawn.fig.layout.yaxis3.range[1] > 0.5


def test_parallel_coordinates_only_beyond_two_searched_keys(tmp_path: Path) -> None:
    two = generate_from_records(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)), study_name="two",
                                out_dir=tmp_path / "two").html.read_text()
    assert 'id="fig-parallel"' not in two
    three = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), lrs=(10.0, 20.0))
    for r in three:
        r["lr_choice"] = {"rule": "fixed"}
    page = generate_from_records(three, study_name="three", out_dir=tmp_path / "three").html.read_text()
    assert 'id="fig-parallel"' in page and "through the 3 searched keys (bptt, batch size, lr)" in page


# --- the page: sections, tables, marks --------------------------------------------------------------------

def test_sections_say_where_numbers_come_from_and_the_profile_disagreement(tmp_path: Path) -> None:
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), repeats=2, gpu_name=None)
    (tmp_path / "profile.csv").write_text(profile_of(recs, tps_factor=0.7).to_csv(index=False))
    page = generate_from_records(recs, study_name="p", out_dir=tmp_path).html.read_text()
    trials = page.split('<section id="figures">')[1].split("</section>")[0]
    profile = page.split('<section id="profile">')[1].split("</section>")[0]
    assert "comes from the study&#x27;s trials" in trials and 'id="fig-tps"' in trials and "fig-profile" not in trials
    assert "comes from profile.csv" in profile and 'id="fig-profile-tps"' in profile
    assert "disagree beyond the noise on 4 of 4 shared cell(s)" in profile and 'id="profile-vs-trials"' in profile
    assert "the ranking and the verdict use the trials" in profile
    # No wall phase in this profile: no wall table, and no caption pointing at one.
    assert "memory-wall" not in page and "table below" not in page


@pytest.mark.parametrize(("factor", "seeds", "said", "unsaid"), [
    (1.0, 2, "agree within the noise on all 4", "disagree"),
    (0.7, 2, "disagree beyond the noise on 4 of 4", "agree within"),
    (0.7, 1, "cannot be judged", "disagree"),     # one seed per configuration: the noise is unknown
])
def test_profile_against_trials(factor: float, seeds: int, said: str, unsaid: str) -> None:
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), repeats=seeds, gpu_name=None)
    checks, note = profile_vs_trials(records_to_frame(recs), profile_of(recs, tps_factor=factor))
    tps = next(c for c in checks if c.metric == "tokens_per_s")
    assert note is None and said in tps.sentence and unsaid not in tps.sentence


def test_profile_is_not_compared_with_trials_of_other_models() -> None:
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 80))
    for r in recs[::2]:
        r["config"]["nhid"] = 200
    checks, note = profile_vs_trials(records_to_frame(recs), profile_of(recs))
    assert checks == [] and note is not None and "vary nhid" in note


def test_ranking_legends_promise_only_marks_that_are_printed(tmp_path: Path) -> None:
    single = generate_from_records(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)), study_name="s",
                                   out_dir=tmp_path / "s").html.read_text()
    ranking = single.split('id="ranking-section"')[1].split("</section>")[0]
    assert "“=”" not in ranking and not re.search(r">\d+=<", ranking)  # no ties in this data
    assert "val ppl (mean ± sd)" in ranking and "95% t interval (df)" in ranking
    rep = report(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), repeats=3))
    et = rep.equal_time.table.copy()
    et.loc[:1, "place_time"] = 1.0  # two configurations tie at equal time
    rep.equal_time.table = et
    section = html._equal_time_section(rep)
    assert ">1=<" in section and "Places marked “=” are not separated from the row above by the seed noise" in section


def test_every_table_scrolls_instead_of_being_clipped(tmp_path: Path) -> None:
    page = generate_from_records(synthetic_records(repeats=2), study_name="w", out_dir=tmp_path).html.read_text()
    assert page.count("<table") == page.count('<div class="table-wrap"><table') > 3
    assert ".table-wrap { overflow-x:auto;" in page
    assert table(pd.DataFrame({"a": [1]}), [("", "a", lambda r: str(r["a"]))]).startswith('<div class="table-wrap">')


def test_figure_titles_are_html_headings_not_plot_titles(tmp_path: Path) -> None:
    """A long plotly title ran under the toolbar at 800 px; headings wrap."""
    rep = report(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80)))
    for d in (figures.heatmap(rep.configs, "val_ppl"), figures.pareto(rep.ranking, None),
              figures.curves(rep.trials, rep.ranking, rep.equal_time)):
        assert d is not None and not (d.fig.layout.title.text or "")
        assert not [a for a in d.fig.layout.annotations if a.text and a.text.startswith("against")]


# --- paths, summary.json ----------------------------------------------------------------------------------

def test_storage_is_shown_relative_to_the_results_folder(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "rel"
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'study.db'}"
    write_optuna_study(synthetic_records(bptts=(35, 70), batch_sizes=(20,), study="rel"), url, "rel")
    (folder / "study.json").write_text(json.dumps({"study_name": "rel", "storage": url}))
    page = generate(folder).html.read_text()
    assert "study.db in this results folder (SQLite)" in page and str(tmp_path) not in page
    assert shown_storage(f"sqlite:///{tmp_path}/elsewhere.db", folder) == f"sqlite:///{tmp_path}/elsewhere.db"
    assert shown_storage("postgresql://bob:***@db/x", folder) == "postgresql://bob:***@db/x"
    assert shown_storage(f"journal:{folder}/j.log", folder) == "j.log in this results folder (journal)"


def test_summary_json_writes_whole_numbers_as_integers(tmp_path: Path) -> None:
    paths = generate_from_records(synthetic_records(bptts=(35, 70), batch_sizes=(20, 80), repeats=2),
                                  study_name="ints", out_dir=tmp_path)
    s = json.loads(paths.summary_json.read_text())
    conf = s["recommendation"]["configuration"]
    for key in ("bptt", "batch_size", "tokens_per_step", "steps", "nhid", "layers", "n", "n_trials"):
        assert type(conf[key]) is int, (key, conf[key])
    assert type(s["budget"]["budget_tokens"]) is int
    row = s["ranking"][0]
    assert type(row["place"]) is int and type(row["bptt"]) is int and type(row["pareto_rank"]) is int
    assert '"bptt": 35.0' not in paths.summary_json.read_text() and '"steps": ' in paths.summary_json.read_text()
    assert type(conf["val_ppl"]) is float and type(conf["lr"]) is float  # a whole lr stays a float: 20.0


# --- compare: result sets -----------------------------------------------------------------------------------

def _folder(root: Path, name: str, records: list[dict]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'study.db'}"
    write_optuna_study(records, url, "cpu-study")
    (folder / "study.json").write_text(json.dumps({"study_name": "cpu-study", "storage": url}))
    return folder


def test_two_runs_on_one_cpu_are_compared_as_runs(tmp_path: Path) -> None:
    grid = dict(bptts=(35, 70), batch_sizes=(20, 80), gpu_name=None, machine_id="cpu-1", study="cpu-study")
    a = _folder(tmp_path / "runs" / "monday", "default", synthetic_records(seed=1, **grid))
    b = _folder(tmp_path / "runs" / "tuesday", "default", synthetic_records(seed=2, **grid))
    paths = generate_compare([str(a), str(b)], out_root=tmp_path / "out")
    page = paths.html.read_text()
    df = pd.read_csv(paths.csv)
    assert set(df["result_set"]) == {"monday", "tuesday"} and set(df["machine"]) == {"Synthetic CPU"}
    assert "nothing to put side by side" not in paths.summary and "nothing to put side by side" not in page
    assert "Same machine and same setup" in paths.summary and "run-to-run variation" in page
    assert "GPU" not in page.split("<body>")[1].split("<script>")[0]  # no GPU words on a CPU comparison
    assert "machine 1" not in page and "Comparison of runs" in page
    assert "Feasible region and throughput — monday" in page
    assert "study.db in its results folder (SQLite)" in page and str(tmp_path) not in page.split("<footer>")[1]


def test_compare_of_cpus_is_titled_for_cpus_and_tables_are_narrow(tmp_path: Path) -> None:
    a = synthetic_records(bptts=(35, 70), batch_sizes=(20,), machine_id="a", gpu_name=None)
    b = synthetic_records(bptts=(35, 70), batch_sizes=(20,), machine_id="b", gpu_name=None)
    for r in b:
        r["hardware"]["cpu_model"] = "Other CPU"
    trials = pd.concat([records_to_frame(a), records_to_frame(b)], ignore_index=True)
    page = write_compare(trials, name="cpus", out_root=tmp_path).html.read_text()
    assert "<title>CPU comparison — cpus</title>" in page and "GPU MiB" not in page
    side = page.split('id="side-by-side-table"')[1].split("</table>")[0]
    assert re.findall(r"<th[^>]*>([^<]*)</th>", side) == ["configuration", "A", "B"]
    assert "A = Synthetic CPU; B = Other CPU" in page


def test_compare_csv_columns_are_documented(tmp_path: Path) -> None:
    from bptt_harness.report.compare import COMPARE_COLUMNS

    doc = (Path(__file__).resolve().parents[1] / "bptt_harness" / "report" / "README.md").read_text()
    for col, meaning in COMPARE_COLUMNS.items():
        assert f"| `{col}` | {meaning} |" in doc, col
    a = synthetic_records(bptts=(35,), batch_sizes=(20,), machine_id="a")
    b = synthetic_records(bptts=(35,), batch_sizes=(20,), machine_id="b", gpu_name="Other GPU")
    csv = write_compare(records_to_frame(a + b), name="doc", out_root=tmp_path).csv
    assert set(pd.read_csv(csv, nrows=0).columns) <= set(COMPARE_COLUMNS)


def test_a_run_that_fixed_a_key_lines_up_with_one_that_searched_it(tmp_path: Path) -> None:
    fixed = synthetic_records(bptts=(35,), batch_sizes=(20,), machine_id="m", study="a")          # key bptt=35,...
    searched = synthetic_records(bptts=(35,), batch_sizes=(20,), lrs=(20.0, 10.0), machine_id="m", study="b")
    trials = pd.concat([records_to_frame(fixed).assign(source="fixed"),
                        records_to_frame(searched).assign(source="searched")], ignore_index=True)
    df = pd.read_csv(write_compare(trials, name="ab", out_root=tmp_path).csv)
    assert set(df["config_key"]) == {"bptt=35,batch_size=20,lr=20", "bptt=35,batch_size=20,lr=10"}
    both = df[df["config_key"] == "bptt=35,batch_size=20,lr=20"]
    assert set(both["result_set"]) == {"fixed", "searched"} and both["tokens_per_s_ratio"].notna().all()
