"""One number format for the report (issue 19 section 3, issue 23 "Rounding"): small, large and mixed
magnitudes keep their significant figures; and the frame's numeric columns come from the record's schema."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from synthetic import synthetic_records

from bptt_harness.record import trial_columns
from bptt_harness.report import numbers
from bptt_harness.report.advice import as_text, fmt_cost
from bptt_harness.report.frame import NUMERIC, csv_frame, records_to_frame


@pytest.mark.parametrize(("value", "digits", "text"), [
    (0.36, 3, "0.36"),               # "fit error: RMS 0 MiB" was 0.36 MiB
    (0.3612, 3, "0.361"),
    (0.002108, 4, "0.002108"),       # the slope of a fit legend that read "0 + 0.002108"
    (0.4213, 3, "0.421"),            # "peaking at 0 MiB"
    (12.07, 3, "12.1"),
    (127.0976, 4, "127.1"),
    (15_219.17, 3, "15,219"),        # large numbers keep every integer digit
    (81_559.0, 3, "81,559"),
    (0.9996, 3, "1"),                # rounding up to the next power of ten
    (99.96, 3, "100"),
    (3.3e-5, 2, "3.3e-5"),           # tiny: scientific, never "0"
    (-0.42, 2, "-0.42"),
    (20.0, 3, "20"),
    (0, 3, "0"),
])
def test_num_keeps_significant_figures(value: float, digits: int, text: str) -> None:
    assert numbers.num(value, digits) == text


@pytest.mark.parametrize("missing", [None, math.nan, math.inf, -math.inf, "12", True])
def test_missing_values_are_the_callers_text(missing: object) -> None:
    assert numbers.num(missing) == "" and numbers.num(missing, missing="n/a") == "n/a"
    assert numbers.mib(missing, missing="-") == "-" and numbers.pm(missing, 1.0) == ""


def test_no_nonzero_number_prints_as_zero_at_any_magnitude() -> None:
    for exp in range(-9, 10):
        for mantissa in (1.0, 2.5, 9.99):
            v = mantissa * 10.0 ** exp
            text = numbers.num(v)
            assert text.strip("0.,") != "", (v, text)
            back = float(text.replace(",", ""))
            assert back == pytest.approx(v, rel=0.006), (v, text)  # within the 3 significant figures


def test_a_column_of_mixed_magnitudes_keeps_each_values_figures() -> None:
    """A heatmap of 0.42-0.65 MiB beside 15,000 tokens/s: every cell is readable on its own."""
    cells = [0.4213, 0.5127, 0.6498, 15_219.2, 0.002108]
    assert [numbers.num(v) for v in cells] == ["0.421", "0.513", "0.65", "15,219", "0.00211"]
    assert len({numbers.num(v) for v in (0.40, 0.45, 0.50, 0.55, 0.60, 0.65)}) == 6


def test_spread_and_interval_share_decimals() -> None:
    assert numbers.pm(127.0976, 0.71) == "127.10 ± 0.71"
    assert numbers.pm(0.132, 0.0085) == "0.1320 ± 0.0085"
    assert numbers.pm(15_219.0, 340.0) == "15,220 ± 340"
    assert numbers.pm(5.0, 0.0) == "5 ± 0" and numbers.pm(127.0976, None) == "127.1"
    assert numbers.interval(125.0, 129.2) == "125.0–129.2"   # the low end keeps its decimal
    assert numbers.interval(0.13, 0.16) == "0.130–0.160"
    assert numbers.interval(15_000.0, 19_000.0) == "15,000–19,000"


def test_units_and_costs() -> None:
    assert numbers.mib(0.36) == "0.36 MiB" and numbers.mib(442.07) == "442 MiB"
    assert numbers.pct(0.5) == "50%" and numbers.pct(0.0042) == "0.42%"
    assert numbers.ratio(2.9734) == "2.97×" and numbers.count(11_200.4) == "11,200"
    assert numbers.cost(0.132, "seconds_per_ktok") == "0.132 s per 1k tokens"
    assert numbers.cost(0.36, "peak_mem_mib") == "0.36 MiB" and numbers.cost(None, "peak_mem_mib") == "n/a"


def test_advice_sentences_use_the_module() -> None:
    assert as_text(0.002108) == "0.002108" and as_text(15_219.2) == "15,219" and as_text(None) == "n/a"
    assert fmt_cost(0.36, "peak_mem_mib") == "0.36 MiB"


# --- the frame's columns: derived from the record's schema, derived values computed once ------------------

def test_every_numeric_schema_column_is_numeric_in_the_frame() -> None:
    """frame.py used to overwrite the schema-derived NUMERIC with a hand list missing 21 columns."""
    schema_numeric = {c.name for c in trial_columns() if c.kind in ("int", "float")}
    assert schema_numeric == NUMERIC
    assert {"eval_energy_j", "max_window", "vocab_size", "eval_peak_mem_mib", "resolved_budget_tokens"} <= NUMERIC
    recs = synthetic_records(bptts=(35, 70), batch_sizes=(20,))
    for r in recs:  # what an older writer or another tool may leave: numbers as strings, a column never filled
        r["study"]["vocab_size"] = "10000" if r["config"]["bptt"] == 35 else "many"
        r["result"]["max_window"] = None
        r["result"]["probe"]["eval_energy_j"] = None
    df = records_to_frame(recs)
    for c in schema_numeric:
        assert pd.api.types.is_float_dtype(df[c]), c
    # A number written as a string reads as the number; anything else as missing, not a crash later.
    assert df.set_index("bptt")["vocab_size"].to_dict() == {35: 10000.0, 70: pytest.approx(math.nan, nan_ok=True)}
    out = csv_frame(records_to_frame(synthetic_records(bptts=(35,), batch_sizes=(20,))))
    assert str(out["max_window"].dtype) == "Int64" or out["max_window"].isna().all()
    assert str(out["warmup_steps"].dtype) == "Int64" and str(out["steps"].dtype) == "Int64"


def test_derived_columns_come_from_the_record_alone() -> None:
    """tokens_per_step, seconds_per_ktok and joules_per_ktok: one derivation (record.derive)."""
    recs = synthetic_records(bptts=(35,), batch_sizes=(20,))
    res = recs[0]["result"]
    res["tokens_per_step"] = res["seconds_per_ktok"] = res["joules_per_ktok"] = None  # an older record
    dead = {"status": "failed", "error": "worker died (no record)", "config": {"bptt": 70, "batch_size": 10},
            "result": {}}
    df = records_to_frame([recs[0], dead])
    assert df.loc[0, "tokens_per_step"] == 700
    assert df.loc[0, "seconds_per_ktok"] == pytest.approx(1000.0 / res["tokens_per_s"])
    assert df.loc[0, "joules_per_ktok"] == pytest.approx(res["probe"]["energy_j"] * 1000.0 / res["train_tokens"])
    assert df.loc[1, "tokens_per_step"] == 700  # the shape of a record-less trial, from its configuration
    assert np.isnan(df.loc[1, "seconds_per_ktok"])
