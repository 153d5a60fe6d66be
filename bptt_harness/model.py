"""The model families behind one interface (:class:`ModelFamily`), and the first ones: ``lstm`` and ``gru``
(embedding -> LSTM/GRU -> decoder, the word_language_model architecture, with cuDNN kernels on GPU) and
``factory`` (a user's own model from ``[model] factory``).

A family says how to build its model, the state a training pass starts from, its FLOPs per token and
how it is evaluated fairly; its torch-free half (:class:`bptt_harness.spec.FamilyInfo`: keys, memory law,
whether the state is carried) is what the config layer, the record and the report read. The trainer
asks the family (:func:`family_of`) instead of assuming an LSTM. A new family is one
:func:`register_family` call.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.awd_lstm import AWDLSTM, awd_flops_per_token
from bptt_harness.batching import get_batch, windows
from bptt_harness.errors import HarnessError
from bptt_harness.spec import AWD_LSTM, FACTORY_FAMILY, GRU, LSTM, TRANSFORMER, FamilyInfo, ModelConfig, declare_family, forget_family
from bptt_harness.transformer import TransformerLM, attention_flops_per_token, transformer_flops_per_token

__all__ = ["ModelFamily", "FamilyInfo", "RNNModel", "register_family", "unregister_family", "family_of", "build_model",
           "check_model", "resolve_factory", "repackage_hidden", "count_params", "evaluate_carried",
           "evaluate_sliding", "rnn_flops_per_token", "estimated_flops_per_token", "no_state",
           "find_embedding"]

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RNNModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ntoken: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Embedding(ntoken, cfg.emsize)
        rnn_cls = nn.LSTM if cfg.type == "lstm" else nn.GRU
        self.rnn = rnn_cls(cfg.emsize, cfg.nhid, cfg.layers, dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.decoder = nn.Linear(cfg.nhid, ntoken)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight
        # The canonical example's initialisation, so results are comparable with it.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not cfg.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """``x``: ``(seq_len, bs)`` token ids -> logits ``(seq_len * bs, ntoken)`` and the new state."""
        emb = self.drop(self.encoder(x))
        out, hidden = self.rnn(emb, hidden)
        logits = self.decoder(self.drop(out))
        return logits.view(-1, logits.size(-1)), hidden

    def advance(self, x: torch.Tensor, hidden: Hidden) -> Hidden:
        """The state after reading ``x``, without the decoder (the diagnostics read many tokens whose logits
        they do not need: :func:`bptt_harness.diagnose.common.advance`)."""
        _, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return hidden

    def init_hidden(self, bs: int) -> Hidden:
        w = next(self.parameters())
        shape = (self.cfg.layers, bs, self.cfg.nhid)
        if self.cfg.type == "lstm":
            return w.new_zeros(shape), w.new_zeros(shape)
        return w.new_zeros(shape)


def repackage_hidden(h: Any) -> Any:
    """Cut the graph at the window start: the state's values flow on, its gradient does not."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    if isinstance(h, (tuple, list)):
        return type(h)(repackage_hidden(v) for v in h)
    return h  # a user's model may keep no tensor state (None)


# --------------------------------------------------------------------------- evaluation rules

def evaluate_carried(model: nn.Module, matrix: torch.Tensor, bptt: int, amp: bool, state: Any) -> float:
    """Mean cross-entropy over a split in fixed windows, ``state`` carried through it: every target sees all
    the text before it in its column, whatever ``bptt`` the model trained with."""
    total = torch.zeros((), device=matrix.device, dtype=torch.float64)
    count = 0
    with torch.inference_mode(), torch.autocast(matrix.device.type, dtype=torch.bfloat16, enabled=amp):
        for x, y in windows(matrix, bptt):
            logits, state = model(x, state)
            total += F.cross_entropy(logits.float(), y, reduction="sum").double()
            count += y.numel()
    return total.item() / count


