"""``bptt-harness trial``: one configuration, its options named like the study-file keys, or one row of a study.

The options are generated from the dataclasses a study file fills (``[corpus]``: CorpusSpec,
``[model]``: ModelConfig, ``[train]``: TrainConfig), so every key has an option of the same name
(``timeout_s`` -> ``--timeout-s``) and a key added there is an option here. ``--from results/<study>
--config bptt=35,batch_size=5`` starts from the study's stored settings; options given as well override
them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, replace
from typing import Any

from bptt_harness.errors import HarnessError
from bptt_harness.fieldkind import field_kinds
from bptt_harness.record import TrialRecord
from bptt_harness.search_keys import CANONICAL, config_key, search_key, spec_with
from bptt_harness.spec import LOG_HELP, CorpusSpec, LogTarget, ModelConfig, RunOptions, TrainConfig, TrialSpec, parse_log_targets

# Old option names kept working (the study key's name comes first in --help).
ALIASES = {"corpus:source": ("--corpus",), "model:type": ("--model",), "train:timeout_s": ("--timeout",)}
# A field's kind -> the argparse type of its option.
OPTION_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass(frozen=True)
class TrialSetup:
    """What ``bptt-harness trial`` runs: the corpus, the configuration, the device, and where it came from."""

    corpus: CorpusSpec
    spec: TrialSpec
    device: str
    options: RunOptions = RunOptions()   # the memory cap (--max-memory-gib, or the study's max_memory_gib)
    repeats: int = 1
    study: Any = None         # with --from: the study's trials (bptt_harness.report.source.LoadedTrials)
    config_key: str | None = None
    log: tuple[LogTarget, ...] = ()   # --log, and with --from the study's own log = [...]
    name: str = "trial"               # the experiment the logging tools file the runs under


def attribute_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of a dataclass docstring's ``Attributes:`` section, joined into one line each."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    docs: dict[str, str] = {}
    name = None
    for line in doc[1].splitlines() if len(doc) > 1 else []:
        m = re.match(r"^ {8}(\w+): (.*)$", line)
        if m:
            name, docs[m[1]] = m[1], m[2]
        elif name and line.startswith(" " * 12):
            docs[name] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in docs.items()}


def fractions(text: str) -> tuple[float, ...]:
    """``--anneal-at 0.5,0.75`` -> ``(0.5, 0.75)``; an empty value is ``()`` (no annealing)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers, e.g. 0.5,0.75") from None


def _option_type(f: dataclasses.Field, name: str | None) -> Any:
    """The argparse type of a field's option: its kind's, :func:`fractions` for a tuple of floats
    (``anneal_at``); None for a field that has no option."""
    if name:
        return OPTION_TYPES.get(name)
    return fractions if str(f.type).startswith("tuple[float, ...]") else None


def _add_section(p: argparse.ArgumentParser, section: str, cls: type, skip: tuple[str, ...] = ()) -> None:
    docs = attribute_docs(cls)
    kinds = field_kinds(cls)
    group = p.add_argument_group(f"[{section}] keys of a study file")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name, choices = kinds[f.name]
        kind = _option_type(f, name)
        if kind is None:
            continue
        dest = f"{section}:{f.name}"
        flags = ("--" + f.name.replace("_", "-"), *ALIASES.get(dest, ()))
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{docs.get(f.name, f.name)} (default: {default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(*flags, dest=dest, type=kind, choices=choices, default=None, help=text,
                               metavar=None if choices else f.name.upper())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_", metavar="RESULTS", default=None,
                   help="a study's results folder (results/<study>), study file or storage URL: run one of its "
                        "configurations with its corpus, model and train settings (options given as well "
                        "override them); with --config")
    p.add_argument("--study-name", default=None, help="with --from: the study, when its storage holds several")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="with --from: the full URL (with its password) of a storage its study.json shows as ***")
    p.add_argument("--config", default=None, metavar="KEY=VALUE,...",
                   help="the configuration, as in the config_key column of trials.csv, e.g. bptt=35,batch_size=5 "
                        "(every key the study searches)")
    p.add_argument("--bptt", type=int, default=None, help="window length (default: 35, or --config's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 20, or --config's)")
    _add_section(p, "corpus", CorpusSpec)
    _add_section(p, "model", ModelConfig)
    _add_section(p, "train", TrainConfig)
    p.add_argument("--repeats", type=int, default=1,
                   help="[train] repeats: run the configuration this many times, with seeds seed, seed+1, ...")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="a memory budget (the study key max_memory_gib): the CUDA allocator's limit, or on CPU "
                        "weights, gradients, optimiser state and saved activations counted against it")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's, else auto)")
    p.add_argument("--no-probe", action="store_true", help="skip the memory/energy probe")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.add_argument("--log", action="append", default=None, metavar="KIND:DIR", help=LOG_HELP)


