"""A user's own truncated-BPTT training script: the pytorch/examples word_language_model loop.

It imports nothing from harness and changes no process setting, so it runs the way a user's script
would: its own process, torch's default threads and OpenMP policy. ``bench_trainer.py`` runs it as
the textbook arm; it can also be run alone:

    python benchmarks/textbook_lm.py --data ids.pt --vocab 10000 [--bptt 35 --batch-size 20 --steps 200]

``ids.pt`` is a 1-D int64 tensor of token ids (``torch.save``). Prints one JSON line:
``{"tokens_per_s": ..., "loss": ..., "steps": ...}``; the first ``--warmup`` steps are not timed.
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x, hidden):
        emb = self.drop(self.encoder(x))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output))
        return decoded.view(-1, decoded.size(-1)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source, i, bptt):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--emsize", type=int, default=200)
    ap.add_argument("--nhid", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
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
    model = RNNModel(args.vocab, args.emsize, args.nhid, args.layers, args.dropout).to(device)
    model.train()
    hidden = model.init_hidden(args.batch_size)
    losses, tokens, t0, step = [], 0, None, 0
    while step < args.steps:
        for i in range(0, train_data.size(0) - 1, args.bptt):
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, tokens = time.perf_counter(), 0
            data, targets = get_batch(train_data, i, args.bptt)
            model.zero_grad()
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = F.cross_entropy(output, targets)
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
