"""The trial record: one typed schema for what a trial measured.

Every field is declared once here, with its unit and meaning as field metadata. The trainer fills a
:class:`TrialResult` (with the probe's :class:`ProbeReport` inside it), the study wraps it in a
:class:`TrialRecord` (configuration, hardware, study), and everything else is derived from these
declarations: the JSON stored with each Optuna trial (:meth:`TrialRecord.to_dict`), the columns of
``trials.csv`` (:func:`trial_columns`, :func:`flatten`) and the column table in
``bptt_harness/report/README.md`` (:func:`columns_markdown`, written there by ``scripts/readme_tables.py``;
a test fails when the README disagrees).

This module imports neither torch nor pandas, so parsing a study file or reading results stays light.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from bptt_harness.fieldkind import field_kind
from bptt_harness.search_keys import SEARCH_KEYS

Status = Literal["ok", "diverged", "oom", "pruned", "timeout", "failed"]
STATUSES: tuple[str, ...] = get_args(Status)
# Trials the sampler is told are infeasible (Optuna constraints): the memory and stability walls.
INFEASIBLE: tuple[str, ...] = ("oom", "diverged")
# The statuses of trials Optuna records as FAIL. A FAIL trial whose record says otherwise (ok, oom, ...) lost
# its completion (its worker died, or a torn journal was cut back, between the record and the state): it
# did not finish, and runs again.
FAIL_STATUSES: tuple[str, ...] = ("timeout", "failed")
SCHEMA_VERSION = 2

# The study's cost objective -> the column that measures it (lower is better).
COST_COLUMNS = {"seconds_per_token": "seconds_per_ktok", "peak_memory": "peak_mem_mib",
                "joules_per_token": "joules_per_ktok"}
COST_LABELS = {"seconds_per_ktok": "seconds per 1k tokens", "peak_mem_mib": "peak memory (MiB)",
               "joules_per_ktok": "joules per 1k tokens"}


def col(default: Any = None, doc: str = "", unit: str = "", *, csv: bool = True, name: str | None = None,
        factory: Any = None, attr: bool = False, keys: bool = False) -> Any:
    """A record field: ``doc`` and ``unit`` document its column; ``csv=False`` keeps it out of trials.csv;
    ``name`` is the column's name when it differs from the field's; ``attr=True`` also stores it as a flat
    Optuna user attribute (see :func:`user_attrs`); ``keys=True``: a dict of the searched keys' values, stored
    flat in its parent and one column per key of the registry (:data:`bptt_harness.search_keys.SEARCH_KEYS`)."""
    meta = {"doc": doc, "unit": unit, "csv": csv, "column": name, "attr": attr, "keys": keys}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ProbeReport:
    """What the probe measured around the training part of a trial, and around its validation apart.

    On CUDA memory is the torch caching allocator's (and NVML's). On CPU the training peak is counted
    by the trainer (the tensors a step holds), because the process's resident set depends on what
    earlier trials left and on the allocator's history: measured here, the same configuration's
    resident-set increase varied by 20% between fresh processes and by 25-35% after a larger trial.
    """

    probe_kind: str | None = col(None, "nvml (GPU telemetry) or cpu (process probe)")
    probe_fallback_reason: str | None = col(None, "why the NVML probe was not used")
    interval_ms: int | None = col(None, "sampling interval of the probe's background thread (empty: no thread)", "ms")
    samples: int | None = col(None, "samples taken during training")
    duration_s: float | None = col(None, "length of the probe's training window", "s")
    peak_mem_mib: float | None = col(
        None, "THE training peak memory: torch max_memory_reserved on CUDA; on CPU the bytes a training step "
              "holds, counted exactly (weights, gradients, optimiser state and the activations autograd saves: "
              "what the CPU memory cap counts, never what an earlier trial left in the process)", "MiB", attr=True)
    peak_mem_torch_mib: float | None = col(None, "torch max_memory_allocated during training (CUDA)", "MiB")
    peak_mem_torch_reserved_mib: float | None = col(None, "torch max_memory_reserved during training (CUDA)", "MiB")
    peak_mem_nvml_mib: float | None = col(None, "peak device memory used during training (NVML, whole GPU)", "MiB")
    peak_mem_nvml_process_mib: float | None = col(
        None, "peak device memory of this process during training (NVML; the whole device where the "
              "driver does not show processes, see nvml_process_mem_source)", "MiB")
    nvml_process_mem_source: str | None = col(None, "process (this PID's memory) or device (whole GPU)")
    idle_mem_nvml_mib: float | None = col(None, "device memory used when training started (NVML)", "MiB")
    peak_rss_mib: float | None = col(
        None, "peak resident set of the whole process during training (includes what the process held before "
              "the trial, and memory the allocator kept from earlier trials)", "MiB")
    rss_start_mib: float | None = col(None, "resident set of the process when the trial started", "MiB")
    energy_j: float | None = col(None, "energy used while training, validation excluded", "J")
    energy_source: str | None = col(None, "how energy was measured (counter, rapl or power-integral)")
    mean_power_w: float | None = col(None, "mean power while training (GPU, or CPU package from RAPL)", "W")
    max_power_w: float | None = col(None, "largest GPU power sample while training", "W")
    mean_util_pct: float | None = col(None, "mean GPU utilisation while training", "%")
    mean_sm_clock_mhz: float | None = col(None, "mean SM clock while training", "MHz")
    max_temp_c: float | None = col(None, "highest GPU temperature while training", "°C")
    cpu_time_s: float | None = col(None, "CPU time of the process while training (all threads)", "s")
    cpu_util_pct: float | None = col(None, "process CPU use while training, percent of one core", "%")
    eval_s: float | None = col(None, "length of the checkpoint validations inside the trial", "s",
                               name="eval_probe_s")
    eval_energy_j: float | None = col(None, "energy used by the checkpoint validations", "J")
    eval_peak_mem_mib: float | None = col(
        None, "peak memory of the checkpoint validations: torch max_memory_reserved on CUDA; on CPU the "
              "resident-set peak during validation above the resident set when the trial started", "MiB")


@dataclass
class TrialResult:
    """Everything one trial measured: what :func:`bptt_harness.trainer.run_trial` returns."""

    status: Status = col("ok", "ok, diverged, oom, pruned, timeout or failed", csv=False)
    error: str | None = col(None, "why the trial did not finish ok", csv=False)
    diverged_step: int | None = col(None, "optimiser step at which the trial diverged")
    bptt: int = col(0, "window length of the trial", csv=False)
    batch_size: int = col(0, "batch size of the trial", csv=False)
    seed: int = col(0, "seed of the trial", csv=False)
    device: str = col("cpu", "torch device of the trial")
    val_loss: float | None = col(None, "final validation cross-entropy", "nats/token")
    val_ppl: float | None = col(None, "final validation perplexity", attr=True)
    best_val_loss: float | None = col(None, "best validation cross-entropy over the checkpoints", "nats/token",
                                      csv=False)
    best_val_ppl: float | None = col(None, "best validation perplexity over the checkpoints")
    test_ppl: float | None = col(None, "test perplexity (when evaluated)", attr=True)
    budget_tokens: int | None = col(
        None, "the token budget as resolved for this trial (epochs x train split tokens with `epochs`)", "tokens",
        name="resolved_budget_tokens")
    train_tokens: int = col(0, "training target tokens processed; equals the token budget for a finished trial",
                            "tokens")
    steps: int = col(0, "optimiser steps taken")
    tokens_per_step: int | None = col(None, "bptt x batch_size: target tokens in one full window", "tokens")
    max_window: int | None = col(None, "longest training window (bptt, or longer with variable-length windows); "
                                       "x batch_size is the memory model's x", "tokens")
    warmup_steps: int = col(0, "first steps of the trial excluded from tokens_per_s")
    timing_includes_warmup: bool = col(
        False, "true when the trial was too short to exclude its warm-up steps: tokens_per_s then includes "
               "them and is marked in the report")
    tokens_per_s: float | None = col(None, "training throughput after warm-up", "tokens/s", attr=True)
    seconds_per_ktok: float | None = col(None, "training seconds per 1,000 tokens (1000 / tokens_per_s)", "s",
                                         attr=True)
    train_s: float = col(0.0, "training seconds (validation excluded)", "s")
    eval_s: float = col(0.0, "validation and test seconds", "s")
    wall_s: float = col(0.0, "wall-clock seconds of the whole trial", "s")
    max_grad_norm: float | None = col(None, "largest gradient norm before clipping")
    clipped_frac: float | None = col(None, "fraction of steps whose gradient was clipped")
    n_params: int = col(0, "model parameters")
    flops_per_token: float = col(0.0, "estimated training FLOPs per token", "FLOP")
    evaluation: str | None = col(None, "how validation was made fair (the model family's rule): carried (the state "
                                       "carried through the split) or sliding (overlapping windows of eval_bptt)")
    achieved_flops: float | None = col(None, "tokens_per_s x flops_per_token", "FLOP/s", name="achieved_flops_per_s")
    final_lr: float | None = col(None, "learning rate at the end (after annealing)")
    joules_per_ktok: float | None = col(None, "training energy per 1,000 training tokens (validation excluded)", "J",
                                        attr=True)
    train_curve: list[dict] = col(csv=False, factory=list,
                                  doc="training every log_every steps: step, tokens, seconds, loss (mean over the "
                                      "interval), grad_norm (mean gradient norm before clipping over the interval), "
                                      "lr (the learning rate then, before variable-length windows rescale it)")
    val_curve: list[dict] = col(csv=False, factory=list,
                                doc="validation at each checkpoint: step, tokens, seconds, loss, ppl")
    time_curve: list[dict] = col(csv=False, factory=list,
                                 doc="validation on the study's time grid (time_grid_s): grid_s, seconds, step, "
                                     "tokens, loss, ppl")
    # The diagnostics ([diagnostics] in the study file; bptt_harness.diagnose), at the end of training.
    effective_context_tokens: int | None = col(
        None, "diagnostics: the smallest n of the context ladder (1, 2, 4, ... to 4 x the study's largest bptt) "
              "whose loss, with only the last n tokens real (the state warmed on text from elsewhere), is within "
              "context_tolerance (default 1%) of the carried-state loss; empty: not measured, or more than the "
              "ladder's top", "tokens")
    gradient_reach_tokens: int | None = col(
        None, "diagnostics: the largest lag k (up to 2 x the study's largest bptt) at which |d loss_t / d "
              "embedding_(t-1-k)| is at least reach_fraction (default 1%) of its largest value", "tokens")
    truncation_bias_k: int | None = col(
        None, "diagnostics: the smallest truncation length K (2, 8, 32, ... and the trial's bptt) whose gradient "
              "differs from backpropagation through 2 x the study's largest bptt by less than bias_tolerance "
              "(default 10%): ||E[g_K - g_long]|| / ||E g_long||; empty: none of the ladder", "tokens")
    noise_scale_tokens: float | None = col(
        None, "diagnostics: the gradient noise scale B_simple = tr(Sigma) / |G|^2 at the trial's bptt, in tokens "
              "per step (from gradients at noise_small and noise_big sequences; McCandlish et al. 2018): batches "
              "above it gain little per token at this loss; empty: |G|^2 not resolved", "tokens")
    diagnose_s: float | None = col(None, "seconds the diagnostics took inside the trial (not training time)", "s")
    diagnose_energy_j: float | None = col(None, "energy the diagnostics used (probe phase 'diagnose'; not training's)",
                                          "J")
    model_path: str | None = col(None, "where the trained weights were kept ([diagnostics] save_model = true)")
    diagnostics: list[dict] = col(csv=False, factory=list,
                                  doc="the diagnostics at each measured point: phase (init, checkpoint, end), step, "
                                      "tokens, the four columns and their curves")
    probe: ProbeReport = field(default_factory=ProbeReport)

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = from_dict(ProbeReport, self.probe)
        derive(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def derive(r: TrialResult, config: TrialConfig | None = None) -> None:
    """The columns computed from others, in one place (the trainer, stored records and the report all use
    it). ``config`` gives the shape when the result has none (a trial whose worker died stored only it)."""
    shape = (r.bptt, r.batch_size) if r.bptt and r.batch_size else \
        (config.value("bptt"), config.value("batch_size")) if config is not None else (0, 0)
    if all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in shape):
        r.tokens_per_step = shape[0] * shape[1]
    r.seconds_per_ktok = 1000.0 / r.tokens_per_s if r.tokens_per_s else None
    e = r.probe.energy_j
    r.joules_per_ktok = e * 1000.0 / r.train_tokens if e is not None and r.train_tokens else None


@dataclass
class TrialConfig:
    """The configuration a trial measured: the searched keys' values and what else defines it.

    Stored flat (``{"bptt": 35, "batch_size": 20, ..., "model": "lstm", ...}``): ``values`` holds every key
    of :data:`bptt_harness.search_keys.SEARCH_KEYS`, each a column of ``trials.csv`` documented there.
    """

    values: dict[str, Any] = col(factory=dict, keys=True,
                                 doc="the searched keys (bptt_harness.search_keys): one column each")
    model: str | None = col(None, "the model family (lstm, gru, ...), or a factory's module:function; the shape columns "
                                  "(nhid, emsize, layers, dropout) are those the family reads (a factory's: only the "
                                  "searched ones; n_params says its size)")
    model_revision: int | None = col(None, "revision of the model family's code (spec.FamilyInfo.revision): two "
                                           "revisions compute different models; empty in records older than "
                                           "the column, which are revision 1")
    optimizer: str | None = col(None, "sgd or adamw")
    seed: int | None = col(None, "random seed of the trial")
    repeat: int | None = col(None, "repeat index of the configuration (0 for the first run)")
    slices: str | None = col(None, "the study's named slices ([slices.NAME]) this configuration belongs to, "
                                   "comma-separated (a configuration two slices share is in both); the "
                                   "configurations of one slice differ only in what it varies "
                                   "(slices_description); empty for a study without slices")

    def value(self, name: str) -> Any:
        """A searched key's value (None when the record does not hold it)."""
        return self.values.get(name)


