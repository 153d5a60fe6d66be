"""Embedding -> LSTM/GRU -> decoder: the word_language_model architecture, with cuDNN kernels on GPU;
or a user's own model from ``[model] factory`` (:func:`build_model`)."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bptt_harness.errors import HarnessError
from bptt_harness.spec import ModelConfig

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


# --------------------------------------------------------------------------- a user's model

def build_model(cfg: ModelConfig, ntoken: int) -> nn.Module:
    """The built-in :class:`RNNModel`, or what ``cfg.factory`` returns for ``(cfg, ntoken)``."""
    if cfg.factory is None:
        return RNNModel(cfg, ntoken)
    make = resolve_factory(cfg.factory)
    try:
        model = make(cfg, ntoken)
    except Exception as e:  # noqa: BLE001 - the user's code: any error is one line naming it
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
    """Import ``name``; a module in the current folder is found too (``harness`` runs from .venv/bin),
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
    through ``forward(x, init_hidden(2))`` on CPU), or one line saying what is wrong."""
    if cfg.factory is None:
        return
    model = build_model(cfg, ntoken)
    x = torch.zeros((3, 2), dtype=torch.long)
    try:
        with torch.no_grad():
            init_hidden: Any = model.init_hidden
            out = model(x, init_hidden(2))
    except Exception as e:  # noqa: BLE001
        raise HarnessError(f"model factory {cfg.factory!r}: forward(x, hidden) with x of shape (3, 2) raised "
                           f"{_one_line(e)}") from None
    logits = out[0] if isinstance(out, tuple) and len(out) == 2 else None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (6, ntoken):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise HarnessError(f"model factory {cfg.factory!r}: forward(x, hidden) must return (logits of shape "
                           f"(seq_len * batch_size, ntoken) = (6, {ntoken}), hidden) for x of shape (3, 2); got {got}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def estimated_flops_per_token(model: nn.Module) -> float:
    """A user's model: 6 x its weights outside embeddings (a multiply-add per weight, forward and backward)."""
    lookup = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return 6.0 * sum(p.numel() for p in model.parameters() if id(p) not in lookup)


def flops_per_token(cfg: ModelConfig, ntoken: int) -> float:
    """Training FLOPs per token: forward multiply-adds x 2, times 3 for forward + backward."""
    gates = 4 if cfg.type == "lstm" else 3
    macs = 0
    for layer in range(cfg.layers):
        inp = cfg.emsize if layer == 0 else cfg.nhid
        macs += gates * cfg.nhid * (inp + cfg.nhid)
    macs += cfg.nhid * ntoken
    return 3 * 2 * float(macs)
