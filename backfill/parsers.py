"""Parsing blocks of records into Arrow tables of ``SCHEMA``, on a small pool of threads.

Theory of operation.  A ``Parser`` turns one block into a table: DuckDB's
``json_transform_strict`` for JSON lines, pyarrow's CSV reader for CSV, then the three maps
decoded from their JSON text into ``map<string, string>`` (``mapjson``, with DuckDB deciding the
rows its fast path does not take), then the cast to
``SCHEMA`` with ``eventTimestamp`` derived.  A block that does not parse goes to
``rowcheck.sift``, which names the bad row or quarantines it; the good rows are parsed again.
``ParserPool`` runs ``workers`` parsers on the process's shared parse threads (``threads``)
and yields tables in block order; the rows a block sets aside reach the quarantine callback
then too, so that rejects are written in line order whichever block parses first.
DuckDB connections are kept on a free list, because opening one costs about 30 ms.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections import deque
from typing import TYPE_CHECKING, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from backfill import mapjson, rowcheck, threads
from backfill.errors import BadDataError
from backfill.framing import frame, lines
from backfill.rowcheck import FLOAT_FIELDS, INT_FIELDS
from backfill.schema import FIELDS, INPUT, MAP, MAPS, SCHEMA

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from concurrent.futures import Future

    from backfill.framing import Block
    from backfill.schema import Limits

__all__ = ["PARSE_ERRORS", "ParserPool"]

_DUCK = {
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
}
_MAP_DUCK = "MAP(VARCHAR, VARCHAR)"
_NUMBERS = INT_FIELDS + FLOAT_FIELDS
# Numbers come out of DuckDB as their JSON text, checked byte by byte and cast by Arrow: DuckDB
# alone would turn "5", true and 1.5 into integers without a word.
_JSON_SCHEMA = json.dumps(
    {name: "JSON" if name in MAPS or name in _NUMBERS else _DUCK[INPUT[name]] for name in FIELDS}
).replace("'", "''")
_JSON_SQL = f"json_transform_strict(line, '{_JSON_SCHEMA}') AS r"
_MAP_SQL = f"json_transform_strict({{0}}, '\"{_MAP_DUCK}\"') AS {{0}}"
_ALLOWED = {name: np.zeros(256, dtype=bool) for name in _NUMBERS}
for _name, _bytes in _ALLOWED.items():
    _bytes[list(b"0123456789-" if _name in INT_FIELDS else b"0123456789-+.eE")] = True
# Whatever a hostile block makes DuckDB or Arrow raise sends it to the row-by-row diagnosis.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    duckdb.Error, pa.ArrowException, ValueError, KeyError, TypeError, OverflowError, IndexError,
)  # fmt: skip

_IDLE: list[duckdb.DuckDBPyConnection] = []
_IDLE_LOCK = threading.Lock()


class _Refused(Exception):
    """A value the fast path saw break a rule: the block goes to the row-by-row diagnosis."""


_FALLBACK: tuple[type[Exception], ...] = (*PARSE_ERRORS, _Refused)


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


def _empty_input() -> pa.Table:
    return pa.table({n: pa.array([], MAP if n in MAPS else INPUT[n]) for n in FIELDS})


def _numbers(table: pa.Table) -> pa.Table:
    """``table`` with its number columns (JSON or CSV text) checked and cast to ``INPUT``."""
    for name in _NUMBERS:
        index = table.schema.get_field_index(name)
        if index < 0:
            continue
        column = table.column(index)
        for chunk in column.chunks:
            _check_bytes(chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk, name)
        if isinstance(column.type, pa.ExtensionType):
            column = pa.chunked_array([c.storage for c in column.chunks], column.type.storage_type)
        cast = pc.cast(column, INPUT[name])
        if name in FLOAT_FIELDS and pc.any(pc.is_inf(cast)).as_py():
            raise _Refused(name)
        table = table.set_column(index, name, cast)
    return table


def _check_bytes(chunk: pa.Array, name: str) -> None:
    """Refuse a number column holding a byte no integer (or decimal number) has."""
    data = chunk.buffers()[2]
    if data is None or not len(chunk):
        return
    wide = pa.types.is_large_string(chunk.type)
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if wide else np.int32)
    low, high = int(offsets[chunk.offset]), int(offsets[chunk.offset + len(chunk)])
    if not _ALLOWED[name][np.frombuffer(data, dtype=np.uint8)[low:high]].all():
        raise _Refused(name)


class _Parser:
    """Turns blocks into Arrow tables in ``SCHEMA``; one per pool thread (one DuckDB each)."""

    def __init__(
        self,
        fmt: Literal["json", "csv"],
        header: list[str] | None,
        quarantine: Callable[[int, str, str], None] | None,
        limits: Limits,
        check_stop: Callable[[], None],
    ) -> None:
        self.fmt = fmt
        self.header = header
        self.quarantine = quarantine
        self.session_range = (limits.min_session_ms, limits.max_session_ms)
        self.check_stop = check_stop
        self.db = _take_connection()

    def close(self) -> None:
        _give_back(self.db)

    def parse(self, block: Block, where: dict[str, str | None]) -> pa.Table:
        """``block`` as a table in ``SCHEMA``; its bad rows fail it (or go to quarantine)."""
        self.check_stop()
        try:
            return self._shape(self._fast(block))
        except _FALLBACK:
            pass
        good = rowcheck.sift(
            block, self.fmt, self.header, self.quarantine, where, self.session_range,
            self.check_stop,
        )  # fmt: skip
        return self._settle(good, where)

    def _fast(self, block: Block) -> pa.Table:
        return self._parse_json(block) if self.fmt == "json" else self._parse_csv(block.data)

    def _settle(self, rows: list[tuple[int, bytes]], where: dict[str, str | None]) -> pa.Table:
        """Parse the rows the diagnosis passed; should one still not convert, find it by halves.

        The diagnosis and the parsers follow the same rules, so this is a safety net: whatever
        DuckDB or Arrow refuse that the diagnosis let through fails the row that caused it
        (with the parser's message), never the run.
        """
        if not rows:
            return self._shape(_empty_input())
        self.check_stop()
        data = b"\n".join(text for _, text in rows) + b"\n"
        try:
            if self.fmt == "json":
                block, _ = frame(data, rows[0][0], False, len(data) + 1, where)
                return self._shape(self._parse_json(block))
            return self._shape(self._parse_csv(data))
        except _FALLBACK as exc:
            if len(rows) > 1:
                half = len(rows) // 2
                return pa.concat_tables(
                    [self._settle(rows[:half], where), self._settle(rows[half:], where)]
                )
            line, text = rows[0]
            problem = f"line {line}: does not convert ({type(exc).__name__}: {str(exc)[:200]})"
            if self.quarantine is None:
                raise BadDataError(problem, **where) from exc
            self.quarantine(line, text.decode("utf-8", "replace"), problem)
            return self._shape(_empty_input())

    def _parse_json(self, block: Block) -> pa.Table:
        line_array = lines(block)
        if not len(line_array):
            return _empty_input()
        # One struct column, split into its fields by Arrow: ``unnest`` in the query costs
        # DuckDB a millisecond more a block.  A relation over the Arrow table, not a registered
        # view: registering and dropping one cost about 2 ms a block (measured on 4 k rows).
        relation = self.db.from_arrow(pa.table({"line": line_array}))
        rows = relation.select(_JSON_SQL).to_arrow_table().column(0)
        names = [field.name for field in rows.type]
        table = pa.table(dict(zip(names, rows.flatten(), strict=True)))
        return _numbers(self._maps(table))

    def _maps(self, raw: pa.Table) -> pa.Table:
        """``raw`` with its map columns decoded from JSON text: by ``mapjson``'s fast path, and
        the rows it does not take by DuckDB, whose rules decide (it raises on a bad row)."""
        for name in [n for n in raw.column_names if n in MAPS]:
            column = mapjson.decode(raw.column(name), functools.partial(self._maps_by_duckdb, name))
            raw = raw.set_column(raw.schema.get_field_index(name), name, column)
        return raw

    def _maps_by_duckdb(self, name: str, text: pa.Array) -> pa.Array:
        relation = self.db.from_arrow(pa.table({name: text}))
        maps = relation.select(_MAP_SQL.format(name)).to_arrow_table()
        return maps.column(0).combine_chunks()

    def _parse_csv(self, data: bytes | memoryview) -> pa.Table:
        assert self.header is not None
        table = pa_csv.read_csv(
            pa.BufferReader(pa.py_buffer(data)),  # no copy
            # One block of the reader per block of ours: columns of one chunk each.
            read_options=pa_csv.ReadOptions(
                column_names=self.header, use_threads=False, block_size=len(data) + 1
            ),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                # Numbers as text, checked like JSON's; only an empty cell is null.
                column_types={n: pa.string() for n in self.header if n in INPUT},
                null_values=[""],
                strings_can_be_null=True,
                include_columns=[n for n in self.header if n in INPUT],
            ),
        )
        return _numbers(self._maps(table))

    def _shape(self, table: pa.Table) -> pa.Table:
        """Cast to ``SCHEMA``, derive ``eventTimestamp``; refuse a session time out of range."""
        n = table.num_rows
        columns: dict[str, pa.ChunkedArray | pa.Array] = {}
        for name in FIELDS:
            want = MAP if name in MAPS else INPUT[name]
            if name in table.column_names:
                columns[name] = table.column(name).cast(want)
            else:
                columns[name] = pa.nulls(n, want)
        session = columns["sessionTimestamp"]
        if n:
            low, high = pc.min_max(session).values()
            if session.null_count or not (
                self.session_range[0] <= low.as_py() and high.as_py() < self.session_range[1]
            ):
                raise _Refused("sessionTimestamp")
        event = pc.add_checked(session, pc.coalesce(columns["eventOffset"], 0))
        columns["eventTimestamp"] = event
        return pa.table([columns[f.name].cast(f.type) for f in SCHEMA], schema=SCHEMA)


_Parsed = tuple[pa.Table, list[tuple[int, str, str]]]


class ParserPool:
    """Parses blocks on ``workers`` threads, each with its own parser; results come in order.
    ``workers`` 0: one parser, on the caller's thread."""

    def __init__(
        self,
        workers: int,
        fmt: Literal["json", "csv"],
        header: list[str] | None,
        quarantine: Callable[[int, str, str], None] | None,
        limits: Limits,
        check_stop: Callable[[], None],
    ) -> None:
        self._check_stop = check_stop
        self._quarantine = quarantine
        self._idle: queue.Queue[_Parser] = queue.Queue()
        self._all = [
            _Parser(fmt, header, quarantine, limits, check_stop) for _ in range(max(1, workers))
        ]
        for parser in self._all:
            self._idle.put(parser)
        # Twice the workers: another conversion may run at once, and threads are made lazily.
        # None: no thread at all, the caller's parses (a small download).
        self._tasks = (
            threads.Tasks(threads.executor("parse", 2 * len(self._all))) if workers >= 1 else None
        )

    def _parse(self, block: Block, where: dict[str, str | None]) -> _Parsed:
        """The block's table, and the rows it set aside (handed on in block order by ``map``)."""
        parser = self._idle.get()
        held: list[tuple[int, str, str]] = []
        if self._quarantine is not None:
            parser.quarantine = lambda line, text, reason: held.append((line, text, reason))
        try:
            return parser.parse(block, where), held
        finally:
            self._idle.put(parser)

    def map(self, blocks: Iterable[Block], where: dict[str, str | None]) -> Iterator[pa.Table]:
        """Parsed tables in block order; at most one block waits per worker beyond those running."""
        tasks = self._tasks
        if tasks is None:
            for block in blocks:
                self._check_stop()
                table, held = self._parse(block, where)
                yield self._emit(table, held)
            return
        pending: deque[Future[_Parsed]] = deque()
        try:
            for block in blocks:
                self._check_stop()
                pending.append(tasks.submit(functools.partial(self._parse, block, where)))
                if len(pending) > len(self._all):
                    yield self._result(pending.popleft())
            while pending:
                yield self._result(pending.popleft())
        finally:
            for future in pending:
                future.cancel()

    def _result(self, future: Future[_Parsed]) -> pa.Table:
        """The future's table, waiting in short steps so that a stop is seen within 0.1 s; the
        rows it set aside go to quarantine now, so that they are written in line order."""
        while True:
            self._check_stop()
            try:
                table, held = future.result(timeout=0.1)
                break
            except TimeoutError:
                continue
        return self._emit(table, held)

    def _emit(self, table: pa.Table, held: list[tuple[int, str, str]]) -> pa.Table:
        for line, text, reason in held:
            assert self._quarantine is not None
            self._quarantine(line, text, reason)
        return table

    def close(self) -> None:
        if self._tasks is not None:
            self._tasks.cancel()
        for parser in self._all:
            parser.close()