@dataclass
class LrChoice:
    """How the trial's learning rate (``lr``) was set: the study's ``[lr]`` rule and what tuning cost."""

    rule: str | None = col(None, "the study's lr rule: fixed, linear, sqrt or tuned (fixed for a configuration "
                                "whose slice holds the lr fixed)", name="lr_rule")
    rule_lr: float | None = col(None, "the rule's lr for this shape (for tuned: the middle of the ladder)",
                                name="lr_rule_value")
    tune_tokens: int | None = col(
        None, "tuned: training tokens the lr ladder of this configuration cost (on the trial that ran it; 0 when "
              "it reused an earlier ladder)", "tokens", name="lr_tune_tokens")
    tune_s: float | None = col(None, "tuned: wall-clock seconds the lr ladder cost (as lr_tune_tokens)", "s",
                               name="lr_tune_s")
    ladder: list[dict] = col(csv=False, factory=list, doc="tuned: every rung of the ladder: lr, val_loss, status")


@dataclass
class Hardware:
    """The machine a trial ran on (:func:`bptt_harness.hardware.fingerprint`)."""

    gpu_name: str | None = col(None, "GPU model (empty on CPU)")
    gpu_memory_mib: int | None = col(None, "GPU memory as the driver reports it", "MiB")
    gpu_compute_capability: str | None = col(None, "CUDA compute capability")
    gpu_count: int | None = col(None, "GPUs visible")
    driver_version: str | None = col(None, "NVIDIA driver")
    cuda_version: str | None = col(None, "CUDA version of torch")
    cudnn_version: int | None = col(None, "cuDNN version of torch")
    torch_version: str | None = col(None, "torch version")
    malloc: str | None = col(None, "the C allocator while training: kept (freed memory kept for reuse, as "
                                   "bptt-harness's own processes ask of glibc), default, or what set it otherwise")
    cpu_model: str | None = col(None, "CPU model")
    cpu_cores: int | None = col(None, "CPU cores this process may use")
    ram_gib: float | None = col(None, "host memory", "GiB")
    hostname: str | None = col(None, "host the trial ran on")
    machine_id: str | None = col(None, "stable hardware fingerprint of that host")
    python_version: str | None = col(None, "Python version")
    platform: str | None = col(None, "operating system")


