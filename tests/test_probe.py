"""The probe: sampling thread, peaks, energy arithmetic, sources, fallback. No GPU needed."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bptt_harness.errors import HarnessError
from bptt_harness.probe import (
    CpuSource,
    NvmlSource,
    NvmlUnavailable,
    Probe,
    Rapl,
    Sample,
    energy_estimate,
    make_probe,
    nvml_handle,
    nvml_target,
    rapl_delta,
)
from bptt_harness.record import ProbeReport


class Scripted:
    """A source whose readings the test chooses; ``None`` once the script is spent."""

    def __init__(self, samples: list[Sample], energy: tuple = (), energy_kind: str | None = "counter",
                 kind: str = "nvml") -> None:
        self.samples, self.energy = list(samples), list(energy)
        self.kind, self.energy_kind = kind, energy_kind
        self.starts = self.stops = 0
        self.spent = threading.Event()

    def start(self) -> None:
        self.starts += 1

    def stop(self) -> None:
        self.stops += 1

    def sample(self) -> Sample | None:
        if self.samples:
            return self.samples.pop(0)
        self.spent.set()
        return None

    def energy_mj(self) -> float | None:
        return self.energy.pop(0) if self.energy else None


def run_script(probe: Probe, source: Scripted) -> ProbeReport:
    with probe:
        assert source.spent.wait(5), "the sampler thread never drained the script"
    return probe.report()


def probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "harness-probe"]


def gpu_samples() -> list[Sample]:
    rows = [(1000, 900, 100.0, 10, 1000, 50), (3000, 2800, 300.0, 20, 1500, 70), (2000, 1900, 200.0, 30, 2000, 60)]
    return [Sample(mem_used_mib=m, mem_process_mib=p, process_mem_source="process", power_w=w, util_pct=u,
                   sm_clock_mhz=c, temp_c=t, rss_mib=500.0 + i) for i, (m, p, w, u, c, t) in enumerate(rows)]


def test_exact_peaks_means_and_counter_energy():
    src = Scripted(gpu_samples(), energy=(1_000_000.0, 1_250_000.0))
    r = run_script(Probe(src, "cpu", interval_ms=1), src)
    assert isinstance(r, ProbeReport)
    assert r.probe_kind == "nvml" and r.probe_fallback_reason is None and r.interval_ms == 1
    assert r.samples == 3
    assert r.peak_mem_nvml_mib == 3000 and r.idle_mem_nvml_mib == 1000
    assert r.peak_mem_nvml_process_mib == 2800 and r.nvml_process_mem_source == "process"
    assert r.max_power_w == 300.0 and r.mean_power_w == 200.0
    assert r.mean_util_pct == 20 and r.mean_sm_clock_mhz == 1500 and r.max_temp_c == 70
    assert r.peak_rss_mib == 502.0 and r.rss_start_mib == 500.0
    assert r.peak_mem_mib == 2.0  # a CPU device: what the window added to the resident set
    assert r.energy_j == 250.0 and r.energy_source == "counter"
    assert r.peak_mem_torch_mib is None and r.peak_mem_torch_reserved_mib is None
    assert src.starts == 1 and src.stops == 1


def test_counter_that_did_not_move_gives_power_integral():
    src = Scripted(gpu_samples(), energy=(5000.0, 5000.0))
    clock = iter([10.0, 12.5]).__next__  # window start and end
    r = run_script(Probe(src, "cpu", interval_ms=1, clock=clock), src)
    assert r.duration_s == 2.5
    assert r.energy_j == 500.0 and r.energy_source == "power-integral"  # 200 W x 2.5 s


def test_nothing_measured_is_none_not_zero():
    src = Scripted([Sample(rss_mib=10.0)], energy=(), energy_kind=None, kind="cpu")
    r = run_script(Probe(src, "cpu", interval_ms=1), src)
    for key in ("energy_j", "energy_source", "mean_power_w", "max_power_w", "peak_mem_nvml_mib",
                "nvml_process_mem_source", "idle_mem_nvml_mib", "mean_util_pct", "max_temp_c"):
        assert getattr(r, key) is None, key
    assert r.peak_rss_mib == 10.0 and r.cpu_time_s >= 0 and r.duration_s > 0


@pytest.mark.parametrize("e0,e1,power,dur,expected", [
    (100.0, 2100.0, 50.0, 1.0, (2.0, "counter")),
    (100.0, 100.0, 50.0, 2.0, (100.0, "power-integral")),
    (100.0, 50.0, 50.0, 2.0, (100.0, "power-integral")),   # a counter reset is not negative energy
    (None, None, 40.0, 0.5, (20.0, "power-integral")),
    (None, None, None, 3.0, (None, None)),
    (7.0, 7.0, None, 3.0, (None, None)),
])
def test_energy_estimate(e0, e1, power, dur, expected):
    assert energy_estimate(e0, e1, "counter", power, dur) == expected


def test_device_level_process_memory_is_flagged():
    samples = [Sample(mem_used_mib=100, mem_process_mib=80, process_mem_source="process"),
               Sample(mem_used_mib=120, mem_process_mib=120, process_mem_source="device")]
    src = Scripted(samples)
    r = run_script(Probe(src, "cpu", interval_ms=1), src)
    assert r.nvml_process_mem_source == "device" and r.peak_mem_nvml_process_mib == 120


class Endless:
    kind, energy_kind = "nvml", "counter"

    def __init__(self) -> None:
        self.n, self.stops, self.e = 0, 0, 0.0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stops += 1

    def sample(self) -> Sample:
        self.n += 1
        return Sample(mem_used_mib=float(self.n), power_w=100.0)

    def energy_mj(self) -> float:
        self.e += 1500.0
        return self.e


def test_exception_inside_window_stops_thread_and_keeps_numbers():
    src = Endless()
    probe = Probe(src, "cpu", interval_ms=1)
    with pytest.raises(ValueError, match="boom"):
        with probe:
            deadline = time.monotonic() + 5
            while src.n < 5 and time.monotonic() < deadline:
                time.sleep(0.002)
            raise ValueError("boom")
    assert not probe_threads() and src.stops == 1
    n = src.n
    time.sleep(0.02)
    assert src.n == n  # nothing samples after the window
    r = probe.report()
    assert r.samples == n >= 5 and r.peak_mem_nvml_mib == float(n)
    assert r.energy_j == 1.5 and r.energy_source == "counter"


def test_reentry_starts_a_fresh_window_and_nesting_is_refused():
    src = Scripted(gpu_samples(), energy=(0.0, 1000.0, 1000.0, 4000.0))
    probe = Probe(src, "cpu", interval_ms=1)
    assert run_script(probe, src).peak_mem_nvml_mib == 3000
    src.samples, src.spent = [Sample(mem_used_mib=7.0)], threading.Event()
    r = run_script(probe, src)
    assert r.samples == 1 and r.peak_mem_nvml_mib == 7.0 and r.energy_j == 3.0
    with probe:
        with pytest.raises(RuntimeError, match="already open"):
            probe.__enter__()
    assert not probe_threads()


def test_a_failing_reading_is_logged_once_and_sampling_goes_on(caplog):
    class Flaky(Endless):
        def sample(self) -> Sample:
            self.n += 1
            if self.n % 2:
                raise OSError("sensor gone")
            return Sample(mem_used_mib=float(self.n))

    src = Flaky()
    with caplog.at_level(logging.WARNING, logger="bptt_harness.probe"):
        with Probe(src, "cpu", interval_ms=1) as probe:
            deadline = time.monotonic() + 5
            while src.n < 10 and time.monotonic() < deadline:
                time.sleep(0.002)
    assert probe.report().samples >= 4
    assert sum("sensor gone" in m for m in caplog.messages) == 1


def test_interval_must_be_a_positive_integer():
    with pytest.raises(HarnessError, match="interval_ms"):
        Probe(Scripted([]), "cpu", interval_ms=0)


def test_cpu_probe_sees_a_real_allocation():
    probe = make_probe("cpu", interval_ms=10)
    assert probe.kind == "cpu" and probe.fallback_reason is None
    with probe:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, every page written
        time.sleep(0.05)
    r = probe.report()
    del block
    assert r.peak_rss_mib - r.rss_start_mib >= 190
    assert r.peak_mem_mib == pytest.approx(r.peak_rss_mib - r.rss_start_mib)
    assert r.cpu_time_s > 0 and r.cpu_util_pct > 0 and r.samples >= 2
    assert r.peak_mem_nvml_mib is None and r.mean_util_pct is None  # never a GPU number


def test_nvml_import_failure_falls_back_with_logged_reason(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.WARNING, logger="bptt_harness.probe"):
        probe = make_probe("cuda:0")
    assert probe.kind == "cpu" and "cannot be imported" in probe.fallback_reason
    assert any("using the CPU probe" in m and "cannot be imported" in m for m in caplog.messages)
    assert probe.report().probe_fallback_reason == probe.fallback_reason


def test_nvml_init_failure_falls_back_with_logged_reason(monkeypatch, caplog):
    import pynvml

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    with caplog.at_level(logging.WARNING, logger="bptt_harness.probe"):
        probe = make_probe("cuda")
    assert probe.kind == "cpu" and probe.fallback_reason.startswith("nvmlInit failed")
    assert any("nvmlInit failed" in m for m in caplog.messages)


# --------------------------------------------------------------------------- NVML source, faked

class NvmlError(Exception):
    pass


def fake_nvml(*, procs=None, v2=True, instant=True, energy=True, mib=2**20) -> SimpleNamespace:
    def memory(h, version=None):
        if version and not v2:
            raise NvmlError("FunctionNotFound")
        return SimpleNamespace(used=3000 * mib, total=80_000 * mib)

    def fields(h, ids):
        ret = 0 if instant else 3
        return [SimpleNamespace(nvmlReturn=ret, valueType=1, value=SimpleNamespace(uiVal=250_000))]

    def total_energy(h):
        if not energy:
            raise NvmlError("NotSupported")
        return 123_456

    return SimpleNamespace(
        NVMLError=NvmlError, NVML_SUCCESS=0, nvmlMemory_v2=0x02000028, NVML_FI_DEV_POWER_INSTANT=186,
        NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetMemoryInfo=memory, nvmlDeviceGetFieldValues=fields,
        nvmlDeviceGetComputeRunningProcesses=lambda h: procs if procs is not None else [],
        nvmlDeviceGetPowerUsage=lambda h: 180_000,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=97, memory=40),
        nvmlDeviceGetClockInfo=lambda h, kind: 1980,
        nvmlDeviceGetTemperature=lambda h, sensor: 61,
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
    )


def test_nvml_source_reads_this_process():
    me = os.getpid()
    procs = [SimpleNamespace(pid=me + 1, usedGpuMemory=5 * 2**20), SimpleNamespace(pid=me, usedGpuMemory=1200 * 2**20)]
    src = NvmlSource(fake_nvml(procs=procs), handle="h")
    src.start()
    s = src.sample()
    assert (s.mem_used_mib, s.mem_process_mib, s.process_mem_source) == (3000, 1200, "process")
    assert (s.power_w, s.util_pct, s.sm_clock_mhz, s.temp_c) == (250.0, 97, 1980, 61)
    assert s.rss_mib > 0 and src.energy_mj() == 123_456.0 and src.energy_kind == "counter"
    assert src.notes["memory"] == "nvmlDeviceGetMemoryInfo v2" and src.notes["power_mw"] == "NVML_FI_DEV_POWER_INSTANT"


def test_nvml_source_falls_back_where_the_driver_offers_less():
    src = NvmlSource(fake_nvml(procs=[], v2=False, instant=False, energy=False), handle="h")
    src.start()
    s = src.sample()
    # PID not visible (a container): device-level memory, and it says so.
    assert (s.mem_process_mib, s.process_mem_source) == (3000, "device")
    assert s.power_w == 180.0 and src.notes["power_mw"] == "nvmlDeviceGetPowerUsage"
    assert src.notes["memory"] == "nvmlDeviceGetMemoryInfo"
    assert src.energy_kind is None and src.energy_mj() is None


def test_probe_over_a_faked_nvml_source():
    src = NvmlSource(fake_nvml(procs=[SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**30)]), handle="h")
    with Probe(src, "cpu", interval_ms=1) as probe:
        time.sleep(0.02)
    r = probe.report()
    assert r.probe_kind == "nvml" and r.peak_mem_nvml_mib == 3000 and r.peak_mem_nvml_process_mib == 1024
    assert r.nvml_process_mem_source == "process" and r.max_power_w == 250.0
    # The faked counter never moves, so the energy is the sampled-power estimate.
    assert r.energy_source == "power-integral" and r.energy_j == pytest.approx(250.0 * r.duration_s)


@pytest.mark.parametrize("index,visible,expected", [
    (1, None, 1), (0, "", 0), (1, "2,3", 3), (0, " 5 ", 5),
    (1, "GPU-aaaa,GPU-bbbb-cccc", "GPU-bbbb-cccc"), (0, "MIG-1234", "MIG-1234"),
])
def test_nvml_target(index, visible, expected):
    assert nvml_target(index, visible) == expected


def test_nvml_target_out_of_range():
    with pytest.raises(NvmlUnavailable, match="not in CUDA_VISIBLE_DEVICES"):
        nvml_target(2, "0,1")


def test_nvml_handle_matches_uuid_prefix():
    uuids = ["GPU-1111-aaaa", "GPU-2222-bbbb"]

    def by_uuid(u):
        if u not in uuids:
            raise NvmlError("NotFound")
        return f"h{uuids.index(u)}"

    nv = SimpleNamespace(nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetCount=lambda: 2,
                         nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
                         nvmlDeviceGetUUID=lambda h: uuids[int(h[1:])].encode())
    assert nvml_handle(nv, 0, "GPU-2222") == "h1"
    assert nvml_handle(nv, 1, "GPU-1111-aaaa,GPU-2222-bbbb") == "h1"
    assert nvml_handle(nv, 0, "1") == "h1"
    with pytest.raises(NvmlUnavailable):
        nvml_handle(nv, 0, "GPU-9999")


def test_nvml_handle_finds_a_mig_instance_by_its_own_uuid_not_its_parent():
    """A MIG slice: torch reports the instance's UUID; NVML knows it as MIG-<uuid>. The old lookup tried
    GPU-<uuid>, failed, and fell back to index 0: the whole parent GPU's memory and power."""
    gpus, migs = {"GPU-parent": "h0"}, {"MIG-aaaa-1111": "m0", "MIG-bbbb-2222": "m1"}

    def by_uuid(u):
        if u in gpus or u in migs:
            return {**gpus, **migs}[u]
        raise NvmlError("NotFound")

    nv = SimpleNamespace(
        nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: "h0",
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 2, nvmlDeviceGetMigDeviceHandleByIndex=lambda h, j: f"m{j}",
        nvmlDeviceGetUUID=lambda h: {"h0": b"GPU-parent", "m0": b"MIG-aaaa-1111", "m1": b"MIG-bbbb-2222"}[h])
    assert nvml_handle(nv, 0, "MIG-bbbb-2222", torch_uuid="bbbb-2222") == "m1"
    assert nvml_handle(nv, 0, "MIG-bbbb", torch_uuid=None) == "m1"          # a prefix, matched among instances
    assert nvml_handle(nv, 0, None, torch_uuid="aaaa-1111") == "m0"
    with pytest.raises(NvmlUnavailable):
        nvml_handle(nv, 0, "MIG-cccc", torch_uuid=None)


