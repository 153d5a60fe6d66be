"""Study files (TOML) -> a validated :class:`StudyConfig`.

Every key is checked: an unknown key, a wrong type or a bad value is one :class:`HarnessError`
line naming the key, the value, what is allowed and, for a typo, the closest valid key.
``studies/README.md`` documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bptt_harness.design import Point, Slice, held_lr, point_of, slice_names, union_points
from bptt_harness.diagnose_options import DiagnoseOptions
from bptt_harness.errors import HarnessError
from bptt_harness.fieldkind import field_kinds
from bptt_harness.lr import LrRule, parse_lr_table
from bptt_harness.search_keys import CELL, SEARCH_KEYS
from bptt_harness.spec import CorpusSpec, LogTarget, ModelConfig, TrainConfig, parse_log_targets
from bptt_harness.urls import database_name, redact

SAMPLERS = ("grid", "tpe", "random", "nsga2")
PRUNERS = ("none", "median", "hyperband")
COSTS = ("seconds_per_token", "peak_memory", "joules_per_token")
TOP_KEYS = ("name", "description", "objectives", "sampler", "pruner", "trials", "storage", "max_memory_gib",
            "seed", "device", "workers", "log", "corpus", "model", "train", "search", "slices", "lr", "race",
            "diagnostics")
# [train] keys beyond TrainConfig's own fields.
TRAIN_EXTRA = ("repeats",)
STORAGE_FORMS = "sqlite:///path/study.db, journal:path/journal.log or postgresql://user@host/db"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class RaceConfig:
    """``[race]``: ``max_seeds`` runs per configuration at most; ``trials`` extra runs in all."""

    max_seeds: int = 3
    trials: int = 6

    def __post_init__(self) -> None:
        for key, low in (("max_seeds", 2), ("trials", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise HarnessError(f"race {key} = {value!r} must be an integer >= {low}")


@dataclass(frozen=True)
class ParamSpace:
    """One searched parameter: a list of choices, or a range ``low..high`` (optionally log or stepped)."""

    name: str
    kind: str  # "int", "float" or "bool"
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of a range (parsing checked both are there)."""
        if self.low is None or self.high is None:
            raise HarnessError(f"search {self.name}: a range needs low and high, e.g. {{ low = 10, high = 80 }}")
        return self.low, self.high

    def grid(self) -> list:
        """Values for a grid: the choices, a stepped range, or doublings ``low, 2 low, ...`` up to ``high``."""
        if self.choices is not None:
            return list(self.choices)
        low, high = self.bounds()
        if self.kind == "int" and self.step is not None:
            return list(range(int(low), int(high) + 1, int(self.step)))
        if self.kind == "int" and self.log:
            out, v = [], int(low)
            while v <= high:
                out.append(v)
                v *= 2
            return out
        raise HarnessError(
            f"search {self.name}: a grid needs a list of values or an integer range with log = true or step; "
            f"got a {self.kind} range {self.low}..{self.high}")

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high

    def max_value(self) -> Any:
        return max(self.choices) if self.choices is not None else self.high


