"""End to end: Optuna storages -> trials.csv, configs.csv, report.html; atomic writes; escaping; passwords; errors."""

from __future__ import annotations

import errno
import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from synthetic import synthetic_records, write_optuna_study

import bptt_harness.fileio as report_io
from bptt_harness.cli import main
from bptt_harness.errors import HarnessError
from bptt_harness.report import generate, generate_from_records
from bptt_harness.report.frame import CONFIG_COLUMNS, TRIAL_COLUMNS
from bptt_harness.urls import redact as redact_url
from bptt_harness.urls import scrub

README = Path(__file__).resolve().parents[1] / "bptt_harness" / "report" / "README.md"
PASSWORD = "s3cr3t-Pa55"


def make_results(tmp_path: Path, name: str = "small", *, storage: str = "sqlite", records: list[dict] | None = None,
                 extra: tuple[str, ...] = ("FAIL", "RUNNING")) -> Path:
    """A results folder as 'bptt-harness sweep' leaves it: study.json plus the storage file."""
    folder = tmp_path / "results" / name
    folder.mkdir(parents=True)
    if storage == "sqlite":
        url = f"sqlite:///{folder / 'study.db'}"
        store = url
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        url = f"journal:{folder / 'journal.log'}"
        store = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    recs = records if records is not None else synthetic_records(bptts=(35, 70, 140, 280, 560),
                                                                 batch_sizes=(20, 80, 320), repeats=2, study=name)
    write_optuna_study(recs, store, name, extra_trials=extra)
    (folder / "study.json").write_text(json.dumps({"study_name": name, "storage": url,
                                                   "objectives": ["val_ppl", "seconds_per_token"],
                                                   "cost": "seconds_per_token"}))
    return folder


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return make_results(tmp_path)


def test_generate_end_to_end_on_a_real_sqlite_study(results: Path):
    paths = generate(results)
    assert paths.csv == results / "trials.csv" and paths.html == results / "report.html"
    trials = pd.read_csv(paths.csv)
    # 30 records + 1 trial whose worker died; the RUNNING trial is left out (and counted in a note).
    assert len(trials) == 31
    dead = trials[trials["error"] == "worker died (no record)"]
    assert len(dead) == 1 and dead.iloc[0]["status"] == "failed" and dead.iloc[0]["state"] == "FAIL"
    assert set(trials["status"]) == {"ok", "oom", "failed"}
    configs = pd.read_csv(paths.configs_csv)
    ok = configs[configs["n"] > 0]
    assert (ok["n"] == 2).all() and ok["val_ppl_std"].notna().all()
    assert configs.iloc[0]["place"] == 1 and configs.iloc[0]["pareto_rank"] == 1
    html = paths.html.read_text()
    assert 'id="ranking"' in html and "Recommendation" in html and "Use bptt" in html
    assert html.count("<script>") >= 7  # plotly.js once + one per figure
    assert html.count("Plotly.newPlot") == 8  # with the verdict at every budget
    assert "1 trial(s) were still running" in paths.summary
    assert "Recommendation: Use bptt" in paths.summary


def test_html_is_self_contained(results: Path):
    from plotly.offline import get_plotlyjs

    html = generate(results).html.read_text()
    # plotly.js is inlined exactly once, and nothing outside it names another place to load from (the
    # library's own bundle mentions map-tile servers that only map traces use; the browser test proves
    # the page renders with the network off).
    js = get_plotlyjs()
    assert html.count(js) == 1
    page = html.replace(js, "")
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    assert not re.search(r"https?://", page), re.search(r".{80}https?://.{80}", page)


def test_journal_storage_and_a_moved_results_folder(tmp_path: Path):
    folder = make_results(tmp_path, "journ", storage="journal", extra=())
    moved = tmp_path / "elsewhere" / "journ"
    moved.parent.mkdir()
    folder.rename(moved)  # study.json still names the old path: the copy in the folder is used
    paths = generate(moved)
    assert len(pd.read_csv(paths.csv)) == 30


