"""The C allocator of bptt-harness's own processes (:mod:`bptt_harness.allocator`).

Known answer: an LM step's logits and their gradient, allocated and freed step after step, take fewer
page faults a step once glibc keeps freed memory (counted by the kernel, not timed). The environment's
own settings win, and the library never changes the allocator of the process that imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bptt_harness import allocator
from bptt_harness.hardware import fingerprint

needs_glibc = pytest.mark.skipif(not allocator.glibc_available(), reason="the C library is not glibc")

STEP_FAULTS = textwrap.dedent("""
    import json, resource, sys, torch, torch.nn.functional as F
    from bptt_harness import allocator
    asked = allocator.keep_freed_memory() if sys.argv[1] == "keep" else allocator.setting()
    torch.manual_seed(0)
    h = torch.randn(700, 200)
    w = torch.randn(10000, 200, requires_grad=True)   # 28 MB of logits a step, as bptt 35 x bs 20
    y = torch.randint(0, 10000, (700,))
    def step():
        F.cross_entropy(h @ w.t(), y).backward()
        w.grad = None
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print(json.dumps({"setting": asked, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20}))
""")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", allocator.OPT_OUT_ENV) and not k.startswith("MALLOC_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True,
                         env=_clean_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_kept_memory_takes_fewer_page_faults_a_step_than_glibcs_defaults() -> None:
    kept, default = _faults("keep"), _faults("default")
    assert kept["setting"] == "kept" and default["setting"] == "default"
    assert default["faults"] > 500   # the defaults give the buffers back and fault them in again
    assert kept["faults"] < 0.75 * default["faults"]


@pytest.mark.parametrize(("environ", "said"), [
    ({allocator.OPT_OUT_ENV: "default"}, "default (BPTT_HARNESS_MALLOC=default)"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD libjemalloc.so.2"),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.trim_threshold=0"},
     "set by the environment (glibc.malloc.trim_threshold=0)"),
    ({"MALLOC_ARENA_MAX": "2"}, "set by the environment (MALLOC_ARENA_MAX)"),
])
def test_the_environments_own_allocator_settings_are_left_alone_and_named(environ: dict, said: str) -> None:
    assert allocator.left_alone(environ) == said
    assert allocator.left_alone({"GLIBC_TUNABLES": "glibc.rtld.nns=2", "LD_PRELOAD": "libfoo.so"}) is None


@needs_glibc
def test_the_command_keeps_freed_memory_records_it_and_the_opt_out_works() -> None:
    def doctor(**extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "bptt_harness", "doctor", "--json", "--device", "cpu"],
                             capture_output=True, text=True, check=True, env=_clean_env(**extra))
        return json.loads(out.stdout)["fingerprint"]["malloc"]

    assert doctor() == "kept"
    assert doctor(**{allocator.OPT_OUT_ENV: "default"}) == "default (BPTT_HARNESS_MALLOC=default)"


def test_importing_and_calling_the_library_leaves_this_process_allocator_alone() -> None:
    """The test process never ran the command's entry point: its fingerprint says glibc's defaults (or the
    environment's settings), not ``kept``."""
    assert fingerprint("cpu")["malloc"] != "kept"
