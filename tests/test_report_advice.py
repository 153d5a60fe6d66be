"""The recommendation and the answers, on a constructed study whose answers are known."""

from __future__ import annotations

import math

from bptt_harness.report.build import build
from bptt_harness.report.frame import records_to_frame


def rec(bptt: int, bs: int, ppl: float | None = None, tps: float | None = None, *, status: str = "ok",
        gpu: bool = True, error: str | None = None, step: int | None = None, seed: int = 0) -> dict:
    ok = status == "ok"
    secs = 2_000_000 / tps if ok else 0.0
    curve = ([{"step": k, "tokens": 500_000 * k, "seconds": secs * k / 4, "loss": math.log(ppl) + (4 - k) * 0.2,
               "ppl": ppl * math.exp((4 - k) * 0.2)} for k in range(1, 5)] if ok else [])
    probe = ({"probe_kind": "nvml" if gpu else "cpu", "peak_mem_mib": 500 + 0.5 * bptt * bs,
              "energy_j": 200.0 * secs if gpu else None} if ok else {})
    return {"status": status, "error": error, "config_key": f"bptt={bptt},batch_size={bs}",
            "config": {"bptt": bptt, "batch_size": bs, "lr": 20.0, "seed": seed, "repeat": seed},
            "result": {"status": status, "val_ppl": ppl if ok else None, "tokens_per_s": tps if ok else None,
                       "train_tokens": 2_000_000 if ok else 0, "diverged_step": step, "val_curve": curve,
                       "clipped_frac": 0.3 if ok else None, "probe": probe},
            "hardware": {"gpu_name": "Test GPU" if gpu else None, "gpu_memory_mib": 8192 if gpu else None,
                         "machine_id": "m1"},
            "study": {"name": "known", "budget": "tokens", "budget_tokens": 2_000_000, "cost": "seconds_per_token"}}


def known_study() -> list[dict]:
    return [
        rec(35, 20, 150.0, 20_000), rec(70, 20, 130.0, 30_000), rec(140, 20, 128.5, 40_000), rec(280, 20, 128.0, 45_000),
        rec(35, 40, 140.0, 35_000), rec(70, 40, 129.0, 50_000), rec(140, 40, 129.5, 60_000),
        rec(280, 40, status="oom", error="CUDA out of memory. Tried to allocate 2.00 GiB"),
        rec(35, 80, status="diverged", error="non-finite loss", step=40),
        rec(70, 80, status="diverged", error="non-finite loss", step=12),
        rec(140, 80, status="oom", error="CUDA out of memory"),
    ]


def findings(records: list[dict]) -> tuple[str, dict[str, str], list[str]]:
    rep = build(records_to_frame(records), study_name="known")
    return rep.advice.headline, {f.key: f.text for f in rep.advice.findings}, rep.advice.notes


def test_recommendation_is_the_cheapest_within_two_percent():
    headline, f, _ = findings(known_study())
    assert headline.startswith("Use bptt 140 × bs 40: its perplexity 129.5 [single-seed] is within 1.2% of the best "
                               "(128 [single-seed], bptt 280 × bs 20)")
    assert "1.3x lower cost" in headline
    assert f["cheapest"].startswith("bptt 140 × bs 40 (perplexity 129.5")
    assert "cheapest of the 5 configurations within 2%" in f["cheapest"]


def test_the_bptt_answer_of_an_uncontrolled_grid_is_inconclusive_and_says_why():
    _, f, _ = findings(known_study())
    # The slice that differs only in bptt is 5,600 tokens per step (140 x 40, 280 x 20); its best is the
    # longest window searched at that tokens per step, so the verdict is inconclusive and says what to try.
    assert f["bptt"].startswith("Inconclusive at this budget: the best (bptt 280 × bs 20) has the highest bptt searched")
    assert "try bptt 560 and above" in f["bptt"]
    assert "optimiser steps" not in f["bptt"]


def test_memory_wall_instability_and_interaction():
    _, f, _ = findings(known_study())
    assert "largest configuration that ran is bptt 280 × bs 20 (5,600 tokens per step)" in f["memory"] or \
        "largest configuration that ran is bptt 140 × bs 40 (5,600 tokens per step)" in f["memory"]
    assert "smallest that ran out of memory is" in f["memory"] and "(11,200 tokens per step)" in f["memory"]
    assert "peak ≈ 500 MiB + 0.5 MiB × the longest window × bs" in f["memory"]
    assert f["stability"].startswith("2 configuration(s) diverged: bptt 35 × bs 80 at step 40, bptt 70 × bs 80 at step 12")
    assert "Every configuration with batch size ≥ 80 diverged" in f["stability"]
    # One seed each: no difference is counted as real, in perplexity or in throughput.
    assert "perplexity lower in 0, higher in 0, no difference beyond the seed noise in 0, untested in 3" in f["interaction"]
    assert "throughput lower in 0, higher in 0, no difference beyond the run-to-run spread in 0, untested in 3" \
        in f["interaction"]


def test_equal_time_finding_present():
    _, f, _ = findings(known_study())
    assert "equal training time" in f["equal_time"]


def test_best_is_also_cheapest():
    headline, f, _ = findings([rec(35, 20, 100.0, 50_000), rec(70, 20, 120.0, 40_000)])
    assert headline.startswith("Use bptt 35 × bs 20: it reaches the lowest validation perplexity (100 [single-seed])")
    # The two differ in tokens per step, not only in bptt: nothing is said about bptt, least of all the
    # old canned "costs optimiser steps" sentence.
    assert f["bptt"].startswith("Cannot tell: no configurations of this study differ only in bptt")
    assert "optimiser steps" not in f["bptt"]


def test_degenerate_single_trial():
    headline, f, _ = findings([rec(35, 20, 100.0, 50_000)])
    assert "only configuration that finished" in headline
    assert "Cannot tell" in f["bptt"]


def test_degenerate_all_failed():
    headline, f, _ = findings([rec(35, 20, status="oom", error="CUDA out of memory"),
                               rec(70, 20, status="diverged", error="nan", step=3),
                               rec(35, 40, status="failed", error="worker died (no record)")])
    assert headline.startswith("No configuration finished ok (")
    assert "1 oom" in headline and "1 diverged" in headline and "1 failed" in headline
    assert "Try smaller bptt x batch size." in headline and "Try a lower learning rate." in headline
    assert "diverged" in f["stability"]


def test_no_gpu_numbers_are_noted():
    records = [rec(35, 20, 100.0, 5_000, gpu=False), rec(70, 20, 98.0, 6_000, gpu=False)]
    rep = build(records_to_frame(records), study_name="cpu", info={"cost": "joules_per_token"})
    assert any("No GPU telemetry" in n for n in rep.advice.notes)
    # Energy was the declared cost but is not measured on CPU: ranked by time instead, and said so.
    assert rep.ranking.cost == "seconds_per_ktok"
    assert any("not measured" in n for n in rep.advice.notes)
    assert rep.cards is None
