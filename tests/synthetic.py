"""A test fixture: synthetic trial records with known laws, for the tests and benchmarks/bench_report.py.

The laws are simple on purpose, so a test knows the answer: peak memory is
``mem_base_mib + mem_slope_mib * bptt * batch_size`` (anything above the card is ``oom``),
throughput saturates with tokens per step, and perplexity improves with more optimiser steps and
with longer windows up to a point. The rules-of-thumb tests turn the other knobs: memory that grows
with bptt as ``bptt ** mem_bptt_power`` plus ``mem_per_bs_mib`` per sequence, throughput times
``(bptt / 35) ** -speed_bptt_exponent``, divergence where ``lr * (bptt / 35) ** diverge_bptt_exponent``
reaches ``diverge_lr`` (times a per-run noise), and a largest gradient norm ``grad_norm * (bptt / 35) **
grad_norm_exponent``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from bptt_harness.record import Hardware, ProbeReport, StudyInfo, TrialConfig, TrialRecord, TrialResult


@dataclass(frozen=True)
class SyntheticLaw:
    mem_base_mib: float = 600.0
    mem_slope_mib: float = 0.3
    card_mib: float = 24_576.0
    peak_tokens_per_s: float = 400_000.0
    half_tokens_per_step: float = 3_000.0
    budget_tokens: int = 2_000_000
    power_w: float = 250.0
    noise: float = 0.01
    diverge_lr: float = 30.0  # configurations with lr >= this diverge (at bptt 35, see diverge_bptt_exponent)
    diverge_bptt_exponent: float = 0.0
    diverge_noise: float = 0.0  # the threshold of each run times exp(this x a standard normal)
    mem_bptt_power: float = 1.0
    mem_per_bs_mib: float = 0.0
    speed_bptt_exponent: float = 0.0
    grad_norm: float = 3.0
    grad_norm_exponent: float = 0.0
    grad_norm_noise: float = 0.0


def synthetic_records(bptts=(35, 70, 140, 280, 560), batch_sizes=(10, 20, 40, 80, 160, 320), *, repeats: int = 1,
                      lrs=(20.0,), law: SyntheticLaw = SyntheticLaw(), seed: int = 0, study: str = "synthetic",
                      machine_id: str = "m-synthetic", gpu_name: str | None = "Synthetic GPU 24GB",
                      cost: str = "seconds_per_token", clips=(0.25,), vocab_size: int | None = None) -> list[dict]:
    """One record per (bptt, batch size, lr, clip, repeat), shaped like ``trial.user_attrs["record"]``."""
    rng = np.random.default_rng(seed)
    out = []
    number = 0
    for bptt, bs, lr, clip, rep in itertools.product(bptts, batch_sizes, lrs, clips, range(repeats)):
        x = bptt * bs
        key = (f"bptt={bptt},batch_size={bs}" + (f",clip={clip:g}" if len(clips) > 1 else "")
               + (f",lr={lr:g}" if len(lrs) > 1 else ""))
        mem = law.mem_base_mib + law.mem_slope_mib * bptt ** law.mem_bptt_power * bs + law.mem_per_bs_mib * bs
        tps = law.peak_tokens_per_s * x / (x + law.half_tokens_per_step) * (1 + law.noise * rng.standard_normal())
        tps *= (bptt / 35) ** -law.speed_bptt_exponent
        edge = law.diverge_lr * (math.exp(law.diverge_noise * rng.standard_normal()) if law.diverge_noise else 1.0)
        grad_norm = law.grad_norm * (bptt / 35) ** law.grad_norm_exponent
        if law.grad_norm_noise:
            grad_norm *= math.exp(law.grad_norm_noise * rng.standard_normal())
        steps = max(1, law.budget_tokens // x)
        ppl = 80.0 * (1 + 25 / math.sqrt(steps)) * (1 + 6 / bptt) * (1 + law.noise * rng.standard_normal())
        train_s = law.budget_tokens / tps
        status, error, diverged_step = "ok", None, None
        if mem > law.card_mib:
            status, error = "oom", f"CUDA out of memory. Tried to allocate {mem - law.card_mib:.0f} MiB"
        elif lr * (bptt / 35) ** law.diverge_bptt_exponent >= edge:
            status, error, diverged_step = "diverged", "non-finite loss or gradient norm", int(steps // 3)
        final_loss = math.log(ppl)
        v0 = math.log(4 * ppl)
        val_curve = []
        if status == "ok":
            for k in range(1, 5):
                loss = final_loss + (v0 - final_loss) * (1 - k / 4) ** 2
                val_curve.append({"step": steps * k // 4, "tokens": law.budget_tokens * k // 4,
                                  "seconds": round(train_s * k / 4, 4), "loss": loss, "ppl": math.exp(loss)})
        ok = status == "ok"
        probe = ProbeReport(
            probe_kind="nvml" if gpu_name else "cpu", peak_mem_mib=mem, peak_mem_torch_mib=mem * 0.9,
            peak_mem_torch_reserved_mib=mem, peak_mem_nvml_mib=mem + 500, peak_mem_nvml_process_mib=mem + 400,
            idle_mem_nvml_mib=0.0 if gpu_name else None, energy_j=law.power_w * train_s if gpu_name else None,
            mean_power_w=law.power_w if gpu_name else None) if ok else ProbeReport()
        result = TrialResult(
            status=status, error=error, diverged_step=diverged_step, bptt=bptt, batch_size=bs, seed=rep,
            device="cuda" if gpu_name else "cpu", val_loss=final_loss if ok else None, val_ppl=ppl if ok else None,
            best_val_loss=final_loss if ok else None, best_val_ppl=ppl if ok else None,
            budget_tokens=law.budget_tokens, train_tokens=law.budget_tokens if ok else 0, steps=steps if ok else 0,
            warmup_steps=5 if ok else 0, tokens_per_s=tps if ok else None, train_s=train_s if ok else 0.0, eval_s=0.5,
            wall_s=train_s + 1.0 if ok else 1.0, max_grad_norm=grad_norm, clipped_frac=0.4, n_params=1_000_000,
            flops_per_token=6e6, achieved_flops=6e6 * tps if ok else None, final_lr=lr, val_curve=val_curve,
            probe=probe)
        record = TrialRecord(
            trial_number=number, config_key=key, status=status, error=error,
            config=TrialConfig(values=dict(bptt=bptt, batch_size=bs, lr=lr, nhid=650, emsize=650, layers=2, dropout=0.5,
                                           variable_bptt=False, clip=clip), model="lstm", optimizer="sgd", seed=rep,
                               repeat=rep),
            result=result,
            hardware=Hardware(gpu_name=gpu_name, gpu_memory_mib=int(law.card_mib) if gpu_name else None,
                              machine_id=machine_id, hostname="synthetic-host", cpu_model="Synthetic CPU",
                              cpu_cores=16),
            study=StudyInfo(name=study, corpus="synthetic", vocab_size=vocab_size, budget="tokens",
                            budget_tokens=law.budget_tokens,
                            objectives=["val_ppl", cost], cost=cost),
            started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:01:00+00:00",
            worker="synthetic-host:1")
        out.append(record.to_dict())
        number += 1
    return out


def write_optuna_study(records: list[dict], storage, study_name: str, *, extra_trials: tuple[str, ...] = ()) -> None:
    """Store ``records`` as finished trials of a new Optuna study (what a sweep leaves behind).

    ``extra_trials`` adds record-less trials in the given states (``"FAIL"``: a worker that died,
    ``"RUNNING"``: one still going).
    """
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=["minimize", "minimize"])
    bptts = sorted({r["config"]["bptt"] for r in records} | {35})
    bss = sorted({r["config"]["batch_size"] for r in records} | {20})
    dists = {"bptt": CategoricalDistribution(bptts), "batch_size": CategoricalDistribution(bss)}
    for rec in records:
        rec = {k: v for k, v in rec.items() if k not in ("trial_number", "state")}
        params = {"bptt": rec["config"]["bptt"], "batch_size": rec["config"]["batch_size"]}
        res = rec["result"]
        if rec["status"] == "ok":
            tps = res.get("tokens_per_s") or 1.0
            study.add_trial(create_trial(state=TrialState.COMPLETE, params=params, distributions=dists,
                                         values=[res["val_ppl"], 1.0 / tps], user_attrs={"record": rec}))
        elif rec["status"] in ("oom", "diverged"):
            # What a sweep stores: infeasible trials complete with infinite values (record.INFEASIBLE).
            study.add_trial(create_trial(state=TrialState.COMPLETE, params=params, distributions=dists,
                                         values=[math.inf, math.inf], user_attrs={"record": rec}))
        else:
            state = TrialState.PRUNED if rec["status"] == "pruned" else TrialState.FAIL
            study.add_trial(create_trial(state=state, params=params, distributions=dists, user_attrs={"record": rec}))
    for state in extra_trials:
        st = TrialState[state]
        if st == TrialState.RUNNING:
            study.enqueue_trial({"bptt": 35, "batch_size": 20})
            study.ask()  # leaves it RUNNING
        else:
            study.add_trial(create_trial(state=st, params={"bptt": 35, "batch_size": 20}, distributions=dists))
