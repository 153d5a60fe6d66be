"""What the probe costs: the same CPU trial with and without it, alternated in one process.

    .venv/bin/python benchmarks/bench_probe.py [--repeats 6] [--tokens 120000] [--interval-ms 50]

Prints tokens/s of each run, the median of each arm and their ratio (goal: the probe costs < 1%),
the process CPU time per 1k tokens of each arm (less sensitive than wall time to other programs on
a shared machine; it includes the sampler thread's own work), and the probe's own time per sample,
which bounds its cost without run-to-run noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bptt_harness.corpus import load
from bptt_harness.model import ModelConfig
from bptt_harness.probe import make_probe
from bptt_harness.trainer import TrainConfig, TrialSpec, run_trial


def sample_cost_us(interval_ms: int, n: int = 2000) -> float:
    """Mean wall time of one sample() call of the probe's source, in microseconds."""
    probe = make_probe("cpu", interval_ms)
    probe.source.start()
    t0 = time.perf_counter()
    for _ in range(n):
        probe.source.sample()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6, help="pairs of (without, with) runs")
    ap.add_argument("--tokens", type=int, default=120_000, help="training tokens per trial")
    ap.add_argument("--interval-ms", type=int, default=50)
    ap.add_argument("--corpus", default="synthetic:k=8,tokens=200000")
    # One intra-op thread: on a small shared machine two OpenMP threads make step times swing
    # by orders of magnitude, which would drown a 1% effect.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = load(args.corpus)
    spec = TrialSpec(bptt=35, batch_size=20, model=ModelConfig(emsize=128, nhid=128, layers=2, dropout=0.0),
                     train=TrainConfig(tokens=args.tokens, checkpoints=1, lr=1.0, warmup_steps=5))
    print(f"trial: 2x128 LSTM on {corpus.name}, bptt 35, bs 20, {args.tokens:,} tokens, "
          f"torch threads {torch.get_num_threads()}, probe interval {args.interval_ms} ms")
    run_trial(spec, corpus, "cpu")  # warm-up: allocator, kernels, page cache

    speeds: dict[str, list[float]] = {"without": [], "with": []}
    cpu_per_ktok: dict[str, list[float]] = {"without": [], "with": []}
    samples = []
    for i in range(args.repeats):
        # Alternate the order within each pair so a drift in machine speed hits both arms alike.
        order = ("without", "with") if i % 2 == 0 else ("with", "without")
        for arm in order:
            probe = make_probe("cpu", args.interval_ms) if arm == "with" else None
            cpu0 = time.process_time()
            r = run_trial(spec, corpus, "cpu", probe=probe)
            cpu_per_ktok[arm].append((time.process_time() - cpu0) / r.train_tokens * 1000)
            if r.status != "ok" or r.tokens_per_s is None:
                print(f"trial failed: {r.status} {r.error}", file=sys.stderr)
                return 1
            speeds[arm].append(r.tokens_per_s)
            if probe is not None:
                samples.append(r.probe.samples / r.probe.duration_s)
            print(f"  pair {i + 1} {arm:<7} {r.tokens_per_s:>10,.0f} tokens/s  train {r.train_s:.2f} s  "
                  f"cpu {cpu_per_ktok[arm][-1] * 1000:.2f} ms/1k tokens")

    med = {arm: statistics.median(v) for arm, v in speeds.items()}
    pair_ratios = [w / wo for w, wo in zip(speeds["with"], speeds["without"])]
    cost = sample_cost_us(args.interval_ms)
    rate = statistics.median(samples)
    print(f"without probe  median {med['without']:>10,.0f} tokens/s")
    print(f"with probe     median {med['with']:>10,.0f} tokens/s")
    print(f"ratio with/without: {med['with'] / med['without']:.4f} (medians), "
          f"{statistics.median(pair_ratios):.4f} (median of pairs); probe cost "
          f"{(1 - med['with'] / med['without']) * 100:+.2f}%")
    cpu = {arm: statistics.median(v) for arm, v in cpu_per_ktok.items()}
    print(f"cpu time per 1k tokens: without {cpu['without'] * 1000:.3f} ms, with {cpu['with'] * 1000:.3f} ms, "
          f"ratio {cpu['with'] / cpu['without']:.4f}")
    # Other programs only ever slow a run down, so each arm's fastest run is its least disturbed one.
    best = {arm: max(v) for arm, v in speeds.items()}
    print(f"best run: without {best['without']:,.0f}, with {best['with']:,.0f} tokens/s, "
          f"ratio {best['with'] / best['without']:.4f}")
    print(f"pair ratios range {min(pair_ratios):.3f} .. {max(pair_ratios):.3f} (the machine's noise)")
    print(f"one sample costs {cost:.1f} us; at {rate:.1f} samples/s that is "
          f"{cost * rate / 1e4:.3f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
