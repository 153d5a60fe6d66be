"""Where trials come from: a results folder, a study file, or a storage URL -> plain record dicts.

Everything here that touches user input fails with a one-line :class:`HarnessError` naming the
value and what was expected. Storage URLs are only ever shown redacted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from bptt_harness.config import load_study
from bptt_harness.errors import HarnessError
from bptt_harness.storage import open_storage, relocated
from bptt_harness.stored import read_trials
from bptt_harness.urls import STORAGE_ENV, anchored, hides_password, redact, same_storage, scrub

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class StudySource:
    """A resolved report input.

    Attributes:
        name: the Optuna study name.
        storage_url: the URL to open (may hold a password: never print it; use ``storage_display``).
        out_dir: where the report files go (None: ``results/<study name>``, known once loaded).
        info: the contents of ``study.json`` when there was one (objectives, cost).
    """

    name: str | None
    storage_url: str
    out_dir: Path | None
    info: dict = field(default_factory=dict)

    @property
    def storage_display(self) -> str:
        return redact(self.storage_url) or ""


@dataclass
class LoadedTrials:
    """The trials of one study as flat-able record dicts, plus what could not be shown."""

    study_name: str
    storage_display: str
    records: list[dict]
    n_running: int = 0
    info: dict = field(default_factory=dict)
    study_config: dict | None = None  # the study file as `bptt-harness sweep` stored it with the study


def is_storage_url(text: str) -> bool:
    return "://" in text or text.startswith("journal:")


def resolve(source: str | Path, *, storage: str | None = None, study_name: str | None = None,
            out_dir: Path | None = None, passwords_from: Sequence[str] = ()) -> StudySource:
    """Turn ``bptt-harness report SOURCE [--storage URL] [--study-name NAME]`` into a :class:`StudySource`.

    ``passwords_from``: full storage URLs (``compare --storage``, one per storage); a folder whose study.json
    records a password-redacted URL takes the one that names the same storage."""
    text = str(source)
    if not text:
        raise HarnessError("report source '' is empty; pass a results folder, a study file (.toml) or a storage URL")
    if is_storage_url(text) and not Path(text).exists():
        if storage is not None:
            raise HarnessError(f"report source {redact(text)!r} is already a storage URL; drop --storage")
        return StudySource(name=study_name, storage_url=text, out_dir=out_dir)
    path = Path(text)
    if path.suffix == ".toml":
        if not path.is_file():
            raise HarnessError(f"study file {str(path)!r} does not exist; pass a studies/*.toml file or a results folder")
        cfg = load_study(path)
        results_dir = Path(cfg.results_dir)
        info = _read_study_json(results_dir) if (results_dir / STUDY_JSON).is_file() else {}
        return StudySource(name=study_name or cfg.name, storage_url=storage or cfg.storage_url,
                           out_dir=out_dir or results_dir, info=info)
    if storage is not None and not path.is_file():
        # An explicit storage: the folder is only where the report goes (it may not exist yet, e.g. PostgreSQL).
        info = _read_study_json(path) if (path / STUDY_JSON).is_file() else {}
        return StudySource(name=study_name or info.get("study_name"), storage_url=storage,
                           out_dir=out_dir or path, info=info)
    if not path.exists():
        raise HarnessError(f"results folder {str(path)!r} does not exist; pass results/<study> "
                           "(a folder with study.json), a study file (.toml) or a storage URL")
    if not path.is_dir():
        raise HarnessError(f"report source {str(path)!r} is a file, not a results folder; pass results/<study> "
                           "(a folder with study.json), a study file (.toml) or a storage URL")
    info = _read_study_json(path) if (path / STUDY_JSON).is_file() else {}
    if not info:
        if (path / "study.db").is_file():
            # A folder copied without its study.json still holds the SQLite storage.
            return StudySource(name=study_name, storage_url=f"sqlite:///{(path / 'study.db').resolve()}",
                               out_dir=out_dir or path, info={})
        raise HarnessError(f"results folder {str(path)!r} has no {STUDY_JSON}; pass a folder written by "
                           "'bptt-harness sweep', or --storage URL --study-name NAME")
    url = info.get("storage")
    if not isinstance(url, str) or not url:
        raise HarnessError(f"{str(path / STUDY_JSON)!r} has no 'storage' URL; pass --storage URL")
    if hides_password(url):
        url = _password_from_environment(url, path / STUDY_JSON, passwords_from)
    moved = relocated(anchored(url, path), path)
    if moved != url:
        log.info("storage %s not found; using %s in the results folder", redact(url), redact(moved))
    url = moved
    return StudySource(name=study_name or info.get("study_name"), storage_url=url,
                       out_dir=out_dir or path, info=info)


def shown_storage(display: str | None, folder: Path | None, where: str = "in this results folder") -> str | None:
    """A storage as a report shows it: a SQLite file or journal inside the results ``folder`` by its path
    relative to the folder (``study.db in this results folder (SQLite)``), so a published report does not
    show the path of the machine that wrote it; anything else as given (passwords already redacted)."""
    if not display or folder is None:
        return display
    for prefix, kind in (("sqlite:///", "SQLite"), ("journal:", "journal")):
        if display.startswith(prefix):
            try:
                rel = Path(display[len(prefix):]).resolve().relative_to(Path(folder).resolve())
            except (ValueError, OSError):
                return display
            return f"{rel.as_posix()} {where} ({kind})"
    return display


def _password_from_environment(recorded: str, where: Path, given: Sequence[str] = ()) -> str:
    """The full URL of a recorded, password-redacted storage: the given URL (or $BPTT_HARNESS_STORAGE)
    that names it."""
    for full in (*given, os.environ.get(STORAGE_ENV, "")):
        if full and same_storage(full, recorded):
            return full
    raise HarnessError(f"the storage URL in {str(where)!r} ({recorded}) has its password removed; "
                       f"pass --storage URL with the password, or set {STORAGE_ENV} to it")


def _read_study_json(folder: Path) -> dict:
    p = folder / STUDY_JSON
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarnessError(f"{str(p)!r} is not readable JSON ({type(e).__name__}); "
                           "expected the study.json that 'bptt-harness sweep' writes") from None
    if not isinstance(info, dict):
        raise HarnessError(f"{str(p)!r} holds {type(info).__name__}, expected a JSON object")
    return info


def load_trials(src: StudySource) -> LoadedTrials:
    """Read the trials of the study at ``src`` into record dicts (:func:`bptt_harness.stored.read_trials`)."""
    shown = src.storage_display
    try:
        storage = open_storage(src.storage_url, read_only=True)
        names = optuna.get_all_study_names(storage=storage)
    except HarnessError:
        raise
    except Exception as e:  # sqlalchemy / journal errors come in many types; all mean "cannot read"
        msg = scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, src.storage_url)
        raise HarnessError(f"cannot read storage {shown}: {msg}") from None
    if not names:
        raise HarnessError(f"storage {shown} holds no study; run 'bptt-harness sweep' first")
    name = src.name
    if name is None:
        if len(names) > 1:
            raise HarnessError(f"storage {shown} holds {len(names)} studies ({', '.join(sorted(names)[:10])}); "
                               "pass --study-name")
        name = names[0]
    if name not in names:
        raise HarnessError(f"study {name!r} is not in storage {shown}; it holds: {', '.join(sorted(names)[:10])}")
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
    except Exception as e:
        msg = scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, src.storage_url)
        raise HarnessError(f"cannot read study {name!r} from storage {shown}: {msg}") from None
    # Final trials, and failed attempts a resume will run again (shown as they failed); not the running ones.
    stored = read_trials(trials, name)
    records = [t.stored for t in stored if t.standing in ("final", "retry") and t.stored is not None]
    n_running = sum(t.standing == "running" for t in stored)
    info = dict(src.info)
    info.setdefault("study_name", name)
    study_file = study.user_attrs.get("study_config")
    if isinstance(study_file, dict) and isinstance(study_file.get("description"), str) and study_file["description"]:
        info["description"] = study_file["description"]  # the study's own copy: also there without study.json
    return LoadedTrials(study_name=name, storage_display=shown, records=records, n_running=n_running, info=info,
                        study_config=study_file if isinstance(study_file, dict) else None)
