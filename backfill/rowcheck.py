"""The row-by-row diagnosis of a block that did not parse: which line, which field, which value.

Theory of operation.  The fast parsers take a block whole and, when it breaks, say little about
where.  ``sift()`` then reads the block again one record at a time with the standard library
(``json``, ``csv``), checks every field against the type it must have, and either raises
``BadDataError`` naming the first bad line, field and value, or, given a quarantine callback,
hands it each bad row (line number, text, reason) and returns the good rows for a second parse.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import TYPE_CHECKING, Any, Literal

from backfill.errors import BadDataError
from backfill.schema import FIELDS, INPUT, MAPS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from backfill.framing import Block

__all__ = ["sift"]

_INT_FIELDS = ("sessionTimestamp", "sessionDuration", "eventOffset", "birthYear")
_FLOAT_FIELDS = ("latitude", "longitude")


def sift(
    block: Block,
    fmt: Literal["json", "csv"],
    header: list[str] | None,
    quarantine: Callable[[int, str, str], None] | None,
    where: dict[str, str | None],
) -> list[bytes]:
    """The good rows of ``block`` as text; the bad ones fail the window, or go to quarantine."""
    good: list[bytes] = []
    for number, text, problem in _scan(block, fmt, header):
        if problem is None:
            good.append(text.encode())
            continue
        if quarantine is None:
            raise BadDataError(problem, **where)
        quarantine(number, text, problem)
    return good


def _scan(
    block: Block, fmt: Literal["json", "csv"], header: list[str] | None
) -> Iterator[tuple[int, str, str | None]]:
    """Every record of ``block``: its line number, its text, and what is wrong with it."""
    text = block.data.decode("utf-8", errors="replace")
    if fmt == "json":
        for offset, line in enumerate(text.split("\n")):
            if line.strip():
                number = block.first_line + offset
                yield number, line, _json_row_problem(line, number)
        return
    assert header is not None
    number = block.first_line
    for record in csv.reader(io.StringIO(text, newline="")):
        out = io.StringIO()
        csv.writer(out, lineterminator="").writerow(record)
        yield number, out.getvalue(), _csv_row_problem(record, header, number)
        number += 1 + sum(cell.count("\n") for cell in record)


def _csv_row_problem(record: list[str], header: list[str], line: int) -> str | None:
    if len(record) != len(header):
        return f"line {line}: {len(record)} cells, the header has {len(header)}"
    for name, cell in zip(header, record, strict=True):
        if name in INPUT and (reason := _check_value(name, _csv_cell(name, cell))):
            return _describe(line, name, cell, reason)
    return None


def _json_row_problem(text: str, line: int) -> str | None:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"line {line}: not valid JSON ({exc.msg}): {text[:40]!r}"
    except RecursionError:
        return f"line {line}: JSON nested too deeply: {text[:40]!r}"
    if not isinstance(row, dict):
        return f"line {line}: not a JSON object: {text[:40]!r}"
    for name in FIELDS:
        reason = _check_value(name, row.get(name))
        if reason:
            return _describe(line, name, row.get(name), reason)
    return None


def _check_value(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be field ``name``, or None if it can."""
    if value is None:
        return "is missing" if name == "sessionTimestamp" else None
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            return "is not an integer"
        if name == "birthYear" and not -(2**31) <= value < 2**31:
            return "is out of range"
        return None if -(2**63) <= value < 2**63 else "is out of range"
    if name in _FLOAT_FIELDS:
        return (
            None
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else "is not a number"
        )
    if name in MAPS:
        return None if isinstance(value, dict) else "is not an object"
    return None if isinstance(value, str) else "is not a string"


def _describe(line: int, name: str, value: Any, reason: str) -> str:
    shown = json.dumps(value, ensure_ascii=False)
    return f"line {line}: field {name!r} {reason}: {shown[:40]}{'…' if len(shown) > 40 else ''}"


def _csv_cell(name: str, cell: str) -> Any:
    """The value a CSV cell stands for, as JSON would have given it (or the text, if none)."""
    if cell == "":
        return None
    if name in _INT_FIELDS:
        return int(cell) if re.fullmatch(r"-?\d+", cell) else cell
    if name in _FLOAT_FIELDS:
        try:
            return float(cell)
        except ValueError:
            return cell
    if name in MAPS:
        try:
            return json.loads(cell)
        except ValueError:
            return cell
    return cell
