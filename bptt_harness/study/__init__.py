"""Optuna studies over bptt x batch size: objective, storage, resume, retries, workers.

One Optuna trial = one :func:`bptt_harness.trainer.run_trial` under the probe. Its full measurement is
stored as the trial's user attribute ``record`` (see :func:`make_record`), whatever its status:
``oom`` and ``diverged`` trials complete with infinite values and a violated constraint, so TPE and
NSGA-II learn the memory and stability walls; ``pruned`` trials are pruned; ``timeout`` and
``failed`` trials fail. A trial whose worker died (SIGKILL, node lost) or was interrupted is failed
and enqueued again with the same parameters, so a rerun of the same command resumes the study.
Which trials count as final is :mod:`bptt_harness.stored`'s rule.
"""

from __future__ import annotations

from bptt_harness.storage import (
    GRACE_S,
    HEARTBEAT_S,
    first_line,
    open_storage,
    recorded_storage,
    resolve_storage,
    storage_failure,
    write_study_json,
)
from bptt_harness.stored import Progress, progress
from bptt_harness.study.objective import (
    Objective,
    TrialFailed,
    cost_value,
    make_record,
    observe_until,
    store_record,
    study_info,
    suggest,
    trial_spec,
)
from bptt_harness.study.queue import (
    CANONICAL,
    MAY_CHANGE,
    create_study,
    enqueue_grid,
    grid_points,
    has_repeats,
    make_pruner,
    make_sampler,
    metric_names,
    now_iso,
    reap,
    retry_trial,
    worker_id,
)
from bptt_harness.study.race import RACE_KEY, Standing, plan_round, race_round, raced
from bptt_harness.study.run import (
    RACE_POLL_S,
    check_corpus_fits,
    check_cost_measurable,
    check_same_corpus,
    config_from_storage,
    load_corpus,
    plan_budget,
    prepare,
    run_worker,
    stored_train_tokens,
)

__all__ = [
    "CANONICAL", "GRACE_S", "HEARTBEAT_S", "MAY_CHANGE", "RACE_KEY", "RACE_POLL_S", "Objective", "Progress", "Standing",
    "TrialFailed", "check_corpus_fits", "check_cost_measurable", "check_same_corpus", "config_from_storage", "cost_value", "create_study",
    "enqueue_grid", "first_line", "grid_points", "has_repeats", "load_corpus", "make_pruner", "make_record",
    "make_sampler", "metric_names", "now_iso", "observe_until", "open_storage", "plan_budget", "plan_round", "prepare",
    "progress", "race_round", "raced", "reap", "recorded_storage", "resolve_storage", "retry_trial", "run_worker",
    "storage_failure", "store_record", "stored_train_tokens", "study_info", "suggest", "trial_spec", "worker_id",
    "write_study_json",
]
