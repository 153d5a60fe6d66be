"""Issue 13, items 5 and 6: quantised shipped search spaces, a figure for scattered ones, and what the
shipped studies declare (lr rule with its reason, racing, the time grid)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_records

from bptt_harness.config import load_study
from bptt_harness.report.build import build
from bptt_harness.report.frame import aggregate_configs, records_to_frame
from bptt_harness.report.html import render
from bptt_harness.report.space import is_grid

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_search_spaces_are_lists_and_say_which_lr_rule_and_why(path: Path) -> None:
    config = load_study(path)
    for name in ("bptt", "batch_size"):
        assert config.search[name].choices is not None, f"{path.name}: search.{name} is a range, not listed values"
    text = path.read_text()
    rule = config.lr_rule.rule
    # A comment next to the [lr] table names the rule and gives a reason.
    assert re.search(rf"#[^\n]*\b{rule}\b[^\n]*:", text), f"{path.name}: no comment saying why lr rule {rule!r}"


@pytest.mark.parametrize("name", ["default.toml", "map.toml"])
def test_the_default_and_map_studies_race_measure_equal_time_and_report_test_perplexity(name: str) -> None:
    config = load_study(next(p for p in STUDIES if p.name == name))
    assert config.race is not None and config.race.max_seeds >= 2
    assert config.train.time_grid_s is not None and config.train.test
    if name == "map.toml":   # the map's shapes differ in tokens per step: a rule scales their lr
        assert config.lr_rule.rule != "fixed"
    else:                    # the controlled study holds the lr fixed inside each slice (issue 20)
        assert config.slices and all(s.lr is not None for s in config.slices)


def test_grid_or_scattered() -> None:
    grid = records_to_frame(synthetic_records((35, 70, 140), (10, 20, 40)))
    rng = np.random.default_rng(0)
    scattered = [r for r in synthetic_records(tuple(int(v) for v in rng.integers(35, 560, 12)), (20,))]
    for i, r in enumerate(scattered):   # TPE over integer ranges: every trial its own bptt and batch size
        bs = int(20 * 2 ** (i / 2))
        r["config"]["batch_size"] = r["result"]["batch_size"] = bs
        r["config_key"] = f"bptt={r['config']['bptt']},batch_size={bs}"
    sparse = records_to_frame(scattered)
    assert is_grid(aggregate_configs(grid))
    assert not is_grid(aggregate_configs(sparse))
    html_grid, html_sparse = render(build(grid, study_name="g")), render(build(sparse, study_name="s"))
    assert 'id="fig-ppl"' in html_grid and 'id="fig-space"' not in html_grid
    assert 'id="fig-space"' in html_sparse and 'id="fig-ppl"' not in html_sparse
