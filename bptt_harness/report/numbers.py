"""Numbers as the report prints them: one set of rules for the HTML, the console, compare and the figures.

A measured number keeps its significant figures whatever its size: 0.36 MiB is ``0.36``, never ``0``;
0.002108 is ``0.002108``, never ``0``; 15,219 tokens/s keeps every integer digit. A spread is shown with
two significant figures and its mean to the same decimal place (``127.10 ± 0.71``); an interval's two
ends share the decimals its width needs (``125.0–129.2``). Missing values (None, NaN, infinities) are
the caller's ``missing`` text.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["count", "cost", "finite", "interval", "mib", "num", "pct", "pm", "ratio", "seconds"]

SPREAD_DIGITS = 2  # significant figures of a standard deviation or an interval's width
_SCI_BELOW = 1e-4  # smaller magnitudes are written 3.3e-5, as %g does


def finite(v: Any) -> float | None:
    """``v`` as a finite float, or None for anything else (None, text, NaN, infinities, a bool)."""
    if v is None or isinstance(v, bool | str):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _magnitude(x: float) -> int:
    """The power of ten of the leading digit: 0.36 -> -1, 15219 -> 4."""
    return math.floor(math.log10(abs(x)))


def _rounded(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` significant figures (so 0.9996 becomes 1.0 before its magnitude is read)."""
    return float(f"{x:.{digits - 1}e}")


def _fixed(x: float, decimals: int) -> str:
    """``x`` with ``decimals`` decimals (negative: rounded to tens, hundreds, ...), thousands separated."""
    if decimals <= 0:
        step = 10 ** (-decimals)
        return f"{int(round(x / step)) * step:,}"
    return f"{x:,.{decimals}f}"


def _strip(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def _sci(x: float, digits: int) -> str:
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{_strip(mantissa)}e{int(exp)}"


def num(v: Any, digits: int = 3, missing: str = "") -> str:
    """A measured number with ``digits`` significant figures: ``0.36``, ``12.1``, ``127.1`` (4), ``15,219``.

    Numbers of ``10**(digits-1)`` and more keep all their integer digits (a count of tokens is not
    rounded to ``15,200``); magnitudes below 1e-4 are written ``3.3e-5``; trailing zeros are dropped."""
    x = finite(v)
    if x is None:
        return missing
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1) - 0.5:
        return f"{int(round(x)):,}"
    if abs(x) < _SCI_BELOW:
        return _sci(x, digits)
    x = _rounded(x, digits)
    return _strip(_fixed(x, digits - 1 - _magnitude(x)))


def _decimals_for(spread: float) -> int:
    """Decimals that show ``spread`` with :data:`SPREAD_DIGITS` significant figures."""
    return SPREAD_DIGITS - 1 - _magnitude(_rounded(spread, SPREAD_DIGITS))


def pm(mean: Any, sd: Any, digits: int = 4, missing: str = "") -> str:
    """``127.10 ± 0.71``: the spread with two significant figures, the mean to the same decimal place.

    Without a spread (None, NaN) the mean alone, with ``digits`` significant figures."""
    m, s = finite(mean), finite(sd)
    if m is None:
        return missing
    if s is None:
        return num(m, digits)
    if s == 0:
        return f"{num(m, digits)} ± 0"
    d = _decimals_for(abs(s))
    if abs(s) < _SCI_BELOW:
        return f"{num(m, digits)} ± {_sci(s, SPREAD_DIGITS)}"
    return f"{_fixed(m, d)} ± {_fixed(abs(s), d)}"


def interval(lo: Any, hi: Any, digits: int = 4, missing: str = "") -> str:
    """``125.0–129.2``: both ends with the decimals the interval's width needs (two significant figures of it)."""
    a, b = finite(lo), finite(hi)
    if a is None or b is None:
        return missing
    width = abs(b - a)
    if width == 0 or width < _SCI_BELOW:
        return f"{num(a, digits)}–{num(b, digits)}"
    d = _decimals_for(width)
    return f"{_fixed(a, d)}–{_fixed(b, d)}"


def count(v: Any, missing: str = "") -> str:
    """A whole number: ``11,200``."""
    x = finite(v)
    return missing if x is None else f"{int(round(x)):,}"


def mib(v: Any, digits: int = 3, missing: str = "") -> str:
    """Memory: ``0.36 MiB``, ``442 MiB``, ``81,559 MiB``."""
    text = num(v, digits)
    return f"{text} MiB" if text else missing


def seconds(v: Any, digits: int = 3, missing: str = "") -> str:
    text = num(v, digits)
    return f"{text} s" if text else missing


def pct(fraction: Any, digits: int = 2, missing: str = "") -> str:
    """A fraction as a percentage with ``digits`` significant figures: 0.5 -> ``50%``, 0.0042 -> ``0.42%``."""
    x = finite(fraction)
    return missing if x is None else f"{num(x * 100, digits)}%"


def ratio(v: Any, digits: int = 3, missing: str = "") -> str:
    """``2.97×``."""
    text = num(v, digits)
    return f"{text}×" if text else missing


# The study's cost columns, in words with their unit (bptt_harness.record.COST_COLUMNS are these).
_COST_UNITS = {"peak_mem_mib": "MiB", "seconds_per_ktok": "s per 1k tokens", "joules_per_ktok": "J per 1k tokens"}


def cost(v: Any, column: str, missing: str = "n/a") -> str:
    """A value of a cost column with its unit: ``0.132 s per 1k tokens``, ``442 MiB``."""
    text = num(v, 3)
    if not text:
        return missing
    unit = _COST_UNITS.get(column)
    return f"{text} {unit}" if unit else num(v, 4)