@dataclass(frozen=True)
class StudyConfig:
    """A validated study file. Paths are resolved; ``raw`` is the parsed TOML (stored with the study)."""

    name: str
    corpus: CorpusSpec
    model: ModelConfig
    train: TrainConfig
    search: dict[str, ParamSpace]
    objectives: tuple[str, ...] = ("val_ppl",)
    sampler: str = "tpe"
    pruner: str = "none"
    trials: int | None = None
    storage: str | None = None
    max_memory_gib: float | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 1
    repeats: int = 1
    lr_rule: LrRule = field(default_factory=LrRule)
    race: RaceConfig | None = None
    log: tuple[LogTarget, ...] = ()   # where each trial's curves also go (bptt_harness.loggers)
    diagnostics: DiagnoseOptions | None = None   # [diagnostics]: measured per trial (bptt_harness.diagnose)
    slices: tuple[Slice, ...] = ()
    description: str = ""
    path: Path | None = None
    results_root: Path = Path("results")
    raw: dict = field(default_factory=dict)

    @property
    def cost(self) -> str:
        return self.objectives[1] if len(self.objectives) > 1 else "seconds_per_token"

    @property
    def memory_cap_mib(self) -> float | None:
        """``max_memory_gib`` in MiB, as trials take it (``RunOptions.memory_cap_mib``)."""
        return self.max_memory_gib * 1024 if self.max_memory_gib is not None else None

    @property
    def results_dir(self) -> Path:
        return self.results_root / self.name

    @property
    def storage_url(self) -> str:
        """The study file's storage, else SQLite in the results folder."""
        return self.storage or f"sqlite:///{(self.results_dir / 'study.db').resolve()}"

    def grid_size(self) -> int:
        """Configurations of a grid: the product of the search lists, or every point of the slices once."""
        if self.slices:
            return len(union_points(self.slices))
        return math.prod(len(p.grid()) for p in self.search.values())

    def held_lr(self, params: dict[str, Any]) -> float | None:
        """The lr a slice holds this configuration at (already capped at ``[lr] max_lr``), or None: the
        ``[lr]`` rule sets it."""
        return held_lr(self.slices, params)

    def slice_names(self, params: dict[str, Any]) -> tuple[str, ...]:
        """The slices this configuration belongs to (empty for a study without ``[slices]``)."""
        return slice_names(self.slices, params)

    def n_trials(self) -> int:
        """Trials to finish: the study's ``trials``, or for a grid every point times ``repeats``."""
        if self.sampler == "grid":
            full = self.grid_size() * self.repeats
            return min(self.trials, full) if self.trials is not None else full
        return self.trials if self.trials is not None else 20 * self.repeats


def _closest(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown(section: str, key: str, allowed: tuple[str, ...] | list[str]) -> HarnessError:
    where = f"[{section}] " if section else ""
    return HarnessError(f"study file: unknown key {where}{key!r}{_closest(key, allowed)}; "
                        f"allowed: {', '.join(allowed)}")


def _field_kind(cls: type, key: str) -> str:
    """The kind ``_check_type`` checks a field of ``cls`` against: its annotation's, ``"tuple"`` for a TOML
    list the caller turned into a tuple (see ``_fractions``)."""
    kind = field_kinds(cls)[key][0]
    if kind is None and str({f.name: f.type for f in dataclasses.fields(cls)}[key]).startswith("tuple"):
        return "tuple"
    return kind or "str"
def _check_type(where: str, value: Any, kind: str) -> Any:
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "tuple": isinstance(value, tuple),
    }[kind]
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                "tuple": "a list"}[kind]
        raise HarnessError(f"study file: {where} = {value!r} must be {want}")
    if kind == "float" and not math.isfinite(value):
        raise HarnessError(f"study file: {where} = {value!r} must be a finite number")
    return float(value) if kind == "float" else value


def _fractions(where: str, value: Any) -> tuple[float, ...]:
    """A TOML list of numbers -> a tuple of floats (TrainConfig checks their range and order)."""
    if not isinstance(value, list):
        raise HarnessError(f"study file: {where} = {value!r} must be a list of fractions of the budget, "
                           "e.g. [0.5, 0.75] (or [] for no annealing)")
    return tuple(_check_type(f"{where}[{i}]", v, "float") for i, v in enumerate(value))


