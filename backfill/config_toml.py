"""Checking one TOML table against a frozen settings dataclass: types, unknown and missing keys.

Pure and generic: ``table(cls, value, source, prefix)`` builds ``cls`` from a TOML table or
raises ``ConfigError`` in the one shape every config message has,
``{source}: {key} = {value}: expected {what}``, with a did-you-mean for a misspelt key.  The
field types it understands are the ones the settings use: ``str``, ``int``, ``float``,
``bool``, ``Path``, ``tuple[str, ...]``, a ``Literal`` of strings (its values are checked by
the caller) and any of them ``| None``.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backfill.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["ABSENT", "at_least", "fail", "hint", "table", "typed"]

_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "Path": "a path (string)",
    "tuple[str, ...]": "a list of strings",
}


def fail(source: str, key: str, value: Any, expected: str) -> ConfigError:
    """The error for ``key``: its value (or ``missing`` for ``ABSENT``) and what was expected."""
    shown = "missing" if value is ABSENT else repr(value)
    return ConfigError(f"{source}: {key} = {shown}: expected {expected}")


ABSENT = object()  # stands for a key that is not in the file


def typed(source: str, key: str, value: Any, kind: str) -> Any:
    """``value`` checked against the field type ``kind`` (as written) and converted to it."""
    base = kind.replace(" | None", "")
    if base.startswith("Literal["):
        # Only the type here, so a wrong type reads as elsewhere; the table's checker names the
        # allowed values.
        base = "str"
    ok = {
        "str": isinstance(value, str),
        "Path": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "tuple[str, ...]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[base]
    if not ok:
        raise fail(source, key, value, _EXPECTED[base])
    if base == "Path":
        return Path(value).expanduser()
    if base == "float":
        return float(value)
    if base == "tuple[str, ...]":
        return tuple(value)
    return value


def table(cls: type[Any], value: Any, source: str, prefix: str) -> Any:
    """A ``cls`` from the TOML table ``value`` found at ``prefix``; every key known and typed."""
    if not isinstance(value, dict):
        raise fail(source, prefix, value, "a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, item in value.items():
        dotted = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(f"{source}: {dotted}: unknown key{hint(key, known, '{!r}')}")
        values[key] = typed(source, dotted, item, str(known[key].type))
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        missing = [n for n, f in known.items() if n not in values and _required(f)]
        raise fail(
            source, f"{prefix}.{missing[0]}" if missing else prefix, ABSENT, "a value"
        ) from exc


def hint(name: str, known: Iterable[str], shape: str) -> str:
    """``; did you mean 'x'?`` for a near miss, else the list of what is known."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {shape.format(close[0])}?" if close else f" (known: {', '.join(names)})"


def _required(f: Any) -> bool:
    return bool(f.default is MISSING and f.default_factory is MISSING)


def at_least(source: str, key: str, value: float, low: float, high: float | None = None) -> None:
    """Refuse ``value`` below ``low`` (or above ``high``, when given)."""
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise fail(source, key, value, f"a value {span}")