@dataclass
class StudyInfo:
    """What every trial of the study shares."""

    name: str | None = col(None, "Optuna study name", name="study")
    corpus: str | None = col(None, "corpus name")
    corpus_source: str | None = col(None, "where the corpus came from", csv=False)
    corpus_licence: str | None = col(None, "licence of the corpus", csv=False)
    vocab_size: int | None = col(None, "vocabulary size")
    corpus_hash: str | None = col(None, "sha256 of the corpus's text: the data the trial measured (a study "
                                        "refuses to resume on other data)")
    budget: str | None = col(None, "tokens or seconds: what every trial was given the same amount of")
    budget_tokens: int | None = col(None, "training-token budget of the study as declared", "tokens")
    budget_epochs: float | None = col(None, "the study's budget in passes over the train split (when declared so)")
    budget_seconds: float | None = col(None, "training-time budget", "s")
    objectives: list[str] = col(csv=False, factory=list, doc="the study's objectives")
    cost: str | None = col(None, "the study's cost objective (seconds_per_token, peak_memory or joules_per_token)")
    lr_rule_text: str | None = col(None, "the study's lr rule in words ([lr]): how each shape's lr was set",
                                   name="lr_rule_description")
    slices_text: str | None = col(
        None, "the study's slices in words, `; `-separated: each one's name, what varies across it, its tokens "
              "per step and its lr (fixed across the slice, or from the [lr] rule); empty without slices",
        name="slices_description")
    race_max_seeds: int | None = col(None, "[race] max_seeds: seeds a contender may get (empty: no racing)")
    race_trials: int | None = col(None, "[race] trials: extra runs the race may spend (empty: no racing)")
    host_workers: int | None = col(
        None, "trials running at once on this host when it ran; above 1 on CPU the workers shared the "
              "machine (each pinned to its own cores), so its timings are marked")


