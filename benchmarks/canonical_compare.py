"""Does a bptt-harness trial land where the canonical PyTorch example lands on the same files?

    .venv/bin/python benchmarks/canonical_compare.py [--fraction 1.0] [--seed 1111] [--device cpu]

The canonical recipe of pytorch/examples ``word_language_model`` (2-layer 200-unit LSTM, emsize 200,
SGD lr 20, clip 0.25, dropout 0.2, bptt 35, batch size 20, eval batch size 10, one epoch) on a
PTB-sized corpus: the embedded default corpus (lower-cased, punctuation split, 10,000-word
vocabulary) is written out as ``train.txt``/``valid.txt``/``test.txt`` in a temporary directory, and
then trained three ways on those files:

1. ``canonical``: a faithful reimplementation of the example's ``data.py`` (a dictionary in order of
   first appearance over train, valid and test), ``model.py`` (log-softmax output) and ``main.py``
   (``batchify``, ``get_batch``, ``repackage_hidden``, ``NLLLoss``, per-step ``loss.item()``, manual
   SGD update ``p.data.add_(p.grad, alpha=-lr)``, clip 0.25, evaluation with ``len(data) * loss``);
2. ``canonical, harness ids``: the same loop fed the harness's numericalised tensors. The example's
   dictionary numbers words in order of appearance and the harness by frequency, so (1) and (3)
   start from differently permuted random initialisations; (2) removes that difference, so it must
   match (3) to rounding if the harness does the same arithmetic;
3. ``harness``: :func:`bptt_harness.trainer.run_trial` with the same settings (a token budget of exactly
   the example's passes, ``checkpoints`` = passes, the same seed).

Prints the three validation perplexities and their ratios. ``--fraction F`` keeps only the first
fraction of the train lines, for a quick run; ``--small`` uses a 2-layer 32-unit model.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bptt_harness.corpus import EOS, SPLITS, UNK, CorpusSpec, load
from bptt_harness.model import ModelConfig
from bptt_harness.trainer import TrainConfig, TrialSpec, run_trial

EVAL_BATCH_SIZE = 10  # main.py: eval_batch_size = 10


@dataclass(frozen=True)
class Recipe:
    """The canonical example's command-line defaults (main.py), except ``epochs`` (one pass here)."""

    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    lr: float = 20.0
    clip: float = 0.25
    epochs: int = 1
    batch_size: int = 20
    bptt: int = 35
    dropout: float = 0.2
    seed: int = 1111


# --------------------------------------------------------------------------- the corpus files