def _build(cls: type, table: Any, section: str, skip: tuple[str, ...] = (), also: tuple[str, ...] = ()) -> Any:
    """Construct a config dataclass from a TOML table, checking keys and types against its fields.

    ``also`` names keys the caller handled itself, so the error for a typo lists them too.
    """
    if not isinstance(table, dict):
        raise HarnessError(f"study file: [{section}] must be a table of keys, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    for key, value in table.items():
        if key not in fields:
            raise _unknown(section, key, list(fields) + list(also))
        _check_type(f"{section}.{key}", value, _field_kind(cls, key))
    return cls(**table)


def _param_space(name: str, value: Any, section: str = "search") -> ParamSpace:
    entry = SEARCH_KEYS[name]
    kind = entry.kind
    where = f"{section}.{name}"
    if isinstance(value, list):
        if not value:
            raise HarnessError(f"study file: {where} is an empty list; give at least one value")
        values = tuple(_check_type(f"{where}[{i}]", v, kind) for i, v in enumerate(value))
        if len(set(values)) != len(values):
            raise HarnessError(f"study file: {where} = {value!r} repeats a value; list each value once")
        space = ParamSpace(name, kind, choices=values)
    elif isinstance(value, dict):
        for key in value:
            if key not in ("low", "high", "log", "step"):
                raise _unknown(where, key, ("low", "high", "log", "step"))
        if kind == "bool":
            raise HarnessError(f"study file: {where} is true/false; give a list such as [false, true]")
        if "low" not in value or "high" not in value:
            raise HarnessError(f"study file: {where} range needs both low and high, got {value!r}")
        low = _check_type(f"{where}.low", value["low"], kind)
        high = _check_type(f"{where}.high", value["high"], kind)
        log = _check_type(f"{where}.log", value.get("log", False), "bool")
        step = _check_type(f"{where}.step", value["step"], kind) if "step" in value else None
        if low > high:
            raise HarnessError(f"study file: {where} has low = {low} above high = {high}")
        if log and (low <= 0 or step is not None):
            raise HarnessError(f"study file: {where} with log = true needs low > 0 and no step")
        if step is not None and step <= 0:
            raise HarnessError(f"study file: {where}.step = {step} must be > 0")
        space = ParamSpace(name, kind, low=low, high=high, log=log, step=step)
    else:
        raise HarnessError(f"study file: {where} = {value!r} must be a list of values or a table "
                           "{ low = .., high = .., log = true }")
    entry.check_bounds(min(space.choices) if space.choices is not None else space.low, space.max_value(), where)
    return space


def _lr_rule(table: Any, searches_lr: bool) -> LrRule:
    if not isinstance(table, dict):
        raise HarnessError(f"study file: [lr] must be a table of keys, got {table!r}")
    fields = [f.name for f in dataclasses.fields(LrRule)]
    for key, value in table.items():
        if key not in fields:
            raise _unknown("lr", key, fields)
        if key != "ladder":
            _check_type(f"lr.{key}", value, _field_kind(LrRule, key))
    rule = parse_lr_table(table)
    if rule.rule != "fixed" and searches_lr:
        raise HarnessError(f"study file: search.lr with lr.rule = {rule.rule!r}: the rule sets each shape's lr; "
                           "search lr only with rule = \"fixed\" (or remove search.lr)")
    return rule


# --------------------------------------------------------------------------- slices (bptt_harness.design)

SLICE_OWN_KEYS = ("tokens_per_step", "lr")
SLICE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")


def _slice_keys() -> tuple[str, ...]:
    # A slice holds its lr fixed (or hands it to the rule): its `lr` is that policy, never a searched list.
    return (*SLICE_OWN_KEYS, *(k for k in SEARCH_KEYS if k != "lr"))


def _divisors_near(n: int, value: int) -> str:
    divisors = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - value), d))[:2]
    return " or ".join(str(d) for d in sorted(divisors))


def _slice_lr(name: str, body: dict, train: TrainConfig) -> float | None:
    """A slice's lr: its own number, ``[train] lr`` when left out (held fixed), or None for ``"rule"``."""
    value = body.get("lr", train.lr)
    if value == "rule":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        hint = _closest(value, ("rule",)) if isinstance(value, str) else ""
        raise HarnessError(f"study file: slices.{name}.lr = {value!r}{hint} must be one number > 0 (every point of "
                           "the slice trains at it) or \"rule\" (the [lr] rule sets each point's lr)")
    return float(value)


def _slice_values(name: str, body: dict) -> dict[str, tuple]:
    """Each searched key of a slice -> its values (a single value or a list; no ranges)."""
    values: dict[str, tuple] = {}
    for key, value in body.items():
        if key in SLICE_OWN_KEYS:
            continue
        if isinstance(value, dict):
            raise HarnessError(f"study file: slices.{name}.{key} is a range; a slice lists its values, "
                               f"e.g. {key} = [..]")
        space = _param_space(key, value if isinstance(value, list) else [value], f"slices.{name}")
        values[key] = space.choices or ()
    return values


