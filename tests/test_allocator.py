"""The C allocator of bptt-harness's own processes (:mod:`bptt_harness.allocator`).

Known answer: large blocks allocated, written and freed step after step take every page in again with
glibc's defaults and none once it keeps freed memory (page faults counted by the kernel, not timed). The environment's
own settings win, and the library never changes the allocator of the process that imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bptt_harness
from bptt_harness import allocator
from bptt_harness.errors import HarnessError
from bptt_harness.hardware import fingerprint

needs_glibc = pytest.mark.skipif(not allocator.glibc_available(), reason="the C library is not glibc")

# A step's large buffers (the logits and their gradient), as the C library sees them: three 24 MiB blocks
# written, freed, and taken again the next step. With glibc's defaults the freed top of the heap (72 MiB) is
# over the trim threshold, so each step faults 3 x 24 MiB / 4 KiB = 18,432 pages in again; kept, none.
STEP_FAULTS = textwrap.dedent("""
    import ctypes, json, resource, sys
    from bptt_harness import allocator
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # Transparent huge pages off for this process (PR_SET_THP_DISABLE): where the kernel's setting is
    # "always", a 2 MiB page is one fault, and the count would say more about the kernel than the heap.
    libc.prctl(41, 1, 0, 0, 0)
    asked = allocator.keep_freed_memory() if sys.argv[1] == "keep" else allocator.setting()
    SIZE = 24 * 2**20
    def step():
        blocks = [libc.malloc(SIZE) for _ in range(3)]
        for b in blocks:
            libc.memset(b, 1, SIZE)
        for b in blocks:
            libc.free(b)
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(json.dumps({"setting": asked, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
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
    pages = 3 * 24 * 2**20 // 4096
    assert default["faults"] >= 0.95 * pages   # the defaults give the blocks back and fault them in again
    assert kept["faults"] <= 0.01 * pages      # measured: 0


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


def test_another_opt_out_value_is_one_error_line_naming_the_one_allowed() -> None:
    with pytest.raises(HarnessError, match=r"BPTT_HARNESS_MALLOC='off': the only value is 'default'"):
        allocator.left_alone({allocator.OPT_OUT_ENV: "off"})
    out = subprocess.run([sys.executable, "-m", "bptt_harness", "doctor"], capture_output=True, text=True,
                         env=_clean_env(**{allocator.OPT_OUT_ENV: "off"}))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: BPTT_HARNESS_MALLOC='off': the only value is 'default' (glibc's own settings); unset it to keep "
        "freed memory for the next step"]


def test_only_the_command_entry_point_changes_the_allocator() -> None:
    """The library leaves process-wide state as it found it: mallopt lives in allocator.py, and only the
    entry point of the command's own processes calls it."""
    package = Path(bptt_harness.__file__).parent
    sources = {p.relative_to(package).as_posix(): p.read_text(encoding="utf-8") for p in package.rglob("*.py")}
    assert [name for name, text in sources.items() if "mallopt" in text] == ["allocator.py"]
    callers = sorted(name for name, text in sources.items() if "keep_freed_memory()" in text and name != "allocator.py")
    assert callers == ["cli.py"]
    assert "allocator.keep_freed_memory()" in sources["cli.py"].split("def entry")[1].split("def main")[0]


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