@dataclass
class TrialRecord:
    """The stored measurement of one trial (``trial.user_attrs["record"]``); the report reads exactly this."""

    trial_number: int | None = col(None, "Optuna trial number (filled in when read back)")
    state: str | None = col(None, "Optuna trial state (COMPLETE, PRUNED, FAIL; filled in when read back)")
    config_key: str | None = col(None, "the configuration, identical for repeats of it (e.g. bptt=35,batch_size=20)",
                                 attr=True)
    config: TrialConfig = field(default_factory=TrialConfig)
    lr_choice: LrChoice = field(default_factory=LrChoice)
    status: Status = col("failed", "ok, diverged, oom, pruned, timeout or failed", attr=True)
    error: str | None = col(None, "why the trial did not finish ok (empty when ok)")
    result: TrialResult = field(default_factory=TrialResult)
    hardware: Hardware = field(default_factory=Hardware)
    study: StudyInfo = field(default_factory=StudyInfo)
    worker: str | None = col(None, "host:pid:token of the worker that ran the trial")
    started_at: str | None = col(None, "start time, ISO 8601")
    finished_at: str | None = col(None, "end time, ISO 8601")
    schema: int = col(SCHEMA_VERSION, "version of this record's schema", csv=False)

    def to_dict(self) -> dict:
        """The stored JSON: nested like the dataclasses (the searched keys flat in ``config``), inf and nan
        written as null."""
        return finite_or_none(_stored(self))

    @classmethod
    def from_dict(cls, d: Any) -> TrialRecord:
        """Tolerant reading of a stored record (this schema or the first one): unknown keys are ignored,
        missing ones take their defaults, an unknown status reads as ``failed``."""
        rec = from_dict(cls, d)
        if rec.status not in STATUSES:
            rec.status = "failed"
        derive(rec.result, rec.config)
        return rec