def test_csv_columns_are_documented_and_present(results: Path):
    paths = generate(results)
    doc = README.read_text()
    trial_cols = list(pd.read_csv(paths.csv, nrows=0).columns)
    assert trial_cols == list(TRIAL_COLUMNS)
    config_cols = list(pd.read_csv(paths.configs_csv, nrows=0).columns)
    assert set(config_cols) <= {"place", "pareto_rank", "tie", *CONFIG_COLUMNS}
    for col in trial_cols + config_cols:
        assert f"`{col}`" in doc, f"column {col} is not documented in {README}"
    for col in ("bptt", "batch_size", "val_ppl", "tokens_per_s", "peak_mem_torch_mib", "peak_mem_nvml_mib",
                "joules_per_ktok", "status", "seed", "gpu_name", "seconds_per_ktok", "machine_id"):
        assert col in trial_cols


def test_atomic_write_keeps_the_previous_report_on_a_full_disk(results: Path, monkeypatch):
    paths = generate(results)
    before = {p: p.read_bytes() for p in (paths.csv, paths.html, paths.configs_csv, paths.summary_json)}

    def full_disk(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_io, "_write_all", full_disk)
    with pytest.raises(HarnessError) as e:
        generate(results)
    msg = str(e.value)
    assert "No space left on device" in msg and "previous version" in msg and "\n" not in msg
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in results.iterdir()) == ["configs.csv", "report.html", "study.db", "study.json",
                                                         "summary.json", "trials.csv"]


def test_cli_report_prints_summary_and_paths(results: Path, capsys):
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    assert "Recommendation:" in out and str(results / "report.html") in out and str(results / "trials.csv") in out


def test_script_in_study_name_and_errors_is_rendered_as_text(tmp_path: Path):
    evil = "<script>alert(1)</script>"
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20, 40), study=evil)
    recs[0]["status"] = recs[0]["result"]["status"] = "failed"
    recs[0]["error"] = '<img src=x onerror="alert(2)"> & </script>'
    recs[1]["study"]["corpus"] = "</title><script>alert(3)</script>"
    paths = generate_from_records(recs, study_name=evil, out_dir=tmp_path / "out",
                                  storage_display="sqlite:////tmp/<b>x</b>/study.db")
    html = paths.html.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for raw in ("<script>alert(1)", "<img src=x", "alert(3)</script>", "<b>x</b>"):
        assert raw not in html
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt; &amp; &lt;/script&gt;" in html


def test_study_name_from_storage_cannot_escape_results(tmp_path: Path, monkeypatch):
    folder = make_results(tmp_path, "plain", extra=())
    url = json.loads((folder / "study.json").read_text())["storage"]
    import optuna

    optuna.copy_study(from_study_name="plain", from_storage=url, to_storage=url, to_study_name="../../escape")
    monkeypatch.chdir(tmp_path)
    paths = generate(url, study_name="../../escape")
    assert paths.html.resolve().is_relative_to((tmp_path / "results").resolve())


def test_redact_and_scrub():
    assert redact_url(f"postgresql://bob:{PASSWORD}@db.example:5432/test") == "postgresql://bob:***@db.example:5432/test"
    assert redact_url("postgresql+psycopg2://bob:p@ss:w0rd@h/db") == "postgresql+psycopg2://bob:***@h/db"
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert PASSWORD not in scrub(f"could not connect (password={PASSWORD})", f"postgresql://bob:{PASSWORD}@h/db")


