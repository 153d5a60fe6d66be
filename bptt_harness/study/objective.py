"""One Optuna trial: sample a configuration, train it under the probe, store its record, return its values."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from bptt_harness.config import ParamSpace, StudyConfig
from bptt_harness.corpus import Corpus
from bptt_harness.design import describe_slices
from bptt_harness.diagnose import DiagnosticsObserver, text_period
from bptt_harness.interrupt import StopRequest
from bptt_harness.loggers import RunInfo, hparams_of, trial_loggers
from bptt_harness.observers import StopCheck
from bptt_harness.probe import make_probe
from bptt_harness.profile_csv import PROFILE_CSV, doesnt_fit
from bptt_harness.record import (
    FAIL_STATUSES,
    INFEASIBLE,
    Hardware,
    LrChoice,
    StudyInfo,
    TrialConfig,
    TrialRecord,
    TrialResult,
    finite_or_none,
    from_dict,
    user_attrs,
)
from bptt_harness.search_keys import config_key, recorded_values, spec_with
from bptt_harness.spec import RunOptions, TrialSpec, resolve_budget_tokens
from bptt_harness.stored import INTERRUPTED, RETRY_OF, SPURIOUS, final_trials, progress
from bptt_harness.study.queue import has_repeats, now_iso, worker_id
from bptt_harness.study.race import RACE_KEY, raced
from bptt_harness.study.tuning import tune
from bptt_harness.trainer import WARM_UP_STEPS, run_trial

log = logging.getLogger(__name__)


class TrialFailed(Exception):
    """Raised by the objective so Optuna records FAIL; the sweep goes on (``catch=``)."""


def suggest(trial: optuna.Trial, search: dict[str, ParamSpace], grid: bool) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, p in search.items():
        if grid and p.kind != "bool":
            # Grid trials arrive with fixed parameters; a range distribution (unlike a categorical one)
            # may widen when the grid is extended in the study file and the study resumed.
            values = p.grid()
            suggest_range = trial.suggest_int if p.kind == "int" else trial.suggest_float
            params[name] = suggest_range(name, min(values), max(values))
        elif grid:
            params[name] = trial.suggest_categorical(name, [False, True])
        elif p.choices is not None:
            params[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            low, high = p.bounds()
            params[name] = trial.suggest_int(name, int(low), int(high), log=p.log, step=int(p.step or 1))
        else:
            low, high = p.bounds()
            params[name] = trial.suggest_float(name, low, high, log=p.log, step=p.step)
    return params


def trial_spec(config: StudyConfig, params: dict[str, Any], repeat: int) -> TrialSpec:
    """The trial of searched values ``params``: the study's model and training with them, the seed moved by
    ``repeat`` and the lr held by the configuration's slice or else set by the study's ``[lr]`` rule for the shape."""
    spec = spec_with(params, config.model, replace(config.train, seed=config.train.seed + repeat))
    # A slice holds its lr fixed across its configurations; elsewhere the [lr] rule sets it per shape.
    held = config.held_lr(params)
    lr = config.lr_rule.lr_for(spec.train.lr, spec.bptt, spec.batch_size) if held is None else held
    return replace(spec, train=replace(spec.train, lr=lr))


def cost_value(result: TrialResult, cost: str, per_ktok: bool = True) -> float | None:
    """The study's cost from a trial's result, in the unit of its ``trials.csv`` column: seconds per 1k
    tokens, training peak memory (MiB) or joules per 1k training tokens. ``per_ktok=False``: per token, the
    unit of studies created before their objectives were named."""
    if cost == "peak_memory":
        return result.probe.peak_mem_mib
    value = result.seconds_per_ktok if cost == "seconds_per_token" else result.joules_per_ktok
    return value if value is None or per_ktok else value / 1000.0


def study_info(config: StudyConfig, corpus: Corpus, host_workers: int = 1) -> StudyInfo:
    t = config.train
    return StudyInfo(name=config.name, corpus=corpus.name, corpus_source=corpus.source,
                     corpus_licence=corpus.licence, vocab_size=corpus.vocab_size,
                     corpus_hash=corpus.content_hash or None, budget=t.budget,
                     budget_tokens=resolve_budget_tokens(t, corpus.train.numel()),
                     budget_epochs=t.epochs if t.budget == "tokens" else None,
                     budget_seconds=t.seconds if t.budget == "seconds" else None,
                     objectives=list(config.objectives), cost=config.cost, host_workers=host_workers,
                     lr_rule_text=config.lr_rule.describe(t.lr),
                     slices_text=describe_slices(config.slices) or None,
                     race_max_seeds=config.race.max_seeds if config.race else None,
                     race_trials=config.race.trials if config.race else None)


def make_record(info: StudyInfo, spec: TrialSpec, params: dict, repeat: int, result: TrialResult,
                hardware: dict, started: str, lr_choice: LrChoice | None = None,
                slices: tuple[str, ...] = ()) -> TrialRecord:
    """The stored measurement of one trial; ``bptt_harness.report`` reads exactly this. ``slices``: the
    study's slices this configuration belongs to (:meth:`StudyConfig.slice_names`)."""
    # The model's own keys (a factory's: only the searched ones; n_params in the result says the rest).
    config = TrialConfig(values=recorded_values(spec, params), model=spec.model.factory or spec.model.type,
                         model_revision=spec.model.info.revision, optimizer=spec.train.optimizer, seed=spec.train.seed, repeat=repeat,
                         slices=",".join(slices) or None)
    return TrialRecord(config_key=config_key(params), config=config, status=result.status, error=result.error,
                       result=result, lr_choice=lr_choice or LrChoice(), hardware=from_dict(Hardware, hardware),
                       study=info, started_at=started, finished_at=now_iso(), worker=worker_id())


