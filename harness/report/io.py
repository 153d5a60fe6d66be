"""Atomic file writes and password redaction: the two things a report must never get wrong."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from harness.errors import HarnessError

# scheme://user:password@host -> scheme://user:***@host. People type passwords with '@' or ':' in
# them unencoded, so the password runs (greedily) to the last '@' that is followed by a host; when in
# doubt this redacts too much, never too little.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>\S*)(?P<tail>@)"
                           r"(?=[^@/\s]*(?:[/?#\s]|$))")


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (safe to print, log and write)."""
    if url is None:
        return None
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", url)


def url_password(url: str | None) -> str | None:
    """The password in a storage URL, if any (used only to scrub it from error text)."""
    if not url or "://" not in url:
        return None
    try:
        pw = urlsplit(url).password
    except ValueError:
        m = _URL_PASSWORD.search(url)
        pw = m["pw"] if m else None
    return pw or None


def scrub(text: str, *urls: str | None) -> str:
    """Remove the passwords of ``urls`` (raw or percent-decoded) and any ``user:pw@`` from ``text``."""
    from urllib.parse import quote, unquote

    for url in urls:
        pw = url_password(url)
        if pw and pw != "***":
            for form in {pw, unquote(pw), quote(unquote(pw), safe="")}:
                if form:
                    text = text.replace(form, "***")
    return redact_url(text) or ""


def _write_all(f, data: bytes) -> None:
    # A separate function so tests can simulate a full disk at the moment of writing.
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files_atomic(files: Mapping[Path, str | bytes]) -> None:
    """Write every file or none: all temporaries first, then one ``os.replace`` each.

    A failure while writing (a full disk, a read-only folder) removes the temporaries and raises a
    one-line :class:`HarnessError`; the previous versions of all files stay as they were.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                data = content.encode("utf-8") if isinstance(content, str) else content
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                temps.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    # mkstemp makes 0600 files; a report is as readable as any file the user creates.
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
                    _write_all(f, data)
            except OSError as e:
                reason = e.strerror or str(e)
                raise HarnessError(f"cannot write {path}: {reason}; the previous report was left as it was") from None
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise HarnessError(f"cannot write {path}: {e.strerror or e}; "
                                   "the previous report was left as it was") from None
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
