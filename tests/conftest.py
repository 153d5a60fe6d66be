"""Shared test fixtures. Keep this small: add fixtures here only when several test modules need them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One BLAS/OpenMP thread per process: on a 2-core machine shared with other jobs, torch's spinning
# worker threads turn millisecond steps into seconds. Set before torch is imported, and inherited by
# the sweeps and workers the tests start as subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def corpus_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the corpus cache (``bptt_harness.corpus.cache_dir``) at a fresh temporary directory.

    Tests never write into the home directory, and each test starts with an empty cache. The
    directory is not created here, so a test can check that nothing was written to it.
    """
    path = tmp_path_factory.mktemp("cache") / "corpus-cache"
    monkeypatch.setenv("BPTT_HARNESS_CACHE", str(path))
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one intra-op thread, and a shared 2-core machine swings less."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def syn() -> Any:
    """A small synthetic corpus with a small validation split: cheap trials."""
    from bptt_harness.corpus import load

    return load("synthetic:k=4,vocab=8,noise=4,tokens=20000")


@pytest.fixture(autouse=True)
def no_storage_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``BPTT_HARNESS_STORAGE`` in the developer's shell would redirect every sweep a test starts."""
    monkeypatch.delenv("BPTT_HARNESS_STORAGE", raising=False)


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``studies/smoke.toml`` swept once, report included: ``results/smoke`` of a finished study, for the
    tests that read one (they must not write into it)."""
    from bptt_harness.cli import main

    root = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BPTT_HARNESS_CACHE", str(root / "cache"))
        mp.delenv("BPTT_HARNESS_STORAGE", raising=False)
        study = Path(__file__).resolve().parents[1] / "studies" / "smoke.toml"
        assert main(["sweep", str(study), "--results-dir", str(root / "results")]) == 0
    return root / "results" / "smoke"
