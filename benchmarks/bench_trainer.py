"""Harness trial vs the textbook truncated-BPTT loop: same model, data and steps, alternated in one process.

    .venv/bin/python benchmarks/bench_trainer.py [--device cpu|cuda] [--rounds 4] [--steps 60]
        [--emsize 200] [--nhid 200] [--layers 2] [--max-vocab 10000] [--bptt 35] [--batch-size 20]

The textbook arm is the pytorch/examples ``word_language_model`` loop written out here: per-step
``loss.item()``, ``repackage_hidden``, ``clip_grad_norm_(0.25)`` and the manual SGD update
``p.data.add_(p.grad, alpha=-lr)``, on :class:`harness.model.RNNModel`. The harness arm is
:func:`harness.trainer.run_trial` with the same model, seed, data, learning rate, clip and number
of steps (one checkpoint at the end). Each arm is timed over its steps after the first
``--warmup`` with a device synchronisation at both ends; the harness's evaluation is not counted
(it reports its own ``tokens_per_s`` the same way). Rounds alternate the order (ABBA), and the
medians of the rounds give the ratio. Goal: >= 1.0x on CPU, >= 1.5x on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness as _omp_policy  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.batching import batchify  # noqa: E402
from harness.corpus import Corpus, CorpusSpec, load  # noqa: E402
from harness.model import ModelConfig, RNNModel  # noqa: E402
from harness.trainer import TrainConfig, TrialSpec, resolve_device, run_trial  # noqa: E402


LOG_EVERY = 25  # the harness's default: device-side accumulators are read every 25 steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def textbook(corpus: Corpus, cfg: ModelConfig, bptt: int, bs: int, steps: int, warmup: int, lr: float,
             clip: float, seed: int, device: torch.device) -> dict:
    """The canonical example's train(): per-step loss.item(), manual SGD. -> tokens/s after warm-up."""
    torch.manual_seed(seed)
    train_data = batchify(corpus.train, bs).to(device)
    model = RNNModel(cfg, corpus.vocab_size).to(device)
    model.train()
    total_loss = 0.0
    losses: list[float] = []
    hidden = model.init_hidden(bs)
    t0, tokens = None, 0
    for step, i in enumerate(range(0, train_data.size(0) - 1, bptt)):
        if step == steps:
            break
        if step == warmup:
            sync(device)
            t0, tokens = time.perf_counter(), 0
        seq_len = min(bptt, len(train_data) - 1 - i)
        data, targets = train_data[i:i + seq_len], train_data[i + 1:i + 1 + seq_len].view(-1)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = F.cross_entropy(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        step_loss = loss.item()  # the textbook loop's per-step host sync
        total_loss += step_loss
        losses.append(step_loss)
        tokens += targets.numel()
    sync(device)
    seconds = time.perf_counter() - t0
    last = losses[(steps - 1) // LOG_EVERY * LOG_EVERY:]  # the harness's last logged interval
    return {"tokens_per_s": tokens / seconds, "loss": sum(last) / len(last)}


def harness(corpus: Corpus, cfg: ModelConfig, bptt: int, bs: int, steps: int, warmup: int, lr: float,
            clip: float, seed: int, device: torch.device) -> dict:
    train = TrainConfig(optimizer="sgd", lr=lr, clip=clip, tokens=steps * bptt * bs, checkpoints=1, seed=seed,
                        warmup_steps=warmup, log_every=LOG_EVERY)
    r = run_trial(TrialSpec(bptt=bptt, batch_size=bs, model=cfg, train=train), corpus, device)
    if r.status != "ok" or r.steps != steps:
        raise RuntimeError(f"harness trial ended {r.status} after {r.steps} steps: {r.error}")
    return {"tokens_per_s": r.tokens_per_s, "loss": r.train_curve[-1]["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each runs both arms once (ABBA order)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    ap.add_argument("--emsize", type=int, default=200)
    ap.add_argument("--nhid", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--max-vocab", type=int, default=10_000, help="vocabulary of the default corpus")
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=1111)
    # One intra-op thread on CPU by default: on a small shared machine two OpenMP threads make step
    # times swing far more than the difference being measured.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.warmup >= args.steps:
        ap.error("--warmup must be smaller than --steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    corpus = load(CorpusSpec("default", lower=True, split_punct=True, max_vocab=args.max_vocab))
    cfg = ModelConfig(type="lstm", emsize=args.emsize, nhid=args.nhid, layers=args.layers, dropout=args.dropout)
    what = (f"{cfg.layers}x{cfg.nhid} LSTM (emsize {cfg.emsize}), vocab {corpus.vocab_size:,}, bptt {args.bptt}, "
            f"bs {args.batch_size}, {args.steps} steps ({args.warmup} untimed), SGD lr {args.lr:g}, clip {args.clip:g}")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"{what}\ndevice {device}{gpu}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    arms = {"textbook": textbook, "harness": harness}
    run_args = (corpus, cfg, args.bptt, args.batch_size, args.steps, args.warmup, args.lr, args.clip, args.seed,
                device)
    for fn in arms.values():  # warm-up run of each: allocator, kernels, page cache
        fn(corpus, cfg, args.bptt, args.batch_size, args.warmup + 2, args.warmup, args.lr, args.clip, args.seed,
           device)
    speeds: dict[str, list[float]] = {name: [] for name in arms}
    losses: dict[str, float] = {}
    print(f"{'round':>5}  {'textbook tok/s':>14}  {'harness tok/s':>13}  {'ratio':>6}")
    for rnd in range(args.rounds):
        order = list(arms) if rnd % 2 == 0 else list(reversed(arms))
        this: dict[str, float] = {}
        for name in order:
            out = arms[name](*run_args)
            this[name] = out["tokens_per_s"]
            losses[name] = out["loss"]
            speeds[name].append(out["tokens_per_s"])
        print(f"{rnd + 1:>5}  {this['textbook']:>14,.0f}  {this['harness']:>13,.0f}  "
              f"{this['harness'] / this['textbook']:>5.3f}x")
    med = {name: statistics.median(v) for name, v in speeds.items()}
    print(f"{'median':>5}  {med['textbook']:>14,.0f}  {med['harness']:>13,.0f}  "
          f"{med['harness'] / med['textbook']:>5.3f}x")
    print(f"harness / textbook tokens/s (median of {args.rounds} rounds): {med['harness'] / med['textbook']:.3f}x")
    print(f"train loss over the last {LOG_EVERY}-step interval: textbook {losses['textbook']:.6f}, "
          f"harness {losses['harness']:.6f} (same seed, model and data: the same computation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
