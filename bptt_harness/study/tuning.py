"""``[lr] rule = "tuned"``: a short run of each rung of the ladder around the rule's lr, the best one kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from bptt_harness.lr import LrRule
from bptt_harness.spec import RunOptions, TrainConfig, TrialSpec, resolve_budget_tokens
from bptt_harness.trainer import run_trial

__all__ = ["Tuned", "pick", "short_train", "tune"]


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
    """The ladder's fidelity: ``fraction`` of the trial's budget, one validation at its end."""
    tokens = resolve_budget_tokens(t, train_split_tokens)
    if tokens is None:
        return t.short(seconds=t.seconds * fraction)
    return t.short(max(1, round(tokens * fraction)))


def tune(spec: TrialSpec, corpus: Any, device: Any, rule: LrRule, options: RunOptions | None = None) -> Tuned:
    """Run the ladder around ``spec.train.lr`` (the rule's lr) on the same seed; return the best lr.
    ``options`` as for the trial (its memory cap); a warm-up in them goes to the first rung only."""
    short = short_train(spec.train, rule.tune_fraction, corpus.train.numel())
    out = Tuned(lr=spec.train.lr)
    options = options if options is not None else RunOptions()
    for m in sorted(rule.ladder):
        lr = spec.train.lr * m
        r = run_trial(replace(spec, train=replace(short, lr=lr)), corpus, device, options=options)
        options = replace(options, warm_up_steps=0)
        out.ladder.append({"lr": lr, "val_loss": r.val_loss, "status": r.status})
        out.tokens += r.train_tokens
        out.seconds += r.wall_s
    out.lr = pick(out.ladder)
    return out
