"""The map columns' JSON text → ``map<string, string>``, vectorised, for the rows it can do exactly.

Theory of operation.  A Flurry map is almost always a flat JSON object of string keys and
string values, written compactly (``{"k":"v","k2":"v2"}``; DuckDB's JSON text always is).
``decode()`` finds every string's quotes in the column's bytes at once (a quote ends a string
unless an odd run of backslashes comes before it), checks each row's shape from the quote
positions alone (``{``, then ``"key":"value"`` pairs joined by ``,``, then ``}``), and cuts the
keys and values out of the bytes with one Arrow ``take`` each.  The strings with escapes
(``\\"``, ``\\\\``, ``\\t``…) are gathered, undone and put after the bytes, where the takes
find them; a key twice in a row is found by sorting (row, key) pairs.  Rows off that path (a
value that is not a string, null or a number; space between tokens; a ``\\u`` escape; a raw
control byte; a key twice; anything not JSON) go, all together, to the caller's general
decoder (``slow``), whose verdict on them stands: the fast path never decides that a row is
bad, it only takes the rows it decodes exactly as the general decoder would.  About twenty
times cheaper than DuckDB's ``json_transform`` to a MAP on the simulator's rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from backfill.schema import MAP

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MAP", "decode"]

_QUOTE, _BACKSLASH, _COLON, _COMMA, _OPEN, _CLOSE = 34, 92, 58, 44, 123, 125
_INSIDE = np.array([1, 0, 1, 0])  # a key runs from after its first quote to its second ...
# What a backslash escape stands for; escapes not here (``\\u``, or none JSON has) go slow.
_UNESCAPED = np.arange(256, dtype=np.uint8)
_UNESCAPED[list(b"bfnrt")] = list(b"\b\f\n\r\t")
_SIMPLE = np.zeros(256, dtype=bool)
_SIMPLE[list(b'"\\/bfnrt')] = True

Ints = np.ndarray[Any, np.dtype[np.int64]]
Bools = np.ndarray[Any, np.dtype[np.bool_]]


def decode(column: pa.Array | pa.ChunkedArray, slow: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """``column`` (JSON text, null for no map) as a ``map<string, string>`` array.

    ``slow`` decodes the rows given to it (a string array) by the general rules, raising on a
    bad one; it is called at most once, with the rows the fast path does not take.
    """
    text = _plain(column)
    if not len(text):
        return pa.array([], MAP)
    try:
        fast, maps = _fast(text)
    except (pa.ArrowException, ValueError):  # an escape Arrow's reader refuses: all go slow
        return slow(text).cast(MAP)
    if fast.all():
        return maps
    rest = slow(text.filter(pa.array(~fast))).cast(MAP)
    rank = np.cumsum(~fast) - 1
    order = np.where(fast, np.arange(len(text)), len(text) + rank)
    return pa.concat_arrays([maps, rest]).take(pa.array(order))


def _plain(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string array: chunks combined, an extension type (DuckDB's JSON) unwrapped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.large_string())
    return column


class _Bytes:
    """A string array's bytes and row bounds, as numpy views (positions relative to ``base``)."""

    def __init__(self, text: pa.Array) -> None:
        n = len(text)
        wide = pa.types.is_large_string(text.type)
        offsets = np.frombuffer(text.buffers()[1], dtype=np.int64 if wide else np.int32)
        bounds = offsets[text.offset : text.offset + n + 1].astype(np.int64)
        self.buffer = text.buffers()[2] or pa.py_buffer(b"")
        self.base = int(bounds[0])
        self.data = np.frombuffer(self.buffer, dtype=np.uint8)[self.base : int(bounds[-1])]
        self.starts, self.ends = bounds[:-1] - self.base, bounds[1:] - self.base
        self.escapes: Ints = np.zeros(0, dtype=np.int64)  # the backslashes that escape
        self.valid: Bools = (
            np.ones(n, dtype=bool)
            if text.null_count == 0
            else np.asarray(text.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        )

    def rows_of(self, positions: Ints) -> Ints:
        """The row each byte position lies in."""
        rows: Ints = np.searchsorted(self.ends, positions, side="right")
        return rows

    def flag(self, positions: Ints) -> Bools:
        """True for each row holding one of ``positions``."""
        flagged = np.zeros(len(self.starts), dtype=bool)
        flagged[self.rows_of(positions)] = True
        return flagged


def _quotes(b: _Bytes) -> tuple[Ints, Bools]:
    """The quotes that open or close a string; and the rows with an escape the fast path does
    not decode (``\\u``, or one JSON does not have)."""
    quotes = b.data == _QUOTE
    slashes = np.flatnonzero(b.data == _BACKSLASH)
    odd = np.zeros(len(b.starts), dtype=bool)
    b.escapes = slashes[:0]
    if len(slashes):
        # In a run of backslashes, the first, third, ... each escape the byte after them.
        breaks = np.flatnonzero(np.diff(slashes) != 1)
        run_start = np.repeat(slashes[np.concatenate(([0], breaks + 1))], np.diff(
            np.concatenate(([0], breaks + 1, [len(slashes)]))))  # fmt: skip
        b.escapes = slashes[(slashes - run_start) % 2 == 0]
        b.escapes = b.escapes[b.escapes + 1 < len(b.data)]
        escaped = b.data[b.escapes + 1]
        quotes[b.escapes + 1] = False
        odd = b.flag(b.escapes[~_SIMPLE[escaped]])
    return np.flatnonzero(quotes), odd


def _fast(text: pa.Array) -> tuple[Bools, pa.Array]:
    """Which rows the fast path takes (null rows included), and their maps (others empty)."""
    b = _Bytes(text)
    n = len(b.starts)
    quotes, odd = _quotes(b)
    counts = np.diff(np.searchsorted(quotes, np.append(b.starts, len(b.data))))
    ok = b.valid & ~odd & (counts % 4 == 0) & ((b.ends - b.starts) >= 2)
    if len(b.data) and int(b.data.min()) < 0x20:  # a raw control byte: rare, looked for if seen
        ok &= ~b.flag(np.flatnonzero(b.data < 0x20))
    if len(b.data):
        last = np.minimum(b.ends - 1, len(b.data) - 1)
        ok &= (b.data[np.minimum(b.starts, len(b.data) - 1)] == _OPEN) & (b.data[last] == _CLOSE)
    ok &= (counts > 0) | (b.ends - b.starts == 2)  # no quotes: only ``{}``
    quotes, counts = _only(ok, quotes, counts)
    misfits = _misfits(b, quotes.reshape(-1, 4), counts // 4)
    if len(misfits):
        ok[misfits] = False
        quotes, counts = _only(ok, quotes, counts)
    entries = counts // 4
    keys, values = _cut(b, quotes.reshape(-1, 4))
    if len(keys) > 1 and entries.max() > 1:  # a key twice needs a row of two entries
        dup = _twice(keys, np.repeat(np.arange(n), entries))
        if len(dup):
            ok[dup] = False
            again = np.repeat(ok, entries)
            keys, values, entries = keys.filter(again), values.filter(again), entries * ok
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(entries, out=offsets[1:])
    mask = pa.array(~b.valid) if not b.valid.all() else None
    maps = pa.MapArray.from_arrays(pa.array(offsets), keys, values, type=MAP, mask=mask)
    return ok | ~b.valid, maps


def _only(ok: Bools, quotes: Ints, counts: Ints) -> tuple[Ints, Ints]:
    """The quotes of the rows still ``ok``, and each row's count of them (0 for the others)."""
    if ok.all():
        return quotes, counts
    return quotes[np.repeat(ok, counts)], counts * ok


def _misfits(b: _Bytes, q: Ints, entries: Ints) -> Ints:
    """The rows with an entry (its four quotes in ``q``) that is not ``"key":"value"`` in its
    place: the first right after the row's ``{``, each next one after the one before and a
    ``,``, the last one right before the ``}``."""
    if not len(q):
        return np.zeros(0, dtype=np.int64)
    fits: Bools = (q[:, 2] - q[:, 1] == 2) & (b.data[q[:, 1] + 1] == _COLON)
    # Each entry's link to the next one; the last entry of a row is checked against its end.
    linked = np.empty(len(q), dtype=bool)
    linked[:-1] = (q[1:, 0] - q[:-1, 3] == 2) & (b.data[q[:-1, 3] + 1] == _COMMA)
    rows = np.flatnonzero(entries)
    ends = np.cumsum(entries[rows])  # one past each such row's last entry
    linked[ends - 1] = q[ends - 1, 3] == b.ends[rows] - 2
    fits &= linked
    bad = np.zeros(len(rows), dtype=bool)
    bad[np.searchsorted(ends, np.flatnonzero(~fits), side="right")] = True
    bad |= q[ends - entries[rows], 0] != b.starts[rows] + 1
    misfits: Ints = rows[bad]
    return misfits


def _cut(b: _Bytes, q: Ints) -> tuple[pa.Array, pa.Array]:
    """The keys and the values between the quotes ``q``, their escapes undone."""
    if not len(q):
        return pa.array([], pa.string()), pa.array([], pa.string())
    # Each entry is four pieces of the bytes: its key, ``":"``, its value, ``","`` and on.
    keys_at = np.arange(0, 4 * len(q), 4, dtype=np.int32)
    values_at = keys_at + 2
    data: pa.Buffer | np.ndarray[Any, Any] = b.buffer
    base, size, moved = b.base, b.base + len(b.data), np.zeros(0, dtype=np.int64)
    if len(b.escapes):  # the strings with an escape: undone apart, put after the bytes
        bounds = (q + _INSIDE).ravel()
        of = np.searchsorted(bounds, b.escapes, side="right") - 1  # the piece of each escape
        inside = (of >= 0) & (of % 2 == 0)  # in a key or a value, not between them
        piece = np.unique(of[inside])
        if len(piece):
            plain, moved = _unescaped(b, bounds[piece], bounds[piece + 1], b.escapes[inside])
            data, base, size = np.concatenate((b.data, plain)), 0, len(b.data) + len(plain)
            at = len(bounds) + np.arange(len(piece))  # after a piece for the gap
            keys_at[piece[piece % 4 == 0] // 4] = at[piece % 4 == 0]
            values_at[piece[piece % 4 == 2] // 4] = at[piece % 4 == 2]
    wide = size >= 2**31 - 1
    offsets = np.empty(4 * len(q) + len(moved) + bool(len(moved)), np.int64 if wide else np.int32)
    np.add(q, _INSIDE + base, out=offsets[: 4 * len(q)].reshape(-1, 4), casting="unsafe")
    if len(moved):
        offsets[4 * len(q)] = len(b.data)
        offsets[4 * len(q) + 1 :] = len(b.data) + moved
    kind = pa.large_string() if wide else pa.string()
    pieces = pa.Array.from_buffers(
        kind, len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    keys, values = pieces.take(pa.array(keys_at)), pieces.take(pa.array(values_at))
    return (keys.cast(pa.string()), values.cast(pa.string())) if wide else (keys, values)


def _unescaped(b: _Bytes, starts: Ints, ends: Ints, escapes: Ints) -> tuple[Any, Ints]:
    """The strings ``b.data[starts[i]:ends[i]]``, one after another, without their ``escapes``
    (the backslashes ``_quotes`` found, all inside them) and with each escaped byte undone;
    and where each string ends now."""
    lengths = ends - starts
    total = np.cumsum(lengths)
    text = b.data[np.repeat(ends - total, lengths) + np.arange(int(total[-1]))]
    string = np.searchsorted(ends, escapes, side="right")  # the string each escape lies in
    escapes = escapes - (ends - total)[string]  # ... and where it is in ``text``
    kept = np.ones(len(text), dtype=bool)
    kept[escapes] = False
    text = text[kept]
    landed = escapes - np.arange(len(escapes))  # where each escaped byte is now
    text[landed] = _UNESCAPED[text[landed]]
    now: Ints = total - np.searchsorted(escapes, total)
    return text, now


def _twice(keys: pa.Array, entry_row: Ints) -> Ints:
    """The rows that hold one key twice."""
    if len(keys) < 2:
        return np.zeros(0, dtype=np.int64)
    encoded = pc.dictionary_encode(keys)
    ids = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    pairs = np.sort(entry_row.astype(np.int64) * len(encoded.dictionary) + ids)
    same = pairs[1:] == pairs[:-1]
    twice: Ints = np.unique(pairs[1:][same] // len(encoded.dictionary))
    return twice