def _slice(name: str, body: Any, train: TrainConfig) -> tuple[dict[str, tuple], int | None, float | None]:
    """One ``[slices.NAME]`` table, checked -> (values per key, tokens_per_step, lr)."""
    if not SLICE_NAME_RE.match(name):
        raise HarnessError(f"study file: slice name {name!r} must start with a letter and hold up to 40 letters, "
                           "digits, '_' or '-'")
    if not isinstance(body, dict):
        raise HarnessError(f"study file: slices.{name} must be a table of keys, e.g. [slices.{name}] with "
                           "bptt = [..] and tokens_per_step = N")
    allowed = _slice_keys()
    for key in body:
        if key not in allowed:
            raise _unknown(f"slices.{name}", key, allowed)
    if "bptt" not in body:
        raise HarnessError(f"study file: slices.{name} has no bptt; give bptt = N or a list")
    tps = body.get("tokens_per_step")
    if tps is not None:
        tps = _check_type(f"slices.{name}.tokens_per_step", tps, "int")
        if tps < 1:
            raise HarnessError(f"study file: slices.{name}.tokens_per_step = {tps} must be >= 1")
        if "batch_size" in body:
            raise HarnessError(f"study file: slices.{name} gives both batch_size and tokens_per_step; give one "
                               "(tokens_per_step derives each point's batch size as tokens_per_step / bptt)")
    elif "batch_size" not in body:
        raise HarnessError(f"study file: slices.{name} needs batch_size = [..] or tokens_per_step = N "
                           "(which derives batch size = tokens_per_step / bptt)")
    values = _slice_values(name, body)
    if tps is not None:
        for b in values["bptt"]:
            if tps % b:
                raise HarnessError(f"study file: slices.{name}: tokens_per_step = {tps} is not a multiple of bptt "
                                   f"{b} ({tps} / {b} = {tps / b:.4g}); use bptt values that divide {tps} "
                                   f"(near {b}: {_divisors_near(tps, b)}) or another tokens_per_step")
    return values, tps, _slice_lr(name, body, train)


def _points(values: dict[str, tuple], tps: int | None, keys: list[str], fill: dict[str, Any]) -> tuple[Point, ...]:
    """The product of a slice's lists (the batch size following bptt at a tokens_per_step), every key of
    the study present: a key this slice leaves out takes the study's own value (``fill``)."""
    names = list(values)
    points = []
    for combo in itertools.product(*(values[k] for k in names)):
        params = dict(zip(names, combo))
        if tps is not None:
            params["batch_size"] = tps // params["bptt"]
        points.append(point_of({k: params.get(k, fill.get(k)) for k in keys}))
    return tuple(points)


def _check_shared(slices: tuple[Slice, ...]) -> None:
    """Slices that share a configuration must train it the same way (it runs once, for both)."""
    for i, a in enumerate(slices):
        for b in slices[i + 1:]:
            for p in set(a.points) & set(b.points):
                if a.lr != b.lr:
                    def lr(s: Slice) -> str:
                        return "the [lr] rule" if s.lr is None else f"{s.lr:g}"
                    shape = f"bptt {dict(p)['bptt']} x batch_size {dict(p)['batch_size']}"
                    raise HarnessError(f"study file: slices.{a.name} and slices.{b.name} share {shape} but train it "
                                       f"at different lr ({lr(a)} and {lr(b)}); give both slices the same lr")


def parse_slices(table: Any, sampler: str, model: ModelConfig, train: TrainConfig,
                 max_lr: float | None = None) -> tuple[Slice, ...]:
    """``[slices.NAME]`` tables -> :class:`bptt_harness.design.Slice` s, every point with every key, a held
    lr capped at ``max_lr`` (``[lr] max_lr``: no configuration trains above it)."""
    if not isinstance(table, dict) or not table:
        raise HarnessError("study file: [slices] needs at least one [slices.NAME] table, e.g. [slices.bptt] with "
                           "tokens_per_step = 640 and bptt = [5, 10, 20, 40, 80]")
    if sampler != "grid":
        raise HarnessError(f"study file: [slices] lists its configurations, so it runs with sampler = \"grid\"; "
                           f"got sampler = {sampler!r}")
    parsed = {name: _slice(name, body, train) for name, body in table.items()}
    keys = ["bptt", "batch_size", *sorted({k for values, _, _ in parsed.values() for k in values} - {"bptt", "batch_size"})]
    fill = {k.name: getattr(model if k.section == "model" else train, k.name)
            for k in SEARCH_KEYS.values() if k.section != "cell"}
    slices = []
    for name, (values, tps, lr) in parsed.items():
        points = _points(values, tps, keys, fill)
        varies = tuple(k for k in keys if len({dict(p)[k] for p in points}) > 1)
        if lr is not None and max_lr is not None:
            lr = min(lr, max_lr)
        slices.append(Slice(name, points, varies, tps, lr))
    _check_shared(tuple(slices))
    return tuple(slices)