def write_corpus_files(directory: Path, fraction: float = 1.0, max_vocab: int = 10_000) -> Path:
    """The default corpus (lower, split_punct, ``max_vocab``) as PTB-style text files, one sentence a line.

    Out-of-vocabulary words are written as ``<unk>``, as in PTB. Only the first ``fraction`` of the
    train lines is written, and, as in PTB, valid and test hold no word that the written train lacks
    (such words become ``<unk>``): the example builds its dictionary over all three files and the
    harness over train only, so this makes the two vocabularies the same set of words.
    """
    corpus = load(CorpusSpec("default", lower=True, split_punct=True, max_vocab=max_vocab))
    directory.mkdir(parents=True, exist_ok=True)
    train_words: set[str] = set()
    for split in SPLITS:  # train first
        words = [corpus.vocab[i] for i in corpus.split(split).tolist()]
        lines: list[list[str]] = [[]]
        for w in words:
            if w == EOS:
                lines.append([])
            else:
                lines[-1].append(w)
        lines = lines[:-1] if not lines[-1] else lines
        if split == "train":
            lines = lines[: max(3, int(len(lines) * fraction))]
            train_words = {w for ln in lines for w in ln}
        else:
            lines = [[w if w in train_words else UNK for w in ln] for ln in lines]
        (directory / f"{split}.txt").write_text("".join(f" {' '.join(ln)} \n" for ln in lines), encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- the canonical example

class Dictionary:
    """data.py: words numbered in order of first appearance."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


class CanonicalCorpus:
    """data.py: the dictionary is built over train, valid and test in that order."""

    def __init__(self, path: Path) -> None:
        self.dictionary = Dictionary()
        self.train = self.tokenize(path / "train.txt")
        self.valid = self.tokenize(path / "valid.txt")
        self.test = self.tokenize(path / "test.txt")

    def tokenize(self, path: Path) -> torch.Tensor:
        with open(path, encoding="utf8") as f:
            for line in f:
                for word in line.split() + ["<eos>"]:
                    self.dictionary.add_word(word)
        with open(path, encoding="utf8") as f:
            idss = []
            for line in f:
                ids = [self.dictionary.word2idx[word] for word in line.split() + ["<eos>"]]
                idss.append(torch.tensor(ids).type(torch.int64))
            return torch.cat(idss)


class CanonicalRNNModel(nn.Module):
    """model.py, the LSTM branch: encoder -> LSTM -> decoder -> log_softmax."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def batchify(data: torch.Tensor, bsz: int, device: torch.device) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    data = data.view(bsz, -1).t().contiguous()
    return data.to(device)


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def canonical_train(train_ids: torch.Tensor, valid_ids: torch.Tensor, ntokens: int, r: Recipe,
                    device: str = "cpu") -> dict:
    """main.py for ``r.epochs`` epochs -> validation loss and perplexity after the last epoch."""
    torch.manual_seed(r.seed)
    dev = torch.device(device)
    train_data = batchify(train_ids, r.batch_size, dev)
    val_data = batchify(valid_ids, EVAL_BATCH_SIZE, dev)
    model = CanonicalRNNModel(ntokens, r.emsize, r.nhid, r.nlayers, r.dropout).to(dev)
    criterion = nn.NLLLoss()

    def get_batch(source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = min(r.bptt, len(source) - 1 - i)
        data = source[i:i + seq_len]
        target = source[i + 1:i + 1 + seq_len].view(-1)
        return data, target

    def evaluate(data_source: torch.Tensor) -> float:
        model.eval()
        total_loss = 0.0
        hidden = model.init_hidden(EVAL_BATCH_SIZE)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, r.bptt):
                data, targets = get_batch(data_source, i)
                output, hidden = model(data, hidden)
                hidden = repackage_hidden(hidden)
                total_loss += len(data) * criterion(output, targets).item()
        return total_loss / (len(data_source) - 1)

    def train(lr: float) -> tuple[int, float]:
        model.train()
        total_loss = 0.0
        hidden = model.init_hidden(r.batch_size)
        steps = 0
        for _batch, i in enumerate(range(0, train_data.size(0) - 1, r.bptt)):
            data, targets = get_batch(train_data, i)
            model.zero_grad()
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            total_loss += loss.item()
            steps += 1
        return steps, total_loss / max(steps, 1)

    lr = r.lr
    best_val_loss = None
    steps = 0
    t0 = time.perf_counter()
    for _epoch in range(1, r.epochs + 1):
        n, _ = train(lr)
        steps += n
        val_loss = evaluate(val_data)
        if not best_val_loss or val_loss < best_val_loss:
            best_val_loss = val_loss
        else:
            lr /= 4.0
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "steps": steps,
            "seconds": time.perf_counter() - t0}


def canonical_on_files(directory: Path, r: Recipe, device: str = "cpu") -> dict:
    corpus = CanonicalCorpus(directory)
    out = canonical_train(corpus.train, corpus.valid, len(corpus.dictionary), r, device)
    out["vocab_size"] = len(corpus.dictionary)
    return out


# --------------------------------------------------------------------------- the harness