def evaluate_sliding(model: nn.Module, matrix: torch.Tensor, bptt: int, amp: bool, fresh_state: Callable[[], Any],
                     stride: int | None = None) -> float:
    """Mean cross-entropy over a split in overlapping windows of ``bptt`` rows that start from a fresh state
    and move by ``stride`` (default ``bptt // 2``); each target is scored once, in the last ``stride`` rows
    of its window, so after the first window every target sees between ``bptt - stride + 1`` and ``bptt``
    tokens of context: the same for every configuration evaluated with the same ``eval_bptt``."""
    stride = max(1, min(stride or bptt // 2, bptt))
    rows = matrix.size(0)
    total = torch.zeros((), device=matrix.device, dtype=torch.float64)
    count, scored = 0, 0   # scored: input rows whose targets are counted so far
    with torch.inference_mode(), torch.autocast(matrix.device.type, dtype=torch.bfloat16, enabled=amp):
        while scored < rows - 1:
            end = min(rows - 1, max(scored + stride, bptt))
            start = max(0, end - bptt)
            x, y = get_batch(matrix, start, end - start)
            logits, _ = model(x, fresh_state())
            new = (end - scored) * x.size(1)   # the window's last rows, flattened row-major like the logits
            total += F.cross_entropy(logits[-new:].float(), y[-new:], reduction="sum").double()
            count += new
            scored = end
    return total.item() / count


# --------------------------------------------------------------------------- the family interface

def init_hidden(model: nn.Module, bs: int) -> Any:
    """The state a pass starts from: the model's ``init_hidden(bs)``, or None for a model without one."""
    make = getattr(model, "init_hidden", None)
    return make(bs) if callable(make) else None


def find_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding, where the diagnostics hook: ``model.encoder`` when it is an
    ``nn.Embedding`` (every built-in family), else the model's first ``nn.Embedding``; None without one."""
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Embedding):
        return encoder
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


@dataclass(frozen=True)
class ModelFamily:
    """A model family's torch side; ``info`` is its torch-free declaration.

    Attributes:
        info: name, keys, shape label, whether the state is carried, evaluation rule, memory-law terms.
        build: ``(model_config, ntoken) -> nn.Module`` whose ``forward(x, state)`` takes ``(seq_len, bs)`` token
            ids and returns ``(logits of shape (seq_len * bs, ntoken), new state)``.
        flops_per_token: ``(model_config, ntoken, model) -> training FLOPs per token`` (forward + backward).
        init_state: ``(model, bs) -> the state a pass starts from`` (None for a model that keeps none).
        window_flops_per_token: ``(model_config, window) -> training FLOPs per token`` that grow with the
            window (attention's), added to ``flops_per_token`` by :meth:`flops`; None: none.
        embedding: ``model -> its token embedding`` (an ``nn.Embedding``, or None), for measurements that
            hook the model's input (the diagnostics).
    """

    info: FamilyInfo
    build: Callable[[ModelConfig, int], nn.Module]
    flops_per_token: Callable[[ModelConfig, int, nn.Module], float]
    init_state: Callable[[nn.Module, int], Any] = init_hidden
    window_flops_per_token: Callable[[ModelConfig, int], float] | None = None
    embedding: Callable[[nn.Module], nn.Embedding | None] = find_embedding

    @property
    def name(self) -> str:
        return self.info.name

    def flops(self, cfg: ModelConfig, ntoken: int, model: nn.Module, window: int) -> float:
        """Training FLOPs per token of ``model`` trained on windows of ``window`` tokens."""
        extra = self.window_flops_per_token(cfg, window) if self.window_flops_per_token is not None else 0.0
        return self.flops_per_token(cfg, ntoken, model) + extra

    def evaluate(self, model: nn.Module, cfg: ModelConfig, matrix: torch.Tensor, bptt: int, amp: bool = False) -> float:
        """Mean validation (or test) cross-entropy of a batchified split (``(rows, bs)``) by the family's rule
        for ``cfg`` (``info.evaluation_of``), in eval mode; the model is put back in the mode it was in."""
        bs = matrix.size(1)
        was_training = model.training
        model.eval()
        try:
            if self.info.evaluation_of(cfg) == "sliding":
                return evaluate_sliding(model, matrix, bptt, amp, lambda: self.init_state(model, bs))
            return evaluate_carried(model, matrix, bptt, amp, self.init_state(model, bs))
        finally:
            model.train(was_training)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    """Make ``family`` usable as ``[model] type = "<name>"`` everywhere: study files, ``bptt-harness trial``,
    the trainer, the record and the report's memory law (its declaration goes to ``bptt_harness.spec``)."""
    declare_family(family.info)
    _FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    """Undo :func:`register_family` (a test's own family)."""
    _FAMILIES.pop(name, None)
    forget_family(name)


def family_of(cfg: ModelConfig) -> ModelFamily:
    """The family that builds ``cfg``'s model (``factory`` when ``cfg.factory`` is set)."""
    family = _FAMILIES.get(cfg.family)
    if family is None:  # declared without a torch side: a torch-free declaration alone cannot train
        raise HarnessError(f"model type {cfg.family!r} is declared but not registered with a build function; "
                           "register it with bptt_harness.model.register_family")
    return family


def build_model(cfg: ModelConfig, ntoken: int) -> nn.Module:
    """``cfg``'s model, built by its family (for ``factory``: what ``cfg.factory`` returns for ``(cfg, ntoken)``)."""
    return family_of(cfg).build(cfg, ntoken)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rnn_flops_per_token(cfg: ModelConfig, ntoken: int, model: nn.Module | None = None) -> float:
    """Training FLOPs per token of :class:`RNNModel`: forward multiply-adds x 2, times 3 for forward + backward."""
    gates = 4 if cfg.type == "lstm" else 3
    macs = 0
    for layer in range(cfg.layers):
        inp = cfg.emsize if layer == 0 else cfg.nhid
        macs += gates * cfg.nhid * (inp + cfg.nhid)
    macs += cfg.nhid * ntoken
    return 3 * 2 * float(macs)


def estimated_flops_per_token(cfg: ModelConfig, ntoken: int, model: nn.Module) -> float:
    """A model we know nothing of: 6 x its weights outside embeddings (a multiply-add per weight, forward and
    backward)."""
    lookup = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return 6.0 * sum(p.numel() for p in model.parameters() if id(p) not in lookup)


# --------------------------------------------------------------------------- a user's model

def build_factory_model(cfg: ModelConfig, ntoken: int) -> nn.Module:
    """What ``cfg.factory`` returns for ``(cfg, ntoken)``, checked to be a module with ``init_hidden``."""
    assert cfg.factory is not None
    make = resolve_factory(cfg.factory)
    try:
        model = make(cfg, ntoken)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: any error (an exit too) is one line
        raise HarnessError(f"model factory {cfg.factory!r} raised {_one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise HarnessError(f"model factory {cfg.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    if not callable(getattr(model, "init_hidden", None)):
        raise HarnessError(f"model factory {cfg.factory!r}: {type(model).__name__} has no init_hidden(batch_size) "
                           "method (the trainer carries the state from one window to the next)")
    return model


def resolve_factory(spec: str) -> Callable[[ModelConfig, int], nn.Module]:
    """``"package.module:function"`` -> the function, or one line saying what is wrong with it."""
    module_name, _, name = spec.partition(":")
    try:
        module = _import(module_name)
    except Exception as e:  # noqa: BLE001 - a missing module or an error while importing it
        raise HarnessError(f"model factory {spec!r}: cannot import {module_name!r} ({_one_line(e)}); it must be "
                           "importable from the current folder or PYTHONPATH") from None
    fn = getattr(module, name, None)
    if fn is None:
        public = [n for n in dir(module) if not n.startswith("_")]
        match = difflib.get_close_matches(name, public, n=1, cutoff=0.5)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise HarnessError(f"model factory {spec!r}: module {module_name!r} has no {name!r}{hint}")
    if not callable(fn):
        raise HarnessError(f"model factory {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _import(name: str) -> Any:
    """Import ``name``; a module in the current folder is found too (``bptt-harness`` runs from .venv/bin),
    without leaving that folder on ``sys.path``."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(cwd)


def check_model(cfg: ModelConfig, ntoken: int) -> None:
    """Before any training: a factory's model has the trainer's interface (one window of 3 x 2 tokens
    through ``forward(x, init_hidden(2))`` on CPU, in eval mode), or one line saying what is wrong. The
    built-in families need no check.

    The shape alone does not say the logits are in the targets' order: ``(seq_len * bs, ntoken)`` is the
    same shape batch-major, and the loss would then silently compare each logit with another position's
    target. So the last token of column 0 is changed: of the logits only row ``(seq_len - 1) * bs``, the
    last position of column 0 in the trainer's (sequence-major) order, may change (batch-major, row
    ``seq_len - 1`` would)."""
    if cfg.factory is None:
        return
    model = build_model(cfg, ntoken)
    if not any(p.requires_grad for p in model.parameters()):
        raise HarnessError(f"model factory {cfg.factory!r}: {type(model).__name__} has no trainable parameters "
                           "(nothing for the optimiser to train); register its weights as nn.Parameter or submodules")
    was_training = model.training
    model.eval()   # dropout would change every row
    seq, bs = 3, 2
    x = (torch.arange(seq * bs, dtype=torch.long) % ntoken).view(seq, bs)
    changed = x.clone()
    changed[-1, 0] = (x[-1, 0] + 1) % ntoken
    try:
        logits = _window_logits(cfg, model, x, ntoken)
        other = _window_logits(cfg, model, changed, ntoken)
    finally:
        model.train(was_training)
    moved = [int(r) for r in ((logits - other).abs().amax(dim=1) > 0).nonzero().flatten()]
    expected = (seq - 1) * bs
    if any(r != expected for r in moved):
        raise HarnessError(f"model factory {cfg.factory!r}: changing the last token of column 0 of x (shape "
                           f"({seq}, {bs})) changed logits rows {moved}, but only row {expected} may change: the "
                           "logits must be sequence-major, row t * batch_size + b for position t of column b "
                           "(e.g. output.view(-1, ntoken) of a (seq_len, batch_size, ntoken) tensor, not a "
                           "batch-first one)")


def _window_logits(cfg: ModelConfig, model: nn.Module, x: torch.Tensor, ntoken: int) -> torch.Tensor:
    """The logits of one window from a fresh state, or one line saying why the interface is wrong."""
    seq, bs = x.shape
    try:
        with torch.no_grad():
            out = model(x, family_of(cfg).init_state(model, bs))
    except (Exception, SystemExit) as e:  # noqa: BLE001
        raise HarnessError(f"model factory {cfg.factory!r}: forward(x, hidden) with x of shape ({seq}, {bs}) "
                           f"raised {_one_line(e)}") from None
    logits = out[0] if isinstance(out, tuple) and len(out) == 2 else None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (seq * bs, ntoken):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise HarnessError(f"model factory {cfg.factory!r}: forward(x, hidden) must return (logits of shape "
                           f"(seq_len * batch_size, ntoken) = ({seq * bs}, {ntoken}), hidden) for x of shape "
                           f"({seq}, {bs}); got {got}")
    return logits.float()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def no_state(model: nn.Module, bs: int) -> None:
    """A Transformer starts each pass with no memory (its first window sees only itself)."""
    return None


for _family in (ModelFamily(LSTM, RNNModel, rnn_flops_per_token), ModelFamily(GRU, RNNModel, rnn_flops_per_token),
                ModelFamily(TRANSFORMER, TransformerLM, transformer_flops_per_token, no_state,
                            attention_flops_per_token),
                ModelFamily(AWD_LSTM, AWDLSTM, awd_flops_per_token),
                ModelFamily(FACTORY_FAMILY, build_factory_model, estimated_flops_per_token)):
    register_family(_family)