def _union_search(slices: tuple[Slice, ...]) -> dict[str, ParamSpace]:
    """The search space the slices span (each key's values over every slice): what the report, the
    profile and the largest-window check read, as for a grid."""
    points = union_points(slices)
    out = {}
    for key in points[0]:
        values = sorted({p[key] for p in points})
        out[key] = ParamSpace(key, SEARCH_KEYS[key].kind, choices=tuple(values))
    return out


def check_storage_url(url: str) -> None:
    if not isinstance(url, str) or not url.strip():
        raise HarnessError(f"storage {url!r} is empty; use {STORAGE_FORMS}")
    if url.startswith("journal:"):
        if not url[len("journal:"):].strip():
            raise HarnessError(f"storage {url!r} names no file; use journal:path/journal.log")
        return
    if url.startswith("sqlite:"):
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path.strip() or path.split("?")[0] == ":memory:" or "mode=memory" in url:
            raise HarnessError(f"storage {url!r} is in memory, and a study must outlive the process (resume, "
                               "workers, report); use sqlite:///path/study.db")
        return
    if re.match(r"^(postgresql(\+\w+)?|mysql(\+\w+)?)://", url):
        if not database_name(url) and "dbname=" not in url:
            raise HarnessError(f"storage {redact(url)!r} names no database, so the driver's defaults would pick "
                               "one; use postgresql://user@host/db")
        return
    raise HarnessError(f"storage {redact(url)!r} is not supported; use {STORAGE_FORMS}")


def _log_targets(log: Any) -> tuple[LogTarget, ...]:
    """The study file's ``log = ["tensorboard:runs", ...]``: where each trial's curves also go."""
    if not isinstance(log, list):
        raise HarnessError(f"study file: log = {log!r} must be a list such as [\"tensorboard:runs\", \"mlflow:runs\"]")
    return parse_log_targets(log, where="study file: log entry")


