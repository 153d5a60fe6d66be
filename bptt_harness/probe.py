"""Telemetry around the training part of a trial: peak memory, power, energy, CPU time.

A :class:`Probe` is a context manager around training. Inside it :meth:`Probe.phase` marks the
checkpoint validations, so training's energy, memory and time never include them: validation gets
its own figures. Each phase change closes a *segment*: the energy counter, CPU time, torch's
allocator peaks and the kernel's resident-set peak are read at both ends, and peaks are reset for the
next segment. A background thread samples what has no counter (NVML power, utilisation, device
memory) every ``interval_ms``. Two sources exist:

* :class:`NvmlSource` (NVIDIA, ``pynvml`` from nvidia-ml-py): device and per-process memory, power,
  utilisation, SM clock, temperature, and the total-energy counter;
* :class:`CpuSource`: the process's peak resident set from the kernel (``VmHWM``, reset through
  ``/proc/self/clear_refs``) and Linux RAPL energy where readable. It needs no sampling thread, so
  on CPU the probe costs nothing while training runs (a thread that wakes every 50 ms competes with
  torch's OpenMP threads for the cores).

Nothing is invented: a number the source cannot read is ``None`` in the :class:`ProbeReport`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import psutil
import torch

from bptt_harness.errors import HarnessError
from bptt_harness.record import ProbeReport

log = logging.getLogger(__name__)

MIB = 2**20
# RAPL counters wrap (at ~262 kJ on most CPUs, ~45 min at 100 W): read them this often at least.
RAPL_INTERVAL_MS = 10_000


@dataclass(frozen=True)
class Sample:
    """One reading. ``None`` means the source could not read that quantity."""

    mem_used_mib: float | None = None        # device memory used (NVML)
    mem_process_mib: float | None = None     # this process's device memory (or device-level, see below)
    process_mem_source: str | None = None    # "process" (PID found) | "device" (PID not visible)
    power_w: float | None = None
    util_pct: float | None = None
    sm_clock_mhz: float | None = None
    temp_c: float | None = None
    rss_mib: float | None = None             # resident memory of this process


class Source(Protocol):
    """What the probe reads. ``sample`` runs in the sampler thread; the rest in the caller's."""

    kind: str                   # the report's probe_kind
    energy_kind: str | None     # what energy_mj() reads ("counter", "rapl") or None

    def start(self) -> None: ...
    def sample(self) -> Sample | None: ...
    def energy_mj(self) -> float | None: ...   # a cumulative counter; only differences mean anything
    def stop(self) -> None: ...
    def thread_interval_ms(self, requested: int) -> int | None: ...  # None: no sampler thread needed
    def rss_mib(self) -> float | None: ...            # resident set now
    def reset_rss_peak(self) -> bool: ...             # False: the kernel peak cannot be reset here
    def rss_peak_mib(self) -> float | None: ...       # kernel peak since the last reset


# --------------------------------------------------------------------------- aggregation

_PEAKS = ("mem_used_mib", "mem_process_mib", "power_w", "temp_c", "rss_mib")
_MEANS = ("power_w", "util_pct", "sm_clock_mhz")


@dataclass
class Stats:
    """Running peaks and sums: a long trial keeps no list of samples."""

    n: int = 0
    first: Sample | None = None
    peak: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    process_sources: set[str] = field(default_factory=set)

    def add(self, s: Sample) -> None:
        self.n += 1
        if self.first is None:
            self.first = s
        for name in _PEAKS:
            v = getattr(s, name)
            if v is not None:
                self.peak[name] = max(v, self.peak.get(name, v))
        for name in _MEANS:
            v = getattr(s, name)
            if v is not None:
                self.total[name] = self.total.get(name, 0.0) + v
                self.count[name] = self.count.get(name, 0) + 1
        if s.process_mem_source:
            self.process_sources.add(s.process_mem_source)

    def mean(self, name: str) -> float | None:
        return self.total[name] / self.count[name] if self.count.get(name) else None


def energy_estimate(e0_mj: float | None, e1_mj: float | None, counter_kind: str | None,
                    mean_power_w: float | None, duration_s: float | None) -> tuple[float | None, str | None]:
    """(joules, how they were obtained). A counter that moved wins; a counter that did not move in a
    short window (or none at all) gives way to sampled mean power x duration (evenly spaced samples,
    so this is the rectangle-rule integral); otherwise nothing is known."""
    if e0_mj is not None and e1_mj is not None and e1_mj > e0_mj:
        return (e1_mj - e0_mj) / 1000.0, counter_kind
    if mean_power_w is not None and duration_s:
        return mean_power_w * duration_s, "power-integral"
    return None, None


