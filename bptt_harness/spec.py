"""What a trial is asked to do: the corpus, the model, how it trains, and the (bptt, batch size) cell.

Plain frozen dataclasses that validate themselves, with no torch import, so that parsing a study
file stays light (``python -c "import bptt_harness.config"`` loads no torch). The model families are
declared here too (:class:`FamilyInfo`: what the config layer, the record and the report know of a
family); their torch side (build, state, FLOPs, evaluation) is :class:`bptt_harness.model.ModelFamily`.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bptt_harness.errors import HarnessError

FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
FACTORY = "factory"   # the family of a model built by ``[model] factory``
EVALUATIONS = ("carried", "sliding")


# --------------------------------------------------------------------------- model families

@dataclass(frozen=True)
class MemoryTerm:
    """One term of a family's memory law ``peak = a + b_1 x_1 + b_2 x_2 + ...``:
    ``x = window ** window_power x batch_size ** bs_power`` (window: the longest training window)."""

    window_power: int = 1
    bs_power: int = 1

    @property
    def name(self) -> str:
        def power(symbol: str, p: int) -> str:
            return "" if p == 0 else symbol if p == 1 else f"{symbol}{'²' if p == 2 else '³' if p == 3 else f'^{p}'}"
        return " × ".join(t for t in (power("window", self.window_power), power("bs", self.bs_power)) if t) or "1"

    def of(self, window: Any, bs: Any) -> Any:
        """``x`` for numbers, numpy arrays or pandas Series."""
        return window ** self.window_power * bs ** self.bs_power


# Activations saved for backward and the logits: linear in the tokens of a step.
WINDOW_X_BS = MemoryTerm(1, 1)
# Attention scores without a fused kernel: a window x window matrix per sequence (and head).
WINDOW2_X_BS = MemoryTerm(2, 1)


@dataclass(frozen=True)
class FamilyInfo:
    """A model family as the config layer, the trial record and the report know it (no torch).

    Attributes:
        name: the study file's ``[model] type`` (``"factory"`` for a model built by ``[model] factory``).
        keys: the ``[model]`` keys this family reads: they describe its shape in the trial record.
        shape: the shape label, formatted from those keys, e.g. ``"{layers}x{nhid}"`` -> ``lstm 2x200``.
        carries_state: whether a state flows from one training window to the next (truncated BPTT);
            False for a model that sees each window alone (``reset_every`` means nothing to it). A function
            of the ``ModelConfig`` where it depends on a key (a Transformer with ``mem_len`` > 0 carries one).
        evaluation: how validation is made fair across shapes: ``"carried"`` (fixed windows, the state
            carried through the whole split: every target sees all the text before it) or ``"sliding"``
            (overlapping windows, each target scored once with about ``eval_bptt`` tokens of context); or a
            function of the ``ModelConfig`` returning one of them.
        memory_terms: the memory law's terms, fitted by the report (``window × bs`` for a recurrent model;
            attention without a fused kernel adds ``window² × bs``).
        check: further validation of a ``ModelConfig`` of this family (one-line ``HarnessError``).
        revision: the version of what the family's model computes, raised whenever a change alters its
            results (an activation, a position encoding, a dropout's random draws); recorded with every
            trial, so ``bptt-harness compare`` names results of two revisions as different setups.
    """

    name: str
    keys: tuple[str, ...] = ()
    shape: str = ""
    carries_state: bool | Callable[[ModelConfig], bool] = True
    evaluation: str | Callable[[ModelConfig], str] = "carried"
    memory_terms: tuple[MemoryTerm, ...] = (WINDOW_X_BS,)
    check: Callable[[ModelConfig], None] | None = None
    revision: int = 1

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z][a-z0-9_-]*$", self.name or ""):
            raise HarnessError(f"model family name {self.name!r} must be lower-case letters, digits, '-' or '_'")
        if not callable(self.evaluation) and self.evaluation not in EVALUATIONS:
            raise HarnessError(f"model family {self.name!r}: evaluation {self.evaluation!r} is not known; use "
                               f"one of {', '.join(EVALUATIONS)}")
        if not self.memory_terms or any(
                not isinstance(m, MemoryTerm) or min(m.window_power, m.bs_power) < 0 or m.window_power + m.bs_power == 0
                for m in self.memory_terms):
            raise HarnessError(f"model family {self.name!r}: memory_terms must be MemoryTerm(window_power, bs_power) "
                               "with powers >= 0, not both 0 (the intercept is always fitted), e.g. (WINDOW_X_BS,)")

    def carries(self, cfg: ModelConfig) -> bool:
        """Whether ``cfg``'s model carries a state from window to window."""
        return bool(self.carries_state(cfg)) if callable(self.carries_state) else self.carries_state

    def evaluation_of(self, cfg: ModelConfig) -> str:
        """``cfg``'s evaluation rule: ``carried`` or ``sliding``."""
        rule = self.evaluation(cfg) if callable(self.evaluation) else self.evaluation
        if rule not in EVALUATIONS:
            raise HarnessError(f"model family {self.name!r}: evaluation {rule!r} is not known; use one of "
                               f"{', '.join(EVALUATIONS)}")
        return rule

    def describe(self, values: Mapping[str, Any]) -> str:
        """``lstm 2x200`` from a config's (or a trials.csv row's) keys; the name alone if one is missing."""
        named = {name for _, name, _, _ in string.Formatter().parse(self.shape) if name}   # not every key: tied
        try:
            shape = self.shape.format(**{k: _plain(values.get(k)) for k in named})
        except (KeyError, TypeError, ValueError):
            return self.name
        return f"{self.name} {shape}" if shape else self.name


def _plain(v: Any) -> Any:
    """A float that holds an integer (pandas reads integer columns with gaps as floats) as that integer."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        raise ValueError("missing")
    return int(v) if isinstance(v, float) and v.is_integer() else v


_FAMILIES: dict[str, FamilyInfo] = {}
_RNN_KEYS = ("emsize", "nhid", "layers", "dropout", "tied")
# The carried attention memory's keys and values are saved for backward: a term in bs alone.
BS = MemoryTerm(0, 1)


def _tied_sizes(cfg: ModelConfig) -> None:
    """A recurrent decoder reads the last layer's ``nhid`` units: tying it to the embedding needs equal sizes."""
    if cfg.tied and cfg.emsize != cfg.nhid:
        raise HarnessError(f"tied weights need emsize == nhid; got emsize={cfg.emsize}, nhid={cfg.nhid}")


def _check_transformer(cfg: ModelConfig) -> None:
    if cfg.emsize % cfg.heads or (cfg.emsize // cfg.heads) % 2:
        raise HarnessError(f"transformer emsize={cfg.emsize} must split into heads={cfg.heads} heads of an even "
                           "width (rotary embeddings rotate pairs), e.g. emsize=128, heads=4")


def _carries_memory(cfg: ModelConfig) -> bool:
    return cfg.mem_len > 0


def _transformer_evaluation(cfg: ModelConfig) -> str:
    # With a carried memory the state flows through the split like an LSTM's; without one, each target
    # is scored in sliding windows with the context the model trained with.
    return "carried" if cfg.mem_len > 0 else "sliding"


LSTM = FamilyInfo("lstm", keys=_RNN_KEYS, shape="{layers}x{nhid}", check=_tied_sizes)
GRU = FamilyInfo("gru", keys=_RNN_KEYS, shape="{layers}x{nhid}", check=_tied_sizes)
# A causal Transformer whose context is the training window (emsize: its width, nhid: the feed-forward
# width, as in PyTorch's word_language_model); mem_len > 0 carries the previous windows' keys and values.
# Attention without a fused kernel stores window x window scores per sequence and head.
TRANSFORMER = FamilyInfo("transformer", keys=("emsize", "nhid", "layers", "heads", "dropout", "mem_len", "tied"),
                         shape="{layers}x{emsize} h{heads} mem{mem_len}", carries_state=_carries_memory,
                         evaluation=_transformer_evaluation, memory_terms=(WINDOW_X_BS, WINDOW2_X_BS, BS),
                         check=_check_transformer, revision=2)   # 2: ReLU, complex rotary pairs, rand_like dropout
# The AWD-LSTM of Merity et al. and the fastai course: weight-dropped recurrent weights, embedding,
# input, hidden and output (``dropout``) dropout, tied weights (its last layer has emsize units).
AWD_LSTM = FamilyInfo("awd-lstm", keys=("emsize", "nhid", "layers", "dropout", "embed_dropout", "input_dropout",
                                        "hidden_dropout", "weight_dropout", "tied"), shape="{layers}x{nhid}")
# A user's model: its shape is its own; the record names the factory and counts its parameters.
FACTORY_FAMILY = FamilyInfo(FACTORY)


def declare_family(info: FamilyInfo) -> None:
    """Make a family known to the config layer, the record and the report (a family's torch side registers
    it through :func:`bptt_harness.model.register_family`, which calls this)."""
    _FAMILIES[info.name] = info


def forget_family(name: str) -> None:
    """Undo :func:`declare_family` (tests that declare a family of their own)."""
    _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
    """The ``[model] type`` values a study may use."""
    return tuple(n for n in _FAMILIES if n != FACTORY)


def family_info(name: str) -> FamilyInfo:
    """The declared family ``name``, or one line naming the known ones."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    match = difflib.get_close_matches(str(name), family_names(), n=1, cutoff=0.5)
    hint = f" (did you mean {match[0]!r}?)" if match else ""
    raise HarnessError(f"model type {name!r} is not known{hint}; use one of {', '.join(family_names())}, or "
                       "factory = 'module:function' for your own model")


def find_family(name: Any) -> FamilyInfo | None:
    """The declared family of a stored ``model`` value (a family name, or a factory's ``module:function``);
    None for a name this process does not know (a family declared by code that is not loaded)."""
    if isinstance(name, str) and FACTORY_RE.match(name):
        return _FAMILIES.get(FACTORY)
    return _FAMILIES.get(name) if isinstance(name, str) else None


for _info in (LSTM, GRU, TRANSFORMER, AWD_LSTM, FACTORY_FAMILY):
    declare_family(_info)


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


# The AWD-LSTM's dropouts beside ``dropout`` (which it applies to the last layer's output).
DROPOUTS = ("embed_dropout", "input_dropout", "hidden_dropout", "weight_dropout")
# The model keys a trial record keeps (those its family reads).
RECORDED_MODEL_KEYS = ("nhid", "emsize", "layers", "dropout", "heads", "mem_len", *DROPOUTS)


@dataclass(frozen=True)
class ModelConfig:
    """The language model.

    Attributes:
        type: the model family: ``"lstm"`` or ``"gru"`` (``bptt_harness.spec.family_names()`` lists those
            declared; each family reads the keys its ``FamilyInfo.keys`` names).
        emsize: embedding size.
        nhid: hidden units per layer.
        layers: number of recurrent layers.
        dropout: dropout on embeddings, between layers and before the decoder.
        tied: share the embedding and decoder weights (an LSTM or GRU needs ``emsize == nhid``).
        heads: attention heads of a ``transformer`` (``emsize`` is its width, ``nhid`` its feed-forward width).
        mem_len: a ``transformer``'s carried memory: keys and values of this many previous tokens, detached
            (Transformer-XL); 0: none, the context is the window.
        embed_dropout: ``awd-lstm``: dropout of whole words from the embedding.
        input_dropout: ``awd-lstm``: locked (variational) dropout on the embedding output.
        hidden_dropout: ``awd-lstm``: locked dropout between the recurrent layers.
        weight_dropout: ``awd-lstm``: DropConnect on the hidden-to-hidden weights.
        factory: your own model instead of the built-in one: ``"package.module:function"``, called as
            ``function(model_config, ntoken)``; it returns an ``nn.Module`` with ``forward(x, hidden) ->
            (logits, hidden)`` (``x``: ``(seq_len, bs)`` token ids, logits ``(seq_len * bs, ntoken)``) and
            ``init_hidden(bs)``. The other keys are passed to it in ``model_config`` (and searched as usual).
    """

    type: str = "lstm"
    emsize: int = 200
    nhid: int = 200
    layers: int = 2
    dropout: float = 0.2
    tied: bool = False
    heads: int = 2
    mem_len: int = 0
    embed_dropout: float = 0.1
    input_dropout: float = 0.65
    hidden_dropout: float = 0.3
    weight_dropout: float = 0.5
    factory: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or self.type == FACTORY:
            raise HarnessError(f"model type {self.type!r} is not a family; use one of {', '.join(family_names())}, "
                               "or factory = 'module:function' for your own model")
        info = family_info(self.type) if self.factory is None else None
        for name in ("emsize", "nhid", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HarnessError(f"model {name}={value!r} must be an integer >= 1")
        if not isinstance(self.mem_len, int) or isinstance(self.mem_len, bool) or self.mem_len < 0:
            raise HarnessError(f"model mem_len={self.mem_len!r} must be an integer >= 0 (0: no carried memory)")
        for name in ("dropout", *DROPOUTS):
            value = getattr(self, name)
            if not _finite_number(value) or not 0.0 <= value < 1.0:
                raise HarnessError(f"model {name}={value!r} must be in [0, 1)")
        if self.factory is not None and not (isinstance(self.factory, str) and FACTORY_RE.match(self.factory)):
            raise HarnessError(f"model factory={self.factory!r} must be 'package.module:function', a function "
                               "returning your nn.Module, e.g. 'mymodels:small_lstm'")
        if info is not None and info.check is not None:
            info.check(self)

    @property
    def family(self) -> str:
        """The family that builds this model: ``type``, or ``"factory"`` when ``factory`` is set."""
        return FACTORY if self.factory is not None else self.type

    @property
    def info(self) -> FamilyInfo:
        return family_info(self.family)

    def describe(self) -> str:
        """What the model is, for people: ``lstm 2x200``, or a factory's ``module:function``."""
        return self.factory if self.factory is not None else self.info.describe(vars(self))

    def recorded(self, searched: Iterable[str] = ()) -> dict[str, Any]:
        """The model keys a trial record keeps: those the family reads (a factory's: only the keys the study
        searches, which reach it in its ``model_config``); the rest are None rather than unused defaults."""
        keep = set(self.info.keys) | set(searched)
        return {k: getattr(self, k) if k in keep else None for k in RECORDED_MODEL_KEYS}


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
        spike_factor: a logged training loss above ``spike_factor`` x its running minimum is divergence
            (so is a loss clearly above a uniform guess once the model had learned; see ``DivergenceGuard``).
        timeout_s: wall-clock limit for the trial's training and evaluation; past it the trial ends as
            ``timeout`` (building the model and a process's warm-up come before it).
        seed: seeds the model initialisation, dropout and variable-length windows.
        eval_batch_size: columns used for validation and test (fixed, so every configuration is
            evaluated the same way, by its family's rule).
        eval_bptt: window length for evaluation. A family that carries a state carries it through the
            whole split, so this only changes speed; a stateless one (a transformer without mem_len) is
            scored in sliding windows of eval_bptt moving by half of it, each target once (set it to at
            least twice the longest bptt so that every target gets the whole context it trained with).
        test: also evaluate the test split at the end.
        variable_bptt: AWD-LSTM variable window lengths around ``bptt`` with the lr scaled by length.
        reset_every: reset the hidden state to zeros every N windows (None: carry it for the whole pass).
        anneal: SGD learning-rate divisor when a checkpoint does not improve validation loss (or, with
            ``anneal_at``, at each of those fractions of the budget).
        anneal_at: fractions of the budget (each in (0, 1), increasing) at which the lr is divided by
            ``anneal``, whatever validation says: every configuration of a token budget then has the same lr
            at the same fraction of its tokens, however many steps its shape takes between checkpoints
            (the plateau rule decides at checkpoints, and a shape with 3 steps between them is judged on
            noise where one with 600 is not). None: the canonical plateau rule at the checkpoints; ``()``:
            no annealing at all.
        amp: ``"bf16"`` autocast on CUDA, or ``None``.
        tf32: allow TF32 matmuls on CUDA.
        compile: wrap the model in ``torch.compile``.
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
    spike_factor: float = 3.0
    timeout_s: float | None = None
    seed: int = 0
    eval_batch_size: int = 10
    eval_bptt: int = 70
    test: bool = False
    variable_bptt: bool = False
    reset_every: int | None = None
    anneal: float = 4.0
    anneal_at: tuple[float, ...] | None = None
    amp: Literal["bf16"] | None = None
    tf32: bool = True
    compile: bool = False
    log_every: int = 25
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        for key, ok, allowed in TRAIN_RULES:
            if not ok(getattr(self, key)):
                raise HarnessError(f"train {key}={getattr(self, key)!r} is invalid; {allowed}")

    def short(self, tokens: int | None = None, *, seconds: float | None = None) -> TrainConfig:
        """This training cut to a quick run (a warm-up, an lr ladder's rung, a profile cell): exactly ``tokens``
        training tokens, or ``seconds`` of training, then one validation; no test split, no time grid."""
        if (tokens is None) == (seconds is None):
            raise HarnessError("TrainConfig.short needs exactly one of tokens or seconds")
        # No annealing in a quick run: one validation at its end cannot plateau, and fractions of the full
        # budget are not fractions of this one (study.tuning.short_train rescales them for a ladder's rung).
        quick = replace(self, epochs=None, checkpoints=1, test=False, time_grid_s=None,
                        anneal_at=None if self.anneal_at is None else ())
        if tokens is not None:
            return replace(quick, budget="tokens", tokens=tokens)
        assert seconds is not None   # exactly one of the two, checked above
        return replace(quick, budget="seconds", seconds=seconds)


@dataclass(frozen=True)
class RunOptions:
    """What the caller of :func:`bptt_harness.trainer.run_trial` decides for a run, beside the study file's
    ``[train]`` keys: the study sets these from its own state, a user of the Python API may set them.

    Attributes:
        memory_cap_mib: a memory budget (the study's ``max_memory_gib`` x 1024). On CUDA it is the
            allocator's hard limit; on CPU parameters, gradients, optimiser state and saved activations are
            counted against it. Exceeding it ends the trial as ``oom``.
        time_grid_until_s: no time-grid point past this many training seconds. An equal-time comparison
            reads the latest grid time every run reached, never later than the shortest run of the study so
            far, so points past that would only cost validation time.
        warm_up_steps: before training, this many untimed steps of the trial's own model and shape and one
            validation window, after which the model is put back exactly as built (the trial trains as it
            would have without them): the first trial of a process then does not pay for start-up (imports,
            thread pools, the CUDA context, cuDNN's first kernels). 0: none.
    """

    memory_cap_mib: float | None = None
    time_grid_until_s: float | None = None
    warm_up_steps: int = 0

    def __post_init__(self) -> None:
        if self.memory_cap_mib is not None and (not _finite_number(self.memory_cap_mib) or self.memory_cap_mib <= 0):
            raise HarnessError(f"memory_cap_mib={self.memory_cap_mib!r} must be a number of MiB > 0 (or None)")
        if self.time_grid_until_s is not None and (not _finite_number(self.time_grid_until_s)
                                                   or self.time_grid_until_s < 0):
            raise HarnessError(f"time_grid_until_s={self.time_grid_until_s!r} must be a number of training "
                               "seconds >= 0 (or None)")
        if not isinstance(self.warm_up_steps, int) or isinstance(self.warm_up_steps, bool) or self.warm_up_steps < 0:
            raise HarnessError(f"warm_up_steps={self.warm_up_steps!r} must be an integer >= 0")


# --------------------------------------------------------------------------- where curves are logged

LOG_KINDS = ("tensorboard", "mlflow", "wandb")


@dataclass(frozen=True)
class LogTarget:
    """A tool a trial's curves go to (``--log KIND:DIR``, or the study file's ``log = ["KIND:DIR"]``): TensorBoard
    event files, an MLflow file store or an offline Weights & Biases run, all under ``directory``. A relative
    directory is relative to where the command runs. :mod:`bptt_harness.loggers` writes them."""

    kind: Literal["tensorboard", "mlflow", "wandb"]
    directory: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.directory}"

    @classmethod
    def parse(cls, text: Any, where: str = "--log") -> LogTarget:
        """``"tensorboard:runs"`` -> LogTarget; one line naming the bad value otherwise."""
        usage = f"use KIND:DIR with KIND one of {', '.join(LOG_KINDS)}, e.g. tensorboard:runs"
        if not isinstance(text, str) or ":" not in text:
            raise HarnessError(f"{where} {text!r} is not KIND:DIR; {usage}")
        kind, _, directory = text.partition(":")
        if kind not in LOG_KINDS:
            match = difflib.get_close_matches(kind, LOG_KINDS, n=1, cutoff=0.5)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise HarnessError(f"{where} {text!r}: unknown tool {kind!r}{hint}; {usage}")
        if not directory.strip():
            raise HarnessError(f"{where} {text!r} names no folder; {usage}")
        return cls(kind, directory)  # type: ignore[arg-type]


LOG_HELP = ("send each trial's curves to a tool, offline: tensorboard:DIR, mlflow:DIR (DIR/mlflow.db) or wandb:DIR; "
            "repeatable, added to the study file's log = [...]")


def parse_log_targets(values: Iterable[Any], where: str = "--log") -> tuple[LogTarget, ...]:
    """Every ``KIND:DIR`` of ``values``, each once, in the order given."""
    out: list[LogTarget] = []
    for v in values:
        target = LogTarget.parse(v, where)
        if target not in out:
            out.append(target)
    return tuple(out)


def _fractions_ok(value: Any) -> bool:
    """None, or a tuple of increasing numbers each in (0, 1)."""
    if value is None:
        return True
    return (isinstance(value, tuple) and all(_finite_number(f) and 0 < f < 1 for f in value)
            and list(value) == sorted(set(value)))


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: _finite_number(v) and (v > low if strict else v >= low)


# [train]'s checks, in the order they are reported: (key, the test its value must pass, what is allowed).
TRAIN_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("optimizer", lambda v: v in ("sgd", "adamw"), "use 'sgd' or 'adamw'"),
    ("budget", lambda v: v in ("tokens", "seconds"), "use 'tokens' or 'seconds'"),
    ("lr", _at_least(0, strict=True), "it must be a number > 0"),
    ("seconds", _at_least(0, strict=True), "it must be a number > 0"),
    ("clip", _at_least(0), "it must be a number >= 0 (0 disables clipping)"),
    ("spike_factor", _at_least(1, strict=True), "it must be a number > 1"),
    *((key, lambda v: _whole(v) and v >= 1, "it must be an integer >= 1")
      for key in ("tokens", "checkpoints", "eval_batch_size", "eval_bptt", "log_every")),
    ("epochs", _optional(_at_least(0, strict=True)), "it must be a number > 0"),
    ("time_grid_s", _optional(_at_least(0, strict=True)), "it must be a number of training seconds > 0 (or left out)"),
    ("timeout_s", _optional(_at_least(0, strict=True)), "it must be a number of seconds > 0"),
    ("amp", lambda v: v in (None, "bf16"), "use 'bf16' or leave it out"),
    ("seed", lambda v: _whole(v) and 0 <= v < 2**32, "it must be an integer in [0, 2**32)"),
    ("anneal", _at_least(1), "it must be a number >= 1 (1 disables annealing)"),
    ("anneal_at", _fractions_ok, "it must be increasing fractions of the budget, each in (0, 1), e.g. [0.5, 0.75]"),
    ("weight_decay", _at_least(0), "it must be a number >= 0"),
    ("warmup_steps", lambda v: _whole(v) and v >= 1, "it must be an integer >= 1 (the first step allocates memory)"),
    ("reset_every", _optional(lambda v: _whole(v) and v >= 1),
     "it must be an integer >= 1 (or left out to carry the state)"),
)


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
        if self.train.reset_every is not None and not self.model.info.carries(self.model):
            raise HarnessError(f"train reset_every={self.train.reset_every} resets a state that the "
                               f"{self.model.family} family does not carry; leave reset_every out")


def resolve_budget_tokens(t: TrainConfig, train_split_tokens: int) -> int | None:
    """The exact number of training target tokens every configuration gets (None: a seconds budget)."""
    if t.budget == "seconds":
        return None
    if t.epochs is not None:
        return max(1, round(t.epochs * (train_split_tokens - 1)))
    return t.tokens
