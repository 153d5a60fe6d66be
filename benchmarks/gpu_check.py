"""``make gpu-check``: does the probe tell the truth on this GPU?

A short grid (bptt {35, 140} x bs {20, 320}, 2x650 LSTM, embedded corpus), then one configuration
made to run out of memory (an allocator cap far below what it needs), then one more trial to show
memory came back. Prints a table, writes ``results/published/gpu-check-<device label>.csv``, and
exits 1 with a ``GPU-CHECK FAILED`` line per broken rule:

* NVML peak device memory below torch's peak reserved memory (NVML missed the peak, or is wrong);
* energy <= 0 (or missing on a GPU) for a trial longer than 5 s;
* the OOM configuration not recorded as ``oom``;
* the trial after it starting more than 256 MiB above the idle level before the OOM trial.

Without CUDA it refuses (exit 2) unless ``--allow-cpu --tiny`` asks for a tiny CPU rehearsal.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bptt_harness.corpus import CorpusSpec, load
from bptt_harness.hardware import device_label, fingerprint
from bptt_harness.model import ModelConfig
from bptt_harness.probe import make_probe, telemetry_problems
from bptt_harness.trainer import RunOptions, TrainConfig, TrialSpec, release_memory, run_trial

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ("role", "bptt", "batch_size", "status", "train_tokens", "train_s", "duration_s", "tokens_per_s",
           "torch_alloc_mib", "torch_reserved_mib", "nvml_device_mib", "nvml_process_mib", "nvml_process_source",
           "energy_j", "energy_source", "j_per_1k_tokens", "mean_power_w", "start_mib", "val_ppl",
           "probe_kind", "device", "device_label", "machine_id", "error")


@dataclass(frozen=True)
class Plan:
    corpus: CorpusSpec
    model: ModelConfig
    grid: tuple[tuple[int, int], ...]     # (bptt, batch size)
    tokens: int
    oom: tuple[int, int, float]           # (bptt, batch size, memory cap MiB)


def plan(tiny: bool, tokens: int | None) -> Plan:
    if tiny:
        # Parameters and gradients alone exceed a 0.05 MiB cap, so the OOM is certain.
        return Plan(CorpusSpec("synthetic:k=8,tokens=20000"), ModelConfig(emsize=32, nhid=32, layers=1, dropout=0.0),
                    ((8, 4), (8, 16), (16, 4), (16, 16)), tokens or 4000, (16, 16, 0.05))
    # bptt 140 x bs 320 x 10k vocabulary: the logits alone are 1.8 GB, far above a 1 GiB cap.
    return Plan(CorpusSpec("default", lower=True, split_punct=True, max_vocab=10000),
                ModelConfig(emsize=650, nhid=650, layers=2, dropout=0.5),
                ((35, 20), (35, 320), (140, 20), (140, 320)), tokens or 1_000_000, (140, 320, 1024.0))


def memory_now(device: torch.device, probe: Any) -> float | None:
    """What the device holds right now: NVML device memory used, else torch's reservation, else RSS."""
    s = probe.read()
    if device.type == "cuda":
        if s is not None and s.mem_used_mib is not None:
            return s.mem_used_mib
        return torch.cuda.memory_reserved(device) / 2**20
    return s.rss_mib if s is not None else None


def row_of(role: str, spec: TrialSpec, result: Any, start_mib: float | None, fp: dict) -> dict:
    p = dataclasses.asdict(result.probe)
    energy = p.get("energy_j")
    return {
        "role": role, "bptt": spec.bptt, "batch_size": spec.batch_size, "status": result.status,
        "train_tokens": result.train_tokens, "train_s": result.train_s, "duration_s": p.get("duration_s"),
        "tokens_per_s": result.tokens_per_s, "torch_alloc_mib": p.get("peak_mem_torch_mib"),
        "torch_reserved_mib": p.get("peak_mem_torch_reserved_mib"), "nvml_device_mib": p.get("peak_mem_nvml_mib"),
        "nvml_process_mib": p.get("peak_mem_nvml_process_mib"), "nvml_process_source": p.get("nvml_process_mem_source"),
        "energy_j": energy, "energy_source": p.get("energy_source"),
        "j_per_1k_tokens": energy / result.train_tokens * 1000 if energy is not None and result.train_tokens else None,
        "mean_power_w": p.get("mean_power_w"), "start_mib": start_mib, "val_ppl": result.val_ppl,
        "probe_kind": p.get("probe_kind"), "device": result.device, "device_label": device_label(fp),
        "machine_id": fp["machine_id"], "error": (result.error or "")[:200] or None,
    }


