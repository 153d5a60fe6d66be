"""Storage URLs: the one place that hides their passwords, and the form they are opened in.

Every printed, logged or written storage URL goes through :func:`redact`; every error text that may
quote one goes through :func:`scrub`. People type passwords unencoded, with ``/``, ``:``, ``@``,
spaces or ``%``, so the userinfo is taken to end at the *last* ``@`` before the host: when in doubt
this hides too much, never too little. ``password=`` and ``passwd=`` query parameters are hidden too.
This module imports nothing heavy, so the report can use it without the trainer stack.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import overload
from urllib.parse import quote, unquote, unquote_plus

HIDDEN = "***"
# The storage URL, with its password, for processes started by this tool (and for users who do not
# want the password in their shell history or in `ps`): read where --storage is not given.
STORAGE_ENV = "BPTT_HARNESS_STORAGE"

# A query parameter that carries a password. Its value runs to the next "&key=" (a raw '&' inside
# a password does not end it) or '#'.
_QUERY_PASSWORD = re.compile(r"(?i)[?&;](?:password|passwd)=(?P<value>[^&#]*(?:&(?![A-Za-z_][\w.-]*=)[^&#]*)*)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# URLs inside free text (error messages): up to the next whitespace or quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_KEYWORD_PASSWORD = re.compile(r"(?i)\b(password|passwd)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)")


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """(start, end) of the password inside ``scheme://user:password@host``, or None.

    The userinfo ends at the last '@' before any ``password=`` query (whose value is hidden on its own),
    and the password starts after its first ':'. A URL whose authority is empty (``sqlite:////abs``) has none.
    """
    m = _SCHEME.match(url)
    if m is None or url[m.end():].startswith("/"):
        return None
    at = url.rfind("@", 0, _query_start(url, m.end()))
    if at < m.end():
        return None
    user, sep, _ = url[m.end():at].partition(":")
    if not sep or "/" in user or "?" in user:  # no password, or that '@' is in the path: no userinfo
        return None
    start = m.end() + len(user) + 1
    return start, at


def _password_spans(url: str) -> list[tuple[int, int]]:
    spans = [(q.start("value"), q.end("value")) for q in _QUERY_PASSWORD.finditer(url)]
    user = _userinfo_span(url)
    if user is not None:
        spans.append(user)
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:  # overlapping: hide as one
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged if e > s]


@overload
def redact(url: str) -> str: ...
@overload
def redact(url: None) -> None: ...
def redact(url: str | None) -> str | None:
    """``url`` with every password replaced by ``***``: safe to print, log and write."""
    if not url:
        return url
    out, last = [], 0
    for start, end in _password_spans(url):
        out.append(url[last:start] + HIDDEN)
        last = end
    return "".join(out) + url[last:]


def passwords(url: str | None) -> list[str]:
    """The passwords in ``url`` as written (userinfo and query); used only to scrub them from text."""
    if not url:
        return []
    return [url[s:e] for s, e in _password_spans(url) if url[s:e] != HIDDEN]


def hides_password(url: str) -> bool:
    """Whether ``url`` is a redacted URL: its password was replaced by ``***`` and must come from elsewhere."""
    return any(url[s:e] == HIDDEN for s, e in _password_spans(url))


def scrub(text: str, *urls: str | None) -> str:
    """``text`` (an error message) without the passwords of ``urls``, in any encoding, nor any other
    URL's password or ``password=...``."""
    for url in urls:
        for pw in passwords(url):
            forms = {pw, unquote(pw), unquote_plus(pw), quote(unquote(pw), safe=""), quote(unquote(pw))}
            # A parser that split the password at an '@' or ':' quotes a piece of it ("invalid port 'w0rd'").
            forms |= {piece for form in list(forms) for piece in re.split(r"[^A-Za-z0-9]+", form) if len(piece) >= 4}
            for form in sorted(forms, key=len, reverse=True):
                if len(form) >= 4:
                    text = text.replace(form, HIDDEN)
                elif form:
                    # A short password is hidden only where it stands alone: hiding every 'p' in a message
                    # ("invalid port 'nota***ort'") would show what it is (URLs are redacted by position below).
                    text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", HIDDEN, text)
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)) or "", text)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m.group(1)}{m.group(2)}{HIDDEN}", text)


