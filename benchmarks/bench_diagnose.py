"""What the diagnostics cost per model: seconds for each of the four measurements of a study's model.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_diagnose.py [--study studies/default.toml] [--threads 2]

Builds the study's model (at initialisation: the cost does not depend on the weights) and times context use,
gradient reach, truncation bias and the noise scale with the study's ``[diagnostics]`` options (the defaults
where it has none), for the study's largest bptt and each bptt's noise scale. Goal: under 15 s per model on
2 idle CPU cores for the default model. Timings on a busy machine are not valid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=Path("studies/default.toml"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from bptt_harness.config import load_study
    from bptt_harness.diagnose import bias_ladder, context_ladder, context_use, gradient_reach, noise_scale, truncation_bias
    from bptt_harness.diagnose_options import DiagnoseOptions
    from bptt_harness.model import build_model, family_of
    from bptt_harness.study import load_corpus

    torch.set_num_threads(args.threads)
    config = load_study(args.study)
    o = config.diagnostics or DiagnoseOptions()
    bptts = sorted(config.search["bptt"].grid())
    longest = max(bptts)
    corpus = load_corpus(config)
    model_cfg = config.model
    torch.manual_seed(0)
    model = build_model(model_cfg, corpus.vocab_size)
    family = family_of(model_cfg)
    split = corpus.valid
    print(f"{model_cfg.describe()} on {corpus.name}: vocabulary {corpus.vocab_size}, bptt {bptts}, "
          f"{args.threads} threads, options {o}")
    took: dict[str, float] = {}
    timings = {
        "context use": lambda: context_use(model, family, split, context_ladder(longest, o.context_factor),
                                           positions=o.positions, warm=o.warm_tokens, seed=o.seed),
        "gradient reach": lambda: gradient_reach(model, family, split, o.reach_factor * longest,
                                                 positions=o.positions, warm=o.warm_tokens, seed=o.seed),
        "truncation bias": lambda: truncation_bias(model, family, split, bias_ladder(longest, o.bias_factor * longest),
                                                   o.bias_factor * longest, columns_per_draw=o.bias_columns,
                                                   draws=o.bias_draws, warm=o.warm_tokens, seed=o.seed),
        **{f"noise scale bptt {b}": (lambda b=b: noise_scale(model, family, split, b, small=o.noise_small,
                                                             big=o.noise_big, draws=o.noise_draws, warm=o.warm_tokens,
                                                             seed=o.seed)) for b in bptts},
    }
    for name, run in timings.items():
        t0 = time.perf_counter()
        run()
        took[name] = time.perf_counter() - t0
        print(f"  {name:<22} {took[name]:7.2f} s")
    one = sum(v for n, v in took.items() if not n.startswith("noise")) + took[f"noise scale bptt {longest}"]
    print(f"one model at bptt {longest} (context use, reach, bias, noise scale): {one:.1f} s (goal: under 15 s on 2 "
          f"idle cores); all {len(bptts)} noise scales too: {sum(took.values()):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
