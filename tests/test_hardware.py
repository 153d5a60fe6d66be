"""Hardware fingerprint, device labels and ``bptt-harness doctor``."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import socket

import pytest
import torch

from bptt_harness.hardware import FINGERPRINT_KEYS, device_label, doctor_report, fingerprint, machine_id, slug


def test_fingerprint_is_the_records_hardware_and_says_what_this_machine_is():
    from bptt_harness.record import Hardware, from_dict

    fp = fingerprint("cpu")
    assert tuple(fp) == FINGERPRINT_KEYS == tuple(f.name for f in dataclasses.fields(Hardware))
    assert dataclasses.asdict(from_dict(Hardware, fp)) == fp  # stored in the record as it is
    # Each value against an independent reading of this machine:
    assert fp["torch_version"] == torch.__version__ and fp["python_version"] == platform.python_version()
    assert fp["hostname"] == socket.gethostname()
    assert fp["cpu_cores"] == len(os.sched_getaffinity(0))
    assert fp["ram_gib"] == pytest.approx(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, abs=0.1)
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    if model:
        assert fp["cpu_model"] == model
    assert re.fullmatch(r"[0-9a-f]{12}", fp["machine_id"])
    for key in ("gpu_name", "gpu_memory_mib", "gpu_compute_capability", "gpu_count", "driver_version",
                "cuda_version", "cudnn_version"):
        assert fp[key] is None, key  # never a GPU number on CPU
    json.dumps(fp)  # stored with every trial


def test_machine_id_is_stable_and_tracks_hardware():
    assert fingerprint("cpu")["machine_id"] == fingerprint("cpu")["machine_id"]
    a = machine_id("AMD EPYC", "NVIDIA H100 80GB HBM3", 81559, "abc")
    assert a == machine_id("AMD EPYC", "NVIDIA H100 80GB HBM3", 81559, "abc")
    assert a != machine_id("AMD EPYC", "NVIDIA A100-SXM4-40GB", 40960, "abc")
    assert a != machine_id("AMD EPYC", "NVIDIA H100 80GB HBM3", 81559, "other-host")


@pytest.mark.parametrize("fp,label", [
    ({"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_memory_mib": 81559}, "nvidia-h100-80gb-hbm3"),
    ({"gpu_name": "NVIDIA GeForce RTX 4090", "gpu_memory_mib": 24564}, "nvidia-geforce-rtx-4090-24gb"),
    ({"gpu_name": "NVIDIA A100-SXM4-40GB", "gpu_memory_mib": 40960}, "nvidia-a100-sxm4-40gb"),
    ({"gpu_name": None, "cpu_model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"},
     "cpu-intel-r-xeon-r-gold-6338-cpu-2-00ghz"),
    ({"gpu_name": None, "cpu_model": ""}, "cpu-unknown"),
])
def test_device_label(fp, label):
    assert device_label(fp) == label


def test_device_label_is_file_safe_here():
    label = device_label(fingerprint("cpu"))
    assert re.fullmatch(r"[a-z0-9-]+", label) and label.startswith("cpu-")
    assert slug("  /../ x  ") == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU wording")
def test_doctor_says_the_cpu_probe_will_be_used():
    text = doctor_report("auto")
    assert "the CPU probe will be used" in text and "machine_id" in text and "rss_mib" in text
    data = json.loads(doctor_report("auto", as_json=True))
    assert data["probe_kind"] == "cpu" and data["device"] == "cpu"
    assert data["fingerprint"]["gpu_name"] is None and data["sample"]["rss_mib"] > 0
    assert data["sample"]["power_w"] is None


def test_doctor_cli_exits_zero(capsys):
    from bptt_harness.cli import main

    assert main(["doctor", "--device", "cpu"]) == 0
    assert "probe" in capsys.readouterr().out
    assert main(["doctor", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["probe_kind"] == "cpu"
