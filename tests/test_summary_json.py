"""summary.json (issue 14, item 7): the report's verdict as data, the same words and numbers as the HTML."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from synthetic import synthetic_records

from bptt_harness.report import generate_from_records
from bptt_harness.report.advice import Advice
from bptt_harness.report.build import build
from bptt_harness.report.frame import records_to_frame
from bptt_harness.report.page import esc
from bptt_harness.report.summary import summary


def strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"summary.json holds {token}")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_holds_the_verdict_of_the_report(smoke_results: Path) -> None:
    s = strict((smoke_results / "summary.json").read_text())
    assert s["schema"] == 1 and s["study"] == "smoke"
    assert s["trials"] == {"total": 4, "running": 0, "by_status": {"ok": 4}}
    assert s["budget"]["budget"] == "tokens" and s["budget"]["budget_tokens"] == 6000
    rec = s["recommendation"]
    configs = pd.read_csv(smoke_results / "configs.csv").set_index("config_key")
    row = configs.loc[rec["recommended"]]
    assert rec["configuration"]["config_key"] == rec["recommended"]
    assert rec["configuration"]["val_ppl"] == pytest.approx(row["val_ppl"])
    assert rec["configuration"]["n"] == row["n"] == 1
    assert rec["configuration"]["cost_column"] == s["cost"]["column"] == "seconds_per_ktok"
    html = (smoke_results / "report.html").read_text()
    assert esc(rec["headline"]) in html
    assert s["answers"]["bptt"]["question"] == "Does a longer bptt help at this budget?"
    for answer in s["answers"].values():  # the same words as the report
        assert esc(answer["answer"]) in html
    assert [r["config_key"] for r in s["ranking"]] == list(configs.index[configs["place"].notna()])
    fit = s["memory"]["fits"][0]
    assert fit["gpu"] is False and fit["n_points"] == 4 and "slope_mib" in fit
    assert s["memory"]["wall"]["largest_ok"]["config_key"] == "bptt=12,batch_size=16"


def test_card_predictions_and_no_nan(tmp_path: Path) -> None:
    records = synthetic_records(bptts=(35, 70, 140, 280), batch_sizes=(20, 80, 320), repeats=2)
    paths = generate_from_records(records, study_name="gpu", out_dir=tmp_path)
    s = strict(paths.summary_json.read_text())
    cards = {c["batch_size"]: c for c in s["memory"]["cards"]}
    assert set(cards) == {20, 80, 320} and cards[20]["H100 80GB"] > cards[320]["H100 80GB"] > 0
    assert s["memory"]["wall"]["smallest_oom"]["config_key"] == "bptt=280,batch_size=320"
    assert s["recommendation"]["configuration"]["n"] == 2
    assert s["recommendation"]["configuration"]["val_ppl_std"] > 0
    assert s["trials"]["by_status"]["oom"] == 2


def test_a_field_added_to_the_advice_is_written_too() -> None:
    @dataclasses.dataclass
    class WithInterval(Advice):
        interval: tuple[float, float] | None = None

    rep = build(records_to_frame(synthetic_records(bptts=(35, 70), batch_sizes=(20,))), study_name="x")
    rep.advice = WithInterval(**{f.name: getattr(rep.advice, f.name) for f in dataclasses.fields(Advice)},
                              interval=(101.5, float("nan")))
    assert summary(rep)["recommendation"]["interval"] == [101.5, None]
