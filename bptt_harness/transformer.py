"""The ``transformer`` family's model: a causal pre-norm Transformer LM whose context is the training window,
with an optional carried memory of the previous windows' keys and values (Transformer-XL).

Positions are rotary (relative): a cached key keeps its meaning when the window moves on, so a memory
carried from window to window needs no re-encoding. Attention is PyTorch's ``scaled_dot_product_attention``
(a fused kernel where the device has one). The state is the memory: per layer the un-rotated keys and
values of the last ``mem_len`` tokens, ``None`` before the first window; the trainer detaches it at each
window start (truncated BPTT for attention).

The model's context is what it trained with: the longest span of keys a query attended to in training
(``context``: window, plus ``mem_len`` with a memory). Evaluated on longer windows, each query attends to
at most that many keys (a band mask, as sliding-window attention does), so no attention spans a relative
distance the model never trained on, whatever the evaluation window (stacked layers reach further back
through each other, as in training with a memory). Its embedding layer is
``model.encoder`` (an ``nn.Embedding``), as in the recurrent families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.spec import ModelConfig

__all__ = ["TransformerLM", "Block", "Dropout", "Memory", "rotate", "rotary_phases", "band_mask", "transformer_flops_per_token",
           "attention_flops_per_token"]

# Per layer: (keys, values) of shape (bs, heads, tokens, head width); None before the first window.
Memory = tuple[tuple[torch.Tensor, torch.Tensor], ...] | None


def rotary_phases(positions: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """The unit complex numbers :func:`rotate` multiplies by: ``(positions, width / 2)``, position p's pair
    j turned by the angle ``p * inv_freq[j]``."""
    angles = torch.outer(torch.arange(positions, device=inv_freq.device, dtype=inv_freq.dtype), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (``(..., positions, width)``): each pair of neighbouring features
    (2j, 2j + 1), read as a complex number, multiplied by its position's phase (:func:`rotary_phases`).
    One complex product, forward and backward: cheaper on CPU than the real-valued halves-and-concatenate
    form (0.33 against 0.74 ms per layer at bs 20, window 35, width 200). Computed in float32 (complex
    bfloat16 does not exist) and returned in ``x``'s dtype."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * phases).flatten(-2).type_as(x)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask on CPU comes from ``torch.rand``: the same law (each element kept with
    probability 1 - p, scaled by 1 / (1 - p)), measured 1.4x faster forward and backward at (700, 200) on
    CPU, where ``bernoulli_`` draws 2.7x slower than ``rand_like``. The mask autograd keeps is boolean: a
    quarter of the bytes ``nn.Dropout`` keeps on CPU. Elsewhere (CUDA's fused kernel), in evaluation, at p = 0
    or 1 and in place: ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1 or self.inplace:
            return super().forward(x)
        # Drawn in float32 whatever x's dtype: bfloat16 draws would move the keep probability.
        return x * (torch.rand(x.shape, device=x.device) >= self.p) * (1.0 / (1.0 - self.p))


def band_mask(queries: int, memory: int, context: int | None, device: torch.device) -> torch.Tensor:
    """Which keys each query may attend to (True: allowed): query ``i`` sits at position ``memory + i`` of
    ``memory + queries`` keys and sees itself and the keys before it, at most ``context`` of them."""
    q = torch.arange(queries, device=device).view(-1, 1) + memory
    k = torch.arange(memory + queries, device=device).view(1, -1)
    allowed = k <= q
    return allowed & (k > q - context) if context else allowed


class Block(nn.Module):
    """Pre-norm self-attention and feed-forward, each a residual branch. The feed-forward's activation is
    ReLU, as in word_language_model's and Transformer-XL's: GELU measured 3-6% slower per training step on
    CPU at the example's shape (``benchmarks/bench_trainer.py --type transformer``)."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ff1, self.ff2 = nn.Linear(width, ff), nn.Linear(ff, width)
        self.drop = Dropout(dropout)

    def forward(self, h: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor] | None, phases: torch.Tensor,
                mask: torch.Tensor | None, mem_len: int
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``h``: ``(bs, T, width)`` -> the block's output and this layer's memory for the next window."""
        bs, T, width = h.shape
        qkv = self.qkv(self.norm1(h)).view(bs, T, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if memory is not None:
            k, v = torch.cat((memory[0], k), dim=2), torch.cat((memory[1], v), dim=2)
        # Un-rotated keys are kept: the next window rotates them by their new (relative) positions.
        kept = (k[:, :, -mem_len:].contiguous(), v[:, :, -mem_len:].contiguous()) if mem_len else None
        if memory is None:   # queries and keys at the same positions: one rotation for both
            q, k = rotate(qkv[:2], phases)
        else:
            q, k = rotate(q, phases[k.size(2) - T:]), rotate(k, phases)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(att.transpose(1, 2).reshape(bs, T, width)))
        h = h + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.norm2(h))))))
        return h, kept


class TransformerLM(nn.Module):
    """``forward(x, memory)``: ``x`` ``(T, bs)`` token ids -> logits ``(T * bs, ntoken)`` and the new memory."""

    inv_freq: torch.Tensor

    def __init__(self, cfg: ModelConfig, ntoken: int) -> None:
        super().__init__()
        self.mem_len = cfg.mem_len
        self.context = 0   # the longest span of keys a query attended to in training (0: not trained yet)
        head_width = cfg.emsize // cfg.heads
        self.register_buffer("inv_freq", 1.0 / 10_000 ** (torch.arange(0, head_width, 2).float() / head_width),
                             persistent=False)
        self.encoder = nn.Embedding(ntoken, cfg.emsize)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.emsize, cfg.heads, cfg.nhid, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.emsize)
        self.decoder = nn.Linear(cfg.emsize, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, Memory]:
        T = x.size(0)
        m = memory[0][0].size(2) if memory else 0
        if self.training:
            self.context = max(self.context, m + T)
        # No mask in training without a memory: the causal kernel. A memory shifts the diagonal; a window
        # longer than the trained context gets the band.
        mask = None if m == 0 and (self.training or not self.context or T <= self.context) else \
            band_mask(T, m, None if self.training else self.context, x.device)
        phases = rotary_phases(m + T, self.inv_freq)
        # The embedding is looked up time-major, as in every family (hooks on model.encoder see (T, bs, width)).
        h = self.drop(self.encoder(x)).transpose(0, 1).contiguous()
        kept = []
        for i, block in enumerate(self.blocks):
            h, layer_memory = block(h, memory[i] if memory else None, phases, mask, self.mem_len)
            kept.append(layer_memory)
        logits = self.decoder(self.norm(h).transpose(0, 1))   # time-major, as the targets are
        new_memory = tuple(mem for mem in kept if mem is not None) if self.mem_len else None
        return logits.reshape(-1, logits.size(-1)), new_memory or None


def transformer_flops_per_token(cfg: ModelConfig, ntoken: int, model: nn.Module | None = None) -> float:
    """Training FLOPs per token of the weights (forward multiply-adds x 2, x 3 for forward + backward):
    per layer the q, k, v and output projections and the feed-forward, then the decoder. Attention's own
    FLOPs grow with the window: :func:`attention_flops_per_token`."""
    d, ff = cfg.emsize, cfg.nhid
    return 6.0 * (cfg.layers * (4 * d * d + 2 * d * ff) + d * ntoken)


def attention_flops_per_token(cfg: ModelConfig, window: int) -> float:
    """Training FLOPs per token of the attention scores and their weighted sum: a query at position i of a
    causal window sees i + 1 keys, (window + 1) / 2 on average, plus the carried memory's."""
    keys = (window + 1) / 2 + cfg.mem_len
    return 6.0 * cfg.layers * 2 * cfg.emsize * keys