def _cell(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def table(rows: list[dict]) -> str:
    head = ("role", "bptt", "bs", "status", "tok/s", "alloc MiB", "reserv MiB", "nvml dev", "nvml proc",
            "energy J", "J/1k tok", "mean W", "train s")
    body = [(r["role"], r["bptt"], r["batch_size"], r["status"], _cell(r["tokens_per_s"]), _cell(r["torch_alloc_mib"]),
             _cell(r["torch_reserved_mib"]), _cell(r["nvml_device_mib"]),
             _cell(r["nvml_process_mib"]) + ("*" if r["nvml_process_source"] == "device" else ""),
             _cell(r["energy_j"], 1), _cell(r["j_per_1k_tokens"], 3), _cell(r["mean_power_w"], 1),
             _cell(r["train_s"], 2)) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in (head, *body)]
    if any(r["nvml_process_source"] == "device" for r in rows):
        lines.append("* this PID is not visible to NVML (container): device-level memory shown")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """Temp file then os.replace: a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(p: Plan, device: torch.device, log: Callable[[str], None]) -> tuple[list[dict], float | None]:
    fp = fingerprint(device)
    corpus = load(p.corpus)
    reader = make_probe(device)
    rows = []

    def trial(role: str, bptt: int, bs: int, cap: float | None = None) -> None:
        spec = TrialSpec(bptt=bptt, batch_size=bs, model=p.model, train=TrainConfig(tokens=p.tokens, checkpoints=1))
        release_memory(device)
        start = memory_now(device, reader)
        result = run_trial(spec, corpus, device, probe=make_probe(device), options=RunOptions(memory_cap_mib=cap))
        rows.append(row_of(role, spec, result, start, fp))
        log(f"  {role:<9} bptt={bptt:<4} bs={bs:<4} {result.status:<8} {result.train_s:6.2f} s")

    log(f"gpu-check on {device} ({device_label(fp)}), {corpus.name}, {p.model.layers}x{p.model.nhid} "
        f"{p.model.type}, {p.tokens:,} tokens per trial")
    for bptt, bs in p.grid:
        trial("grid", bptt, bs)
    release_memory(device)
    idle = memory_now(device, reader)
    trial("oom", *p.oom)
    trial("after-oom", *p.grid[0])
    return rows, idle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Short CUDA grid + OOM check of the probe's numbers.")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only with --allow-cpu --tiny)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU is visible (needs --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and budget: a rehearsal, not a measurement")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per trial")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "published", help="CSV directory")
    args = ap.parse_args(argv)

    want_cuda = args.device.startswith("cuda")
    if not (want_cuda and torch.cuda.is_available()):
        if not (args.allow_cpu and args.tiny):
            print("gpu-check: no CUDA GPU is visible; run it on a machine with an NVIDIA GPU "
                  "(or pass --allow-cpu --tiny for a CPU rehearsal)", file=sys.stderr)
            return 2
        device = torch.device("cpu")
    else:
        device = torch.device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from threads; a shared CPU loses a lot
    try:
        rows, idle = run(plan(args.tiny, args.tokens), device, lambda s: print(s, file=sys.stderr))
    finally:
        torch.set_num_threads(threads)
    label = rows[0]["device_label"] + ("-tiny" if args.tiny else "")
    path = args.out / f"gpu-check-{label}.csv"
    write_csv(rows, path)
    print(table(rows))
    print(f"idle before the OOM trial: {_cell(idle)} MiB; wrote {path}")
    failures = telemetry_problems(rows, idle, gpu=device.type == "cuda")
    for line in failures:
        print(f"GPU-CHECK FAILED: {line}", file=sys.stderr)
    if failures:
        return 1
    print(f"gpu-check passed on {rows[0]['device_label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