def store_record(trial: optuna.Trial, record: TrialRecord) -> dict:
    """Store the record, and its main metrics flat beside it for optuna-dashboard; returns the stored dict."""
    stored = record.to_dict()
    trial.set_user_attr("record", stored)
    for name, value in user_attrs(record).items():
        trial.set_user_attr(name, value)
    return stored










def observe_until(study: optuna.Study, spec: TrialSpec) -> float | None:
    """With a time grid, no points past the latest grid time of the shortest final ok run: the equal-time
    comparison never reads later than that (see ``RunOptions.time_grid_until_s``)."""
    if spec.train.time_grid_s is None:
        return None
    ends = [max(p["grid_s"] for p in t.record.result.time_curve)
            for t in final_trials(study.get_trials(deepcopy=False), study.study_name)
            if t.record.status == "ok" and t.record.result.time_curve]
    return min(ends) if ends else None


@dataclass
class Objective:
    """The Optuna objective: sample, train under the probe, store the record, return the values."""

    config: StudyConfig
    corpus: Corpus
    device: Any
    hardware: dict
    on_result: Callable[[optuna.Trial, dict], None] | None = None
    on_start: Callable[[optuna.Trial, dict], None] | None = None
    host_workers: int = 1
    warmed: bool = False   # this process's first trial ran with RunOptions.warm_up_steps
    profile: Any = None    # the study's profile.csv (bptt_harness.profile_csv): cells it saw run out of memory are skipped
    # Called at each validation checkpoint with the trial and the point (index, of, tokens, seconds, ppl).
    on_checkpoint: Callable[[optuna.Trial, dict], None] | None = None
    stop: StopRequest | None = None  # a recorded Ctrl-C or SIGTERM, acted on after each training step
    n_target: int | None = None  # the study's trials (every worker's): a trial asked past them does not run
    _named: bool | None = None  # whether the study's objectives are named (and so in trials.csv's units)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        trial.set_user_attr("worker", worker_id())
        skip = self._spurious(trial)
        if skip:
            # Not a measurement: progress, retries and the report ignore it.
            trial.set_user_attr(SPURIOUS, skip)
            raise optuna.TrialPruned(skip)
        params = suggest(trial, self.config.search, self.config.sampler == "grid")
        repeat = int(trial.user_attrs.get("repeat", 0))
        spec = trial_spec(self.config, params, repeat)
        single = len(self.config.objectives) == 1
        if self.on_start:
            self.on_start(trial, params)

        def on_checkpoint(i: int, point: dict) -> bool:
            if self.on_checkpoint:
                self.on_checkpoint(trial, {**point, "index": i, "of": spec.train.checkpoints})
            # Intermediate values in the objective's unit (optuna-dashboard plots them beside it); Optuna
            # takes them only from single-objective studies.
            if not single or not math.isfinite(point["ppl"]):
                return False
            trial.report(point["ppl"], step=i)
            return trial.should_prune()

        info = study_info(self.config, self.corpus, self.host_workers)
        started = now_iso()
        held = self.config.held_lr(params) is not None
        slices = self.config.slice_names(params)
        choice = LrChoice(rule="fixed" if held else self.config.lr_rule.rule, rule_lr=spec.train.lr)
        try:
            result = self._known_oom(spec)
            if result is None:
                # The process's first run (a ladder's or the trial) warms up: start-up is not a trial's.
                options = RunOptions(memory_cap_mib=self.config.memory_cap_mib,
                                     warm_up_steps=0 if self.warmed else WARM_UP_STEPS)
                self.warmed = True
                if self.config.lr_rule.rule == "tuned" and not held:
                    spec = self._tuned(trial, spec, config_key(params), choice, options)
                    options = replace(options, warm_up_steps=0)
                options = replace(options, time_grid_until_s=observe_until(trial.study, spec))
                key = config_key(params)
                run = RunInfo(self.config.name, f"{trial.number:04d}-{key}-seed{spec.train.seed}",
                              hparams_of(spec, trial=trial.number, config_key=key, repeat=repeat))
                result = run_trial(spec, self.corpus, self.device, probe=make_probe(self.device),
                                   on_checkpoint=on_checkpoint, options=options,
                                   observers=[*self.observers(), *trial_loggers(self.config.log, run),
                                              *([StopCheck(self.stop)] if self.stop is not None else [])])
        except KeyboardInterrupt:
            interrupted = TrialResult(status="failed", error="interrupted (SIGINT); retried on resume",
                                      bptt=spec.bptt, batch_size=spec.batch_size, seed=spec.train.seed)
            trial.set_user_attr(INTERRUPTED, True)
            store_record(trial, make_record(info, spec, params, repeat, interrupted, self.hardware, started,
                                            choice, slices))
            raise
        typed = make_record(info, spec, params, repeat, result, self.hardware, started, choice, slices)
        record = store_record(trial, typed)
        if (repeat == 0 and self.config.repeats > 1 and self.config.sampler != "grid"
                and not has_repeats(trial.study, params)):
            for r in range(1, self.config.repeats):
                trial.study.enqueue_trial(params, user_attrs={"repeat": r})
        if self.on_result:
            self.on_result(trial, record)
        values, constraint = self._values(typed, trial.study)
        # Optuna's constraints API: TPE and NSGA-II learn the memory and stability walls from this.
        trial.set_user_attr("constraint", constraint)
        return values

    def observers(self) -> list[DiagnosticsObserver]:
        """The study's per-trial measurements beyond the built-in ones: the diagnostics, when it asks for them."""
        d = self.config.diagnostics
        if d is None:
            return []
        return [DiagnosticsObserver(d, int(self.config.search["bptt"].max_value()),
                                    period=text_period(self.corpus.extra), model_dir=self.config.results_dir / "models")]

    def _known_oom(self, spec: TrialSpec) -> TrialResult | None:
        """An ``oom`` result without training when the study's profile shows the cell cannot fit."""
        if not doesnt_fit(self.profile, self.config.memory_cap_mib, spec.bptt, spec.batch_size):
            return None
        return TrialResult(status="oom", bptt=spec.bptt, batch_size=spec.batch_size, seed=spec.train.seed,
                           device=str(self.device),
                           error=f"does not fit: {PROFILE_CSV} ran out of memory at this bptt and batch size or "
                                 "below both, under the same memory cap (not trained)")

    def _tuned(self, trial: optuna.Trial, spec: TrialSpec, key: str, choice: LrChoice,
               options: RunOptions) -> TrialSpec:
        """``[lr] rule = "tuned"``: the configuration's lr from its ladder, run by the first trial of the
        configuration and stored with the study, so its repeats reuse it (and its cost is counted once)."""
        attr = f"lr_tuned:{key}"
        stored = trial.study.user_attrs.get(attr)
        choice.tune_tokens, choice.tune_s = 0, 0.0
        if stored is None:
            tuned = tune(spec, self.corpus, self.device, self.config.lr_rule, options)
            stored = finite_or_none({"lr": tuned.lr, "ladder": tuned.ladder})
            trial.study.set_user_attr(attr, stored)
            choice.tune_tokens, choice.tune_s = tuned.tokens, tuned.seconds
        choice.ladder = stored["ladder"]
        return replace(spec, train=replace(spec.train, lr=stored["lr"]))

    def _spurious(self, trial: optuna.Trial) -> str | None:
        """Why this trial must not run: another worker emptied the grid's queue between our check and
        Optuna's ask, or a retry or racing run was queued twice by two workers (the lower number runs)."""
        if self.config.sampler == "grid" and "repeat" not in trial.user_attrs:  # set on every queued point
            return "the grid's queue was empty when this worker asked for a trial"
        if self.n_target is not None:
            # Workers that asked at the same moment all saw a trial left to run; the lowest numbers run it.
            target = self.n_target + (raced(trial.study) if self.config.race else 0)
            ahead = sum(1 for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if t.number < trial.number and not t.user_attrs.get(SPURIOUS))
            if progress(trial.study).done + ahead >= target:
                return f"the study's {target} trials were already finished or running"
        race_key = trial.user_attrs.get(RACE_KEY)
        if race_key is not None and any(t.user_attrs.get(RACE_KEY) == race_key and t.number < trial.number
                                        for t in trial.study.get_trials(deepcopy=False)):
            return f"racing run {race_key} was already queued"
        retry_of = trial.user_attrs.get(RETRY_OF)
        if retry_of is not None and any(
                t.user_attrs.get(RETRY_OF) == retry_of and t.number < trial.number
                for t in trial.study.get_trials(deepcopy=False)):
            return f"trial {retry_of} was already queued for retry"
        return None

    def named_metrics(self, study: optuna.Study) -> bool:
        if self._named is None:
            self._named = study.metric_names is not None
        return self._named

    def _values(self, record: TrialRecord, study: optuna.Study) -> tuple[float | tuple[float, ...], list[float]]:
        status, result = record.status, record.result
        if status == "pruned":
            raise optuna.TrialPruned(record.error)
        if status in FAIL_STATUSES:
            raise TrialFailed(record.error)
        budget_mib = self.config.max_memory_gib * 1024 if self.config.max_memory_gib else None
        peak = result.probe.peak_mem_mib
        over = peak - budget_mib if budget_mib and peak and self.device.type == "cuda" else 0.0
        infeasible = status in INFEASIBLE or over > 0
        constraint = [1.0 if status in INFEASIBLE else max(0.0, over)]
        values = [math.inf if status in INFEASIBLE or result.val_ppl is None else result.val_ppl]
        if len(self.config.objectives) > 1:
            cost = cost_value(result, self.config.cost, per_ktok=self.named_metrics(study))
            values.append(math.inf if infeasible or cost is None else cost)
        return (values[0] if len(values) == 1 else tuple(values)), constraint
