"""What kind of value a dataclass field takes, read from its annotation: the one reading shared by the study
file's type checks (:mod:`bptt_harness.config`), the ``bptt-harness trial`` options and the record's columns."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any, Literal, Union

__all__ = ["Kind", "field_kind", "field_kinds"]

Kind = Literal["int", "float", "bool", "str"]
_PLAIN: tuple[tuple[Kind, type], ...] = (("bool", bool), ("int", int), ("float", float), ("str", str))


def field_kind(tp: Any) -> tuple[Kind | None, tuple | None]:
    """``(kind, choices)`` of a resolved annotation: ``int | None`` -> ``("int", None)``, ``Literal["a", "b"]``
    -> ``("str", ("a", "b"))``; ``(None, None)`` for anything else (a list, a dataclass, a union of two kinds)."""
    if typing.get_origin(tp) is Literal:
        return "str", typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return field_kind(args[0]) if len(args) == 1 else (None, None)
    for kind, plain in _PLAIN:
        if tp is plain:
            return kind, None
    return None, None


@functools.cache  # resolving string annotations is slow; a class's hints never change
def field_kinds(cls: type) -> dict[str, tuple[Kind | None, tuple | None]]:
    """:func:`field_kind` of every annotated field of ``cls``."""
    return {name: field_kind(tp) for name, tp in typing.get_type_hints(cls).items()}
