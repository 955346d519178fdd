"""Cutting decompressed bytes into blocks of whole records, their boundaries found with numpy.

Theory of operation.  ``blocks()`` gathers pieces until about ``block_bytes`` have come, finds
every record-ending newline at once (in CSV, one inside a quoted cell is no boundary: the
parity of the quotes before it tells), cuts after the last one and carries the rest over to the
next block.  A record longer than ``max_line_bytes``, or a quoted CSV cell that never closes,
raises ``BadDataError`` naming the line.  Memory stays bounded by the block size, never by the
file.  ``csv_header()`` reads and checks a CSV download's header line; ``lines()`` views a
block's records as an Arrow string array without copying them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from backfill import crashpoints
from backfill.errors import BadDataError
from backfill.schema import FIELDS

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from backfill.schema import Limits

__all__ = ["Block", "blocks", "chain", "csv_header", "lines", "record_ends"]


def record_ends(
    view: np.ndarray[Any, np.dtype[np.uint8]], csv_quotes: bool
) -> np.ndarray[Any, Any]:
    """Positions of the newlines that end a record (in CSV, not those inside quotes)."""
    newlines = np.flatnonzero(view == 10)
    if csv_quotes and len(newlines):
        # RFC 4180 doubles quotes inside cells, so a newline is inside one iff the quotes
        # before it are odd in number; a running XOR keeps the parity in one byte a position.
        parity = np.bitwise_xor.accumulate((view == 34).view(np.uint8))[newlines]
        newlines = newlines[parity == 0]
    return newlines


@dataclass(slots=True)
class Block:
    """Whole records of a download: their bytes, where they start, where each one ends."""

    data: bytes
    first_line: int  # 1-based line number of the block's first line
    ends: np.ndarray[Any, Any]  # positions of the newlines that end its records


def blocks(
    pieces: Iterable[bytes],
    limits: Limits,
    csv_quotes: bool,
    where: dict[str, str | None],
    line: int = 1,
) -> Iterator[Block]:
    """Blocks of whole records, about ``limits.block_bytes`` each, their newlines found once."""
    carry = b""
    pieces = iter(pieces)
    while True:
        piece = next(pieces, None)
        if piece is not None:
            carry += piece
            if len(carry) < limits.block_bytes:
                continue
        elif not carry.strip():
            return
        elif not carry.endswith(b"\n"):
            carry += b"\n"
        ends = record_ends(np.frombuffer(carry, dtype=np.uint8), csv_quotes)
        if not len(ends):
            if len(carry) > limits.max_line_bytes:
                raise BadDataError(
                    f"line {line} is longer than {limits.max_line_bytes} bytes", **where
                )
            if piece is None:
                raise BadDataError(f"unterminated quoted CSV cell from line {line}", **where)
            continue
        cut = int(ends[-1]) + 1
        block, carry = carry[:cut], carry[cut:]
        _check_lengths(ends, line, limits, where)
        crashpoints.hit("decode.block")
        yield Block(block, line, ends)
        line += len(ends)
        if piece is None and not carry.strip():
            return


def _check_lengths(
    ends: np.ndarray[Any, Any], line: int, limits: Limits, where: dict[str, str | None]
) -> None:
    """Refuse a block holding a record longer than ``limits.max_line_bytes``."""
    lengths = np.diff(ends, prepend=-1)
    if int(lengths.max()) > limits.max_line_bytes:
        at = int(np.argmax(lengths > limits.max_line_bytes))
        raise BadDataError(
            f"line {line + at} is longer than {limits.max_line_bytes} bytes", **where
        )


def lines(block: Block) -> pa.StringArray:
    """The block's non-blank lines as an Arrow string array, without copying the bytes."""
    ends = block.ends
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    view = np.frombuffer(block.data, dtype=np.uint8)
    keep = (lengths > 1) | ((lengths == 1) & (view[starts] != 13))  # blank and "\r" lines go
    wide = len(block.data) >= 2**31
    offsets = np.empty(len(ends) + 1, dtype=np.int64 if wide else np.int32)
    offsets[0] = 0
    offsets[1:] = ends + 1
    kind = pa.large_string() if wide else pa.string()
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(block.data)]
    array = pa.Array.from_buffers(kind, len(ends), buffers)
    return array if keep.all() else array.filter(pa.array(keep))


def chain(first: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    """``first`` (if not empty), then the pieces of ``rest``."""
    if first:
        yield first
    yield from rest


def csv_header(
    first: bytes, pieces: Iterator[bytes], limits: Limits, where: dict[str, str | None]
) -> tuple[bytes, list[str]]:
    """Split a CSV download's header line off ``first`` (reading on as needed) and check it.

    Returns the bytes after the header and its column names; raises ``BadDataError`` when the
    line is too long or is not a Flurry header.
    """
    while b"\n" not in first:
        piece = next(pieces, None)
        if piece is None:
            first += b"\n"
            break
        first += piece
        if len(first) > limits.max_line_bytes:
            raise BadDataError("the CSV header line is too long", **where)
    line, _, rest = first.partition(b"\n")
    try:
        header = next(csv.reader([line.decode("utf-8", "replace").strip("\r\ufeff")]))
    except (csv.Error, StopIteration):
        header = []
    if "sessionTimestamp" not in header or len(set(header) & set(FIELDS)) < 3:
        raise BadDataError(f"neither JSON lines nor a Flurry CSV header: {line[:60]!r}", **where)
    return rest, header
