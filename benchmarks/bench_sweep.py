"""Full grid vs TPE + median pruning with a third of the grid's trials, on a smoke-sized grid.

Both studies use the same corpus, model, budget and seeds; prints the best validation perplexity
each found and the compute each spent (training tokens and training seconds, summed over trials).

    .venv/bin/python benchmarks/bench_sweep.py [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import optuna
import torch

from bptt_harness.config import parse_study
from bptt_harness.study import prepare, run_worker

REPO = Path(__file__).resolve().parent.parent


def run(raw: dict, results: Path) -> dict:
    config = parse_study(raw, results_root=results)
    url = f"sqlite:///{results / config.name / 'study.db'}"
    study, corpus, device = prepare(config, url, "cpu")
    t0 = time.perf_counter()
    run_worker(study, config, corpus, device, config.n_trials())
    wall = time.perf_counter() - t0
    recs = [t.user_attrs["record"] for t in study.get_trials() if "record" in t.user_attrs]
    ok = [r for r in recs if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["result"]["val_ppl"])
    return {"study": config.name, "trials": len(recs), "pruned": sum(r["status"] == "pruned" for r in recs),
            "best_ppl": best["result"]["val_ppl"], "best": best["config_key"],
            "tokens": sum(r["result"].get("train_tokens") or 0 for r in recs),
            "train_s": sum(r["result"].get("train_s") or 0 for r in recs), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.basicConfig(level=logging.ERROR)

    base = tomllib.loads((REPO / "studies" / "smoke.toml").read_text())
    base["search"] = {"bptt": [2, 4, 8, 12, 16], "batch_size": [4, 8, 16]}
    base["objectives"] = ["val_ppl"]
    base["train"]["checkpoints"] = 4
    grid = copy.deepcopy(base) | {"name": "bench-grid", "sampler": "grid"}
    n_grid = parse_study(grid).n_trials()
    tpe = copy.deepcopy(base) | {"name": "bench-tpe", "sampler": "tpe", "pruner": "median", "trials": n_grid // 3}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(grid, Path(tmp)), run(tpe, Path(tmp))]
    print(f"{'study':<11} {'trials':>6} {'pruned':>6} {'best ppl':>9}  {'best config':<22} {'train tokens':>12} "
          f"{'train s':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['study']:<11} {r['trials']:>6} {r['pruned']:>6} {r['best_ppl']:>9.4f}  {r['best']:<22} "
              f"{r['tokens']:>12,} {r['train_s']:>8.1f} {r['wall_s']:>7.1f}")
    g, t = rows
    print(f"\nTPE+pruning used {t['tokens'] / g['tokens']:.2f}x the grid's training tokens and "
          f"{t['train_s'] / g['train_s']:.2f}x its training time; best ppl ratio (tpe / grid) "
          f"{t['best_ppl'] / g['best_ppl']:.4f}")


if __name__ == "__main__":
    main()
