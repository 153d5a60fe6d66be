"""Racing: more seeds only where the verdict depends on them (the study file's ``[race]`` table).

After the first pass, the contenders (configurations tied with the best under the seed noise of
:mod:`bptt_harness.seeds`) run again with new seeds, one round at a time, until the best is separated
from all of them, every contender has ``max_seeds`` runs, or the race has spent ``trials`` runs.
While no configuration has two seeds the noise is unknown: the first round runs the two leaders
again, which measures it. :func:`plan_round` is the decision; :func:`race_round` applies it to a study.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from bptt_harness.config import RaceConfig
from bptt_harness.seeds import mean, pooled_cv, standard_error, tied
from bptt_harness.stored import final_trials, trial_params

RACE_KEY = "race_key"     # user attribute of a racing trial: "<config_key>#<repeat>"


@dataclass(frozen=True)
class Standing:
    """One configuration so far: perplexities of its ok seeds, and how many runs it had in all."""

    ppl: tuple[float, ...]
    runs: int


def plan_round(standings: dict[str, Standing], max_seeds: int, left: int) -> list[str]:
    """The configurations that get one more seed this round, best first (empty: the race is over)."""
    ranked = sorted((k for k, s in standings.items() if s.ppl), key=lambda k: mean(standings[k].ppl))
    if len(ranked) < 2 or left <= 0:
        return []
    noise = pooled_cv(s.ppl for s in standings.values())
    if noise is None:
        contenders = ranked[:2]
    else:
        def se(k: str) -> float | None:
            return standard_error(standings[k].ppl, noise)

        best = ranked[0]
        rivals = [k for k in ranked[1:] if tied(mean(standings[best].ppl), se(best), mean(standings[k].ppl), se(k))]
        if not rivals:
            return []  # separated
        contenders = [best, *rivals]
    return [k for k in contenders if standings[k].runs < max_seeds][:left]


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
