"""Reading a downloaded window file into Arrow tables of the fixed schema, streaming.

Theory of operation.  ``tables()`` runs four steps with memory bounded by the block size, never
by the file: (1) decompress (gzip, one member or several, zip, or plain; decided by the magic
bytes, never by a header or a name) in a prefetch thread, with limits on compressed size,
decompressed size and their ratio, so a bomb fails the window; (2) frame whole lines (JSON) or
records (CSV, where a newline inside quotes is not a boundary) into blocks of a few MB, refusing
an over-long line; (3) parse each block on its own thread: DuckDB's ``json_transform_strict``
for JSON lines, pyarrow's CSV reader for CSV, the three maps decoded from their JSON text into
``map<string, string>``; (4) cast to ``SCHEMA`` and derive ``eventTimestamp``.  A block that does
not parse is scanned row by row to name the first bad line, field and value (or, when a
quarantine callback is given, to set the bad rows aside and keep the good ones).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import queue
import re
import threading
import zipfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from isal import isal_zlib

from backfill import crashpoints
from backfill.errors import BadDataError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

__all__ = ["FIELDS", "MAPS", "SCHEMA", "Limits", "tables"]

FIELDS: tuple[str, ...] = (
    "sessionTimestamp", "appVersion", "sessionDuration", "eventOffset", "deviceIdentifiers",
    "deviceModel", "deviceSubModel", "countryISO", "eventName", "eventParameters", "userId",
    "gender", "birthYear", "latitude", "longitude", "sessionProperties",
)  # fmt: skip
MAPS = ("deviceIdentifiers", "eventParameters", "sessionProperties")
_MAP = pa.map_(pa.string(), pa.string())
_TS = pa.timestamp("ms", tz="UTC")
SCHEMA = pa.schema(
    [
        ("sessionTimestamp", _TS),
        ("eventTimestamp", _TS),
        ("appVersion", pa.string()),
        ("sessionDuration", pa.int64()),
        ("eventOffset", pa.int64()),
        ("deviceIdentifiers", _MAP),
        ("deviceModel", pa.string()),
        ("deviceSubModel", pa.string()),
        ("countryISO", pa.string()),
        ("eventName", pa.string()),
        ("eventParameters", _MAP),
        ("userId", pa.string()),
        ("gender", pa.string()),
        ("birthYear", pa.int32()),
        ("latitude", pa.float64()),
        ("longitude", pa.float64()),
        ("sessionProperties", _MAP),
    ]
)
_INPUT: dict[str, pa.DataType] = {
    "sessionTimestamp": pa.int64(), "sessionDuration": pa.int64(), "eventOffset": pa.int64(),
    "birthYear": pa.int32(), "latitude": pa.float64(), "longitude": pa.float64(),
} | {name: pa.string() for name in FIELDS if name not in ("sessionTimestamp", "sessionDuration",
     "eventOffset", "birthYear", "latitude", "longitude")}  # fmt: skip
_DUCK = {
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
}
_MAP_DUCK = "MAP(VARCHAR, VARCHAR)"
_JSON_SCHEMA = json.dumps(
    {name: (_MAP_DUCK if name in MAPS else _DUCK[_INPUT[name]]) for name in FIELDS}
).replace("'", "''")
_MAP_SQL = f"json_transform_strict({{0}}, '\"{_MAP_DUCK}\"') AS {{0}}"
_GZIP = b"\x1f\x8b"
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, isal_zlib.error)  # type: ignore[assignment]  # isal stubs type its error as an instance
_ZIP = b"PK\x03\x04"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What a download may be before it is refused as corrupt or hostile."""

    max_compressed_bytes: int = 64 << 30
    max_decompressed_bytes: int = 256 << 30
    max_ratio: float = 250.0  # decompressed / compressed; gzip tops out near 1032 for bombs
    ratio_grace_bytes: int = 64 << 20  # small files may compress better than the ratio
    max_line_bytes: int = 8 << 20
    block_bytes: int = 8 << 20
    buffer_bytes: int = 128 << 20  # Arrow bytes buffered across partitions before a flush
    file_bytes: int = 64 << 20  # a partition with this many Arrow bytes buffered is written
    row_group_rows: int = 128 * 1024
    parse_workers: int = 2  # blocks parsed at once, each on one thread