@dataclass
class Phase:
    """What one phase (training, validation, or another measurement named by the trainer's observers)
    accumulated over its segments."""

    duration_s: float = 0.0
    cpu_time_s: float = 0.0
    energy_mj: float | None = None   # sum of the counter's moves; None when it never could be read
    stats: Stats = field(default_factory=Stats)
    torch_alloc_mib: float | None = None
    torch_reserved_mib: float | None = None
    rss_peak_mib: float | None = None

    def fold_peak(self, name: str, value: float | None) -> None:
        if value is not None:
            old = getattr(self, name)
            setattr(self, name, value if old is None else max(old, value))

    def energy(self, counter_kind: str | None) -> tuple[float | None, str | None]:
        moved = self.energy_mj if self.energy_mj else None
        return energy_estimate(0.0 if moved else None, moved, counter_kind, self.stats.mean("power_w"),
                               self.duration_s)


@dataclass(frozen=True)
class PhaseCost:
    """What one phase outside training cost: seconds, energy (J) and peak memory (MiB; None where not
    measured). Validation is phase ``eval``; other measurements name their own."""

    seconds: float
    energy_j: float | None
    peak_mem_mib: float | None


# --------------------------------------------------------------------------- the probe

class Probe:
    """Context manager measuring one trial's training; :meth:`phase` marks validation inside it.

    Exceptions inside the window propagate; the thread is stopped and what was measured up to then
    stays available through :meth:`report`.
    """

    def __init__(self, source: Source, device: torch.device | str | None = None, interval_ms: int = 50,
                 fallback_reason: str | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if not isinstance(interval_ms, int) or isinstance(interval_ms, bool) or interval_ms < 1:
            raise HarnessError(f"probe interval_ms={interval_ms!r} must be an integer >= 1")
        self.source = source
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval_ms = interval_ms
        self.fallback_reason = fallback_reason
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._trial_rss: float | None = None
        self._reset()

    @property
    def kind(self) -> str:
        return self.source.kind

    def _reset(self) -> None:
        self._phases: dict[str, Phase] = {"train": Phase(), "eval": Phase()}
        self._current = "train"
        self._seg: tuple[float, float, float | None] | None = None   # (clock, cpu time, energy counter)
        self._open = False
        self._thread_ms: int | None = None
        self._rss_resettable = False
        self._start_rss: float | None = None
        self._errors = 0

    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def read(self) -> Sample | None:
        """One live reading outside any window (``bptt-harness doctor``)."""
        self.source.start()
        try:
            return self.source.sample()
        finally:
            self.source.stop()

    def mark_trial_start(self) -> None:
        """Call before the trial builds anything: CPU memory is counted from here, so what an earlier
        trial left in the process (or freed memory the allocator kept) is not this trial's."""
        self._trial_rss = self._optional("rss_mib")

    def _optional(self, name: str, *args: Any) -> Any:
        """A reading that a source may not offer (older or third-party sources): None if it does not."""
        fn = getattr(self.source, name, None)
        return _quiet(lambda: fn(*args)) if fn is not None else None

    def __enter__(self) -> Probe:
        if self._open:
            raise RuntimeError("probe window is already open")
        self._reset()
        self._open = True
        self.source.start()
        self._start_rss = self._optional("rss_mib")
        self._open_segment()
        self._take()  # at once, so the window's idle memory is known and short windows have a sample
        if self._start_rss is None:  # a source that only samples: its first reading is the start
            first = self._phases["train"].stats.first
            self._start_rss = first.rss_mib if first else None
        if self._trial_rss is None:
            self._trial_rss = self._start_rss
        wanted = getattr(self.source, "thread_interval_ms", None)
        self._thread_ms = wanted(self.interval_ms) if wanted is not None else self.interval_ms
        if self._thread_ms is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="harness-probe", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join()
        try:
            self._take()  # the end state: a caching allocator's reserved memory peaks here
            self._close_segment()
        finally:
            self._open = False
            self.source.stop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the code inside as ``name`` (``"eval"``: validation; a diagnostic: its own name) instead
        of training; :meth:`phase_cost` reads it back."""
        if not isinstance(name, str) or not name or name == "train":
            raise ValueError(f"probe phase {name!r} must be a name other than 'train', e.g. 'eval'")
        if not self._open:
            yield
            return
        self._phases.setdefault(name, Phase())
        previous = self._current
        self._switch(name)
        try:
            yield
        finally:
            self._switch(previous)

    def _switch(self, name: str) -> None:
        self._take()
        self._close_segment()
        with self._lock:
            self._current = name
        self._open_segment()

    def _open_segment(self) -> None:
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss_resettable = bool(self._optional("reset_rss_peak"))
        self._seg = (self._clock(), time.process_time(), self._read_energy())

    def _close_segment(self) -> None:
        if self._seg is None:
            return
        t0, cpu0, e0 = self._seg
        self._seg = None
        e1 = self._read_energy()
        ph = self._phases[self._current]
        ph.duration_s += self._clock() - t0
        ph.cpu_time_s += time.process_time() - cpu0
        if e0 is not None and e1 is not None:
            ph.energy_mj = (ph.energy_mj or 0.0) + max(0.0, e1 - e0)
        if self._rss_resettable:
            ph.fold_peak("rss_peak_mib", self._optional("rss_peak_mib"))
        if self._cuda():
            alloc, reserved = self._read_torch_peaks() or (None, None)
            ph.fold_peak("torch_alloc_mib", alloc)
            ph.fold_peak("torch_reserved_mib", reserved)

    def _run(self) -> None:
        interval = (self._thread_ms or self.interval_ms) / 1000.0
        while not self._stop.wait(interval):
            self._take()

    def _take(self) -> None:
        try:
            s = self.source.sample()
        except Exception as e:  # noqa: BLE001 - a flaky reading must not end the trial
            self._errors += 1
            if self._errors == 1:
                log.warning("probe %s: sample failed (%s); later failures are not logged", self.kind, e)
            return
        if s is not None:
            with self._lock:
                self._phases[self._current].stats.add(s)

    def _read_torch_peaks(self) -> tuple[float, float] | None:
        try:
            return (torch.cuda.max_memory_allocated(self.device) / MIB,
                    torch.cuda.max_memory_reserved(self.device) / MIB)
        except Exception as e:  # noqa: BLE001 - a broken context must not hide the trial's own error
            log.warning("probe: torch CUDA memory peaks could not be read (%s)", e)
            return None

    def _read_energy(self) -> float | None:
        try:
            return self.source.energy_mj()
        except Exception as e:  # noqa: BLE001
            log.warning("probe %s: energy counter read failed (%s)", self.kind, e)
            return None

    def _peak_mem(self, ph: Phase) -> float | None:
        """The phase's peak memory: torch's reservation on CUDA; on CPU the resident-set peak above the
        trial's start (the kernel's peak where it can be reset, else the sampled one)."""
        if self.device.type == "cuda":
            return ph.torch_reserved_mib
        peak = ph.rss_peak_mib if ph.rss_peak_mib is not None else ph.stats.peak.get("rss_mib")
        if peak is None or self._trial_rss is None:
            return None
        return max(0.0, peak - self._trial_rss)

    def phase_cost(self, name: str) -> PhaseCost | None:
        """What phase ``name`` cost inside the window (seconds, energy, peak memory), or None if it never ran."""
        with self._lock:
            ph = self._phases.get(name)
        if ph is None or not ph.duration_s:
            return None
        energy_j, _ = ph.energy(self.source.energy_kind)
        return PhaseCost(ph.duration_s, energy_j, self._peak_mem(ph))

    def report(self) -> ProbeReport:
        """What was measured; ``None`` where nothing was."""
        with self._lock:
            train = self._phases["train"]
            st = train.stats
            peak, first, n = dict(st.peak), st.first, st.n
            means = {k: st.mean(k) for k in _MEANS}
            sources = set(st.process_sources)
        opened = self._start_rss is not None or n > 0
        duration = train.duration_s if opened else None
        cpu_time = train.cpu_time_s if opened else None
        energy_j, energy_source = train.energy(self.source.energy_kind) if opened else (None, None)
        ev = self.phase_cost("eval") or PhaseCost(0.0, None, None)
        mean_power = means["power_w"]
        if mean_power is None and energy_j is not None and duration:
            mean_power = energy_j / duration  # RAPL: a counter and no power readings
        rss_peak = train.rss_peak_mib if train.rss_peak_mib is not None else peak.get("rss_mib")
        return ProbeReport(
            probe_kind=self.kind,
            probe_fallback_reason=self.fallback_reason,
            interval_ms=self._thread_ms,
            samples=n,
            duration_s=duration,
            peak_mem_mib=self._peak_mem(train),
            peak_mem_torch_mib=train.torch_alloc_mib,
            peak_mem_torch_reserved_mib=train.torch_reserved_mib,
            peak_mem_nvml_mib=peak.get("mem_used_mib"),
            peak_mem_nvml_process_mib=peak.get("mem_process_mib"),
            nvml_process_mem_source=("device" if "device" in sources else "process") if sources else None,
            idle_mem_nvml_mib=first.mem_used_mib if first else None,
            peak_rss_mib=rss_peak,
            rss_start_mib=self._trial_rss,
            energy_j=energy_j,
            energy_source=energy_source,
            mean_power_w=mean_power,
            max_power_w=peak.get("power_w"),
            mean_util_pct=means["util_pct"],
            mean_sm_clock_mhz=means["sm_clock_mhz"],
            max_temp_c=peak.get("temp_c"),
            cpu_time_s=cpu_time,
            # Percent of one core, as top and psutil count it (several threads can exceed 100).
            cpu_util_pct=100.0 * cpu_time / duration if cpu_time is not None and duration else None,
            eval_s=ev.seconds or None,
            eval_energy_j=ev.energy_j,
            eval_peak_mem_mib=ev.peak_mem_mib,
        )


def _quiet(fn: Callable[[], Any]) -> Any:
    """A reading that may be unsupported here: None instead of an exception."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- CPU source

