"""Reading a downloaded window file into Arrow tables of the fixed schema, streaming.

Theory of operation.  ``tables()`` runs four steps with memory bounded by the block size, never
by the file: (1) decompress (``inflate``: gzip, one member or several, zip, or plain; decided by
the magic bytes) in a prefetch thread, within limits on compressed size, decompressed size and
their ratio, checked as it inflates, so a bomb fails the window; (2) frame whole lines (JSON) or
records (CSV, where a newline inside quotes is not a boundary) into blocks of a few MB
(``framing``), refusing an over-long line and dropping blank space without buffering it;
(3) parse each block on its own thread (``parsers``); (4) cast to ``SCHEMA`` and derive
``eventTimestamp``.  A small download (``small``: about a block once inflated) runs all four
steps on the caller's thread instead: a thread hop costs more than its work there.  A block
that does not parse is scanned row by row (``rowcheck``) to name the first bad line, field
and value, or, when a quarantine callback is given, to set the bad rows aside and keep the
good ones.  Every loop does a bounded amount of work between checks of
the caller's ``stop`` (a callable or an Event), and raises ``Stopped`` once it is set.  Whatever
DuckDB, Arrow, numpy or zlib raise on hostile input leaves ``tables()`` as ``BadDataError``.

What a row must be (the README's schema section says the same):

- JSON lines: one object per line with each of the sixteen fields as a key (``null`` for no
  value) and no key twice; other keys are ignored.  CSV: a header naming each of the sixteen
  fields once (other columns are ignored), as many cells in every row; an empty cell is null.
- ``sessionTimestamp`` (required), ``sessionDuration``, ``eventOffset``, ``birthYear``: an
  integer (a JSON integer literal; in CSV ``-?[0-9]+``) in range.  A string, a boolean, a
  fraction or an exponent (``"5"``, ``true``, ``1.5``, ``5.0``, ``1e3``) is a bad row.
  ``sessionTimestamp`` must lie in 2000-01-01 .. 2100-01-01 UTC (``Limits``), and, when a window
  is asked for, inside it (``staging``).
- ``latitude``, ``longitude``: a finite number.
- The three maps: a JSON object (or null) with no key twice.  A value that is a string is kept
  as it is; null stays null; any other value (number, boolean, array, object) is kept as its
  compact JSON text, as DuckDB writes it: ``1`` → ``"1"``, ``true`` → ``"true"``, ``1.50`` →
  ``"1.5"``, ``{"a": [1, 2]}`` → ``"{\"a\":[1,2]}"``.
- The other fields are strings; a value of another JSON type is kept as its JSON text by the
  same rule.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import TYPE_CHECKING, Literal

import duckdb
import pyarrow as pa
from isal import isal_zlib

from backfill.errors import BadDataError
from backfill.framing import blocks, chain, csv_header
from backfill.inflate import Inline, Prefetch, chunks
from backfill.parsers import PARSE_ERRORS, ParserPool
from backfill.schema import FIELDS, MAPS, SCHEMA, Limits, Stopped, stop_check

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterator
    from pathlib import Path

__all__ = ["DATA_ERRORS", "FIELDS", "MAPS", "SCHEMA", "Limits", "Stopped", "tables", "translate"]

# What a library may raise on hostile bytes (OSError is left alone: that is the disk, not data).
DATA_ERRORS: tuple[type[BaseException], ...] = (
    *PARSE_ERRORS,
    duckdb.Error,
    pa.ArrowException,
    zlib.error,
    isal_zlib.error,  # type: ignore[arg-type]  # isal stubs type its error as an instance
    EOFError,
    UnicodeError,
    RecursionError,
)


@contextlib.contextmanager
def translate(where: dict[str, str | None]) -> Iterator[None]:
    """Turn a library's exception on hostile input into ``BadDataError`` (the disk's stay)."""
    try:
        yield
    except (BadDataError, Stopped, OSError):
        raise
    except DATA_ERRORS as exc:
        raise BadDataError(
            f"the download does not convert: {type(exc).__name__}: {str(exc)[:300]}", **where
        ) from exc


@contextlib.contextmanager
def tables(
    source: Path,
    limits: Limits,
    where: dict[str, str | None],
    quarantine: Callable[[int, str, str], None] | None = None,
    stop: Callable[[], bool] | threading.Event | None = None,
    *,
    inline: bool = False,
) -> Iterator[Iterator[pa.Table]]:
    """The rows of ``source`` as Arrow tables in ``SCHEMA``, block by block; ``inline``: all on
    the caller's thread (for a download that is ``small``).

    A context manager, so that the prefetch and parser threads stop however the caller leaves.
    Raises ``BadDataError`` (from the iterator) for corrupt, hostile or schema-breaking input,
    and ``Stopped`` within a block's work of ``stop`` being set.
    """
    check_stop = stop_check(stop)
    reader = Inline if inline else Prefetch
    pieces = reader(chunks(source, limits, where), check_stop=check_stop)
    parsers: ParserPool | None = None
    try:
        with translate(where):
            first, line = _skip_blank(pieces, check_stop)
            fmt: Literal["json", "csv"] = "json" if first[:1] in (b"{", b"") else "csv"
            header = None
            if fmt == "csv":
                first, header = csv_header(first, pieces, limits, where)
                line += 1
            workers = 0 if inline else limits.parse_workers
            parsers = ParserPool(workers, fmt, header, quarantine, limits, check_stop)
            framed = blocks(chain(first, pieces), limits, fmt == "csv", where, line, check_stop)
        yield _translated(parsers.map(framed, where), where)
    finally:
        if parsers is not None:
            parsers.close()
        pieces.close()


def small(source: Path, limits: Limits) -> bool:
    """True if ``source`` is small enough to convert on the caller's thread alone (inflating,
    parsing and writing one after another): about a block once inflated.  A window of a few
    thousand rows then pays no thread hop, and conversions at once keep the cores busy."""
    try:
        return source.stat().st_size <= limits.block_bytes // 8
    except OSError:  # the reader names the problem
        return False


def _skip_blank(pieces: Iterator[bytes], check_stop: Callable[[], None]) -> tuple[bytes, int]:
    """The first piece with content, its leading blank space cut; and the line it begins on.

    Blank space is counted and dropped piece by piece, never gathered: a gzip of gigabytes of
    newlines costs time linear in its size and no memory.
    """
    line = 1
    for piece in pieces:
        check_stop()
        content = piece.lstrip()
        if content:
            return content, line + piece.count(b"\n", 0, len(piece) - len(content))
        line += piece.count(b"\n")
    return b"", line


def _translated(tables: Iterator[pa.Table], where: dict[str, str | None]) -> Iterator[pa.Table]:
    with translate(where):
        yield from tables