def harness_spec(r: Recipe, train_tokens: int) -> TrialSpec:
    """The recipe as a bptt-harness trial. The example's epoch is one pass over its batchified matrix,
    ``(N // bs - 1) * bs`` targets; the harness's ``epochs`` budget is ``epochs x (N - 1)`` for every
    shape alike, so the example's passes are given as an exact token budget instead."""
    model = ModelConfig(type="lstm", emsize=r.emsize, nhid=r.nhid, layers=r.nlayers, dropout=r.dropout)
    per_pass = (train_tokens // r.batch_size - 1) * r.batch_size
    train = TrainConfig(optimizer="sgd", lr=r.lr, clip=r.clip, tokens=r.epochs * per_pass, checkpoints=r.epochs,
                        seed=r.seed, eval_batch_size=EVAL_BATCH_SIZE, eval_bptt=r.bptt)
    return TrialSpec(bptt=r.bptt, batch_size=r.batch_size, model=model, train=train)


def harness_on_files(directory: Path, r: Recipe, device: str = "cpu") -> dict:
    corpus = load(CorpusSpec(str(directory)))
    t0 = time.perf_counter()
    res = run_trial(harness_spec(r, corpus.train.numel()), corpus, device)
    if res.status != "ok":
        raise RuntimeError(f"bptt-harness trial ended {res.status}: {res.error}")
    return {"val_loss": res.val_loss, "val_ppl": res.val_ppl, "steps": res.steps,
            "seconds": time.perf_counter() - t0, "vocab_size": corpus.vocab_size, "corpus": corpus}


def compare(directory: Path, r: Recipe, device: str = "cpu") -> dict[str, dict]:
    """Run all three on the files in ``directory``, printing each result as it comes."""

    def done(name: str, res: dict) -> dict:
        print(f"  {name}: val ppl {res['val_ppl']:.3f} after {res['steps']} steps, {res['seconds']:.0f} s",
              flush=True)
        return res

    harness = harness_on_files(directory, r, device)
    corpus = harness.pop("corpus")
    done("harness", harness)
    theirs = CanonicalCorpus(directory)
    harness["same_streams"] = all(
        [corpus.vocab[i] for i in corpus.split(s).tolist()]
        == [theirs.dictionary.idx2word[i] for i in getattr(theirs, s).tolist()] for s in SPLITS)
    harness["same_vocabulary"] = sorted(theirs.dictionary.idx2word) == sorted(corpus.vocab)
    same_ids = canonical_train(corpus.train, corpus.valid, corpus.vocab_size, r, device)
    same_ids["vocab_size"] = corpus.vocab_size
    done("canonical, harness ids", same_ids)
    canonical = done("canonical", canonical_on_files(directory, r, device))
    return {"canonical": canonical, "canonical, harness ids": same_ids, "harness": harness}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1.0, help="use only the first fraction of train")
    ap.add_argument("--seed", type=int, default=1111, help="main.py's default seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="a 2-layer 32-unit model instead of 2x200")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--dir", type=Path, default=None, help="write the corpus files here (default: a temp dir)")
    ap.add_argument("--valid-lines", type=int, default=None, help="keep only the first N lines of valid")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the three results")
    args = ap.parse_args()
    if not 0 < args.fraction <= 1:
        ap.error("--fraction must be in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = Recipe(seed=args.seed)
    if args.small:
        r = Recipe(emsize=32, nhid=32, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_corpus_files(args.dir or Path(tmp) / "corpus", args.fraction)
        if args.valid_lines:
            valid = directory / "valid.txt"
            lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)[: args.valid_lines]
            valid.write_text("".join(lines), encoding="utf-8")
        sizes = {s: sum(len(ln.split()) + 1 for ln in (directory / f"{s}.txt").open(encoding="utf-8"))
                 for s in SPLITS}
        print(f"corpus files in {directory}: " + ", ".join(f"{s} {n:,} tokens" for s, n in sizes.items()))
        print(f"recipe: {r}, eval batch size {EVAL_BATCH_SIZE}, device {args.device}, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
        results = compare(directory, r, args.device)
    width = max(map(len, results))
    for name, res in results.items():
        print(f"{name:<{width}}  val ppl {res['val_ppl']:9.3f}  val loss {res['val_loss']:.5f}  "
              f"steps {res['steps']:5d}  vocab {res['vocab_size']:6,}  {res['seconds']:7.1f} s")
    h = results["harness"]["val_ppl"]
    print(f"ratio harness / canonical:             {h / results['canonical']['val_ppl']:.4f}")
    print(f"ratio harness / canonical, harness ids: {h / results['canonical, harness ids']['val_ppl']:.6f}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
