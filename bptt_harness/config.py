"""Study files (TOML) -> a validated :class:`StudyConfig`.

Every key is checked: an unknown key, a wrong type or a bad value is one :class:`HarnessError`
line naming the key, the value, what is allowed and, for a typo, the closest valid key.
``studies/README.md`` documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bptt_harness.errors import HarnessError
from bptt_harness.fieldkind import field_kinds
from bptt_harness.lr import LrRule, parse_lr_table
from bptt_harness.search_keys import CELL, SEARCH_KEYS
from bptt_harness.spec import CorpusSpec, LogTarget, ModelConfig, TrainConfig, parse_log_targets
from bptt_harness.urls import redact

SAMPLERS = ("grid", "tpe", "random", "nsga2")
PRUNERS = ("none", "median", "hyperband")
COSTS = ("seconds_per_token", "peak_memory", "joules_per_token")
TOP_KEYS = ("name", "description", "objectives", "sampler", "pruner", "trials", "storage", "max_memory_gib",
            "seed", "device", "workers", "log", "corpus", "model", "train", "search", "lr", "race")
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

    def grid(self) -> list:
        """Values for a grid: the choices, a stepped range, or doublings ``low, 2 low, ...`` up to ``high``."""
        if self.choices is not None:
            return list(self.choices)
        if self.kind == "int" and self.step is not None:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        if self.kind == "int" and self.log:
            out, v = [], int(self.low)
            while v <= self.high:
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
        return math.prod(len(p.grid()) for p in self.search.values())

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


def _check_type(where: str, value: Any, kind: str) -> Any:
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
        raise HarnessError(f"study file: {where} = {value!r} must be {want}")
    if kind == "float" and not math.isfinite(value):
        raise HarnessError(f"study file: {where} = {value!r} must be a finite number")
    return float(value) if kind == "float" else value


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
        _check_type(f"{section}.{key}", value, field_kinds(cls)[key][0] or "str")
    return cls(**table)


def _param_space(name: str, value: Any) -> ParamSpace:
    entry = SEARCH_KEYS[name]
    kind = entry.kind
    where = f"search.{name}"
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
                raise _unknown(f"search.{name}", key, ("low", "high", "log", "step"))
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
                           "{{ low = .., high = .., log = true }}")
    entry.check_bounds(min(space.choices) if space.choices is not None else space.low, space.max_value())
    return space


def _lr_rule(table: Any, search: dict[str, ParamSpace]) -> LrRule:
    if not isinstance(table, dict):
        raise HarnessError(f"study file: [lr] must be a table of keys, got {table!r}")
    fields = [f.name for f in dataclasses.fields(LrRule)]
    for key, value in table.items():
        if key not in fields:
            raise _unknown("lr", key, fields)
        if key != "ladder":
            _check_type(f"lr.{key}", value, field_kinds(LrRule)[key][0] or "str")
    rule = parse_lr_table(table)
    if rule.rule != "fixed" and "lr" in search:
        raise HarnessError(f"study file: search.lr with lr.rule = {rule.rule!r}: the rule sets each shape's lr; "
                           "search lr only with rule = \"fixed\" (or remove search.lr)")
    return rule


def check_storage_url(url: str) -> None:
    if not isinstance(url, str) or not url.strip():
        raise HarnessError(f"storage {url!r} is empty; use {STORAGE_FORMS}")
    if url.startswith("journal:"):
        if not url[len("journal:"):].strip():
            raise HarnessError(f"storage {url!r} names no file; use journal:path/journal.log")
        return
    if re.match(r"^(sqlite|postgresql(\+\w+)?|mysql(\+\w+)?)://", url):
        return
    raise HarnessError(f"storage {redact(url)!r} is not supported; use {STORAGE_FORMS}")


def parse_study(raw: dict, path: Path | None = None, results_root: Path = Path("results")) -> StudyConfig:
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
    objectives = raw.get("objectives", ["val_ppl"])
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
    if "seed" in raw and not 0 <= raw["seed"] < 2**32:
        raise HarnessError(f"study file: seed = {raw['seed']} must be an integer in [0, 2**32)")
    for key in ("trials", "workers"):
        if key in raw and raw[key] < 1:
            raise HarnessError(f"study file: {key} = {raw[key]} must be >= 1")
    if "max_memory_gib" in raw and raw["max_memory_gib"] <= 0:
        raise HarnessError(f"study file: max_memory_gib = {raw['max_memory_gib']} must be > 0")
    if "storage" in raw:
        check_storage_url(raw["storage"])
    log = raw.get("log", [])
    if not isinstance(log, list):
        raise HarnessError(f"study file: log = {log!r} must be a list such as [\"tensorboard:runs\", \"mlflow:runs\"]")
    log_targets = parse_log_targets(log, where="study file: log entry")
    device = raw.get("device", "auto")
    if not (device in ("auto", "cpu", "cuda") or re.match(r"^cuda:\d+$", device)):
        raise HarnessError(f"study file: device = {device!r} must be auto, cpu, cuda or cuda:N")

    corpus = _build(CorpusSpec, raw.get("corpus", {}), "corpus")
    model = _build(ModelConfig, raw.get("model", {}), "model")
    train_table = dict(raw.get("train", {})) if isinstance(raw.get("train", {}), dict) else raw["train"]
    repeats = 1
    if isinstance(train_table, dict) and "repeats" in train_table:
        repeats = _check_type("train.repeats", train_table.pop("repeats"), "int")
        if repeats < 1:
            raise HarnessError(f"study file: train.repeats = {repeats} must be >= 1")
    if isinstance(train_table, dict):
        for key in train_table:
            if key == "memory_cap_mib":
                raise HarnessError("study file: train.memory_cap_mib is set from the top-level max_memory_gib; "
                                   "use max_memory_gib = N")
    train = _build(TrainConfig, train_table, "train", also=TRAIN_EXTRA)

    search_raw = raw.get("search")
    if not isinstance(search_raw, dict) or not search_raw:
        raise HarnessError("study file: [search] is missing; it needs at least bptt and batch_size, "
                           "e.g. bptt = [35, 70] and batch_size = [20, 40]")
    for key in search_raw:
        if key not in SEARCH_KEYS:
            raise _unknown("search", key, tuple(SEARCH_KEYS))
    for key in CELL:
        if key not in search_raw:
            raise HarnessError(f"study file: search.{key} is missing; every study searches {' and '.join(CELL)}")
    search = {key: _param_space(key, value) for key, value in search_raw.items()}
    lr_rule = _lr_rule(raw.get("lr", {}), search)
    race = _build(RaceConfig, raw["race"], "race") if "race" in raw else None
    if model.tied and ({"nhid", "emsize"} & set(search)):
        raise HarnessError("study file: tied = true needs emsize == nhid in every trial; do not search "
                           "nhid or emsize with tied weights (or set tied = false)")

    config = StudyConfig(name=name, corpus=corpus, model=model, train=train, search=search,
                         objectives=tuple(objectives), sampler=sampler, pruner=pruner, trials=raw.get("trials"),
                         storage=raw.get("storage"), max_memory_gib=raw.get("max_memory_gib"),
                         seed=raw.get("seed", 0), device=device, workers=raw.get("workers", 1), repeats=repeats,
                         lr_rule=lr_rule, race=race, log=log_targets,
                         description=raw.get("description", ""), path=path, results_root=results_root,
                         # The resolved name goes with the stored copy, so `bptt-harness worker` can rebuild it.
                         raw={**raw, "name": name})
    if sampler == "grid":
        config.grid_size()  # raises if a range cannot be gridded
    return config


def with_log(config: StudyConfig, given: list[str] | None) -> StudyConfig:
    """The study with ``--log KIND:DIR`` targets added to its own ``log`` (each once)."""
    return dataclasses.replace(config, log=parse_log_targets([*map(str, config.log), *(given or [])]))


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
