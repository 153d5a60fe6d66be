"""`bptt-harness trial` (probe on) against a user's own textbook loop, each in its own process, alternated.

    .venv/bin/python benchmarks/bench_trainer.py [--device cpu|cuda] [--rounds 5] [--tokens 150000]
        [--emsize 200] [--nhid 200] [--layers 2] [--max-vocab 10000] [--bptt 35] [--batch-size 20]
        [--type lstm|transformer] [--heads 2]

The textbook arm is ``benchmarks/textbook_lm.py``: the pytorch/examples ``word_language_model`` loop
(per-step ``loss.item()``, ``repackage_hidden``, ``clip_grad_norm_``, manual SGD update), importing
nothing from harness and run as a user runs a script: its own process, the environment as it is,
torch's default threads. The harness arm is the command a user would run instead,
``bptt-harness trial --json`` with the NVML or CPU probe on, also in its own process. Both train the same
model shape on the same token ids (the default corpus, exported once for the textbook script) and
report tokens/s after the same number of untimed warm-up steps. Rounds alternate the order (ABBA);
the medians give the ratio. Goal: >= 1.0x on CPU, >= 1.5x on a GPU. The harness's process keeps freed
memory for the next step (``bptt_harness/allocator.py``), as the command does for every user;
``BPTT_HARNESS_MALLOC=default`` in this script's environment measures it with glibc's defaults, like the
textbook script's.

``--type transformer`` measures the ``transformer`` family against the example's ``TransformerModel``
(``benchmarks/textbook_transformer.py``): the same width (``--emsize``), feed-forward width (``--nhid``),
layers, heads, dropout, window and batch size, both with the example's SGD update (use a small ``--lr``,
e.g. 0.5: the example's lr 20 is an LSTM's). Goal: >= 1.0x on CPU.

Measured on a 2-core Intel Xeon, torch 2.13.0+cpu, idle (2026-12-02):
``--rounds 5``: LSTM 1.083x (11,196 vs 10,333 tokens/s);
``--type transformer --heads 2 --lr 0.5 --rounds 5 --tokens 70000``: 1.073x (10,238 vs 9,542), and 0.984x
(9,159 vs 9,307) with ``BPTT_HARNESS_MALLOC=default``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTBOOK = {"lstm": "textbook_lm.py", "transformer": "textbook_transformer.py"}
WARMUP = 5  # the harness's default warmup_steps; the textbook script skips as many


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs both arms once (ABBA order)")
    ap.add_argument("--tokens", type=int, default=150_000, help="training tokens per run")
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
    ap.add_argument("--type", choices=sorted(TEXTBOOK), default="lstm", help="the model family to measure")
    ap.add_argument("--heads", type=int, default=2, help="attention heads (--type transformer)")
    args = ap.parse_args()
    steps = -(-args.tokens // (args.bptt * args.batch_size))

    import torch

    from bptt_harness.corpus import CorpusSpec, load

    corpus = load(CorpusSpec("default", lower=True, split_punct=True, max_vocab=args.max_vocab))
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "train_ids.pt"
        torch.save(corpus.train.clone(), ids)
        shape = ["--emsize", str(args.emsize), "--nhid", str(args.nhid), "--layers", str(args.layers),
                 "--dropout", str(args.dropout), "--bptt", str(args.bptt), "--batch-size", str(args.batch_size),
                 "--lr", str(args.lr), "--clip", str(args.clip), "--seed", str(args.seed), "--device", args.device]
        heads = ["--heads", str(args.heads)] if args.type == "transformer" else []
        arms = {
            "textbook": [sys.executable, str(HERE / TEXTBOOK[args.type]), "--data", str(ids),
                         "--vocab", str(corpus.vocab_size), "--steps", str(steps), "--warmup", str(WARMUP), *shape,
                         *heads],
            "harness": [sys.executable, "-m", "bptt_harness", "trial", "--corpus", "default", "--lower", "--split-punct",
                        "--max-vocab", str(args.max_vocab), "--tokens", str(steps * args.bptt * args.batch_size),
                        "--checkpoints", "1", "--json", "--type", args.type, *shape, *heads],
        }
        model = "LSTM" if args.type == "lstm" else f"Transformer ({args.heads} heads)"
        print(f"{args.layers}x{args.nhid} {model} (emsize {args.emsize}), vocab {corpus.vocab_size:,}, bptt {args.bptt}, "
              f"bs {args.batch_size}, {steps} steps ({WARMUP} untimed), device {args.device}, torch {torch.__version__}; "
              "each arm in its own process")
        speeds: dict[str, list[float]] = {name: [] for name in arms}
        losses: dict[str, float] = {}
        print(f"{'round':>5}  {'textbook tok/s':>14}  {'harness tok/s':>13}  {'ratio':>6}")
        for rnd in range(args.rounds):
            order = list(arms) if rnd % 2 == 0 else list(reversed(arms))
            this: dict[str, float] = {}
            for name in order:
                out = run_json(arms[name])
                if name == "harness":
                    if out["status"] != "ok":
                        raise RuntimeError(f"bptt-harness trial ended {out['status']}: {out['error']}")
                    losses[name] = out["train_curve"][-1]["loss"]
                else:
                    losses[name] = out["loss"]
                this[name] = out["tokens_per_s"]
                speeds[name].append(out["tokens_per_s"])
            print(f"{rnd + 1:>5}  {this['textbook']:>14,.0f}  {this['harness']:>13,.0f}  "
                  f"{this['harness'] / this['textbook']:>5.3f}x", flush=True)
    med = {name: statistics.median(v) for name, v in speeds.items()}
    print(f"{'median':>5}  {med['textbook']:>14,.0f}  {med['harness']:>13,.0f}  {med['harness'] / med['textbook']:>5.3f}x")
    print(f"bptt-harness trial (probe on) / textbook script, tokens/s (median of {args.rounds} rounds): "
          f"{med['harness'] / med['textbook']:.3f}x")
    print(f"train loss near the end: textbook {losses['textbook']:.4f}, harness {losses['harness']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