# --------------------------------------------------------------------------- RAPL

def test_rapl_delta_wraps():
    assert rapl_delta(100, 250, 1000) == 150
    assert rapl_delta(900, 50, 1000) == 150


def write_domain(root, name, energy, max_range=1000):
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")


def test_rapl_sums_packages_across_a_wrap(tmp_path):
    write_domain(tmp_path, "intel-rapl:0", 900)
    write_domain(tmp_path, "intel-rapl:1", 10)
    write_domain(tmp_path, "intel-rapl:0:0", 5)  # a sub-domain: already inside the package
    rapl = Rapl.discover(tmp_path)
    src = CpuSource(rapl)
    assert src.energy_kind == "rapl"
    e0 = src.energy_mj()
    write_domain(tmp_path, "intel-rapl:0", 100)  # wrapped: 900 -> 1000 -> 100 is 200 uJ
    write_domain(tmp_path, "intel-rapl:0:0", 999)
    src.sample()
    write_domain(tmp_path, "intel-rapl:0", 300)
    write_domain(tmp_path, "intel-rapl:1", 2010, max_range=10_000)
    assert src.energy_mj() - e0 == pytest.approx((200 + 200 + 2000) / 1000)


def test_rapl_absent_or_unreadable_is_none(tmp_path):
    assert Rapl.discover(tmp_path) is None
    (tmp_path / "intel-rapl:0").mkdir()
    assert Rapl.discover(tmp_path) is None  # no readable energy_uj
    assert CpuSource(None).energy_mj() is None


