"""Optuna studies over bptt x batch size: objective, storage, resume, retries, workers.

One Optuna trial = one :func:`bptt_harness.trainer.run_trial` under the probe. Its full measurement is
stored as the trial's user attribute ``record`` (see :func:`make_record`), whatever its status:
``oom`` and ``diverged`` trials complete with infinite values and a violated constraint, so TPE and
NSGA-II learn the memory and stability walls; ``pruned`` trials are pruned; ``timeout`` and
``failed`` trials fail. A trial whose worker died (SIGKILL, node lost) or was interrupted is failed
and enqueued again with the same parameters, so a rerun of the same command resumes the study.
"""

from __future__ import annotations

from bptt_harness.study.common import CANONICAL, GRACE_S, HEARTBEAT_S, MAX_RETRIES, RACE_POLL_S, TrialFailed
from bptt_harness.study.objective import (  # noqa: F401
    Objective,
    _observe_until,
    config_key,
    cost_value,
    make_record,
    store_record,
    study_info,
    suggest,
    trial_spec,
)
from bptt_harness.study.queue import (  # noqa: F401
    MAY_CHANGE,
    Progress,
    _changed_keys,
    _ConstrainedRandomSampler,
    _constraints,
    _has_final_record,
    _has_repeats,
    _name_metrics,
    _now,
    _params_key,
    _pid_alive,
    _process_token,
    _retried,
    _retries_exhausted,
    _trial_params,
    _worker_is_dead,
    create_study,
    enqueue_grid,
    grid_points,
    make_pruner,
    make_sampler,
    metric_names,
    progress,
    reap,
    retry_trial,
    worker_id,
)
from bptt_harness.study.run import (  # noqa: F401
    _largest,
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
from bptt_harness.study.storage import (  # noqa: F401
    _check_journal_tail,
    _check_sqlite_file,
    _complete_bytes,
    _directory_lock,
    _first_line,
    _open_journal,
    _open_rdb,
    _relocated,
    _sqlite_damage,
    open_storage,
    recorded_storage,
    resolve_storage,
    storage_failure,
    write_study_json,
)
