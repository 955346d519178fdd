"""Reading a downloaded window file into Arrow tables of the fixed schema, streaming.

Theory of operation.  ``tables()`` runs four steps with memory bounded by the block size, never
by the file: (1) decompress (``inflate``: gzip, one member or several, zip, or plain; decided by
the magic bytes) in a prefetch thread, within limits on compressed size, decompressed size and
their ratio, so a bomb fails the window; (2) frame whole lines (JSON) or records (CSV, where a
newline inside quotes is not a boundary) into blocks of a few MB (``framing``), refusing an
over-long line; (3) parse each block on its own thread (``parsers``); (4) cast to ``SCHEMA`` and
derive ``eventTimestamp``.  A block that does not parse is scanned row by row (``rowcheck``) to
name the first bad line, field and value, or, when a quarantine callback is given, to set the
bad rows aside and keep the good ones.  The schema and the limits live in ``schema``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

from backfill.framing import blocks, chain, csv_header
from backfill.inflate import Prefetch, chunks
from backfill.parsers import ParserPool
from backfill.schema import FIELDS, MAPS, SCHEMA, Limits

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import pyarrow as pa

__all__ = ["FIELDS", "MAPS", "SCHEMA", "Limits", "tables"]


@contextlib.contextmanager
def tables(
    source: Path,
    limits: Limits,
    where: dict[str, str | None],
    quarantine: Callable[[int, str, str], None] | None = None,
) -> Iterator[Iterator[pa.Table]]:
    """The rows of ``source`` as Arrow tables in ``SCHEMA``, block by block.

    A context manager, so that the prefetch and parser threads stop however the caller leaves.
    Raises ``BadDataError`` (from the iterator) for corrupt, hostile or schema-breaking input.
    """
    pieces = Prefetch(chunks(source, limits, where))
    parsers: ParserPool | None = None
    try:
        first = b""
        for piece in pieces:
            first += piece
            if first.strip():
                break
        fmt: Literal["json", "csv"] = "json" if first.lstrip()[:1] in (b"{", b"") else "csv"
        header = None
        if fmt == "csv":
            first, header = csv_header(first, pieces, limits, where)
        parsers = ParserPool(limits.parse_workers, fmt, header, quarantine)
        framed = blocks(chain(first, pieces), limits, fmt == "csv", where, 1 + (fmt == "csv"))
        yield parsers.map(framed, where)
    finally:
        if parsers is not None:
            parsers.close()
        pieces.close()
