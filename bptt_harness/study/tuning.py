"""``[lr] rule = "tuned"``: a short run of each rung of the ladder around the rule's lr, the best one kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from bptt_harness.corpus import hold_out
from bptt_harness.lr import LrRule
from bptt_harness.spec import RunOptions, TrainConfig, TrialSpec, resolve_budget_tokens
from bptt_harness.trainer import run_trial

__all__ = ["Tuned", "pick", "rung_lrs", "short_train", "tune", "tuning_seed"]


@dataclass
class Tuned:
    """The outcome of a ladder: the lr chosen, every rung, and what the ladder cost."""

    lr: float
    ladder: list[dict] = field(default_factory=list)   # {"lr", "val_loss", "status"} per rung
    tokens: int = 0
    seconds: float = 0.0


def pick(rungs: list[dict]) -> float:
    """The lr with the lowest validation loss; a rung that did not finish ok counts as infinitely bad,
    and equal losses go to the smaller lr (the safer one). With no rung ok: the smallest lr."""
    def loss(r: dict) -> float:
        v = r.get("val_loss")
        return v if r.get("status") == "ok" and isinstance(v, (int, float)) and math.isfinite(v) else math.inf

    return min(rungs, key=lambda r: (loss(r), r["lr"]))["lr"]


def short_train(t: TrainConfig, fraction: float, train_split_tokens: int) -> TrainConfig:
    """The ladder's fidelity: ``fraction`` of the trial's budget, one validation at its end, with the
    seed of :func:`tuning_seed`. An ``anneal_at`` schedule keeps the anneals the full run makes in its first
    ``fraction``, at the same points of it."""
    tokens = resolve_budget_tokens(t, train_split_tokens)
    short = t.short(seconds=t.seconds * fraction) if tokens is None else t.short(max(1, round(tokens * fraction)))
    anneal_at = None if t.anneal_at is None else tuple(f / fraction for f in t.anneal_at if f < fraction)
    return replace(short, seed=tuning_seed(t.seed), anneal_at=anneal_at)


def tuning_seed(seed: int) -> int:
    """The seed a ladder trains with: none of the measured runs' (they use ``seed + repeat``), so the lr is
    not chosen on the very noise the measured run then reports."""
    return (seed + 2**31) % 2**32


def rung_lrs(lr: float, rule: LrRule) -> list[float]:
    """The ladder's lrs around ``lr``, smallest first, each capped at ``max_lr`` (a rung the cap merges
    with another runs once)."""
    out: list[float] = []
    for m in sorted(rule.ladder):
        rung = lr * m if rule.max_lr is None else min(lr * m, rule.max_lr)
        if rung not in out:
            out.append(rung)
    return out


def tune(spec: TrialSpec, corpus: Any, device: Any, rule: LrRule, options: RunOptions | None = None) -> Tuned:
    """Run the ladder around ``spec.train.lr`` (the rule's lr, already capped) and return the best lr.

    Each rung trains with :func:`tuning_seed` on the training split less a held-out slice at its end, and
    is judged on that slice (:func:`bptt_harness.corpus.hold_out`): the validation split the report ranks
    on never chooses the lr. ``options`` as for the trial (its memory cap); a warm-up in them goes to the
    first rung only."""
    t = spec.train
    short = short_train(t, rule.tune_fraction, corpus.train.numel())
    tuning = hold_out(corpus, min(corpus.valid.numel(), corpus.train.numel() // 10),
                      (t.eval_bptt + 1) * t.eval_batch_size)
    out = Tuned(lr=t.lr)
    options = options if options is not None else RunOptions()
    for lr in rung_lrs(t.lr, rule):
        r = run_trial(replace(spec, train=replace(short, lr=lr)), tuning, device, options=options)
        options = replace(options, warm_up_steps=0)
        out.ladder.append({"lr": lr, "val_loss": r.val_loss, "status": r.status})
        out.tokens += r.train_tokens
        out.seconds += r.wall_s
    out.lr = pick(out.ladder)
    return out