def rapl_delta(prev_uj: int, cur_uj: int, max_range_uj: int) -> int:
    """Energy between two reads of a RAPL counter that wraps at ``max_range_uj``."""
    return cur_uj - prev_uj if cur_uj >= prev_uj else cur_uj + max_range_uj - prev_uj


class Rapl:
    """Sum of the package domains under /sys/class/powercap, accumulated across wraparounds.

    Read at every sample, so a counter that wraps every ~40 minutes at full load never wraps
    twice between reads. Sub-domains (core, uncore, dram: ``intel-rapl:0:0``) are skipped: the
    package counter already includes core and uncore.
    """

    def __init__(self, domains: list[tuple[Path, int]]) -> None:
        self._domains = domains
        self._lock = threading.Lock()
        self._last = [self._read(p) for p, _ in domains]
        self._total_uj = 0

    @staticmethod
    def _read(path: Path) -> int:
        return int(path.read_text().strip())

    @classmethod
    def discover(cls, root: Path = Path("/sys/class/powercap")) -> Rapl | None:
        domains = []
        for d in sorted(root.glob("intel-rapl:*")):
            if not re.fullmatch(r"intel-rapl:\d+", d.name):
                continue
            try:
                domains.append((d / "energy_uj", cls._read(d / "max_energy_range_uj")))
                cls._read(d / "energy_uj")  # root-only on most kernels since 2020
            except (OSError, ValueError):
                return None
        return cls(domains) if domains else None

    def total_uj(self) -> int:
        with self._lock:
            for i, (path, max_range) in enumerate(self._domains):
                cur = self._read(path)
                self._total_uj += rapl_delta(self._last[i], cur, max_range)
                self._last[i] = cur
            return self._total_uj