# --------------------------------------------------------------------------- reading, flattening

def finite_or_none(obj: Any) -> Any:
    """JSON has no inf/nan: stored records and --json output write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def _stored(obj: Any) -> Any:
    """``dataclasses.asdict`` with each ``keys=True`` dict spread into its parent."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return copy.deepcopy(obj)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = _stored(getattr(obj, f.name))
        if f.metadata.get("keys"):
            out = {**value, **out}
        else:
            out[f.name] = value
    return out


@functools.cache  # resolving the string annotations is slow: 10,000 records read each class's hints 7 times
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def from_dict(cls: type, d: Any) -> Any:
    """Build dataclass ``cls`` from a dict, recursively; a non-dict gives the defaults."""
    d = d if isinstance(d, dict) else {}
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("keys"):
            kwargs[f.name] = {k: d[k] for k in SEARCH_KEYS if k in d}
            continue
        if f.name not in d:
            continue
        sub = _dataclass_of(hints[f.name])
        kwargs[f.name] = from_dict(sub, d[f.name]) if sub else d[f.name]
    return cls(**kwargs)


@dataclass(frozen=True)
class Column:
    """One column of ``trials.csv``: where it comes from in the record, its kind, unit and meaning."""

    name: str
    path: tuple[str, ...]
    kind: str          # "int", "float", "bool" or "str"
    unit: str
    doc: str
    attr: bool = False  # also a flat Optuna user attribute