# --------------------------------------------------------------------------- with the trainer

def test_run_trial_fills_probe_with_documented_keys(one_thread):
    from bptt_harness.corpus import load
    from bptt_harness.model import ModelConfig
    from bptt_harness.trainer import TrainConfig, TrialSpec, run_trial

    corpus = load("synthetic:k=8,tokens=20000")
    spec = TrialSpec(bptt=16, batch_size=8, model=ModelConfig(emsize=16, nhid=16, layers=1, dropout=0.0),
                     train=TrainConfig(tokens=4000, checkpoints=1, lr=1.0))
    result = run_trial(spec, corpus, "cpu", probe=make_probe("cpu", interval_ms=5))
    assert result.status == "ok"
    assert isinstance(result.probe, ProbeReport)
    assert result.probe.probe_kind == "cpu" and result.probe.samples >= 2
    assert result.probe.peak_rss_mib > 0 and result.probe.duration_s > 0
    # The checkpoint validation is measured apart: the probe's training window is the trainer's training time.
    assert result.probe.duration_s == pytest.approx(result.train_s, rel=0.05, abs=0.02)
    assert result.probe.eval_s > 0 and result.probe.eval_peak_mem_mib is not None
    assert not probe_threads()


# --------------------------------------------------------------------------- make gpu-check

