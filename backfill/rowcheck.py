"""The row-by-row diagnosis of a block that did not parse: which line, which field, which value.

Theory of operation.  The fast parsers take a block whole and, when it breaks, say little about
where.  ``sift()`` then reads the block again one record at a time with the standard library
(``json``, ``csv``), checks every field against the rules below, and either raises
``BadDataError`` naming the first bad line, field and value, or, given a quarantine callback,
hands it each bad row (line number, text, reason) and returns the good rows for a second parse.

The rules (the fast parsers enforce the same ones; ``decode`` documents them for users):

- a JSON row is one object with each of the sixteen fields as a key (``null`` for no value),
  no key twice, valid UTF-8; a CSV row has as many cells as the header, an empty cell is null;
- ``sessionTimestamp``, ``sessionDuration``, ``eventOffset``, ``birthYear``: a JSON integer
  literal (in CSV: ``-?[0-9]+``), in range; never a string, a boolean, a fraction or ``1e3``;
- ``latitude``, ``longitude``: a finite JSON number (in CSV: a decimal number);
- ``sessionTimestamp`` present and within ``[min_session_ms, max_session_ms)`` of the limits;
- the three maps: a JSON object (or null) with no key twice; any value goes, a non-string one
  is kept as its compact JSON text;
- the string fields: any JSON value goes, a non-string one is kept as its compact JSON text.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import TYPE_CHECKING, Any, Literal

from backfill.errors import BadDataError
from backfill.schema import FIELDS, INPUT, MAPS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from backfill.framing import Block

__all__ = ["FLOAT_FIELDS", "INT_FIELDS", "sift"]

INT_FIELDS = ("sessionTimestamp", "sessionDuration", "eventOffset", "birthYear")
FLOAT_FIELDS = ("latitude", "longitude")
_CSV_INT = re.compile(r"-?[0-9]+")
_CSV_FLOAT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_RANGES = {"birthYear": (-(2**31), 2**31)}


class _Object(dict[str, Any]):
    """A decoded JSON object that remembers the first key it saw twice."""

    __slots__ = ("twice",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.twice: str | None = None
        if len(self) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.twice = key
                    break
                seen.add(key)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def sift(
    block: Block,
    fmt: Literal["json", "csv"],
    header: list[str] | None,
    quarantine: Callable[[int, str, str], None] | None,
    where: dict[str, str | None],
    session_range: tuple[int, int],
    check_stop: Callable[[], None] = lambda: None,
) -> list[tuple[int, bytes]]:
    """The good rows of ``block`` (line number, text); the bad ones fail the window, or go to
    quarantine.

    ``check_stop`` is called every few hundred rows; it raises when the caller asked to stop.
    """
    good: list[tuple[int, bytes]] = []
    for count, (number, text, problem) in enumerate(_scan(block, fmt, header, session_range)):
        if count % 256 == 0:
            check_stop()
        if problem is None:
            good.append((number, text.encode()))
            continue
        if quarantine is None:
            raise BadDataError(problem, **where)
        quarantine(number, text, problem)
    return good


def _scan(
    block: Block,
    fmt: Literal["json", "csv"],
    header: list[str] | None,
    session_range: tuple[int, int],
) -> Iterator[tuple[int, str, str | None]]:
    """Every record of ``block``: its line number, its text, and what is wrong with it."""
    if fmt == "json":
        for offset, raw in enumerate(bytes(block.data).split(b"\n")):
            if raw.strip():
                number = block.first_line + offset
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("utf-8", errors="replace")
                    yield number, text, f"line {number}: not valid UTF-8: {text[:40]!r}"
                    continue
                yield number, line, _json_row_problem(line, number, session_range)
        return
    assert header is not None
    text = bytes(block.data).decode("utf-8", errors="surrogateescape")
    number = block.first_line
    for record in csv.reader(io.StringIO(text, newline="")):
        out = io.StringIO()
        csv.writer(out, lineterminator="").writerow(record)
        shown = out.getvalue()
        try:
            shown.encode("utf-8")
            problem = _csv_row_problem(record, header, number, session_range)
        except UnicodeEncodeError:
            shown = shown.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            problem = f"line {number}: not valid UTF-8: {shown[:40]!r}"
        yield number, shown, problem
        number += 1 + sum(cell.count("\n") for cell in record)


def _csv_row_problem(
    record: list[str], header: list[str], line: int, session_range: tuple[int, int]
) -> str | None:
    if len(record) != len(header):
        return f"line {line}: {len(record)} cells, the header has {len(header)}"
    row = {}
    for name, cell in zip(header, record, strict=True):
        if name in INPUT:
            value = row[name] = _csv_cell(name, cell)
            if reason := _check_value(name, value):
                return _describe(line, name, cell, reason)
    return _session_problem(row.get("sessionTimestamp"), line, session_range)


def _json_row_problem(text: str, line: int, session_range: tuple[int, int]) -> str | None:
    try:
        row = json.loads(text, object_pairs_hook=_Object, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        return f"line {line}: not valid JSON ({exc.msg}): {text[:40]!r}"
    except ValueError as exc:  # NaN/Infinity, or an integer of more than 4300 digits
        return f"line {line}: not valid JSON ({exc}): {text[:40]!r}"
    except RecursionError:
        return f"line {line}: JSON nested too deeply: {text[:40]!r}"
    if not isinstance(row, _Object):
        return f"line {line}: not a JSON object: {text[:40]!r}"
    if row.twice is not None:
        return f"line {line}: key {row.twice!r} appears twice"
    for name in FIELDS:  # what each value is, before what is missing: the more telling error
        if name in row and (reason := _check_value(name, row[name])):
            return _describe(line, name, row[name], reason)
    for name in FIELDS:
        if name not in row:
            return f"line {line}: field {name!r} is missing"
    return _session_problem(row["sessionTimestamp"], line, session_range)


def _session_problem(value: Any, line: int, session_range: tuple[int, int]) -> str | None:
    if value is None:
        return f"line {line}: field 'sessionTimestamp' is missing"
    if not session_range[0] <= value < session_range[1]:
        return _describe(line, "sessionTimestamp", value, "is not a plausible time (2000-2099)")
    return None


def _check_value(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be field ``name``, or None if it can (null always can, here)."""
    if value is None:
        return None
    if name in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            return "is not an integer"
        low, high = _RANGES.get(name, (-(2**63), 2**63))
        return None if low <= value < high else "is out of range"
    if name in FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        return None if math.isfinite(value) else "is not a finite number"
    if name in MAPS:
        if not isinstance(value, dict):
            return "is not an object"
        if isinstance(value, _Object) and value.twice is not None:
            return f"has the key {value.twice!r} twice"
    return None


def _describe(line: int, name: str, value: Any, reason: str) -> str:
    shown = json.dumps(value, ensure_ascii=False)
    return f"line {line}: field {name!r} {reason}: {shown[:40]}{'…' if len(shown) > 40 else ''}"


def _csv_cell(name: str, cell: str) -> Any:
    """The value a CSV cell stands for, as JSON would have given it (or the text, if none)."""
    if cell == "":
        return None
    if name in INT_FIELDS:
        # More than 40 digits is out of range anyway (and int() refuses over 4300).
        return int(cell[:40]) if _CSV_INT.fullmatch(cell) else cell
    if name in FLOAT_FIELDS:
        return float(cell) if _CSV_FLOAT.fullmatch(cell) else cell
    if name in MAPS:
        try:
            return json.loads(cell, object_pairs_hook=_Object, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            return cell
    return cell