def _top_level(raw: dict, path: Path | None) -> tuple[str, str, str, list, str]:
    """The study file's top-level keys checked: its name, sampler, pruner, objectives and device."""
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown("", key, TOP_KEYS)
    name = raw.get("name", path.stem if path else None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise HarnessError(f"study file: name = {name!r} must be 1-100 letters, digits, '.', '_' or '-' "
                           "(it names the results folder)")
    for key, kind in (("description", "str"), ("sampler", "str"), ("pruner", "str"), ("trials", "int"),
                      ("storage", "str"), ("max_memory_gib", "float"), ("seed", "int"), ("device", "str"),
                      ("workers", "int")):
        if key in raw:
            _check_type(key, raw[key], kind)
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise HarnessError(f"study file: sampler = {sampler!r} is not known{_closest(sampler, SAMPLERS)}; "
                           f"use one of {', '.join(SAMPLERS)}")
    pruner = raw.get("pruner", "none")
    if pruner not in PRUNERS:
        raise HarnessError(f"study file: pruner = {pruner!r} is not known{_closest(pruner, PRUNERS)}; "
                           f"use one of {', '.join(PRUNERS)}")
    objectives = _objectives(raw.get("objectives", ["val_ppl"]), sampler, pruner)
    _check_numbers(raw)
    device = raw.get("device", "auto")
    if not (device in ("auto", "cpu", "cuda") or re.match(r"^cuda:\d+$", device)):
        raise HarnessError(f"study file: device = {device!r} must be auto, cpu, cuda or cuda:N")
    return name, sampler, pruner, objectives, device


def _objectives(objectives: Any, sampler: str, pruner: str) -> list:
    """``objectives``: the perplexity, and optionally one cost; what the sampler and pruner can work with."""
    if (not isinstance(objectives, list) or not 1 <= len(objectives) <= 2 or objectives[0] != "val_ppl"
            or (len(objectives) == 2 and objectives[1] not in COSTS)):
        raise HarnessError(f"study file: objectives = {objectives!r} must be [\"val_ppl\"] or "
                           f"[\"val_ppl\", COST] with COST one of {', '.join(COSTS)}")
    if pruner != "none" and len(objectives) > 1:
        raise HarnessError(f"study file: pruner = {pruner!r} needs a single objective (Optuna cannot prune "
                           "multi-objective studies); use pruner = \"none\" or objectives = [\"val_ppl\"]")
    if sampler == "nsga2" and len(objectives) < 2:
        raise HarnessError("study file: sampler = \"nsga2\" is for two objectives; add a cost to objectives "
                           "or use tpe")
    return objectives


def _check_numbers(raw: dict) -> None:
    """The top-level numbers in range, and the storage URL well formed."""
    if "seed" in raw and not 0 <= raw["seed"] < 2**32:
        raise HarnessError(f"study file: seed = {raw['seed']} must be an integer in [0, 2**32)")
    for key in ("trials", "workers"):
        if key in raw and raw[key] < 1:
            raise HarnessError(f"study file: {key} = {raw[key]} must be >= 1")
    if "max_memory_gib" in raw and raw["max_memory_gib"] <= 0:
        raise HarnessError(f"study file: max_memory_gib = {raw['max_memory_gib']} must be > 0")
    if "storage" in raw:
        check_storage_url(raw["storage"])


def _train(raw: dict) -> tuple[TrainConfig, int]:
    """``[train]``: the trainer's settings, and ``repeats`` (seeds per configuration), which is the study's."""
    train_table = dict(raw.get("train", {})) if isinstance(raw.get("train", {}), dict) else raw["train"]
    repeats = 1
    if isinstance(train_table, dict):
        if "repeats" in train_table:
            repeats = _check_type("train.repeats", train_table.pop("repeats"), "int")
            if repeats < 1:
                raise HarnessError(f"study file: train.repeats = {repeats} must be >= 1")
        if "anneal_at" in train_table:
            train_table["anneal_at"] = _fractions("train.anneal_at", train_table["anneal_at"])
        if "memory_cap_mib" in train_table:
            raise HarnessError("study file: train.memory_cap_mib is set from the top-level max_memory_gib; "
                               "use max_memory_gib = N")
        if "tokens" in train_table and "epochs" in train_table:
            raise HarnessError(f"study file: train has tokens = {train_table['tokens']!r} and epochs = "
                               f"{train_table['epochs']!r}; a budget is one of them: keep tokens or epochs")
    return _build(TrainConfig, train_table, "train", also=TRAIN_EXTRA), repeats


def parse_study(raw: dict, path: Path | None = None, results_root: Path = Path("results")) -> StudyConfig:
    name, sampler, pruner, objectives, device = _top_level(raw, path)
    log_targets = _log_targets(raw.get("log", []))
    corpus = _build(CorpusSpec, raw.get("corpus", {}), "corpus")
    model = _build(ModelConfig, raw.get("model", {}), "model")
    train, repeats = _train(raw)
    search, lr_rule, slices = _design(raw, sampler, model, train)
    race = _build(RaceConfig, raw["race"], "race") if "race" in raw else None
    diagnostics = _diagnostics(raw["diagnostics"]) if "diagnostics" in raw else None
    if model.tied and ({"nhid", "emsize"} & set(search)):
        raise HarnessError("study file: tied = true needs emsize == nhid in every trial; do not search "
                           "nhid or emsize with tied weights (or set tied = false)")

    config = StudyConfig(name=name, corpus=corpus, model=model, train=train, search=search,
                         objectives=tuple(objectives), sampler=sampler, pruner=pruner, trials=raw.get("trials"),
                         storage=raw.get("storage"), max_memory_gib=raw.get("max_memory_gib"),
                         seed=raw.get("seed", 0), device=device, workers=raw.get("workers", 1), repeats=repeats,
                         lr_rule=lr_rule, race=race, slices=slices, log=log_targets, diagnostics=diagnostics,
                         description=raw.get("description", ""), path=path, results_root=results_root,
                         # The resolved name goes with the stored copy, so `bptt-harness worker` can rebuild it.
                         raw={**raw, "name": name})
    if sampler == "grid":
        config.grid_size()  # raises if a range cannot be gridded
    return config


def with_log(config: StudyConfig, given: list[str] | None) -> StudyConfig:
    """The study with ``--log KIND:DIR`` targets added to its own ``log`` (each once)."""
    return dataclasses.replace(config, log=parse_log_targets([*map(str, config.log), *(given or [])]))


def _diagnostics(table: Any) -> DiagnoseOptions:
    """``[diagnostics]``: an empty table is every measurement with the defaults; ``measure`` is a list."""
    if not isinstance(table, dict):
        raise HarnessError(f"study file: [diagnostics] must be a table of keys, got {table!r}")
    rest = {k: v for k, v in table.items() if k != "measure"}
    options = _build(DiagnoseOptions, rest, "diagnostics", also=("measure",))
    if "measure" not in table:
        return options
    measure = table["measure"]
    if not isinstance(measure, list) or not all(isinstance(m, str) for m in measure):
        raise HarnessError(f"study file: diagnostics.measure = {measure!r} must be a list of names, e.g. "
                           "[\"context\", \"noise\"]")
    return dataclasses.replace(options, measure=tuple(measure))


def _design(raw: dict, sampler: str, model: ModelConfig,
            train: TrainConfig) -> tuple[dict[str, ParamSpace], LrRule, tuple[Slice, ...]]:
    """What the study runs: ``[search]`` (a grid or a sampled space) or ``[slices]`` (listed configurations,
    whose union is the search space), and the ``[lr]`` rule."""
    if "slices" not in raw:
        search = _search(raw.get("search"))
        return search, _lr_rule(raw.get("lr", {}), "lr" in search), ()
    if "search" in raw:
        raise HarnessError("study file: give [search] (a grid or a sampled space) or [slices] (listed "
                           "configurations), not both; move the [search] keys into each [slices.NAME]")
    lr_rule = _lr_rule(raw.get("lr", {}), False)
    slices = parse_slices(raw["slices"], sampler, model, train, lr_rule.max_lr)
    if lr_rule.rule == "tuned" and all(s.lr is not None for s in slices):
        raise HarnessError("study file: [lr] rule = \"tuned\" but every slice holds its lr fixed, so nothing is "
                           "tuned; add lr = \"rule\" to the slices to tune, or use another rule")
    return _union_search(slices), lr_rule, slices


def _search(search_raw: Any) -> dict[str, ParamSpace]:
    """``[search]``: every key checked, bptt and batch_size required."""
    if not isinstance(search_raw, dict) or not search_raw:
        raise HarnessError("study file: [search] is missing; it needs at least bptt and batch_size, "
                           "e.g. bptt = [35, 70] and batch_size = [20, 40]")
    if "tokens_per_step" in search_raw:
        raise HarnessError("study file: search.tokens_per_step: a controlled slice is its own table, "
                           "[slices.NAME] with tokens_per_step = N and bptt = [..] (batch size = N / bptt); "
                           "see studies/README.md")
    for key in search_raw:
        if key not in SEARCH_KEYS:
            raise _unknown("search", key, tuple(SEARCH_KEYS))
    for key in CELL:
        if key not in search_raw:
            raise HarnessError(f"study file: search.{key} is missing; every study searches {' and '.join(CELL)}")
    return {key: _param_space(key, value) for key, value in search_raw.items()}


def load_study(path: str | Path, results_root: Path | str = Path("results")) -> StudyConfig:
    """Read and validate a study file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"study file '{path}' does not exist; see studies/ for examples")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HarnessError(f"study file '{path}' is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"study file '{path}' is not valid TOML: {e}") from None
    return parse_study(raw, path, Path(results_root))