class ProcessMemory:
    """This process's resident set, and the kernel's record of its peak (Linux ``VmHWM``).

    Writing ``5`` to ``/proc/self/clear_refs`` resets that peak to the current resident set (Linux >= 4.0),
    so each probe segment gets the exact peak without sampling. Elsewhere :meth:`reset_peak` says False
    and the probe samples the resident set instead.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self._proc = psutil.Process(self.pid)
        self.peak_resettable: bool | None = None   # unknown until the first reset

    def now_mib(self) -> float:
        return self._proc.memory_info().rss / MIB

    def reset_peak(self) -> bool:
        if self.pid != os.getpid():
            self.peak_resettable = False
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.peak_resettable = self.peak_mib() is not None
        except OSError:
            self.peak_resettable = False
        return self.peak_resettable

    def peak_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0   # kB
        except (OSError, ValueError, IndexError):
            pass
        return None


class _ProcessReadings:
    """The resident-set readings every source offers (its ``memory`` is this process's)."""

    memory: ProcessMemory

    def rss_mib(self) -> float | None:
        return self.memory.now_mib()

    def reset_rss_peak(self) -> bool:
        return self.memory.reset_peak()

    def rss_peak_mib(self) -> float | None:
        return self.memory.peak_mib()


class CpuSource(_ProcessReadings):
    """The process's resident-set peak from the kernel, RAPL energy where readable. A sampler thread
    runs only where it is needed: to keep RAPL's wraparound accounting (every 10 s), or to sample the
    resident set where the kernel's peak cannot be reset."""

    kind = "cpu"

    def __init__(self, rapl: Rapl | None = None, pid: int | None = None) -> None:
        self.memory = ProcessMemory(pid)
        self._rapl = rapl
        self.energy_kind = "rapl" if rapl else None

    @classmethod
    def create(cls) -> CpuSource:
        return cls(Rapl.discover())

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def thread_interval_ms(self, requested: int) -> int | None:
        if not self.memory.peak_resettable:
            return requested
        return max(requested, RAPL_INTERVAL_MS) if self._rapl else None

    def sample(self) -> Sample:
        if self._rapl:
            self._rapl.total_uj()  # keeps the wraparound accounting current
        return Sample(rss_mib=self.memory.now_mib())

    def energy_mj(self) -> float | None:
        return self._rapl.total_uj() / 1000.0 if self._rapl else None


# --------------------------------------------------------------------------- NVML source

class NvmlSource(_ProcessReadings):
    """NVML readings for one device. Readings the driver does not offer are found once at the first
    ``start`` and skipped afterwards, so an unsupported call costs nothing per sample."""

    kind = "nvml"

    def __init__(self, nvml: ModuleType, handle: Any, pid: int | None = None) -> None:
        self.nvml, self.handle = nvml, handle
        self.pid = pid or os.getpid()
        self.memory = ProcessMemory(self.pid)
        self._readers: dict[str, Callable[[], Any]] | None = None
        self.energy_kind: str | None = "counter"
        self.notes: dict[str, str] = {}   # which NVML call each reading uses, for doctor

    def start(self) -> None:
        if self._readers is None:
            self._readers = self._find_readers()

    def stop(self) -> None:
        pass

    def _find_readers(self) -> dict[str, Callable[[], Any]]:
        nv, h = self.nvml, self.handle
        candidates: dict[str, list[tuple[str, Callable[[], Any]]]] = {
            # v2 counts driver-reserved memory apart from "used"; v1 folds it in.
            "memory": [("nvmlDeviceGetMemoryInfo v2", lambda: nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)),
                       ("nvmlDeviceGetMemoryInfo", lambda: nv.nvmlDeviceGetMemoryInfo(h))],
            "processes": [("nvmlDeviceGetComputeRunningProcesses", lambda: nv.nvmlDeviceGetComputeRunningProcesses(h))],
            # Instant power where offered; nvmlDeviceGetPowerUsage is a 1 s average on recent GPUs.
            "power_mw": [("NVML_FI_DEV_POWER_INSTANT", self._instant_power),
                         ("nvmlDeviceGetPowerUsage", lambda: nv.nvmlDeviceGetPowerUsage(h))],
            "util": [("nvmlDeviceGetUtilizationRates", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu)],
            "sm_clock": [("nvmlDeviceGetClockInfo SM", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))],
            "temp": [("nvmlDeviceGetTemperature", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))],
        }
        readers = {}
        for name, options in candidates.items():
            for label, fn in options:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends, or a missing symbol
                    continue
                readers[name] = fn
                self.notes[name] = label
                break
            else:
                self.notes[name] = "not offered"
        try:
            nv.nvmlDeviceGetTotalEnergyConsumption(h)
            self.notes["energy"] = "nvmlDeviceGetTotalEnergyConsumption"
        except Exception:  # noqa: BLE001 - pre-Volta GPUs
            self.energy_kind = None
            self.notes["energy"] = "not offered (energy from sampled power)"
        return readers

    def _instant_power(self) -> float:
        fv = self.nvml.nvmlDeviceGetFieldValues(self.handle, [self.nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if fv.nvmlReturn != self.nvml.NVML_SUCCESS:
            raise self.nvml.NVMLError(fv.nvmlReturn)
        return field_value(fv)

    def _get(self, name: str) -> Any:
        fn = self._readers.get(name) if self._readers else None
        if fn is None:
            return None
        try:
            return fn()
        except Exception:  # noqa: BLE001 - one failed reading is a gap, not a crash
            return None

    def sample(self) -> Sample:
        mem = self._get("memory")
        used = mem.used / MIB if mem is not None else None
        proc_mib, proc_source = used, "device" if used is not None else None
        procs = self._get("processes")
        for p in procs or ():
            if p.pid == self.pid and p.usedGpuMemory is not None:
                proc_mib, proc_source = p.usedGpuMemory / MIB, "process"
                break
        power = self._get("power_mw")
        return Sample(mem_used_mib=used, mem_process_mib=proc_mib, process_mem_source=proc_source,
                      power_w=power / 1000.0 if power is not None else None,
                      util_pct=_num(self._get("util")), sm_clock_mhz=_num(self._get("sm_clock")),
                      temp_c=_num(self._get("temp")), rss_mib=self.memory.now_mib())

    def energy_mj(self) -> float | None:
        if self.energy_kind is None:
            return None
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def thread_interval_ms(self, requested: int) -> int | None:
        return requested   # power, utilisation and device memory have no counter: sample them


def _num(v: Any) -> float | None:
    return float(v) if v is not None else None


def field_value(fv: Any) -> float:
    """The number in an ``nvmlFieldValue_t``, whatever its declared type."""
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    return float(getattr(fv.value, member.get(fv.valueType, "uiVal")))


# --------------------------------------------------------------------------- device mapping

class NvmlUnavailable(Exception):
    """Why the NVML probe cannot be used (logged; the CPU probe takes over)."""


def nvml_target(index: int, visible: str | None) -> int | str:
    """torch's ``cuda:<index>`` as an NVML index (int) or UUID or UUID prefix (str).

    CUDA_VISIBLE_DEVICES lists NVML indices or UUIDs (``GPU-...``, ``MIG-...``, prefixes allowed);
    torch's index counts positions in that list.
    """
    if visible is None or not visible.strip():
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        raise NvmlUnavailable(f"cuda:{index} is not in CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[index]
    return int(entry) if entry.isdigit() else entry


def _uuid_str(u: Any) -> str:
    return u.decode() if isinstance(u, bytes) else str(u)


def nvml_handle(nv: ModuleType, index: int, visible: str | None, torch_uuid: str | None = None) -> Any:
    """The NVML handle of torch's ``cuda:<index>``: a whole GPU, or a MIG instance by its own UUID (never
    its parent GPU, whose memory and power are the whole card's)."""
    mig = any(e.strip().startswith("MIG-") for e in (visible or "").split(","))
    # torch knows the UUID of its device: exact even when CUDA and NVML order devices differently.
    if torch_uuid is None:
        try:
            torch_uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "") or None
        except Exception:  # noqa: BLE001 - old torch, or no CUDA runtime: use the variable
            torch_uuid = None
    if torch_uuid:
        for prefix in (("MIG-", "GPU-") if mig else ("GPU-", "MIG-")):
            try:
                return nv.nvmlDeviceGetHandleByUUID(f"{prefix}{torch_uuid}")
            except Exception:  # noqa: BLE001 - not this kind of device
                continue
    target = nvml_target(index, visible)
    if isinstance(target, int):
        return nv.nvmlDeviceGetHandleByIndex(target)
    try:
        return nv.nvmlDeviceGetHandleByUUID(target)
    except Exception:  # noqa: BLE001 - a prefix: match it against every device's (and MIG instance's) UUID
        for h in _all_handles(nv):
            if _uuid_str(nv.nvmlDeviceGetUUID(h)).startswith(target):
                return h
    raise NvmlUnavailable(f"no NVML device matches {target!r} from CUDA_VISIBLE_DEVICES")


def _all_handles(nv: ModuleType) -> Iterator[Any]:
    """Every GPU, then every MIG instance of each (where MIG is enabled)."""
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        yield h
        try:
            n_mig = nv.nvmlDeviceGetMaxMigDeviceCount(h)
        except Exception:  # noqa: BLE001 - no MIG on this GPU or driver
            continue
        for j in range(n_mig):
            try:
                yield nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except Exception:  # noqa: BLE001 - an empty MIG slot
                continue


def open_nvml(index: int) -> NvmlSource:
    """Initialise NVML and return a source for torch's ``cuda:<index>``; :class:`NvmlUnavailable` if not."""
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"pynvml (nvidia-ml-py) cannot be imported: {e}") from None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise NvmlUnavailable(f"nvmlInit failed: {e}") from None
    try:
        handle = nvml_handle(pynvml, index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except Exception as e:  # noqa: BLE001
        pynvml.nvmlShutdown()
        raise NvmlUnavailable(f"no NVML handle for cuda:{index}: {e}") from None
    source = NvmlSource(pynvml, handle)
    # nvmlInit is reference counted: give our reference back when the source goes away.
    weakref.finalize(source, _quiet_shutdown, pynvml)
    return source


def _quiet_shutdown(nv: ModuleType) -> None:
    try:
        nv.nvmlShutdown()
    except Exception:  # noqa: BLE001 - interpreter shutdown
        pass


def make_probe(device: torch.device | str, interval_ms: int = 50) -> Probe:
    """The NVML probe for a CUDA device when NVML works, else the CPU probe (the reason is logged)."""
    device = torch.device(device)
    if device.type != "cuda":
        return Probe(CpuSource.create(), device, interval_ms)
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    try:
        source = open_nvml(index)
    except NvmlUnavailable as e:
        log.warning("NVML probe unavailable for %s (%s); using the CPU probe: no GPU power, energy or "
                    "device memory will be recorded", device, e)
        return Probe(CpuSource.create(), device, interval_ms, fallback_reason=str(e))
    return Probe(source, device, interval_ms)


def sample_dict(s: Sample | None) -> dict[str, Any]:
    return {f.name: getattr(s, f.name) if s else None for f in fields(Sample)}


# --------------------------------------------------------------------------- consistency rules

# The trial after an out-of-memory one must start within this of the idle device (memory released).
MAX_ABOVE_IDLE_MIB = 256
# A training window at least this long must have moved the energy counter.
ENERGY_MIN_S = 5.0


def telemetry_problems(rows: list[dict], idle_mib: float | None, gpu: bool) -> list[str]:
    """``make gpu-check``'s rules: every way the probe's numbers of a short grid fail to hold together,
    as one line each (empty when they hold). ``rows`` are the check's trials (roles ``grid``, ``oom``,
    ``after-oom``); ``idle_mib`` is device memory before the first."""
    bad = []
    for r in rows:
        name = f"{r['role']} bptt={r['bptt']} bs={r['batch_size']}"
        if r["status"] == "failed":
            bad.append(f"{name}: trial failed: {r['error']}")
        if gpu and r["probe_kind"] != "nvml":
            bad.append(f"{name}: probe is {r['probe_kind']!r}, not NVML, on a CUDA device")
        nvml, reserved = r["nvml_device_mib"], r["torch_reserved_mib"]
        # An OOM makes the allocator free its cache before it gives up, so its peak may go unsampled.
        if r["status"] != "oom" and nvml is not None and reserved is not None and nvml < reserved:
            bad.append(f"{name}: NVML peak device memory {nvml:.0f} MiB < torch peak reserved {reserved:.0f} MiB")
        long = (r["duration_s"] or 0) > ENERGY_MIN_S
        if long and (r["energy_j"] is None if gpu else False):
            bad.append(f"{name}: no energy recorded for a {r['duration_s']:.1f} s trial")
        if long and r["energy_j"] is not None and r["energy_j"] <= 0:
            bad.append(f"{name}: energy {r['energy_j']} J <= 0 for a {r['duration_s']:.1f} s trial")
    oom = [r for r in rows if r["role"] == "oom"]
    if not oom or oom[0]["status"] != "oom":
        bad.append(f"the OOM configuration was recorded as {oom[0]['status'] if oom else 'nothing'!r}, not 'oom'")
    after = [r for r in rows if r["role"] == "after-oom"]
    if not after:
        bad.append("no trial ran after the OOM configuration")
    else:
        a = after[0]
        if a["status"] != "ok":
            bad.append(f"the trial after the OOM ended as {a['status']!r}: {a['error']}")
        if idle_mib is None or a["start_mib"] is None:
            bad.append("memory before the trial after the OOM could not be read")
        elif a["start_mib"] - idle_mib > MAX_ABOVE_IDLE_MIB:
            bad.append(f"the trial after the OOM started {a['start_mib'] - idle_mib:.0f} MiB above idle "
                       f"({a['start_mib']:.0f} vs {idle_mib:.0f} MiB; limit {MAX_ABOVE_IDLE_MIB})")
    return bad