def test_password_in_a_storage_url_never_appears(results: Path, tmp_path: Path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://bob:{PASSWORD}@127.0.0.1:1/test"
    # 1. study.json with the redacted URL cannot be reopened: the user is told to pass --storage.
    info = json.loads((results / "study.json").read_text())
    info["storage"] = redact_url(url)
    (results / "study.json").write_text(json.dumps(info))
    with pytest.raises(HarnessError, match="password removed; pass --storage"):
        generate(results)
    # 2. An unreachable server: one line naming the redacted URL.
    with pytest.raises(HarnessError) as e:
        generate(results, storage=url)
    assert "bob:***@127.0.0.1:1/test" in str(e.value) and PASSWORD not in str(e.value)
    # 3. The CLI, with the URL as source and as --storage.
    assert main(["report", url, "--study-name", "small"]) == 2
    assert main(["report", str(results), "--storage", url]) == 2
    assert main(["compare", str(results)]) == 2
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    assert all(line.startswith("error: ") for line in out.err.strip().splitlines())
    assert PASSWORD not in caplog.text
    # 4. Nothing written anywhere holds it.
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.suffix in (".csv", ".html", ".json"):
            assert PASSWORD not in p.read_text(errors="replace")


def test_storage_display_in_html_is_redacted(tmp_path: Path):
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20,))
    paths = generate_from_records(recs, study_name="s", out_dir=tmp_path,
                                  storage_display=redact_url(f"postgresql://bob:{PASSWORD}@h/db"))
    html = paths.html.read_text()
    assert "postgresql://bob:***@h/db" in html and PASSWORD not in html


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"results folder '.*nope' does not exist; pass results/<study>"),
    ("no_json", r"has no study.json; pass a folder written by 'bptt-harness sweep'"),
    ("file", r"is a file, not a results folder"),
    ("corrupt", r"is not an SQLite database \(corrupted or another file\)"),
    ("unknown_name", r"study 'nope' is not in storage sqlite:///.*; it holds: small"),
    ("no_storage_file", r"storage sqlite:///.*gone.db.* does not exist; there is no study to read"),
    ("bad_json", r"study.json' is not readable JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, results: Path, case: str, pattern: str):
    target, kwargs = results, {}
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "no_json":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "file":
        target = results / "study.json"
    elif case == "corrupt":
        (results / "study.db").write_bytes(b"this is not a database" * 100)
    elif case == "unknown_name":
        kwargs = {"study_name": "nope"}
    elif case == "no_storage_file":
        (results / "study.json").write_text(json.dumps({"study_name": "small",
                                                        "storage": f"sqlite:///{tmp_path / 'gone.db'}"}))
        (results / "study.db").unlink()
    elif case == "bad_json":
        (results / "study.json").write_text("{not json")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(HarnessError) as e:
        generate(target, **kwargs)
    assert re.search(pattern, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_empty_study_is_an_error(tmp_path: Path):
    folder = make_results(tmp_path, "empty", records=[], extra=())
    with pytest.raises(HarnessError, match=r"study 'empty' in storage sqlite:///.* has no finished trials"):
        generate(folder)
    assert not (folder / "report.html").exists()


def test_study_file_source_uses_the_config_module(tmp_path: Path, results: Path, monkeypatch):
    """A .toml source: ``bptt_harness.config.load_study(path)`` gives ``.name``, ``.results_dir``, ``.storage_url``."""
    import bptt_harness.report.source

    study_file = tmp_path / "small.toml"
    study_file.write_text('name = "small"\n')
    url = json.loads((results / "study.json").read_text())["storage"]
    monkeypatch.setattr(bptt_harness.report.source, "load_study",
                        lambda path: types.SimpleNamespace(name="small", results_dir=results, storage_url=url))
    paths = generate(study_file)
    assert paths.html == results / "report.html" and paths.html.exists()


def test_report_of_records_from_several_machines_notes_it(tmp_path: Path):
    recs = synthetic_records(bptts=(35,), batch_sizes=(20, 40), machine_id="a") + \
        synthetic_records(bptts=(70,), batch_sizes=(20, 40), machine_id="b")
    paths = generate_from_records(recs, study_name="mixed", out_dir=tmp_path)
    assert "bptt-harness compare" in paths.summary


def test_readme_column_tables_are_generated_from_the_schema():
    """The README's trials.csv and configs.csv tables are exactly what the schema generates."""
    from bptt_harness.record import columns_markdown
    from bptt_harness.report.frame import configs_markdown

    doc = README.read_text()
    assert columns_markdown() in doc, "run `python scripts/readme_tables.py`"
    assert configs_markdown() in doc, "run `python scripts/readme_tables.py`"
    script = Path(__file__).resolve().parents[1] / "scripts" / "readme_tables.py"
    assert subprocess.run([sys.executable, str(script), "--check"], capture_output=True).returncode == 0
