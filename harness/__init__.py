"""bptt-harness: measure how bptt and batch size trade perplexity against time, memory and energy.

From Python::

    import harness
    paths = harness.run_study("studies/smoke.toml")    # runs (or resumes) it; paths.html is the report
    df = harness.load_results("results/smoke")          # the trials.csv frame
    result = harness.run_trial(harness.TrialSpec(bptt=35, batch_size=20), harness.load_corpus("default"))

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
    "load_results": ("harness.api", "load_results"),
    "run_study": ("harness.api", "run_study"),
    "run_trial": ("harness.trainer", "run_trial"),
    "load_corpus": ("harness.corpus", "load"),
    "load_study": ("harness.config", "load_study"),
    "TrialSpec": ("harness.spec", "TrialSpec"),
    "ModelConfig": ("harness.spec", "ModelConfig"),
    "TrainConfig": ("harness.spec", "TrainConfig"),
    "HarnessError": ("harness.errors", "HarnessError"),
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
