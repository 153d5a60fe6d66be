"""The ``awd-lstm`` family's model: the ASGD Weight-Dropped LSTM of Merity, Keskar and Socher (2017), as in
salesforce/awd-lstm-lm and the fastai course, written from the paper's description.

Its regularisers, each a small piece:
* DropConnect on every layer's hidden-to-hidden weights (``weight_dropout``): one mask per window, the same
  at every time step, applied to the weights rather than to the activations, so cuDNN's LSTM still runs;
* embedding dropout (``embed_dropout``): whole words dropped from the embedding matrix for a window;
* locked (variational) dropout: one mask per window and sequence, shared by every time step, on the
  embedding output (``input_dropout``), between layers (``hidden_dropout``) and on the last layer's output
  (``dropout``);
* tied weights: the last layer has ``emsize`` units so the decoder can share the embedding matrix.

The state is one ``(h, c)`` pair per layer, carried from window to window like the LSTM's. Its embedding
layer is ``model.encoder`` (an ``nn.Embedding``), as in the other families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bptt_harness.spec import ModelConfig

__all__ = ["AWDLSTM", "WeightDropLSTM", "locked_dropout", "embedding_dropout", "awd_layer_sizes",
           "awd_flops_per_token"]

State = list[tuple[torch.Tensor, torch.Tensor]]


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout of ``x`` (``(T, bs, width)``) with one mask per sequence and unit, the same at every time step."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty((1, x.size(1), x.size(2))).bernoulli_(1.0 - p) / (1.0 - p)
    return x * mask


def embedding_dropout(embed: nn.Embedding, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The embedding of ``x`` with whole words (rows of the matrix) dropped with probability ``p``. The
    module itself runs (with the dropped matrix for this call), so hooks on it see every lookup."""
    if not training or p == 0.0:
        return embed(x)
    weight = embed.weight
    dropped = weight * (weight.new_empty((weight.size(0), 1)).bernoulli_(1.0 - p) / (1.0 - p))
    out: torch.Tensor = functional_call(embed, {"weight": dropped}, (x,))
    return out


class WeightDropLSTM(nn.Module):
    """A one-layer LSTM whose hidden-to-hidden weight is dropped (DropConnect) afresh at each forward in
    training. The raw weight is the parameter; the dropped copy is passed to the LSTM for that call only."""

    def __init__(self, inputs: int, hidden: int, p: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden)
        self.p = p

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if not self.training or self.p == 0.0:
            return self.lstm(x, state)
        raw = self.lstm.get_parameter("weight_hh_l0")
        dropped = F.dropout(raw, self.p, training=True)
        return functional_call(self.lstm, {"weight_hh_l0": dropped}, (x, state), strict=False)


def awd_layer_sizes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(inputs, units) of each layer: ``nhid`` units, the last ``emsize`` when the weights are tied."""
    sizes = []
    for layer in range(cfg.layers):
        inputs = cfg.emsize if layer == 0 else cfg.nhid
        units = cfg.emsize if layer == cfg.layers - 1 and cfg.tied else cfg.nhid
        sizes.append((inputs, units))
    return sizes


class AWDLSTM(nn.Module):
    """``forward(x, state)``: ``x`` ``(T, bs)`` token ids -> logits ``(T * bs, ntoken)`` and the new state."""

    def __init__(self, cfg: ModelConfig, ntoken: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Embedding(ntoken, cfg.emsize)
        self.rnns = nn.ModuleList(WeightDropLSTM(i, h, cfg.weight_dropout) for i, h in awd_layer_sizes(cfg))
        out = awd_layer_sizes(cfg)[-1][1]
        self.decoder = nn.Linear(out, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        cfg = self.cfg
        h = embedding_dropout(self.encoder, x, cfg.embed_dropout, self.training)
        h = locked_dropout(h, cfg.input_dropout, self.training)
        new_state = []
        for layer, rnn in enumerate(self.rnns):
            h, layer_state = rnn(h, state[layer])
            new_state.append(layer_state)
            last = layer == len(self.rnns) - 1
            h = locked_dropout(h, cfg.dropout if last else cfg.hidden_dropout, self.training)
        logits = self.decoder(h)
        return logits.view(-1, logits.size(-1)), new_state

    def init_hidden(self, bs: int) -> State:
        w = self.decoder.bias
        return [(w.new_zeros(1, bs, units), w.new_zeros(1, bs, units)) for _, units in awd_layer_sizes(self.cfg)]


def awd_flops_per_token(cfg: ModelConfig, ntoken: int, model: nn.Module | None = None) -> float:
    """Training FLOPs per token: each layer's four gates over its inputs and units, then the decoder
    (forward multiply-adds x 2, x 3 for forward + backward)."""
    macs = sum(4 * units * (inputs + units) for inputs, units in awd_layer_sizes(cfg))
    macs += awd_layer_sizes(cfg)[-1][1] * ntoken
    return 6.0 * macs