def _given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = f"{section}:"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def parse_config(text: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``bptt=35,batch_size=5,lr=2.5`` -> typed values; every key in ``required`` must be there."""
    params: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise HarnessError(f"--config {text!r}: {part!r} is not key=value; e.g. bptt=35,batch_size=5")
        params[key] = search_key(key, "--config").parse(value, "--config")
    missing = [k for k in required if k not in params]
    if missing:
        raise HarnessError(f"--config {text!r} misses {', '.join(dict.fromkeys(missing))}; give every key of the "
                           "config_key column of trials.csv, e.g. bptt=35,batch_size=5")
    return params


def load_from(source: str, study_name: str | None = None, storage: str | None = None) -> tuple[Any, Any]:
    """``--from``: (the study's StudyConfig as stored with it, its LoadedTrials; None for a study file
    that has not run yet)."""
    from pathlib import Path

    from bptt_harness.config import load_study, parse_study
    from bptt_harness.report.source import load_trials, resolve

    if source.endswith(".toml"):
        config = load_study(source)
        if not (config.results_dir / "study.json").is_file():
            return config, None
        source = str(config.results_dir)
    loaded = load_trials(resolve(source, study_name=study_name, passwords_from=[storage] if storage else []))
    if loaded.study_config is None:
        if source.endswith(".toml"):
            return load_study(source), loaded
        raise HarnessError(f"study {loaded.study_name!r} in {loaded.storage_display} was not created by harness "
                           "sweep (no stored study file); pass --from with the study file (.toml) instead")
    return parse_study(loaded.study_config, results_root=Path(source).parent), loaded


def setup(args: argparse.Namespace) -> TrialSetup:
    """The trial that ``args`` ask for, validated, nothing loaded or trained yet."""
    if args.repeats < 1:
        raise HarnessError(f"--repeats {args.repeats} must be >= 1")
    study = loaded = None
    if args.from_ is None and (args.study_name is not None or args.storage is not None):
        raise HarnessError("--study-name and --storage choose the study of --from; pass --from RESULTS as well")
    if args.from_ is not None:
        if args.config is None:
            raise HarnessError("--from needs --config with the configuration to run, e.g. --config "
                               "bptt=35,batch_size=5 (the config_key column of trials.csv)")
        study, loaded = load_from(args.from_, args.study_name, args.storage)
    given = {k: getattr(args, k) for k in CANONICAL if getattr(args, k) is not None}
    required = tuple(k for k in (*(study.search if study else ()), *CANONICAL) if k not in given)
    params = {**(parse_config(args.config, required) if args.config else CANONICAL), **given}
    key, cap = None, study.memory_cap_mib if study is not None else None
    if study is not None:
        from bptt_harness.study import trial_spec

        spec = trial_spec(study, params, repeat=0)
        corpus, device, key = study.corpus, study.device, config_key(params)
    else:
        spec = spec_with(params, ModelConfig(), TrainConfig())
        corpus, device = CorpusSpec(), "auto"
    train = _given(args, "train")
    if "seconds" in train and "budget" not in train:
        train["budget"] = "seconds"  # --seconds alone asks for a time budget
    if args.max_memory_gib is not None:
        if not args.max_memory_gib > 0 or args.max_memory_gib == float("inf"):
            raise HarnessError(f"--max-memory-gib {args.max_memory_gib} must be a number of GiB > 0")
        cap = args.max_memory_gib * 1024
    spec = replace(spec, model=replace(spec.model, **_given(args, "model")), train=replace(spec.train, **train))
    log = parse_log_targets([*(map(str, study.log) if study is not None else ()), *(args.log or [])])
    return TrialSetup(corpus=replace(corpus, **_given(args, "corpus")), spec=spec,
                      device=args.device if args.device is not None else device, options=RunOptions(memory_cap_mib=cap),
                      repeats=args.repeats, study=loaded, config_key=key, log=log,
                      name=study.name if study is not None else "trial")


def study_measured(ts: TrialSetup) -> str | None:
    """What the study measured for this configuration, for the reader to compare with (text mode)."""
    if ts.study is None or ts.config_key is None:
        return None
    records = (TrialRecord.from_dict(r) for r in ts.study.records)
    ppl = [r.result.val_ppl for r in records if r.config_key == ts.config_key and r.status == "ok"
           and isinstance(r.result.val_ppl, (int, float))]
    if not ppl:
        return f"study {ts.study.study_name}: no finished ok run of {ts.config_key}"
    return (f"study {ts.study.study_name}: {ts.config_key} measured val ppl "
            + ", ".join(f"{p:.4g}" for p in ppl[:5]) + f" ({len(ppl)} run(s))")
