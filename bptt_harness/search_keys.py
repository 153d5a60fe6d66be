"""The keys a study may search: one table, from which everything that names them derives.

Each :class:`SearchKey` says where the key lives in a :class:`~bptt_harness.spec.TrialSpec` (its
section), what kind of value it takes, the bounds a study file may give it, and how the trial record
documents its column. Config parsing (``[search]``), the objective (params -> spec -> record),
``bptt-harness trial --config``, the record's columns (``TrialConfig.values``) and the report's
per-configuration fields all read this table, so a key added here is searched, run and recorded
everywhere. No torch import: parsing a study file stays light.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from bptt_harness.errors import HarnessError
from bptt_harness.spec import ModelConfig, TrainConfig, TrialSpec

__all__ = ["CANONICAL", "CELL", "SEARCH_KEYS", "SearchKey", "config_key", "recorded_values", "search_key", "spec_with"]

Section = Literal["cell", "model", "train"]
Kind = Literal["int", "float", "bool"]
_WANT = {"int": "an integer", "float": "a number", "bool": "true or false"}


@dataclass(frozen=True)
class SearchKey:
    """One searchable key.

    Attributes:
        name: the key in ``[search]``, in ``config_key`` and in ``trials.csv``; also the field's name in
            its section (``TrialSpec`` for the cell, ``ModelConfig`` for ``model``, ``TrainConfig`` for ``train``).
        section: ``"cell"`` (bptt, batch size: the trial's shape), ``"model"`` or ``"train"``.
        kind: ``"int"``, ``"float"`` or ``"bool"``.
        low, high: the values a study file may search (None for a bool).
        doc, unit: the trial record's column: its meaning and unit.
        model_size: the key changes the model's size, so the report fits a memory law per value of it.
        attr: the record also stores it as a flat Optuna user attribute (optuna-dashboard sorts by it).
    """

    name: str
    section: Section
    kind: Kind
    low: float | None = None
    high: float | None = None
    doc: str = ""
    unit: str = ""
    model_size: bool = False
    attr: bool = False

    def check_bounds(self, lo: Any, hi: Any, where: str = "") -> None:
        """One line when searched values ``lo..hi`` leave the key's bounds; ``where`` names the key in the
        study file (default ``search.NAME``; a slice's is ``slices.SLICE.NAME``)."""
        if self.kind == "bool" or self.low is None or self.high is None:
            return
        if lo < self.low or hi > self.high:
            raise HarnessError(f"study file: {where or 'search.' + self.name} values must lie in "
                               f"[{self.low:g}, {self.high:g}]; got {lo:g}..{hi:g}")

    def parse(self, text: str, where: str) -> Any:
        """A value written as text (``--config bptt=35``) -> the key's kind; one line when it is not one."""
        try:
            if self.kind == "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                return text.lower() == "true"
            return int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise HarnessError(f"{where} {self.name}={text!r} must be {_WANT[self.kind]}") from None

    def value_in(self, spec: TrialSpec, searched: Iterable[str] = ()) -> Any:
        """The key's value in a trial's spec as the record keeps it: a model key the family does not read
        (a factory's, unless searched: then it reaches the factory's ``model_config``) is None rather than
        an unused default."""
        if self.section == "cell":
            return getattr(spec, self.name)
        if self.section == "train":
            return getattr(spec.train, self.name)
        model = spec.model
        used = set(model.info.keys) | set(searched)
        return getattr(model, self.name) if self.name in used else None


SEARCH_KEYS: dict[str, SearchKey] = {k.name: k for k in (
    SearchKey("bptt", "cell", "int", 1, 100_000, "truncated-BPTT window length", "tokens"),
    SearchKey("batch_size", "cell", "int", 1, 1_000_000, "batch size (columns of the token matrix)"),
    SearchKey("lr", "train", "float", 1e-12, 1e6, "learning rate", attr=True),
    SearchKey("nhid", "model", "int", 1, 65_536, "hidden units per layer", model_size=True),
    SearchKey("emsize", "model", "int", 1, 65_536, "embedding size", model_size=True),
    SearchKey("layers", "model", "int", 1, 64, "recurrent layers", model_size=True),
    SearchKey("dropout", "model", "float", 0.0, 0.999, "dropout probability (awd-lstm: on the last layer's output)"),
    SearchKey("heads", "model", "int", 1, 1024, "transformer: attention heads", model_size=True),
    SearchKey("mem_len", "model", "int", 0, 1_000_000,
              "transformer: carried memory of previous tokens' keys and values (0: none)", "tokens", model_size=True),
    SearchKey("embed_dropout", "model", "float", 0.0, 0.999, "awd-lstm: embedding (whole-word) dropout"),
    SearchKey("input_dropout", "model", "float", 0.0, 0.999, "awd-lstm: locked dropout on the embedding output"),
    SearchKey("hidden_dropout", "model", "float", 0.0, 0.999, "awd-lstm: locked dropout between recurrent layers"),
    SearchKey("weight_dropout", "model", "float", 0.0, 0.999, "awd-lstm: DropConnect on the hidden-to-hidden weights"),
    SearchKey("variable_bptt", "train", "bool", doc="variable-length windows (AWD-LSTM style)"),
    SearchKey("clip", "train", "float", 0.0, 1e6, "gradient-norm clipping threshold (0: off)"),
)}
# The keys every study searches: a trial's (bptt, batch size) cell.
CELL = tuple(k.name for k in SEARCH_KEYS.values() if k.section == "cell")
# The reference cell (the canonical word-language-model example's): a sweep queues it first, so every
# report has it; ``bptt-harness trial`` runs it when given no cell.
CANONICAL: dict[str, int] = {"bptt": 35, "batch_size": 20}


def search_key(name: str, where: str = "search") -> SearchKey:
    """The registered key ``name``, or one line naming the closest and the allowed ones."""
    if name in SEARCH_KEYS:
        return SEARCH_KEYS[name]
    match = difflib.get_close_matches(name, list(SEARCH_KEYS), n=1, cutoff=0.5)
    hint = f" (did you mean {match[0]!r}?)" if match else ""
    raise HarnessError(f"{where}: unknown key {name!r}{hint}; allowed: {', '.join(SEARCH_KEYS)}")


def spec_with(params: Mapping[str, Any], model: ModelConfig, train: TrainConfig) -> TrialSpec:
    """The trial that searched values ``params`` (every cell key among them) make of a model and a training."""
    def section(name: str) -> dict[str, Any]:
        return {k: v for k, v in params.items() if search_key(k).section == name}

    return TrialSpec(**section("cell"), model=replace(model, **section("model")),
                     train=replace(train, **section("train")))


def recorded_values(spec: TrialSpec, searched: Iterable[str] = ()) -> dict[str, Any]:
    """Every registered key's value in ``spec``, as the trial record keeps it (``TrialConfig.values``)."""
    searched = tuple(searched)
    return {k.name: k.value_in(spec, searched) for k in SEARCH_KEYS.values()}


def config_key(params: Mapping[str, Any]) -> str:
    """``bptt=35,batch_size=20[,lr=2.5,...]``: the cell first, then the other searched keys by name; the same
    for every repeat of a configuration (the ``config_key`` column)."""
    order = [*CELL, *sorted(k for k in params if k not in CELL)]
    return ",".join(f"{k}={params[k]}" for k in order if k in params)
