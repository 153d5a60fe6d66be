"""Embedding -> LSTM/GRU -> decoder: the word_language_model architecture, with cuDNN kernels on GPU."""

from __future__ import annotations

import torch
from torch import nn

from harness.spec import ModelConfig

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


def repackage_hidden(h: Hidden) -> Hidden:
    """Cut the graph at the window start: the state's values flow on, its gradient does not."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, ntoken: int) -> float:
    """Training FLOPs per token: forward multiply-adds x 2, times 3 for forward + backward."""
    gates = 4 if cfg.type == "lstm" else 3
    macs = 0
    for layer in range(cfg.layers):
        inp = cfg.emsize if layer == 0 else cfg.nhid
        macs += gates * cfg.nhid * (inp + cfg.nhid)
    macs += cfg.nhid * ntoken
    return 3 * 2 * float(macs)
