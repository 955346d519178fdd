"""The ledger, on SQLite and on PostgreSQL alike: real files and databases, real processes.

Every test that takes the ``ledger`` (or ``opener``) fixture runs on both adapters; a test for
one adapter alone takes ``tmp_path`` (SQLite) or lives in ``test_ledger_pg.py``.
"""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import psycopg
import pytest

from backfill import audit, planner
from backfill.errors import IllegalTransitionError, LedgerError, StaleAttemptError
from backfill.ledger import Ledger
from backfill.ledger_pg import PgLedger
from backfill.ledger_schema import RecordedSettings
from backfill.models import (
    DAY_MS,
    WEEK_MS,
    Window,
    WindowRecord,
    WindowState,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

S = WindowState
T0 = 1_700_006_400_000  # 2023-11-15T00:00Z
ROOT = __file__.rsplit("/tests/", 1)[0]


AnyLedger = Ledger | PgLedger


class Opener:
    """Opens ledgers on one store: a SQLite file or a PostgreSQL database (``target``)."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind, self.target = kind, target
        self.opened: list[AnyLedger] = []

    async def __call__(self) -> AnyLedger:
        ledger: AnyLedger
        if self.kind == "sqlite":
            ledger = await Ledger.open(Path(self.target))
        else:
            ledger = await PgLedger.open(self.target, worker=f"worker-{len(self.opened)}")
        self.opened.append(ledger)
        return ledger

    def execute(self, sql: str) -> None:
        """Run ``sql`` on the store behind the ledger's back (an edit by hand)."""
        if self.kind == "sqlite":
            db = sqlite3.connect(self.target)
            db.execute(sql)
            db.commit()
            db.close()
        else:
            with psycopg.connect(self.target, autocommit=True) as conn:
                conn.execute(sql.encode())


@pytest.fixture(params=["sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    if request.param == "sqlite":
        target = str(tmp_path / "ledger.sqlite")
    else:
        target = request.getfixturevalue("pg_url")
    opener = Opener(request.param, target)
    yield opener
    for ledger in opener.opened:
        await ledger.close()


@pytest.fixture
async def ledger(opener: Opener) -> AnyLedger:
    return await opener()


async def _ledger(tmp_path: Path) -> Ledger:
    return await Ledger.open(tmp_path / "ledger.sqlite")


async def test_opening_creates_the_schema_in_wal_mode(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    await ledger.close()
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3  # migrations 1, 2 and 3
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="newer than this backfill knows"):
        await _ledger(tmp_path)


async def test_an_unopenable_ledger_is_a_ledger_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        await _ledger(tmp_path)


async def test_replanning_the_same_range_changes_nothing(ledger: AnyLedger) -> None:
    added = await ledger.add_windows("a", T0, T0 + 90 * DAY_MS, size_ms=30 * DAY_MS)
    assert [r.window for r in added] == planner.plan("a", T0, T0 + 90 * DAY_MS)
    before = await ledger.windows()
    assert await ledger.add_windows("a", T0, T0 + 90 * DAY_MS, size_ms=30 * DAY_MS) == []
    assert await ledger.windows() == before


async def test_an_overlapping_range_adds_only_what_is_missing(ledger: AnyLedger) -> None:
    await ledger.add_windows("a", T0, T0 + 30 * DAY_MS, size_ms=30 * DAY_MS)
    await ledger.add_windows("b", T0, T0 + 30 * DAY_MS, size_ms=30 * DAY_MS)
    added = await ledger.add_windows("a", T0 - 10 * DAY_MS, T0 + 40 * DAY_MS, size_ms=WEEK_MS)
    assert [(r.window.start, r.window.end) for r in added] == [
        (T0 - 10 * DAY_MS, T0 - 3 * DAY_MS),
        (T0 - 3 * DAY_MS, T0),
        (T0 + 30 * DAY_MS, T0 + 37 * DAY_MS),
        (T0 + 37 * DAY_MS, T0 + 40 * DAY_MS),
    ]
    leaves = sorted((r.window.start, r.window.end) for r in await ledger.windows(apps=["a"]))
    assert all(x[1] == y[0] for x, y in zip(leaves, leaves[1:], strict=False)), "tiled, no overlap"


async def test_moves_are_compare_and_set_on_window_and_attempt(ledger: AnyLedger) -> None:
    (record,) = await ledger.add_windows("a", T0, T0 + DAY_MS, size_ms=DAY_MS)
    submitted = await ledger.advance(record, S.SUBMITTED, request_id="26", submitted_at=5)
    assert (submitted.state, submitted.request_id, submitted.attempt) == (S.SUBMITTED, "26", 0)
    with pytest.raises(StaleAttemptError):
        await ledger.advance(record, S.SUBMITTED, request_id="27")  # stale: still thinks PENDING
    retried = await ledger.retry(submitted, error_class="ServerError", error_message="502")
    assert (retried.state, retried.attempt, retried.request_id) == (S.PENDING, 1, None)
    with pytest.raises(StaleAttemptError):
        await ledger.advance(submitted, S.READY)  # attempt 0 is superseded
    with pytest.raises(IllegalTransitionError):
        await ledger.advance(retried, S.COMMITTED)
    with pytest.raises(ValueError, match="not ledger columns"):
        await ledger.advance(retried, S.SUBMITTED, link="https://secret")  # type: ignore[call-arg]  # not a column, on purpose


async def test_committing_records_the_committed_attempt(ledger: AnyLedger) -> None:
    (record,) = await ledger.add_windows("a", T0, T0 + DAY_MS, size_ms=DAY_MS)
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED):
        record = await ledger.advance(record, state)
    record = await ledger.advance(record, S.COMMITTED, rows=10, bytes=999, manifest="m.json")
    assert record.committed_attempt == 0
    repull = await ledger.retry(record)
    assert (repull.state, repull.attempt, repull.committed_attempt) == (S.PENDING, 1, 0)
    assert await ledger.newest_committed_end("a") == T0 + DAY_MS, (
        "a re-pull keeps the old attempt live"
    )


async def test_two_connections_race_and_exactly_one_wins(opener: Opener) -> None:
    first, second = await opener(), await opener()
    records = await first.add_windows("a", T0, T0 + 60 * DAY_MS, size_ms=DAY_MS)

    async def claim(
        ledger: AnyLedger, name: str, record: WindowRecord, outcomes: list[str]
    ) -> None:
        try:
            await ledger.advance(record, S.SUBMITTED, request_id=name)
            outcomes.append(name)
        except StaleAttemptError:
            outcomes.append("lost")

    for record in records:
        outcomes: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(claim, first, "one", record, outcomes)
            tg.start_soon(claim, second, "two", record, outcomes)
        assert sorted(outcomes) in (["lost", "one"], ["lost", "two"])
        winner = next(o for o in outcomes if o != "lost")
        assert (await first.get(record.id)).request_id == winner


async def test_split_replaces_the_parent_by_its_children(ledger: AnyLedger) -> None:
    (parent,) = await ledger.add_windows("a", T0, T0 + 30 * DAY_MS, size_ms=30 * DAY_MS)
    children = planner.split(parent.window, WEEK_MS)
    with pytest.raises(ValueError, match="do not tile"):
        await ledger.split(parent, children[:-1])
    added = await ledger.split(parent, children)
    assert [r.window for r in added] == children
    assert all(r.parent_id == parent.id and r.state is S.PENDING for r in added)
    assert (await ledger.get(parent.id)).state is S.SPLIT
    assert [r.window for r in await ledger.claimable()] == children
    # Re-planning the range adds nothing: the children cover it.
    assert await ledger.add_windows("a", T0, T0 + 30 * DAY_MS, size_ms=30 * DAY_MS) == []


_SPLIT_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from backfill import crashpoints, planner
    from backfill.ledger import Ledger
    from backfill.ledger_pg import PgLedger

    async def main() -> None:
        target = sys.argv[1]
        if target.startswith("postgresql://"):
            ledger = await PgLedger.open(target, worker="child")
        else:
            ledger = await Ledger.open(Path(target))
        (parent,) = await ledger.claimable()
        crashpoints.arm(sys.argv[2])
        await ledger.split(parent, planner.split(parent.window, 86_400_000))
        print("split done", flush=True)
        await ledger.close()

    anyio.run(main)
    """
)


@pytest.mark.parametrize("crash_at", ["ledger.split:1", "ledger.split:15", "ledger.split:30", ""])
async def test_a_kill_in_the_middle_of_a_split_leaves_parent_or_all_children(
    opener: Opener, crash_at: str
) -> None:
    ledger = await opener()
    (parent,) = await ledger.add_windows("a", T0, T0 + 30 * DAY_MS, size_ms=30 * DAY_MS)
    await ledger.close()
    done = await anyio.run_process(
        [sys.executable, "-c", _SPLIT_CHILD, opener.target, crash_at], cwd=ROOT, check=False
    )
    ledger = await opener()
    records = await ledger.windows()
    if crash_at:
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        assert [(r.id, r.state) for r in records] == [(parent.id, S.PENDING)], "the parent alone"
    else:
        assert done.returncode == 0, done.stderr.decode()
        assert len(records) == 31
        assert {r.state for r in records if r.id != parent.id} == {S.PENDING}
        assert (await ledger.get(parent.id)).state is S.SPLIT


async def test_queries_for_the_engine_and_the_cli(ledger: AnyLedger) -> None:
    a = await ledger.add_windows("a", T0, T0 + 4 * DAY_MS, size_ms=DAY_MS)
    await ledger.add_windows("b", T0, T0 + 2 * DAY_MS, size_ms=DAY_MS)
    first = a[0]
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED):
        first = await ledger.advance(
            first, state, request_id="26" if state is S.SUBMITTED else first.request_id
        )
    await ledger.advance(first, S.COMMITTED, rows=100, bytes=2048)
    flying = await ledger.advance(a[2], S.SUBMITTED, request_id="27")
    failed = await ledger.advance(
        a[3], S.FAILED, error_class="RequestRejectedError", error_message="no", retryable=False
    )
    assert [r.request_id for r in await ledger.in_flight()] == ["27"]
    assert [r.id for r in await ledger.failed()] == [failed.id]
    assert [r.window.app for r in await ledger.claimable()] == ["a", "b", "b"]
    assert [r.id for r in await ledger.claimable(apps=["a"])] == [a[1].id]
    assert await ledger.newest_committed_end("a") == T0 + DAY_MS
    assert await ledger.newest_committed_end("b") is None
    coverage = {c.app: c for c in audit.coverage(await ledger.windows())}
    assert coverage["a"].states == {"COMMITTED": 1, "PENDING": 1, "SUBMITTED": 1, "FAILED": 1}
    assert (coverage["a"].rows, coverage["a"].bytes) == (100, 2048)
    assert (coverage["a"].first_ms, coverage["a"].last_ms) == (T0, T0 + DAY_MS)
    assert coverage["a"].gaps == ((T0 + DAY_MS, T0 + 4 * DAY_MS),)
    assert coverage["b"].gaps == ((T0, T0 + 2 * DAY_MS),)
    assert flying.state is S.SUBMITTED


async def test_the_learned_size_only_shrinks(ledger: AnyLedger) -> None:
    assert await ledger.learned_size("a") is None
    await ledger.learn_size("a", WEEK_MS)
    await ledger.learn_size("a", 30 * DAY_MS)
    assert await ledger.learned_size("a") == WEEK_MS
    await ledger.learn_size("a", DAY_MS)
    assert await ledger.learned_size("a") == DAY_MS
    assert await ledger.learned_size("b") is None


def test_windows_must_not_be_built_empty() -> None:
    with pytest.raises(ValueError, match="empty window"):
        Window(app="a", start=T0, end=T0)


async def test_a_state_this_version_does_not_know_is_a_clear_ledger_error(opener: Opener) -> None:
    ledger = await opener()
    await ledger.add_windows("a", T0, T0 + DAY_MS, size_ms=DAY_MS)
    await ledger.close()
    opener.execute("UPDATE windows SET state = 'ARCHIVED'")
    ledger = await opener()
    with pytest.raises(LedgerError, match="'ARCHIVED', which this backfill does not know"):
        await ledger.windows()
    await ledger.close()


async def test_a_committed_window_split_for_a_repull_commits_as_one_group(
    ledger: AnyLedger,
) -> None:
    (record,) = await ledger.add_windows("a", T0, T0 + 2 * DAY_MS, size_ms=2 * DAY_MS)
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED):
        record = await ledger.advance(record, state, request_id="26")
    record = await ledger.advance(record, S.COMMITTED, rows=5, bytes=50)
    repull = await ledger.retry(record)
    children = await ledger.split(repull, planner.split(repull.window, DAY_MS))
    assert {c.replaces for c in children} == {record.id}
    assert [c.id for c in await ledger.group(record.id)] == [c.id for c in children]
    staged = []
    for child in children:
        for state in (S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED):
            child = await ledger.advance(child, state, request_id="27")
        staged.append(child)
    root = await ledger.get(record.id)
    assert (root.state, root.committed_attempt) == (S.SPLIT, 0), "old files live until the swap"
    stale = dataclasses.replace(staged[1], attempt=staged[1].attempt + 1)
    with pytest.raises(StaleAttemptError):
        await ledger.commit_group(root, [(staged[0], {"rows": 1}), (stale, {"rows": 2})])
    assert (await ledger.get(root.id)).committed_attempt == 0, "all or nothing"
    assert (await ledger.get(staged[0].id)).state is S.STAGED
    done = await ledger.commit_group(root, [(c, {"rows": 1, "bytes": 10}) for c in staged])
    assert [(r.state, r.replaces, r.committed_attempt) for r in done] == [
        (S.COMMITTED, None, 0)
    ] * 2
    assert (await ledger.get(record.id)).committed_attempt is None
    assert await ledger.group(record.id) == []
    with pytest.raises(StaleAttemptError):  # the swap happened: a second one finds it done
        await ledger.commit_group(root, [])


async def test_replacing_a_range_swaps_windows_in_one_step(ledger: AnyLedger) -> None:
    old = await ledger.add_windows("a", T0, T0 + 3 * DAY_MS, size_ms=DAY_MS)
    window_id = await ledger.next_id()
    assert window_id > max(r.id for r in old)
    landed = Window(app="a", start=T0 + DAY_MS // 2, end=T0 + 2 * DAY_MS)
    outside = [(Window(app="a", start=T0, end=T0 + DAY_MS // 2), old[0].id)]
    new = await ledger.replace_range(
        old[:2], outside, landed, window_id=window_id, rows=7, size=70, manifest="m.json"
    )
    assert (new.id, new.state, new.rows, new.committed_attempt) == (window_id, S.COMMITTED, 7, 0)
    assert [(await ledger.get(r.id)).state for r in old] == [S.SPLIT, S.SPLIT, S.PENDING]
    (part,) = [r for r in await ledger.claimable() if r.parent_id == old[0].id]
    assert part.window == outside[0][0]
    later = await ledger.add_windows("b", T0, T0 + DAY_MS, size_ms=DAY_MS)
    assert later[0].id > window_id, "ids stay unique after an id given by hand"
    with pytest.raises(StaleAttemptError):
        await ledger.replace_range(
            old[:1], [], landed, window_id=window_id + 100, rows=1, size=1, manifest="x"
        )


async def test_settings_are_recorded_and_forgetting_an_app_deletes_its_rows(
    ledger: AnyLedger,
) -> None:
    settings = RecordedSettings(app="a", api_key="key-a", app_versions=("1.0", "2.0"))
    assert await ledger.recorded_settings("a") is None
    await ledger.record_settings(settings)
    await ledger.record_settings(settings)  # replaced, not duplicated
    assert await ledger.recorded_settings("a") == settings
    assert await ledger.app_with_key("key-a") == "a"
    assert await ledger.app_with_key("key-b") is None
    (parent,) = await ledger.add_windows("a", T0, T0 + 2 * DAY_MS, size_ms=2 * DAY_MS)
    await ledger.split(parent, planner.split(parent.window, DAY_MS))
    await ledger.add_windows("b", T0, T0 + DAY_MS, size_ms=DAY_MS)
    await ledger.learn_size("a", DAY_MS)
    assert await ledger.forget("a") == 3
    assert [r.window.app for r in await ledger.windows()] == ["b"]
    assert await ledger.recorded_settings("a") is None
    assert await ledger.learned_size("a") is None