def run_gpu_check(*args: str):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)


def test_gpu_check_tiny_cpu_rehearsal_writes_csv(tmp_path):
    import csv

    done = run_gpu_check("--allow-cpu", "--tiny", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("gpu-check-*-tiny.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["role"] for r in rows] == ["grid"] * 4 + ["oom", "after-oom"]
    assert rows[4]["status"] == "oom" and rows[5]["status"] == "ok"
    assert all(r["probe_kind"] == "cpu" and r["nvml_device_mib"] == "" for r in rows)  # no invented GPU numbers
    assert not list(tmp_path.glob("*.tmp"))
    assert "gpu-check passed" in done.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    for args in ([], ["--allow-cpu"]):  # a CPU run must say it is tiny
        done = run_gpu_check(*args, "--out", str(tmp_path))
        assert done.returncode == 2 and "no CUDA GPU" in done.stderr.strip().splitlines()[0]
    assert not list(tmp_path.iterdir())


def check_row(role="grid", **kw):
    row = {"role": role, "bptt": 35, "batch_size": 20, "status": "ok", "probe_kind": "nvml", "error": None,
           "nvml_device_mib": 5000.0, "torch_reserved_mib": 4000.0, "duration_s": 10.0, "energy_j": 900.0,
           "start_mib": 600.0}
    return {**row, **kw}


def good_rows():
    return [check_row(), check_row("oom", status="oom", nvml_device_mib=900.0, torch_reserved_mib=1000.0),
            check_row("after-oom")]


def test_gpu_check_rules():
    from bptt_harness.probe import telemetry_problems

    assert telemetry_problems(good_rows(), idle_mib=500.0, gpu=True) == []

    def fails(rows, idle=500.0, gpu=True):
        (line,) = telemetry_problems(rows, idle_mib=idle, gpu=gpu)
        return line

    rows = good_rows()
    rows[0]["nvml_device_mib"] = 3000.0
    assert "NVML peak device memory 3000 MiB < torch peak reserved 4000" in fails(rows)
    rows = good_rows()
    rows[0]["energy_j"] = 0.0
    assert "energy 0.0 J <= 0" in fails(rows)
    rows[0]["duration_s"] = 4.0  # too short for the counter to be held to account
    assert telemetry_problems(rows, 500.0, gpu=True) == []
    rows = good_rows()
    rows[0]["energy_j"] = None
    assert "no energy recorded" in fails(rows)
    assert telemetry_problems(rows, 500.0, gpu=False) == []  # CPU without RAPL: energy is honestly missing
    rows = good_rows()
    rows[1].update(status="ok", nvml_device_mib=5000.0)
    assert "recorded as 'ok', not 'oom'" in fails(rows)
    assert "started 357 MiB above idle" in fails(good_rows(), idle=243.0)
    assert telemetry_problems(good_rows(), idle_mib=344.0, gpu=True) == []  # 256 MiB above is still fine
    rows = good_rows()
    rows[2]["probe_kind"] = "cpu"
    assert "not NVML" in fails(rows)
    assert "nothing" in fails(good_rows()[::2])
