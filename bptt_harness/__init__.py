"""bptt-harness: measure how bptt and batch size trade perplexity against time, memory and energy.

From Python::

    import bptt_harness
    paths = bptt_harness.run_study("studies/smoke.toml")    # runs (or resumes) it; paths.html is the report
    df = bptt_harness.load_results("results/smoke")          # the trials.csv frame
    spec = bptt_harness.TrialSpec(bptt=12, batch_size=16, model=bptt_harness.ModelConfig(emsize=16, nhid=32, layers=1),
                                  train=bptt_harness.TrainConfig(optimizer="adamw", lr=0.01, tokens=20_000))
    result = bptt_harness.run_trial(spec, bptt_harness.load_corpus("synthetic:k=6"))   # seconds on a CPU

Importing the package changes nothing process-wide (threads, OpenMP policy, allocator settings) and
loads no torch: the names below are imported when first used. A notebook that imports it runs exactly
as it did before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute): the public API, imported on first use.
_API = {
    "load_results": ("bptt_harness.api", "load_results"),
    "run_study": ("bptt_harness.study.sweep", "run_study"),
    "run_trial": ("bptt_harness.trainer", "run_trial"),
    "load_corpus": ("bptt_harness.corpus", "load"),
    "load_study": ("bptt_harness.config", "load_study"),
    "TrialSpec": ("bptt_harness.spec", "TrialSpec"),
    "ModelConfig": ("bptt_harness.spec", "ModelConfig"),
    "TrainConfig": ("bptt_harness.spec", "TrainConfig"),
    "RunOptions": ("bptt_harness.spec", "RunOptions"),
    "TrialObserver": ("bptt_harness.observers", "TrialObserver"),
    "HarnessError": ("bptt_harness.errors", "HarnessError"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'bptt_harness' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