def _walk(cls: type, prefix: tuple[str, ...]) -> list[Column]:
    hints = _hints(cls)
    out: list[Column] = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(hints[f.name])
        if f.metadata.get("keys"):
            out += [Column(k.name, (*prefix, f.name, k.name), k.kind, k.unit, k.doc, k.attr) for k in SEARCH_KEYS.values()]
        elif sub is not None:
            out += _walk(sub, (*prefix, f.name))
        elif f.metadata.get("csv", True):
            out.append(Column(f.metadata.get("column") or f.name, (*prefix, f.name), field_kind(hints[f.name])[0] or "str",
                              f.metadata.get("unit", ""), f.metadata.get("doc", ""), f.metadata.get("attr", False)))
    return out


def trial_columns() -> list[Column]:
    """The columns of ``trials.csv``, in order."""
    return list(_columns(tuple(SEARCH_KEYS)))


@functools.cache  # walked once per set of searched keys, not once per record
def _columns(searched: tuple[str, ...]) -> tuple[Column, ...]:
    cols = _walk(TrialRecord, ())
    names = [c.name for c in cols]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:  # a schema edit that would silently overwrite a column
        raise AssertionError(f"trial record columns declared twice: {sorted(dupes)}")
    return tuple(cols)


def flatten(rec: TrialRecord) -> dict[str, Any]:
    """One record -> one ``trials.csv`` row (column name -> value)."""
    row: dict[str, Any] = {}
    for c in _columns(tuple(SEARCH_KEYS)):
        v: Any = rec
        for part in c.path:
            v = v.get(part) if isinstance(v, dict) else getattr(v, part)
        row[c.name] = v
    return row


# The diagnostics' headline numbers (``bptt_harness.diagnose``): flat user attributes wherever a record has them.
HEADLINE_DIAGNOSTICS = ("effective_context_tokens", "gradient_reach_tokens", "truncation_bias_k", "noise_scale_tokens")


def user_attrs(rec: TrialRecord) -> dict[str, Any]:
    """The main metrics of a record as flat Optuna user attributes, named like their ``trials.csv`` columns:
    optuna-dashboard sorts and plots user attributes, but not the fields inside the nested ``record`` (it
    shows that blob cut at 1,024 characters). The columns marked ``attr=True`` and the diagnostics' headline
    numbers where the record has measured them."""
    row = flatten(rec)
    names = [c.name for c in trial_columns() if c.attr] + [n for n in HEADLINE_DIAGNOSTICS if row.get(n) is not None]
    return finite_or_none({name: row[name] for name in dict.fromkeys(names)})


def columns_markdown() -> str:
    """The ``trials.csv`` table of ``bptt_harness/report/README.md``."""
    lines = ["| column | unit | meaning |", "|---|---|---|"]
    for c in trial_columns():
        lines.append(f"| `{c.name}` | {c.unit} | {c.doc} |")
    return "\n".join(lines)
