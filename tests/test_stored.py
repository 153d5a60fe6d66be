"""One rule for which trials count as final (bptt_harness.stored), read the same by progress, retries,
the race and the report."""

from __future__ import annotations

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from bptt_harness.stored import MAX_RETRIES, final_trials, read_trials, retried_numbers, standing
from bptt_harness.study import progress, reap

DISTS = {"bptt": IntDistribution(1, 1000), "batch_size": IntDistribution(1, 1000)}


def _record(bptt: int, status: str = "ok", ppl: float | None = 100.0) -> dict:
    return {"status": status, "config_key": f"bptt={bptt},batch_size=20",
            "config": {"bptt": bptt, "batch_size": 20}, "result": {"val_ppl": ppl}}


def _add(study: optuna.Study, state: TrialState, bptt: int, **attrs: object) -> None:
    study.add_trial(create_trial(state=state, params={"bptt": bptt, "batch_size": 20}, distributions=DISTS,
                                 values=[1.0] if state == TrialState.COMPLETE else None, user_attrs=attrs))


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s")
    _add(study, TrialState.COMPLETE, 35, record=_record(35, ppl=120.0))                  # 0 final
    _add(study, TrialState.FAIL, 70, record=_record(70, "failed", None), interrupted=True)  # 1 superseded by 4
    _add(study, TrialState.FAIL, 140)                                                   # 2 died: retry
    _add(study, TrialState.FAIL, 280, retries=MAX_RETRIES)                              # 3 died, retried enough: final
    _add(study, TrialState.COMPLETE, 70, record=_record(70, ppl=90.0), retry_of=1, retries=1)  # 4 final
    _add(study, TrialState.PRUNED, 35, spurious="queued twice")                          # 5 spurious
    _add(study, TrialState.FAIL, 560, record=_record(560, "timeout", None))             # 6 final (a timeout)
    study.enqueue_trial({"bptt": 35, "batch_size": 40})                                 # 7 waiting
    return study


def test_each_trial_has_one_standing() -> None:
    study = _study()
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    assert retried == {1}
    assert [standing(t, retried) for t in trials] == [
        "final", "superseded", "retry", "final", "final", "spurious", "final", "waiting"]
    final = {t.number: t for t in final_trials(trials, "s")}
    assert sorted(final) == [0, 3, 4, 6]
    died = final[3].record
    assert died.status == "failed" and died.error == "worker died (no record)"
    assert died.config_key == "bptt=280,batch_size=20" and died.config.value("bptt") == 280
    assert final[6].record.status == "timeout" and final[4].stored["state"] == "COMPLETE"


def test_a_stored_record_is_final_whatever_optunas_state_says() -> None:
    study = _study()
    running = study.ask()   # the queued trial 7, now RUNNING
    assert progress(study).running == 1 and progress(study).done == 4
    running.set_user_attr("record", _record(35, ppl=80.0))   # the objective stores it before Optuna finishes
    p = progress(study)
    assert p.running == 0 and p.done == 5 and p.counts == {"ok": 3, "failed": 1, "timeout": 1}
    assert p.best is not None and p.best.number == running.number and p.best.record.result.val_ppl == 80.0
    [t] = [t for t in read_trials(study.get_trials(deepcopy=False), "s") if t.number == running.number]
    assert t.standing == "final" and t.state == "RUNNING"


def test_only_the_attempts_that_stand_for_retry_are_run_again() -> None:
    study = _study()
    assert reap(study) == 1
    queued = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING and "retry_of" in t.user_attrs]
    assert [t.user_attrs["retry_of"] for t in queued] == [2]
    assert reap(study) == 0     # trial 2 is superseded by its retry now
    assert standing(study.get_trials(deepcopy=False)[2], retried_numbers(study.get_trials(deepcopy=False))) == "superseded"