def engine_url(url: str) -> str:
    """The URL to hand to SQLAlchemy: ``postgresql://`` opened with psycopg2 (the driver this package
    installs; SQLAlchemy 2.1 would pick psycopg 3), and user and passwords percent-encoded, so a raw
    ``@``, ``:``, ``/`` or space in a password is read as the user meant it."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    m = _SCHEME.match(url)
    if m is None or url[m.end():].startswith("/"):
        return url
    # A raw '@' or ':' in a password= value would make SQLAlchemy take it for the userinfo's end.
    url = _QUERY_PASSWORD.sub(_encode_query_password, url)
    at = url.rfind("@", 0, _query_start(url, m.end()))
    if at < m.end():
        return url
    user, sep, pw = url[m.end():at].partition(":")
    if "/" in user or "?" in user:  # that '@' is in the path or query: there is no userinfo
        return url
    encoded = quote(unquote(user), safe="") + (sep + quote(unquote(pw), safe="") if sep else "")
    return url[:m.end()] + encoded + url[at:]


def _encode_query_password(q: re.Match) -> str:
    head = q.group(0)[:q.start("value") - q.start()]
    return head + quote(unquote(q["value"]), safe="")


def _query_start(url: str, after: int) -> int:
    """Where a ``password=`` query begins (its '@'s are not the userinfo's), else the end of ``url``."""
    q = _QUERY_PASSWORD.search(url, after)
    return q.start() if q else len(url)


def database_name(url: str) -> str:
    """The database a server URL names (``postgresql://user:pw@host:5432/db`` -> ``db``), '' if none;
    the userinfo (whose password may hold '/') is skipped first."""
    m = _SCHEME.match(url)
    if m is None:
        return ""
    end = _query_start(url, m.end())
    rest = url[m.end():end]
    at = rest.rfind("@")
    rest = rest[at + 1:] if at >= 0 else rest
    _, slash, path = rest.partition("/")
    return path.split("?")[0].strip() if slash else ""


FILE_PREFIXES = ("sqlite:///", "journal:")


def relative_to_folder(url: str, folder: Path) -> str:
    """A SQLite file or journal inside ``folder`` as a path relative to it (``sqlite:///study.db``), so a
    results folder that is copied or moved keeps its own storage; any other URL unchanged."""
    for prefix in FILE_PREFIXES:
        if url.startswith(prefix):
            try:
                rel = Path(url[len(prefix):]).expanduser().resolve().relative_to(folder.resolve())
            except (ValueError, OSError):
                return url
            return prefix + rel.as_posix()
    return url


def anchored(url: str, folder: Path) -> str:
    """The inverse of :func:`relative_to_folder`: a relative SQLite or journal path read from ``folder``'s
    ``study.json`` is that folder's file (absolute); any other URL unchanged."""
    for prefix in FILE_PREFIXES:
        if url.startswith(prefix):
            path = Path(url[len(prefix):]).expanduser()
            return url if path.is_absolute() else prefix + str((folder / path).resolve())
    return url


def same_storage(a: str, b: str) -> bool:
    """Whether two storage URLs open the same storage, whatever their driver spelling, relative
    paths or passwords (a redacted URL matches the full one)."""
    return _identity(a) == _identity(b)


def _identity(url: str) -> object:
    url = url.strip()
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix):
            return prefix + str(Path(url[len(prefix):]).expanduser().resolve())
    try:
        from sqlalchemy.engine import make_url

        u = make_url(engine_url(url))
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: compare the text without its passwords
        return redact(url)
    query = tuple(sorted((k, str(v)) for k, v in u.query.items() if k.lower() not in ("password", "passwd")))
    port = u.port if u.port is not None or not u.drivername.startswith("postgresql") else 5432
    return u.drivername, u.username, u.host, port, u.database, query
