"""A user's own Transformer LM training script: the pytorch/examples word_language_model ``TransformerModel``.

The example's model as it runs there: ``nn.TransformerEncoder`` layers (post-norm, ReLU, dropout in
attention and feed-forward), sinusoidal positions added to the embedding scaled by sqrt(emsize), a float
``-inf`` causal mask, a log-softmax output with ``NLLLoss``, and its ``main.py`` loop (``batchify``,
``get_batch``, per-step ``loss.item()``, ``clip_grad_norm_``, manual SGD update). Each window is seen
alone: the context is the window. Like ``textbook_lm.py`` it imports nothing from harness and changes no
process setting; ``bench_trainer.py --type transformer`` runs it as the textbook arm, or alone:

    python benchmarks/textbook_transformer.py --data ids.pt --vocab 10000 [--bptt 35 --batch-size 20 --steps 200]

Prints one JSON line: ``{"tokens_per_s": ..., "loss": ..., "steps": ...}``; the first ``--warmup`` steps
are not timed.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(1))

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


class TransformerModel(nn.Module):
    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout):
        super().__init__()
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout)
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.decoder = nn.Linear(ninp, ntoken)
        self.ninp, self.src_mask = ninp, None
        nn.init.uniform_(self.input_emb.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, src):
        if self.src_mask is None or self.src_mask.size(0) != len(src):
            mask = (torch.triu(torch.ones(len(src), len(src))) == 1).transpose(0, 1)
            self.src_mask = mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0).to(
                src.device)
        src = self.pos_encoder(self.input_emb(src) * math.sqrt(self.ninp))
        output = self.decoder(self.encoder(src, mask=self.src_mask))
        return F.log_softmax(output, dim=-1)


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--emsize", type=int, default=200)
    ap.add_argument("--nhid", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_data = batchify(torch.load(args.data, weights_only=True), args.batch_size).to(device)
    model = TransformerModel(args.vocab, args.emsize, args.heads, args.nhid, args.layers, args.dropout).to(device)
    model.train()
    criterion = nn.NLLLoss()
    losses, tokens, t0, step = [], 0, None, 0
    while step < args.steps:
        for i in range(0, train_data.size(0) - 1, args.bptt):
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, tokens = time.perf_counter(), 0
            data, targets = get_batch(train_data, i, args.bptt)
            model.zero_grad()
            output = model(data)
            loss = criterion(output.view(-1, args.vocab), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-args.lr)
            losses.append(loss.item())
            tokens += targets.numel()
            step += 1
            if step == args.steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": tokens / seconds, "loss": sum(losses[-25:]) / len(losses[-25:]),
                      "steps": step}))


if __name__ == "__main__":
    main()