# -- reading: decompress and frame ---------------------------------------------------------


def _chunks(path: Path, limits: Limits, where: dict[str, str | None]) -> Iterator[bytes]:
    """The decompressed bytes of ``path`` (gzip, zip or plain), in pieces, within the limits."""
    size = path.stat().st_size
    if size > limits.max_compressed_bytes:
        raise BadDataError(
            f"download is {size} bytes, over the {limits.max_compressed_bytes} limit", **where
        )
    budget = min(
        limits.max_decompressed_bytes, max(int(size * limits.max_ratio), limits.ratio_grace_bytes)
    )
    with path.open("rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        if head.startswith(_ZIP):
            yield from _unzip(path, budget, where)
            return
        if not head.startswith(_GZIP):
            if size > budget:
                raise BadDataError(f"plain download over the {budget}-byte limit", **where)
            while piece := raw.read(4 << 20):
                yield piece
            return
        yield from _gunzip(raw, budget, where)


def _gunzip(raw: IO[bytes], budget: int, where: dict[str, str | None]) -> Iterator[bytes]:
    total = 0
    # ISA-L inflates gzip about twice as fast as zlib, on the same stream format.
    decoder = isal_zlib.decompressobj(wbits=31)
    pending = b""
    while True:
        if not pending:
            pending = raw.read(1 << 20)
            if not pending:
                break
        try:
            out = decoder.decompress(pending, 4 << 20)
        except _INFLATE_ERRORS as exc:
            raise BadDataError(f"corrupt gzip data after {total} bytes: {exc}", **where) from exc
        pending = decoder.unconsumed_tail
        total += len(out)
        if total > budget:
            raise BadDataError(
                f"decompressed data passed {budget} bytes: refused as a bomb", **where
            )
        if out:
            yield out
        if decoder.eof:  # one member ended; another may follow
            rest = decoder.unused_data + pending
            decoder = isal_zlib.decompressobj(wbits=31)
            pending = rest.lstrip(b"\x00")  # zero padding after the last member is legal
            if not pending:
                pending = raw.read(1 << 20).lstrip(b"\x00")
                if not pending:
                    return
            if not pending.startswith(_GZIP[:1]):
                raise BadDataError("garbage after the last gzip member", **where)
    if not decoder.eof:
        raise BadDataError(f"truncated gzip data after {total} bytes", **where)


def _unzip(path: Path, budget: int, where: dict[str, str | None]) -> Iterator[bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise BadDataError(
                    f"a zip must hold exactly one file, it holds {len(members)}", **where
                )
            total = 0
            with archive.open(members[0]) as member:
                while piece := member.read(4 << 20):
                    total += len(piece)
                    if total > budget:
                        raise BadDataError(f"decompressed data passed {budget} bytes", **where)
                    yield piece
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise BadDataError(f"corrupt zip file: {exc}", **where) from exc


def _record_ends(
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
class _Block:
    data: bytes
    first_line: int  # 1-based line number of the block's first line
    ends: np.ndarray[Any, Any]  # positions of the newlines that end its records


def _blocks(
    pieces: Iterable[bytes],
    limits: Limits,
    csv_quotes: bool,
    where: dict[str, str | None],
    line: int = 1,
) -> Iterator[_Block]:
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
        ends = _record_ends(np.frombuffer(carry, dtype=np.uint8), csv_quotes)
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
        lengths = np.diff(ends, prepend=-1)
        if int(lengths.max()) > limits.max_line_bytes:
            at = int(np.argmax(lengths > limits.max_line_bytes))
            raise BadDataError(
                f"line {line + at} is longer than {limits.max_line_bytes} bytes", **where
            )
        crashpoints.hit("decode.block")
        yield _Block(block, line, ends)
        line += len(ends)
        if piece is None and not carry.strip():
            return


# -- parsing: blocks → Arrow in the fixed schema -------------------------------------------


def _lines(block: _Block) -> pa.StringArray:
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
    lines = pa.Array.from_buffers(kind, len(ends), buffers)
    return lines if keep.all() else lines.filter(pa.array(keep))


def _empty_input() -> pa.Table:
    return pa.table({n: pa.array([], _MAP if n in MAPS else _INPUT[n]) for n in FIELDS})


_INT_FIELDS = ("sessionTimestamp", "sessionDuration", "eventOffset", "birthYear")
_FLOAT_FIELDS = ("latitude", "longitude")


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


def _csv_cell(name: str, cell: str) -> Any:
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


_IDLE: list[duckdb.DuckDBPyConnection] = []
_IDLE_LOCK = threading.Lock()


def _take_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection from the free list (opening one costs ~30 ms)."""
    with _IDLE_LOCK:
        if _IDLE:
            return _IDLE.pop()
    # One thread per connection: two single-threaded parsers on alternate blocks use both
    # cores with a quarter less CPU than one parser on two threads (measured).
    return duckdb.connect(config={"threads": 1, "memory_limit": "128MB"})


def _give_back(db: duckdb.DuckDBPyConnection) -> None:
    with _IDLE_LOCK:
        _IDLE.append(db)


class _Parser:
    """Turns blocks into Arrow tables in ``SCHEMA``; one per staged file (one DuckDB each)."""

    def __init__(
        self,
        fmt: Literal["json", "csv"],
        header: list[str] | None,
        quarantine: Callable[[int, str, str], None] | None,
    ) -> None:
        self.fmt = fmt
        self.header = header
        self.quarantine = quarantine
        self.db = _take_connection()

    def close(self) -> None:
        _give_back(self.db)

    def parse(self, block: _Block, where: dict[str, str | None]) -> pa.Table:
        try:
            table = self._parse_json(block) if self.fmt == "json" else self._parse_csv(block.data)
        except (duckdb.Error, pa.ArrowInvalid):
            table = self._salvage(block, where)
        return self._shape(table, block, where)

    def _parse_json(self, block: _Block) -> pa.Table:
        # Small record batches let DuckDB spread one block over all its threads.
        line_array = _lines(block)
        if not len(line_array):
            return _empty_input()
        lines = pa.Table.from_batches(pa.table({"line": line_array}).to_batches(max_chunksize=4096))
        self.db.register("block_lines", lines)
        try:
            sql = f"SELECT unnest(json_transform_strict(line, '{_JSON_SCHEMA}')) FROM block_lines"
            table: pa.Table = self.db.sql(sql).to_arrow_table()
        finally:
            self.db.unregister("block_lines")
        return table

    def _maps(self, raw: pa.Table) -> pa.Table:
        names = raw.column_names
        self.db.register("block_rows", raw)
        try:
            columns = ", ".join(_MAP_SQL.format(n) if n in MAPS else n for n in names)
            return self.db.sql(f"SELECT {columns} FROM block_rows").to_arrow_table()
        finally:
            self.db.unregister("block_rows")

    def _parse_csv(self, data: bytes) -> pa.Table:
        assert self.header is not None
        table = pa_csv.read_csv(
            io.BytesIO(data),
            read_options=pa_csv.ReadOptions(column_names=self.header, use_threads=False),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={n: _INPUT[n] for n in self.header if n in _INPUT},
                strings_can_be_null=True,
                include_columns=[n for n in self.header if n in _INPUT],
            ),
        )
        return self._maps(table)

    def _salvage(self, block: _Block, where: dict[str, str | None]) -> pa.Table:
        """Find the bad rows of a block that failed to parse; fail, or quarantine them."""
        good: list[bytes] = []
        for number, text, problem in self._scan(block):
            if problem is None:
                good.append(text.encode())
                continue
            if self.quarantine is None:
                raise BadDataError(problem, **where)
            self.quarantine(number, text, problem)
        if not good:
            return _empty_input()
        data = b"\n".join(good) + b"\n"
        if self.fmt == "json":
            ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            return self._parse_json(_Block(data, block.first_line, ends))
        assert self.header is not None
        return self._parse_csv(data)

    def _scan(self, block: _Block) -> Iterator[tuple[int, str, str | None]]:
        text = block.data.decode("utf-8", errors="replace")
        if self.fmt == "json":
            for offset, line in enumerate(text.split("\n")):
                if line.strip():
                    number = block.first_line + offset
                    yield number, line, _json_row_problem(line, number)
            return
        assert self.header is not None
        number = block.first_line
        for record in csv.reader(io.StringIO(text, newline="")):
            problem = None
            if len(record) != len(self.header):
                problem = f"line {number}: {len(record)} cells, the header has {len(self.header)}"
            else:
                for name, cell in zip(self.header, record, strict=True):
                    if name in _INPUT and (reason := _check_value(name, _csv_cell(name, cell))):
                        problem = _describe(number, name, cell, reason)
                        break
            out = io.StringIO()
            csv.writer(out, lineterminator="").writerow(record)
            yield number, out.getvalue(), problem
            number += 1 + sum(cell.count("\n") for cell in record)

    def _shape(self, table: pa.Table, block: _Block, where: dict[str, str | None]) -> pa.Table:
        n = table.num_rows
        columns: dict[str, pa.ChunkedArray | pa.Array] = {}
        for name in FIELDS:
            want = _MAP if name in MAPS else _INPUT[name]
            if name in table.column_names:
                columns[name] = table.column(name).cast(want)
            else:
                columns[name] = pa.nulls(n, want)
        session = columns["sessionTimestamp"]
        if session.null_count:
            raise BadDataError(
                f"a row near line {block.first_line} has no sessionTimestamp", **where
            )
        event = pc.add(session, pc.coalesce(columns["eventOffset"], 0))
        columns["eventTimestamp"] = event
        return pa.table([columns[f.name].cast(f.type) for f in SCHEMA], schema=SCHEMA)


class _ParserPool:
    """Parses blocks on ``workers`` threads, each with its own parser; results come in order."""

    def __init__(
        self,
        workers: int,
        fmt: Literal["json", "csv"],
        header: list[str] | None,
        quarantine: Callable[[int, str, str], None] | None,
    ) -> None:
        self._idle: queue.Queue[_Parser] = queue.Queue()
        self._all = [_Parser(fmt, header, quarantine) for _ in range(max(1, workers))]
        for parser in self._all:
            self._idle.put(parser)
        self._pool = ThreadPoolExecutor(max_workers=len(self._all), thread_name_prefix="parse")

    def _parse(self, block: _Block, where: dict[str, str | None]) -> pa.Table:
        parser = self._idle.get()
        try:
            return parser.parse(block, where)
        finally:
            self._idle.put(parser)

    def map(self, blocks: Iterable[_Block], where: dict[str, str | None]) -> Iterator[pa.Table]:
        """Parsed tables in block order; at most one block waits per worker beyond those running."""
        pending: deque[Future[pa.Table]] = deque()
        try:
            for block in blocks:
                pending.append(self._pool.submit(self._parse, block, where))
                if len(pending) > len(self._all):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for parser in self._all:
            parser.close()


class _Prefetch:
    """Runs a byte iterator (decompression) in a thread, one piece ahead: overlaps with parsing."""

    def __init__(self, source: Iterator[bytes], depth: int = 4) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[bytes]) -> None:
        try:
            for piece in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("data", piece), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put(("error", exc))

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        kind, value = self._queue.get()
        if kind == "data":
            data: bytes = value
            return data
        if kind == "error":
            raise value
        self._queue.put(("end", None))
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)


def _chain(first: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _csv_header(
    first: bytes, pieces: Iterator[bytes], limits: Limits, where: dict[str, str | None]
) -> tuple[bytes, list[str]]:
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
    pieces = _Prefetch(_chunks(source, limits, where))
    parsers: _ParserPool | None = None
    try:
        first = b""
        for piece in pieces:
            first += piece
            if first.strip():
                break
        fmt: Literal["json", "csv"] = "json" if first.lstrip()[:1] in (b"{", b"") else "csv"
        header = None
        if fmt == "csv":
            first, header = _csv_header(first, pieces, limits, where)
        parsers = _ParserPool(limits.parse_workers, fmt, header, quarantine)
        blocks = _blocks(_chain(first, pieces), limits, fmt == "csv", where, 1 + (fmt == "csv"))
        yield parsers.map(blocks, where)
    finally:
        if parsers is not None:
            parsers.close()
        pieces.close()
