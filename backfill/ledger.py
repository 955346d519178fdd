"""The ledger: one SQLite row per window, moved only by compare-and-set.

Theory of operation.  The ledger stores states; ``models.advance`` decides which moves are
legal.  Every write is one ``BEGIN IMMEDIATE`` transaction and every move is an ``UPDATE ...
WHERE id = ? AND attempt = ? AND state = ?``: if another worker (or process) moved the window
first, nothing changes and ``StaleAttemptError`` says so.  A split retires the parent and
inserts its children in one transaction, so a crash leaves either the parent or all the
children.  Planning inserts windows only for the parts of a range no live window covers.

SQLite runs in WAL mode with ``synchronous=FULL`` and a busy timeout; calls run in a worker
thread (``anyio.to_thread``), one at a time per ``Ledger``.  The SQL is plain enough to port to
PostgreSQL as a second adapter.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from backfill import crashpoints, planner
from backfill.errors import LedgerError, StaleAttemptError
from backfill.ledger_apps import AppFacts
from backfill.ledger_schema import (
    COLUMNS,
    MIGRATIONS,
    UPDATABLE,
    RecordedSettings,
    record_of,
)
from backfill.models import (
    UNFINISHED,
    Window,
    WindowRecord,
    WindowState,
    advance,
    check_tiles,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path
    from typing import Unpack

    from backfill.models import Changes

__all__ = ["Ledger", "RecordedSettings"]

T = TypeVar("T")


class Ledger(AppFacts):
    """The window ledger on one SQLite file.  Open with ``await Ledger.open(path)``."""

    shared = False  # one process at a time: the run lock (``cli.session.exclusive``) sees to it
    worker = "local"

    def __init__(self, connection: sqlite3.Connection, clock: Callable[[], float]) -> None:
        self._db = connection
        self._clock = clock
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, *, clock: Callable[[], float] = time.time) -> Ledger:
        """Open (creating and migrating if needed); raises ``LedgerError``."""
        connection = await anyio.to_thread.run_sync(cls._connect, path)
        return cls(connection, clock)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise LedgerError(
                    f"{path}: ledger schema version {version} is newer than this backfill "
                    f"knows ({len(MIGRATIONS)}); upgrade backfill"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.execute("BEGIN IMMEDIATE")
                # executescript would commit on its own; run statement by statement instead.
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: cannot open the ledger: {exc}") from exc
        return db

    async def close(self) -> None:
        await self._run(self._db.close)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(
            partial(self._locked, fn, *args), limiter=self._limiter
        )

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise LedgerError(f"ledger error: {exc}") from exc

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` inside one ``BEGIN IMMEDIATE`` transaction (rolled back on error)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(*args)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    def _now(self) -> int:
        return int(self._clock() * 1000)

    # -- planning --------------------------------------------------------------------------

    async def add_windows(
        self, app: str, start: int, end: int, *, size_ms: int, tz: dt.tzinfo = dt.UTC
    ) -> list[WindowRecord]:
        """Plan ``[start, end)`` for ``app`` into windows, adding only what no live window covers.

        Returns the windows added (none when the range is already planned).
        """
        return await self._run(self._write, self._add_windows, app, start, end, size_ms, tz)

    def _add_windows(
        self, app: str, start: int, end: int, size_ms: int, tz: dt.tzinfo
    ) -> list[WindowRecord]:
        taken = self._db.execute(
            "SELECT start_ms, end_ms FROM windows WHERE app = ? AND state != ? "
            "AND end_ms > ? AND start_ms < ?",
            (app, WindowState.SPLIT, start, end),
        ).fetchall()
        holes = planner.gaps([(r[0], r[1]) for r in taken], start, end)
        return [
            self._insert(window, None, None)
            for lo, hi in holes
            for window in planner.plan(app, lo, hi, size_ms=size_ms, tz=tz)
        ]

    def _insert(self, window: Window, parent_id: int | None, replaces: int | None) -> WindowRecord:
        now = self._now()
        cursor = self._db.execute(
            "INSERT INTO windows (app, start_ms, end_ms, state, attempt, parent_id, created_at, "
            "updated_at, replaces) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (window.app, window.start, window.end, WindowState.PENDING, parent_id, now, now,
             replaces),
        )  # fmt: skip
        return WindowRecord(
            id=int(cursor.lastrowid or 0),
            window=window,
            state=WindowState.PENDING,
            attempt=0,
            parent_id=parent_id,
            created_at=now,
            updated_at=now,
            replaces=replaces,
        )

    # -- compare-and-set moves -------------------------------------------------------------

    async def advance(
        self, record: WindowRecord, target: WindowState, **updates: Unpack[Changes]
    ) -> WindowRecord:
        """Move ``record`` to ``target`` in the same attempt; raises ``StaleAttemptError``."""
        advance(record.state, target)
        return await self._run(self._write, self._move, record, target, record.attempt, updates)

    async def retry(self, record: WindowRecord, **updates: Unpack[Changes]) -> WindowRecord:
        """Back to ``PENDING`` with ``attempt + 1``, the request forgotten."""
        advance(record.state, WindowState.PENDING)
        forget: Changes = {"request_id": None, "submitted_at": None, "ready_at": None}
        updates = forget | updates
        return await self._run(
            self._write, self._move, record, WindowState.PENDING, record.attempt + 1, updates
        )

    def _move(
        self, record: WindowRecord, target: WindowState, attempt: int, updates: dict[str, Any]
    ) -> WindowRecord:
        unknown = set(updates) - UPDATABLE
        if unknown:
            raise ValueError(f"not ledger columns: {sorted(unknown)}")
        if target is WindowState.COMMITTED:
            updates = updates | {"committed_attempt": attempt}
        now = self._now()
        sets = "".join(f", {name} = ?" for name in updates)
        if target is WindowState.FAILED:
            sets += ", failures = failures + 1"
        sql = (
            f"UPDATE windows SET state = ?, attempt = ?, updated_at = ?{sets} "
            "WHERE id = ? AND attempt = ? AND state = ?"
        )
        params = (target, attempt, now, *updates.values(), record.id, record.attempt, record.state)
        crashpoints.hit("ledger.move")
        if self._db.execute(sql, params).rowcount != 1:
            raise StaleAttemptError(
                f"window {record.id} ({record.window.label}) is no longer {record.state} "
                f"at attempt {record.attempt}"
            )
        return self._get(record.id)

    async def split(self, record: WindowRecord, children: Sequence[Window]) -> list[WindowRecord]:
        """Retire ``record`` as SPLIT and insert ``children`` (which must tile it), atomically.

        A window whose files are live (it was committed, and is being pulled again) keeps them
        live as SPLIT: its children replace its range together (``replaces``), in one
        ``commit_group`` once all of them are staged, never one by one.
        """
        advance(record.state, WindowState.SPLIT)
        check_tiles(record.window, children)
        return await self._run(self._write, self._split, record, list(children))

    def _split(self, record: WindowRecord, children: list[Window]) -> list[WindowRecord]:
        cursor = self._db.execute(
            "UPDATE windows SET state = ?, updated_at = ? "
            "WHERE id = ? AND attempt = ? AND state = ?",
            (WindowState.SPLIT, self._now(), record.id, record.attempt, record.state),
        )
        if cursor.rowcount != 1:
            raise StaleAttemptError(f"window {record.id} moved before it could be split")
        replaces = record.replaces
        if replaces is None and record.committed_attempt is not None:
            replaces = record.id
        added = []
        for child in children:
            added.append(self._insert(child, record.id, replaces))
            crashpoints.hit("ledger.split")
        return added

    # -- replacement by range ------------------------------------------------------------------

    async def group(self, root_id: int) -> list[WindowRecord]:
        """The windows that replace the range of ``root_id`` together (SPLIT ones excluded)."""
        where = "replaces = ? AND state != ?"
        return await self._run(self._select, where, (root_id, WindowState.SPLIT))

    async def commit_group(
        self, root: WindowRecord, members: Sequence[tuple[WindowRecord, Changes]]
    ) -> list[WindowRecord]:
        """STAGED → COMMITTED for every member, and the root's old files no longer live.

        One transaction: readers of the ledger see the old range or the new one, never both.
        Raises ``StaleAttemptError`` if the root or any member moved.
        """
        for record, _ in members:
            advance(record.state, WindowState.COMMITTED)
        return await self._run(self._write, self._commit_group, root, list(members))

    def _commit_group(
        self, root: WindowRecord, members: list[tuple[WindowRecord, Changes]]
    ) -> list[WindowRecord]:
        cursor = self._db.execute(
            "UPDATE windows SET committed_attempt = NULL, updated_at = ? "
            "WHERE id = ? AND committed_attempt IS ?",
            (self._now(), root.id, root.committed_attempt),
        )
        if cursor.rowcount != 1:
            raise StaleAttemptError(f"window {root.id} was replaced by another run")
        done = []
        for record, changes in members:
            done.append(self._move(record, WindowState.COMMITTED, record.attempt, dict(changes)))
        marks = ", ".join("?" * len(done))
        self._db.execute(
            f"UPDATE windows SET replaces = NULL WHERE id IN ({marks})", tuple(r.id for r in done)
        )
        return [self._get(r.id) for r in done]

    async def next_id(self) -> int:
        """The id the next inserted window will get (stable while the caller holds the run lock)."""
        row = await self._run(self._fetchone, "SELECT COALESCE(MAX(id), 0) + 1 FROM windows")
        return 1 if row is None else int(row[0])

    async def replace_range(
        self,
        retired: Sequence[WindowRecord],
        outside: Sequence[tuple[Window, int]],
        window: Window,
        *,
        window_id: int,
        rows: int,
        size: int,
        manifest: str,
    ) -> WindowRecord:
        """One transaction: ``retired`` SPLIT with no live files, ``window`` COMMITTED under
        ``window_id`` (its files already published), and the parts of ``retired`` outside it
        planned again (PENDING, children of their window).  Raises ``StaleAttemptError``."""
        for record in retired:
            advance(record.state, WindowState.SPLIT)
        landed = (window, window_id, rows, size, manifest)
        return await self._run(
            self._write, self._replace_range, list(retired), list(outside), landed
        )

    def _replace_range(
        self,
        retired: list[WindowRecord],
        outside: list[tuple[Window, int]],
        landed: tuple[Window, int, int, int, str],
    ) -> WindowRecord:
        now = self._now()
        for record in retired:
            moved = self._db.execute(
                "UPDATE windows SET state = ?, committed_attempt = NULL, updated_at = ? "
                "WHERE id = ? AND attempt = ? AND state = ?",
                (WindowState.SPLIT, now, record.id, record.attempt, record.state),
            ).rowcount
            if moved != 1:
                raise StaleAttemptError(f"window {record.id} moved while its range was replaced")
        window, window_id, rows, size, manifest = landed
        self._db.execute(
            "INSERT INTO windows (id, app, start_ms, end_ms, state, attempt, rows, bytes, "
            "manifest, committed_attempt, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, 0, ?, ?)",
            (window_id, window.app, window.start, window.end, WindowState.COMMITTED, rows, size,
             manifest, now, now),
        )  # fmt: skip
        for part, parent in outside:
            self._insert(part, parent, None)
        return self._get(window_id)

    # -- queries ---------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._db.execute(sql, params)

    def _fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
        return row

    def _select(self, where: str = "1 = 1", params: tuple[Any, ...] = ()) -> list[WindowRecord]:
        sql = f"SELECT {COLUMNS} FROM windows WHERE {where} ORDER BY app, start_ms, id"
        return [record_of(r) for r in self._db.execute(sql, params).fetchall()]

    def _get(self, window_id: int) -> WindowRecord:
        found = self._select("id = ?", (window_id,))
        if not found:
            raise LedgerError(f"window {window_id} is not in the ledger")
        return found[0]

    async def get(self, window_id: int) -> WindowRecord:
        return await self._run(self._get, window_id)

    async def windows(
        self, *, apps: Iterable[str] | None = None, states: Iterable[WindowState] | None = None
    ) -> list[WindowRecord]:
        """Windows, optionally of some apps and states, ordered by app and start."""
        clauses, params = [], []
        if apps is not None:
            names = list(apps)
            clauses.append(f"app IN ({', '.join('?' * len(names))})")
            params += names
        if states is not None:
            wanted = [str(s) for s in states]
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            params += wanted
        where = " AND ".join(clauses) or "1 = 1"
        return await self._run(self._select, where, tuple(params))

    async def claimable(self, apps: Iterable[str] | None = None) -> list[WindowRecord]:
        """Windows waiting to be submitted (PENDING), oldest range first."""
        return await self.windows(apps=apps, states=[WindowState.PENDING])

    async def in_flight(self, apps: Iterable[str] | None = None) -> list[WindowRecord]:
        """Windows a previous run left between submit and commit, to re-attach to or finish."""
        states = [s for s in UNFINISHED if s is not WindowState.PENDING]
        return await self.windows(apps=apps, states=states)

    async def failed(self, apps: Iterable[str] | None = None) -> list[WindowRecord]:
        return await self.windows(apps=apps, states=[WindowState.FAILED])
