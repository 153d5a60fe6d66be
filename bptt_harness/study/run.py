"""Running a study: the corpus check, the worker loop, the budget plan and everything checked before a trial runs."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna

from bptt_harness.config import StudyConfig, parse_study
from bptt_harness.corpus import Corpus, check_fits, load
from bptt_harness.errors import HarnessError
from bptt_harness.hardware import fingerprint, resolve_device
from bptt_harness.interrupt import StopRequest
from bptt_harness.model import check_model
from bptt_harness.profile_csv import cells, doesnt_fit, load_profile, plan_tokens
from bptt_harness.spec import resolve_budget_tokens
from bptt_harness.storage import first_line, open_storage, write_study_json
from bptt_harness.stored import progress
from bptt_harness.study.objective import Objective, TrialFailed
from bptt_harness.study.queue import create_study, enqueue_grid, reap, retry_trial
from bptt_harness.study.race import race_round, raced
from bptt_harness.urls import redact

log = logging.getLogger(__name__)

# How often a worker waiting for the others' trials looks again before a racing round.
RACE_POLL_S = 2.0


# A token budget past this many passes over the train split is a practically endless sweep, not a study.
MAX_PASSES = 10_000


def check_corpus_fits(config: StudyConfig, corpus: Corpus) -> None:
    """Fail before the first trial if the largest window in the search space cannot fit the corpus, or the
    token budget is a practically endless number of passes over it."""
    check_fits(corpus, _largest(config, "batch_size"), _largest(config, "bptt"), config.train.eval_batch_size)
    n = corpus.train.numel()
    tokens = resolve_budget_tokens(config.train, n)
    if tokens is not None and tokens > MAX_PASSES * n:
        raise HarnessError(f"study file: train.tokens = {tokens:,} is {tokens / n:,.0f} passes over the corpus's "
                           f"{n:,} training tokens in every trial; at most {MAX_PASSES:,} passes: lower tokens, "
                           "or use budget = \"seconds\"")


def _largest(config: StudyConfig, name: str) -> Any:
    """The largest value a trial can get: a grid's (or a stepped range's) largest point, which can lie
    below the range's ``high``; a sampled range's ``high``."""
    space = config.search[name]
    if space.choices is None and (config.sampler == "grid" or space.step is not None):
        return max(space.grid())
    return space.max_value()


def load_corpus(config: StudyConfig) -> Corpus:
    return load(config.corpus, check=lambda corpus: check_corpus_fits(config, corpus))


CORPUS_HASH_ATTR = "corpus_hash"


def check_same_corpus(study: optuna.Study, config: StudyConfig, corpus: Corpus) -> None:
    """A study measures one corpus: refuse to add trials on other data (a corpus file edited, replaced or
    regenerated since the study started), as a changed study file is refused. The first run records the
    corpus's content hash in the study; a study from before that is checked against its trials' records."""
    if not corpus.content_hash:
        return
    stored = study.user_attrs.get(CORPUS_HASH_ATTR)
    if stored is None:
        hashes = {((t.user_attrs.get("record") or {}).get("study") or {}).get("corpus_hash")
                  for t in study.get_trials(deepcopy=False)} - {None}
        stored = next(iter(hashes)) if len(hashes) == 1 else None
    if stored is None:
        study.set_user_attr(CORPUS_HASH_ATTR, corpus.content_hash)
    elif stored != corpus.content_hash:
        raise HarnessError(
            f"study {config.name!r} measured corpus {corpus.source or corpus.name} with content hash {stored[:12]}, "
            f"but it now hashes to {corpus.content_hash[:12]}: the data changed, and its trials would not be "
            f"comparable. Restore the data it measured, or use a new study name, or delete {config.results_dir} "
            "to start over")


def check_cost_measurable(config: StudyConfig, device: Any) -> None:
    if config.cost == "joules_per_token" and len(config.objectives) > 1 and device.type != "cuda":
        readable = [p for p in glob.glob("/sys/class/powercap/intel-rapl:*/energy_uj") if os.access(p, os.R_OK)]
        if not readable:
            raise HarnessError("objective joules_per_token needs an energy reading, and this CPU-only machine "
                               "has no readable RAPL counter; use seconds_per_token or peak_memory here")


def run_worker(study: optuna.Study, config: StudyConfig, corpus: Corpus, device: Any, n_target: int,
               on_result: Callable[[optuna.Trial, dict], None] | None = None,
               on_start: Callable[[optuna.Trial, dict], None] | None = None, host_workers: int = 1,
               on_checkpoint: Callable[[optuna.Trial, dict], None] | None = None,
               stop: StopRequest | None = None) -> None:
    """Run trials until the study holds ``n_target`` finished ones (counting every worker's).

    ``host_workers``: how many workers run on this host at once (recorded with each trial: on CPU they
    share the machine, so their timings are marked). ``stop``: a recorded Ctrl-C or SIGTERM
    (:func:`bptt_harness.interrupt.deferred_signals`), acted on after every training step and between trials."""
    objective = Objective(config, corpus, device, fingerprint(device), on_result, on_start, host_workers,
                          profile=load_profile(config.results_dir), on_checkpoint=on_checkpoint, stop=stop,
                          n_target=n_target)
    while True:
        if stop is not None:
            stop.check()
        reap(study)
        p = progress(study)
        target = n_target + (raced(study) if config.race else 0)
        if p.done >= target or (p.waiting == 0 and (p.done + p.running >= target or config.sampler == "grid")):
            # A grid only runs its queue: nothing waiting means nothing left for this worker, unless the
            # race queues another round once every trial so far has finished.
            if config.race is None or p.waiting:
                return
            if p.running:
                time.sleep(RACE_POLL_S)  # another worker's trial may change the standings
                continue
            if p.done < n_target or race_round(study, config.race) == 0:
                return
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=True)




def stored_train_tokens(config: StudyConfig, storage_url: str) -> int | None:
    """The token budget an existing study in this storage was started with (None: no such study)."""
    try:
        storage = open_storage(storage_url)
        if config.name not in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
            return None
        stored = optuna.load_study(study_name=config.name, storage=storage).user_attrs.get("study_config") or {}
    except HarnessError:
        return None
    tokens = (stored.get("train") or {}).get("tokens")
    return int(tokens) if isinstance(tokens, int) else None


def plan_budget(config: StudyConfig, storage_url: str, max_seconds: float) -> tuple[StudyConfig, int, bool]:
    """``--max-seconds``: the study with the token budget that fits that limit, from its profile.

    A study already started keeps the budget it was planned with (its trials must stay comparable).
    Returns (config, tokens, whether they were planned now)."""
    stored = stored_train_tokens(config, storage_url)
    if stored is not None:
        tokens, planned = stored, False
    else:
        df = load_profile(config.results_dir)
        fit = [c for c in cells(config) if not doesnt_fit(df, config.memory_cap_mib, *c)]
        tokens = plan_tokens(df, fit, max_seconds, config.train.checkpoints, config.repeats)
        planned = True
    train = replace(config.train, budget="tokens", tokens=tokens, epochs=None)
    raw = {**config.raw, "train": {**(config.raw.get("train") or {}), "budget": "tokens", "tokens": tokens}}
    raw["train"].pop("epochs", None)
    return replace(config, train=train, raw=raw), tokens, planned


def prepare(config: StudyConfig, storage_url: str, device_name: str | None) -> tuple[optuna.Study, Corpus, Any]:
    """Everything that can fail on bad input, before a single trial runs."""
    device = resolve_device(device_name or config.device)
    check_cost_measurable(config, device)
    corpus = load_corpus(config)
    check_model(config.model, corpus.vocab_size)  # a user's model factory: one line now, not a failed trial later
    study = create_study(config, open_storage(storage_url, on_stale_trial=retry_trial))
    check_same_corpus(study, config, corpus)
    if config.sampler == "grid":
        enqueue_grid(study, config)
    write_study_json(config, storage_url)
    return study, corpus, device


def config_from_storage(study_name: str, storage_url: str) -> tuple[StudyConfig, optuna.Study]:
    """For ``bptt-harness worker``: the study file as stored by whoever created the study."""
    storage = open_storage(storage_url, create=False, on_stale_trial=retry_trial)
    try:
        summaries = optuna.get_all_study_summaries(storage)
    except Exception as e:  # noqa: BLE001
        raise HarnessError(f"storage {redact(storage_url)}: cannot list studies: {first_line(e, storage_url)}") from None
    names = [s.study_name for s in summaries]
    if study_name not in names:
        raise HarnessError(f"study {study_name!r} is not in storage {redact(storage_url)}; it holds: "
                           f"{', '.join(names) or 'no studies'} (start it with bptt-harness sweep first)")
    raw = optuna.load_study(study_name=study_name, storage=storage).user_attrs.get("study_config")
    if raw is None:
        raise HarnessError(f"study {study_name!r} was not created by bptt-harness sweep (no stored study file)")
    config = parse_study(raw)
    return config, create_study(config, storage)
