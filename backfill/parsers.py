"""Parsing blocks of records into Arrow tables of ``SCHEMA``, on a small pool of threads.

Theory of operation.  A ``Parser`` turns one block into a table: DuckDB's
``json_transform_strict`` for JSON lines, pyarrow's CSV reader for CSV, then the three maps
decoded from their JSON text into ``map<string, string>`` by DuckDB, then the cast to
``SCHEMA`` with ``eventTimestamp`` derived.  A block that does not parse goes to
``rowcheck.sift``, which names the bad row or quarantines it; the good rows are parsed again.
``ParserPool`` runs ``workers`` parsers on as many threads and yields tables in block order.
DuckDB connections are kept on a free list, because opening one costs about 30 ms.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from backfill import rowcheck
from backfill.errors import BadDataError
from backfill.framing import Block, lines
from backfill.schema import FIELDS, INPUT, MAP, MAPS, SCHEMA

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

__all__ = ["ParserPool"]

_DUCK = {
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
}
_MAP_DUCK = "MAP(VARCHAR, VARCHAR)"
_JSON_SCHEMA = json.dumps(
    {name: (_MAP_DUCK if name in MAPS else _DUCK[INPUT[name]]) for name in FIELDS}
).replace("'", "''")
_MAP_SQL = f"json_transform_strict({{0}}, '\"{_MAP_DUCK}\"') AS {{0}}"

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


def _empty_input() -> pa.Table:
    return pa.table({n: pa.array([], MAP if n in MAPS else INPUT[n]) for n in FIELDS})


class _Parser:
    """Turns blocks into Arrow tables in ``SCHEMA``; one per pool thread (one DuckDB each)."""

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

    def parse(self, block: Block, where: dict[str, str | None]) -> pa.Table:
        try:
            table = self._parse_json(block) if self.fmt == "json" else self._parse_csv(block.data)
        except (duckdb.Error, pa.ArrowInvalid):
            table = self._salvage(block, where)
        return self._shape(table, block, where)

    def _parse_json(self, block: Block) -> pa.Table:
        # Small record batches let DuckDB spread one block over all its threads.
        line_array = lines(block)
        if not len(line_array):
            return _empty_input()
        batches = pa.table({"line": line_array}).to_batches(max_chunksize=4096)
        self.db.register("block_lines", pa.Table.from_batches(batches))
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
                column_types={n: INPUT[n] for n in self.header if n in INPUT},
                strings_can_be_null=True,
                include_columns=[n for n in self.header if n in INPUT],
            ),
        )
        return self._maps(table)

    def _salvage(self, block: Block, where: dict[str, str | None]) -> pa.Table:
        """Find the bad rows of a block that failed to parse; fail, or quarantine them."""
        good = rowcheck.sift(block, self.fmt, self.header, self.quarantine, where)
        if not good:
            return _empty_input()
        data = b"\n".join(good) + b"\n"
        if self.fmt == "json":
            ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            return self._parse_json(Block(data, block.first_line, ends))
        assert self.header is not None
        return self._parse_csv(data)

    def _shape(self, table: pa.Table, block: Block, where: dict[str, str | None]) -> pa.Table:
        n = table.num_rows
        columns: dict[str, pa.ChunkedArray | pa.Array] = {}
        for name in FIELDS:
            want = MAP if name in MAPS else INPUT[name]
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


class ParserPool:
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

    def _parse(self, block: Block, where: dict[str, str | None]) -> pa.Table:
        parser = self._idle.get()
        try:
            return parser.parse(block, where)
        finally:
            self._idle.put(parser)

    def map(self, blocks: Iterable[Block], where: dict[str, str | None]) -> Iterator[pa.Table]:
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
