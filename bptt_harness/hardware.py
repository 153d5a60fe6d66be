"""What machine a result came from: the hardware fingerprint, a file-safe label, and ``bptt-harness doctor``.

Every trial stores :func:`fingerprint`; ``machine_id`` is a short hash of the hardware identity, so
result sets from several machines can be grouped and compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import socket
import sys
from pathlib import Path
from typing import Any

import psutil
import torch

from bptt_harness import allocator
from bptt_harness.cuda_check import check_installed
from bptt_harness.errors import HarnessError
from bptt_harness.probe import MIB, make_probe, sample_dict
from bptt_harness.record import Hardware

log = logging.getLogger(__name__)

# The fingerprint is the record's Hardware part: one schema (bptt_harness/record.py) for both.
FINGERPRINT_KEYS = tuple(f.name for f in dataclasses.fields(Hardware))


def resolve_device(name: str | None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU. Asking for CUDA without one is a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise HarnessError(f"device {name!r} is not known; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _machine_id_file() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(path).read_text().strip()
        except OSError:
            continue
    return ""


def _nvml_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: the version is unknown, not invented
        return None
    try:
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001
        return None
    finally:
        pynvml.nvmlShutdown()


def _gpu_fields(device: torch.device) -> dict[str, Any]:
    none = dict.fromkeys(("gpu_name", "gpu_memory_mib", "gpu_compute_capability", "gpu_count",
                          "driver_version", "cuda_version", "cudnn_version"))
    if device.type != "cuda" or not torch.cuda.is_available():
        return none
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu_name": props.name,
        "gpu_memory_mib": round(props.total_memory / MIB),
        "gpu_compute_capability": f"{props.major}.{props.minor}",
        "gpu_count": torch.cuda.device_count(),
        "driver_version": _nvml_driver(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def machine_id(cpu: str, gpu_name: str | None, gpu_memory_mib: int | None, host_id: str) -> str:
    """12 hex digits of a hash of what identifies the hardware (not the software versions)."""
    key = "|".join((cpu, gpu_name or "", str(gpu_memory_mib or ""), host_id))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def fingerprint(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    fp: dict[str, Any] = _gpu_fields(device)
    cpu = cpu_model()
    fp.update(
        torch_version=torch.__version__,
        malloc=allocator.setting(),
        cpu_model=cpu,
        # Cores this process may use (a container or taskset limit), not the host's count.
        cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        ram_gib=round(psutil.virtual_memory().total / 2**30, 1),
        hostname=socket.gethostname(),
        machine_id=machine_id(cpu, fp["gpu_name"], fp["gpu_memory_mib"], _machine_id_file() or socket.gethostname()),
        python_version=platform.python_version(),
        platform=platform.platform(),
    )
    return {k: fp[k] for k in FINGERPRINT_KEYS}


def slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "unknown"


def device_label(fp: dict[str, Any]) -> str:
    """``nvidia-h100-80gb-hbm3``, ``nvidia-geforce-rtx-4090-24gb`` or ``cpu-amd-epyc``: safe in file names."""
    if fp.get("gpu_name"):
        label = slug(fp["gpu_name"])
        if not re.search(r"\d+gb", label) and fp.get("gpu_memory_mib"):
            label += f"-{round(fp['gpu_memory_mib'] / 1024)}gb"  # names like "RTX 4090" omit the size
        return label
    return "cpu-" + slug(fp.get("cpu_model") or "unknown", limit=40)


def doctor_report(device_arg: str, as_json: bool = False) -> str:
    """What ``bptt-harness trial`` and ``bptt-harness sweep`` would use here: device, probe, fingerprint, a live sample."""
    device = resolve_device(device_arg)
    probe = make_probe(device)
    sample = sample_dict(probe.read())
    fp = fingerprint(device)
    if probe.kind == "nvml":
        summary = "NVML probe: device and process memory, power, energy counter, utilisation, clocks"
    elif device.type == "cuda":
        summary = f"CPU probe on a CUDA device (NVML unavailable: {probe.fallback_reason}); no GPU power or energy"
    else:
        why = "no CUDA GPU is visible" if not torch.cuda.is_available() else f"device {device} was asked for"
        energy = "energy from RAPL" if probe.source.energy_kind else "energy not measured: RAPL is not readable"
        summary = f"{why}: the CPU probe will be used (peak RSS and CPU time; {energy}). No GPU numbers are recorded"
    notes = getattr(probe.source, "notes", {})
    install = check_installed()
    if as_json:
        return json.dumps({"device": str(device), "probe_kind": probe.kind,
                           "probe_fallback_reason": probe.fallback_reason, "summary": summary,
                           "nvml_readings": notes or None, "label": device_label(fp),
                           "fingerprint": fp, "sample": sample,
                           "torch_build": {"ok": install.ok, "message": install.message}})
    lines = [f"device       {device}", f"probe        {probe.kind}", f"             {summary}",
             f"label        {device_label(fp)}",
             f"torch build  {'ok' if install.ok else 'PROBLEM'}: {install.message}"]
    lines += [f"nvml         {k}: {v}" for k, v in notes.items()]
    lines.append("fingerprint")
    lines += [f"  {k:<24} {v}" for k, v in fp.items()]
    lines.append("live sample")
    lines += [f"  {k:<24} {_fmt(v)}" for k, v in sample.items() if v is not None]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":  # pragma: no cover - a quick look without the CLI
    sys.stdout.write(doctor_report("auto") + "\n")
