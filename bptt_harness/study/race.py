"""Racing: more seeds only where the verdict depends on them (the study file's ``[race]`` table).

After the first pass, the contenders (the best and the configurations it is not separated from under
the seed noise of :mod:`bptt_harness.seeds`) run again with new seeds, one round at a time, those with
the fewest seeds first and the runner-up before the others, until the best is separated from all of
them, every contender has ``max_seeds`` runs, or the race has spent ``trials`` runs. While no
configuration has two seeds the noise is unknown: the first round runs the runner-up and the best
again, which measures it. :func:`plan_round` is the decision; :func:`race_round` applies it to a study.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from bptt_harness.config import RaceConfig
from bptt_harness.seeds import leaders, seed_means
from bptt_harness.stored import final_trials, trial_params

RACE_KEY = "race_key"     # user attribute of a racing trial: "<config_key>#<repeat>"


@dataclass(frozen=True)
class Standing:
    """One configuration so far: perplexities of its ok seeds, and how many runs it had in all."""

    ppl: tuple[float, ...]
    runs: int


def plan_round(standings: dict[str, Standing], max_seeds: int, left: int) -> list[str]:
    """The configurations that get one more seed this round, in the order they should run (empty: over).

    The contenders are the best and every configuration at least as close to it as one it is not separated from
    (:func:`bptt_harness.seeds.leaders`; while no configuration has two seeds, the best and the runner-up). Runs go to the contenders with the
    fewest seeds first, and among equals to the closest rival first: the runner-up, then the best, then the
    others by mean. So no run is left unused while a rival still has one seed, and the budget is spent on
    the comparisons the verdict depends on."""
    ppl = {k: s.ppl for k, s in standings.items() if s.ppl}
    if len(ppl) < 2 or left <= 0:
        return []
    lead = leaders(seed_means(ppl))
    if lead.separated:
        return []
    # The rivals: every configuration at least as close to the best (by mean) as one it is not separated
    # from. A single seed's borrowed noise can make a nearer configuration look separated while a farther
    # one with its own wide noise is not; the nearer one is still the closer rival, and is run first.
    last = max((lead.order.index(k) for k in lead.tied), default=0) if lead.noise_known else 1
    rivals = lead.order[1:last + 1]
    closeness = {k: i for i, k in enumerate([*rivals[:1], lead.best, *rivals[1:]])}
    open_ = [k for k in closeness if standings[k].runs < max_seeds]
    return sorted(open_, key=lambda k: (len(standings[k].ppl), closeness[k]))[:left]


def raced(study: optuna.Study) -> int:
    """How many racing runs this study has queued so far (each counted once)."""
    return len({t.user_attrs[RACE_KEY] for t in study.get_trials(deepcopy=False) if RACE_KEY in t.user_attrs})


def race_round(study: optuna.Study, race: RaceConfig) -> int:
    """Queue the next round's runs (each with its next repeat index, hence a new seed); returns how many."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    ppl: dict[str, list[float]] = {}
    runs: dict[str, int] = {}
    params: dict[str, dict] = {}
    repeats: dict[str, int] = {}
    for stored in final_trials(trials.values(), study.study_name):
        t, rec = trials[stored.number], stored.record
        key = str(rec.config_key)
        runs[key] = runs.get(key, 0) + 1
        params[key] = trial_params(t)
        repeats[key] = max(repeats.get(key, 0), int(t.user_attrs.get("repeat", 0)))
        value = rec.result.val_ppl
        ppl.setdefault(key, [])
        if rec.status == "ok" and isinstance(value, (int, float)):
            ppl[key].append(float(value))
    standings = {k: Standing(tuple(ppl[k]), runs[k]) for k in runs}
    chosen = plan_round(standings, race.max_seeds, race.trials - raced(study))
    for key in chosen:
        repeat = repeats[key] + 1
        study.enqueue_trial(params[key], user_attrs={"repeat": repeat, RACE_KEY: f"{key}#{repeat}"})
    return len(chosen)
