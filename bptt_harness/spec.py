"""What a trial is asked to do: the corpus, the model, how it trains, and the (bptt, batch size) cell.

Plain frozen dataclasses that validate themselves, with no torch import, so that parsing a study
file stays light (``python -c "import bptt_harness.config"`` loads no torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from bptt_harness.errors import HarnessError

FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class CorpusSpec:
    """Which text and how to tokenise it.

    Attributes:
        source: ``"default"``, a path (file or directory), or ``"synthetic:k=12[,vocab=16,noise=2,tokens=200000,seed=0]"``.
        tokenizer: ``"word"`` (whitespace split, ``<eos>`` at each line end) or ``"char"``.
        lower: lower-case the text before tokenising (word tokenizer).
        split_punct: split punctuation off words (``"end."`` -> ``"end" "."``).
        max_vocab: keep only the most frequent ``max_vocab - 1`` train tokens, the rest become ``<unk>``.
    """

    source: str = "default"
    tokenizer: Literal["word", "char"] = "word"
    lower: bool = False
    split_punct: bool = False
    max_vocab: int | None = None

    def __post_init__(self) -> None:
        if self.tokenizer not in ("word", "char"):
            raise HarnessError(f"tokenizer {self.tokenizer!r} is not known; use 'word' or 'char'")
        if self.max_vocab is not None and (not isinstance(self.max_vocab, int) or self.max_vocab < 2):
            raise HarnessError(f"max_vocab={self.max_vocab!r} must be an integer >= 2 (or left out for no cap)")


@dataclass(frozen=True)
class ModelConfig:
    """The language model.

    Attributes:
        type: ``"lstm"`` or ``"gru"``.
        emsize: embedding size.
        nhid: hidden units per layer.
        layers: number of recurrent layers.
        dropout: dropout on embeddings, between layers and before the decoder.
        tied: share the embedding and decoder weights (needs ``emsize == nhid``).
        factory: your own model instead of the built-in one: ``"package.module:function"``, called as
            ``function(model_config, ntoken)``; it returns an ``nn.Module`` with ``forward(x, hidden) ->
            (logits, hidden)`` (``x``: ``(seq_len, bs)`` token ids, logits ``(seq_len * bs, ntoken)``) and
            ``init_hidden(bs)``. The other keys are passed to it in ``model_config`` (and searched as usual).
    """

    type: Literal["lstm", "gru"] = "lstm"
    emsize: int = 200
    nhid: int = 200
    layers: int = 2
    dropout: float = 0.2
    tied: bool = False
    factory: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ("lstm", "gru"):
            raise HarnessError(f"model type {self.type!r} is not known; use 'lstm' or 'gru'")
        for name in ("emsize", "nhid", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"model {name}={value!r} must be an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise HarnessError(f"model dropout={self.dropout!r} must be in [0, 1)")
        if self.factory is not None and not (isinstance(self.factory, str) and FACTORY_RE.match(self.factory)):
            raise HarnessError(f"model factory={self.factory!r} must be 'package.module:function', a function "
                               "returning your nn.Module, e.g. 'mymodels:small_lstm'")
        if self.tied and self.emsize != self.nhid:
            raise HarnessError(f"tied weights need emsize == nhid; got emsize={self.emsize}, nhid={self.nhid}")


@dataclass(frozen=True)
class TrainConfig:
    """How a trial trains. Every field is a study-file key under ``[train]``.

    Attributes:
        optimizer: ``"sgd"`` (the canonical recipe: lr 20, clip 0.25, lr / ``anneal`` when validation
            stops improving) or ``"adamw"`` (fused on CUDA).
        lr: learning rate.
        weight_decay: AdamW weight decay.
        clip: gradient-norm clipping threshold (0 disables clipping; the norm is still recorded).
        budget: ``"tokens"`` (every configuration sees the same training tokens; the fair default)
            or ``"seconds"`` of training time.
        tokens: training target tokens when ``budget = "tokens"``: every configuration trains on exactly
            this many, its last window cut to the remainder.
        epochs: if set, overrides ``tokens``: the budget becomes ``epochs`` x the train split's tokens
            (the same for every configuration; a pass that a batch size shortens continues into the next).
        seconds: training seconds when ``budget = "seconds"``.
        checkpoints: validation evaluations spread evenly over the budget (the last one is the end).
        time_grid_s: besides the checkpoints, a validation point every this many training seconds (at the
            step end nearest each multiple), the same grid for every configuration, so that an equal-time
            comparison reads measurements instead of interpolating. Observation only: these points never
            anneal the lr, prune or end a trial.
        time_grid_until_s: set by the study, not a study-file key: no time-grid point past this many seconds.
            An equal-time comparison reads the latest grid time every run reached, never later than the
            shortest run of the study so far, so points past that would only cost validation time.
        spike_factor: a logged training loss above ``spike_factor`` x its running minimum is divergence
            (so is a loss clearly above a uniform guess once the model had learned; see ``DivergenceGuard``).
        timeout_s: wall-clock limit for the whole trial; past it the trial ends as ``timeout``.
        seed: seeds the model initialisation, dropout and variable-length windows.
        eval_batch_size: columns used for validation and test (fixed, so every configuration is
            evaluated the same way; the state is carried through the whole split).
        eval_bptt: window length for evaluation. With the state carried it only changes speed.
        test: also evaluate the test split at the end.
        variable_bptt: AWD-LSTM variable window lengths around ``bptt`` with the lr scaled by length.
        reset_every: reset the hidden state to zeros every N windows (None: carry it for the whole pass).
        anneal: SGD learning-rate divisor when a checkpoint does not improve validation loss.
        amp: ``"bf16"`` autocast on CUDA, or ``None``.
        tf32: allow TF32 matmuls on CUDA.
        compile: wrap the model in ``torch.compile``.
        memory_cap_mib: a memory budget for the trial. On CUDA it is the allocator's hard limit; on
            CPU parameters, gradients, optimiser state and saved activations are counted against it.
            Exceeding it ends the trial as ``oom``.
        log_every: steps between reads of the device-side accumulators (divergence checks, curve points).
        warmup_steps: first steps of every trial excluded from the tokens/s measurement (at least 1: the
            first step allocates and, on a GPU, autotunes). A trial with no more steps than this is timed
            whole and flagged (``timing_includes_warmup``).
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 20.0
    weight_decay: float = 0.0
    clip: float = 0.25
    budget: Literal["tokens", "seconds"] = "tokens"
    tokens: int = 200_000
    epochs: float | None = None
    seconds: float = 60.0
    checkpoints: int = 4
    time_grid_s: float | None = None
    time_grid_until_s: float | None = None
    spike_factor: float = 3.0
    timeout_s: float | None = None
    seed: int = 0
    eval_batch_size: int = 10
    eval_bptt: int = 70
    test: bool = False
    variable_bptt: bool = False
    reset_every: int | None = None
    anneal: float = 4.0
    amp: Literal["bf16"] | None = None
    tf32: bool = True
    compile: bool = False
    memory_cap_mib: float | None = None
    log_every: int = 25
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> HarnessError:
            return HarnessError(f"train {key}={getattr(self, key)!r} is invalid; {allowed}")

        if self.optimizer not in ("sgd", "adamw"):
            raise bad("optimizer", "use 'sgd' or 'adamw'")
        if self.budget not in ("tokens", "seconds"):
            raise bad("budget", "use 'tokens' or 'seconds'")
        for key in ("lr", "seconds"):
            if not _finite_number(getattr(self, key)) or getattr(self, key) <= 0:
                raise bad(key, "it must be a number > 0")
        if not _finite_number(self.clip) or self.clip < 0:
            raise bad("clip", "it must be a number >= 0 (0 disables clipping)")
        if not _finite_number(self.spike_factor) or self.spike_factor <= 1:
            raise bad("spike_factor", "it must be a number > 1")
        for key in ("tokens", "checkpoints", "eval_batch_size", "eval_bptt", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "it must be an integer >= 1")
        if self.epochs is not None and (not _finite_number(self.epochs) or self.epochs <= 0):
            raise bad("epochs", "it must be a number > 0")
        if self.time_grid_s is not None and (not _finite_number(self.time_grid_s) or self.time_grid_s <= 0):
            raise bad("time_grid_s", "it must be a number of training seconds > 0 (or left out)")
        if self.time_grid_until_s is not None and (not _finite_number(self.time_grid_until_s)
                                                   or self.time_grid_until_s < 0):
            raise bad("time_grid_until_s", "it must be a number of training seconds >= 0")
        if self.timeout_s is not None and (not _finite_number(self.timeout_s) or self.timeout_s <= 0):
            raise bad("timeout_s", "it must be a number of seconds > 0")
        if self.amp not in (None, "bf16"):
            raise bad("amp", "use 'bf16' or leave it out")
        if self.memory_cap_mib is not None and (not _finite_number(self.memory_cap_mib) or self.memory_cap_mib <= 0):
            raise bad("memory_cap_mib", "it must be a number of MiB > 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise bad("seed", "it must be an integer in [0, 2**32)")
        if not _finite_number(self.anneal) or self.anneal < 1:
            raise bad("anneal", "it must be a number >= 1 (1 disables annealing)")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "it must be a number >= 0")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 1:
            raise bad("warmup_steps", "it must be an integer >= 1 (the first step allocates memory)")
        if self.reset_every is not None and (not isinstance(self.reset_every, int) or isinstance(
                self.reset_every, bool) or self.reset_every < 1):
            raise bad("reset_every", "it must be an integer >= 1 (or left out to carry the state)")


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrialSpec:
    """One configuration to measure."""

    bptt: int
    batch_size: int
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for key in ("bptt", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"{key}={value!r} must be an integer >= 1")




def resolve_budget_tokens(t: TrainConfig, train_split_tokens: int) -> int | None:
    """The exact number of training target tokens every configuration gets (None: a seconds budget)."""
    if t.budget == "seconds":
        return None
    if t.epochs is not None:
        return max(1, round(t.epochs * (train_split_tokens - 1)))
    return t.tokens
