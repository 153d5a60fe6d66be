"""The registry of searched keys: one table, and a key added to it is parsed, run and recorded."""

from __future__ import annotations

import pandas as pd
import pytest

from bptt_harness.config import parse_study
from bptt_harness.errors import HarnessError
from bptt_harness.record import StudyInfo, TrialRecord, TrialResult, flatten, trial_columns
from bptt_harness.report.frame import CONFIG_FIELDS, varying_fields
from bptt_harness.report.memory import SHAPE
from bptt_harness.search_keys import CELL, SEARCH_KEYS, SearchKey, config_key, recorded_values, spec_with
from bptt_harness.spec import ModelConfig, TrainConfig
from bptt_harness.study import make_record, trial_spec
from bptt_harness.trial_cli import parse_config

WEIGHT_DECAY = SearchKey("weight_decay", "train", "float", 0.0, 1.0, "AdamW weight decay (a test key)")


def _study(search: dict) -> dict:
    return {"name": "keys", "train": {"optimizer": "adamw", "lr": 1e-3},
            "search": {"bptt": [35], "batch_size": [20], **search}}


def test_a_key_added_to_the_registry_is_parsed_run_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SEARCH_KEYS, WEIGHT_DECAY.name, WEIGHT_DECAY)
    config = parse_study(_study({"weight_decay": [0.0, 0.01]}))
    assert config.search["weight_decay"].kind == "float" and config.search["weight_decay"].grid() == [0.0, 0.01]
    with pytest.raises(HarnessError, match=r"search.weight_decay values must lie in \[0, 1\]; got 0..2"):
        parse_study(_study({"weight_decay": [0.0, 2.0]}))

    params = parse_config("bptt=35,batch_size=20,weight_decay=0.01")
    assert params["weight_decay"] == 0.01 and config_key(params) == "bptt=35,batch_size=20,weight_decay=0.01"
    spec = trial_spec(config, params, repeat=1)
    assert spec.train.weight_decay == 0.01 and spec.train.seed == 1

    record = make_record(StudyInfo(name="keys"), spec, params, 1, TrialResult(bptt=35, batch_size=20), {}, "now")
    stored = record.to_dict()
    assert stored["config"]["weight_decay"] == 0.01 and stored["config"]["bptt"] == 35   # flat, as before
    back = TrialRecord.from_dict(stored)
    assert back.config.value("weight_decay") == 0.01 and back.config.values == record.config.values
    assert flatten(back)["weight_decay"] == 0.01
    column = next(c for c in trial_columns() if c.name == "weight_decay")
    assert (column.kind, column.doc) == ("float", WEIGHT_DECAY.doc)


def test_without_the_key_the_registry_does_not_know_it() -> None:
    with pytest.raises(HarnessError, match=r"unknown key \[search\] 'weight_decay'"):
        parse_study(_study({"weight_decay": [0.0]}))
    with pytest.raises(HarnessError, match=r"--config: unknown key 'bpt' \(did you mean 'bptt'\?\)"):
        parse_config("bpt=35")
    assert "weight_decay" not in {c.name for c in trial_columns()}


def test_everything_that_names_the_searched_keys_reads_the_registry() -> None:
    assert CELL == ("bptt", "batch_size")
    columns = {c.name: c for c in trial_columns()}
    for key in SEARCH_KEYS.values():
        assert columns[key.name].kind == key.kind and columns[key.name].doc == key.doc
        assert key.name in CONFIG_FIELDS
    assert SHAPE == ("model", "nhid", "emsize", "layers", "heads", "mem_len")
    frame = pd.DataFrame({"clip": [0.0, 0.25], "lr": [1.0, 1.0], "bptt": [35, 70]})
    assert varying_fields(frame) == ["clip"]


def test_recorded_values_leave_out_model_keys_a_factory_does_not_read() -> None:
    model = ModelConfig(factory="tests.helpers:model")
    spec = spec_with({"bptt": 35, "batch_size": 4, "nhid": 64}, model, TrainConfig())
    values = recorded_values(spec, searched=("bptt", "batch_size", "nhid"))
    assert values["nhid"] == 64 and values["emsize"] is None and values["layers"] is None
    assert values["lr"] == 20.0 and values["clip"] == 0.25 and values["bptt"] == 35
    lstm = recorded_values(spec_with({"bptt": 35, "batch_size": 4}, ModelConfig(), TrainConfig()))
    assert lstm["emsize"] == 200 and lstm["dropout"] == 0.2


def test_old_records_read_with_their_searched_keys() -> None:
    stored = {"config": {"bptt": 70, "batch_size": 10, "lr": 20.0, "nhid": 200, "model": "lstm", "seed": 3},
              "status": "ok", "result": {"tokens_per_s": 100.0}}
    rec = TrialRecord.from_dict(stored)
    assert rec.config.value("bptt") == 70 and rec.config.seed == 3 and rec.result.tokens_per_step == 700
    assert flatten(rec)["nhid"] == 200 and flatten(rec)["clip"] is None
