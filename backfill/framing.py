"""Cutting decompressed bytes into blocks of whole records, their boundaries found with numpy.

Theory of operation.  ``blocks()`` gathers pieces until about a block's size has come
(``block_bytes``; a small download is one block: each block costs the parser a fixed few
milliseconds, and small windows convert side by side instead), finds every record-ending
newline at once (in CSV, one inside a quoted cell is no boundary: the
parity of the quotes before it tells), cuts after the last one and carries the rest over to the
next block.  A record longer than ``max_line_bytes``, or a quoted CSV cell that never closes,
raises ``BadDataError`` naming the line.  Memory stays bounded by the block size, never by the
file.  ``csv_header()`` reads and checks a CSV download's header line; ``lines()`` views a
block's records as an Arrow string array without copying them.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from backfill import crashpoints
from backfill.errors import BadDataError
from backfill.schema import FIELDS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from backfill.schema import Limits

__all__ = ["Block", "blocks", "chain", "csv_header", "frame", "lines"]

_STEP = 1 << 20  # bytes scanned at a time: a block of blank lines costs 8 bytes a line per MB
_ONES = np.uint64(0x0101010101010101)  # times a word of 0/1 bytes: their sum in the top byte


@dataclass(slots=True)
class Block:
    """Whole records of a download: their bytes, where they start, where each one ends.

    ``ends`` holds only the newlines that end a record with content (blank lines, and a lone
    ``\r``, are no record; a record's text runs from the end before it, blank lines included);
    ``count`` is how many lines the block has, blank ones too.
    """

    data: bytes | memoryview  # a view of the bytes read: a block is never copied out of them
    first_line: int  # 1-based line number of the block's first line
    ends: np.ndarray[Any, Any]  # positions of the newlines that end its non-blank records
    count: int = 0


def frame(
    data: bytes | memoryview,
    first_line: int,
    csv_quotes: bool,
    max_line: int,
    where: dict[str, str | None],
) -> tuple[Block, int]:
    """``data`` as a block of its newline-ended records; and where its last record ends (-1: none).

    Scans a megabyte at a time, so a block of blank lines costs little memory; raises
    ``BadDataError`` for a line longer than ``max_line`` bytes.
    """
    view = np.frombuffer(data, dtype=np.uint8)
    kept: list[np.ndarray[Any, Any]] = []
    last, count, odd = -1, 0, 0  # odd: the quotes before the step are odd in number
    for low in range(0, len(view), _STEP):
        step = view[low : low + _STEP]
        newlines = np.flatnonzero(step == 10)
        if csv_quotes:  # counted a step at a time: no array the size of the block
            quotes = _QuoteCount(step)
            if len(newlines):
                newlines = newlines[quotes.even_before(newlines, odd)]
            odd = (odd + quotes.total) & 1
        if not len(newlines):
            continue
        newlines += low
        before = np.concatenate(([last], newlines[:-1]))
        lengths = newlines - before  # the newline included
        if int(lengths.max()) > max_line:
            at = count + int(np.argmax(lengths > max_line))
            raise BadDataError(f"line {first_line + at} is longer than {max_line} bytes", **where)
        keep = (lengths > 2) | ((lengths == 2) & (view[before + 1] != 13))
        kept.append(newlines[keep].astype(np.int64 if len(data) >= 2**31 else np.int32))
        last, count = int(newlines[-1]), count + len(newlines)
    ends = np.concatenate(kept) if kept else np.empty(0, dtype=np.int32)
    return Block(data, first_line, ends, count), last


class _QuoteCount:
    """How many double quotes come before a position, counted eight bytes at a time.

    RFC 4180 doubles quotes inside cells, so a newline is inside one iff the quotes before it
    are odd in number.  A running count over 64-bit words (the bytes of each word summed by one
    multiplication) costs an eighth of a running count over bytes.
    """

    def __init__(self, view: np.ndarray[Any, Any]) -> None:
        whole = len(view) // 8 * 8  # the last few bytes: a word of their own, zero-padded
        self.words = np.zeros(whole // 8 + 1, dtype=np.uint64)
        marks = self.words.view(np.bool_)
        np.equal(view[:whole], 34, out=marks[:whole])
        np.equal(view[whole:], 34, out=marks[whole : len(view)])
        per_word = self.words * _ONES
        per_word >>= np.uint64(56)
        self.before = np.cumsum(per_word)
        self.total = int(self.before[-1])  # the quotes in the whole view
        self.before -= per_word  # the quotes in the words before each

    def even_before(self, positions: np.ndarray[Any, Any], odd: int = 0) -> np.ndarray[Any, Any]:
        """True where an even number of quotes precede each position (``odd``: one more
        quote than the view holds came before it)."""
        word = positions >> 3
        inside = (np.uint64(1) << ((positions & 7) * 8).astype(np.uint64)) - np.uint64(1)
        partial = ((self.words[word] & inside) * _ONES) >> np.uint64(56)
        total = self.before[word] + partial + np.uint64(odd)
        even: np.ndarray[Any, Any] = (total & np.uint64(1)) == 0
        return even


def blocks(
    pieces: Iterable[bytes],
    limits: Limits,
    csv_quotes: bool,
    where: dict[str, str | None],
    line: int = 1,
    check_stop: Callable[[], None] = lambda: None,
) -> Iterator[Block]:
    """Blocks of whole records, about ``limits.block_bytes`` each, their newlines found once.

    Blank space between records costs no block: a piece of nothing but whitespace, with no
    record begun, is counted (for line numbers) and dropped.
    """
    carry, have = b"", 0
    waiting: list[bytes] = []  # pieces are joined once, when a block's worth has come
    pieces = iter(pieces)
    size = limits.block_bytes
    ended = short = False  # the input is all read; the bytes held have no whole record
    while True:
        check_stop()
        # Read only while less than a block is held: what is held is cut into blocks first, so
        # it never grows past a block and a piece, whatever the sizes of pieces and blocks.
        if not ended and (short or len(carry) + have < size):
            piece = next(pieces, None)
            if piece is None:
                ended = True
            elif piece.isspace() and not waiting and (not carry or carry.isspace()):
                line += carry.count(b"\n") + piece.count(b"\n")
                carry = b""
                continue
            else:
                waiting.append(piece)
                have, short = have + len(piece), False
                continue
        if waiting:  # one piece and nothing carried (a small download): no copy
            carry = waiting[0] if not carry and len(waiting) == 1 else b"".join([carry, *waiting])
            have = 0
            waiting.clear()
        if ended:
            if not carry or carry.isspace():  # (``strip`` would copy it all to say so)
                return
            if not carry.endswith(b"\n"):
                carry += b"\n"
        block, last = _frame_head(carry, size, line, csv_quotes, limits.max_line_bytes, where)
        if last < 0:
            if len(carry) > limits.max_line_bytes:
                raise BadDataError(
                    f"line {line} is longer than {limits.max_line_bytes} bytes", **where
                )
            if ended:
                raise BadDataError(f"unterminated quoted CSV cell from line {line}", **where)
            short = True
            continue
        block.data, carry = memoryview(carry)[: last + 1], carry[last + 1 :]
        crashpoints.hit("decode.block")
        yield block
        line += block.count


def _frame_head(
    data: bytes, size: int, line: int, csv_quotes: bool, max_line: int, where: dict[str, str | None]
) -> tuple[Block, int]:
    """``frame`` on about the first ``size`` bytes of ``data`` (all of it when it is not much
    more), or on all of it when those hold no whole record."""
    if len(data) >= 2 * size:
        block, last = frame(memoryview(data)[:size], line, csv_quotes, max_line, where)
        if last >= 0:
            return block, last
    return frame(data, line, csv_quotes, max_line, where)


def lines(block: Block) -> pa.StringArray:
    """The block's records as an Arrow string array, without copying the bytes.

    Each string runs from the end of the record before it, so it may begin with blank lines:
    JSON allows the whitespace.
    """
    ends = block.ends
    wide = len(block.data) >= 2**31
    offsets = np.empty(len(ends) + 1, dtype=np.int64 if wide else np.int32)
    offsets[0] = 0
    offsets[1:] = ends + 1
    kind = pa.large_string() if wide else pa.string()
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(block.data)]
    return pa.Array.from_buffers(kind, len(ends), buffers)


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
    line is too long, is not a Flurry header, names a column twice or lacks one of ``FIELDS``.
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
    twice = sorted(name for name, times in Counter(header).items() if times > 1)
    if twice:
        raise BadDataError(f"the CSV header names a column twice: {', '.join(twice)}", **where)
    missing = [name for name in FIELDS if name not in header]
    if missing:
        raise BadDataError(f"the CSV header lacks the columns: {', '.join(missing)}", **where)
    return rest, header
