"""What only the PostgreSQL ledger does: migrations shared by processes, claims and leases,
takeovers and fencing, concurrent planning, the shared API budget, passwords, workers.

Everything both ledgers do is tested on both in ``test_ledger.py``.
"""

from __future__ import annotations

import sys
import textwrap
import time
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

import anyio
import psycopg
import pytest

from backfill import planner
from backfill.errors import LedgerError, StaleAttemptError
from backfill.ledger_pg import PgLedger, mask_url
from backfill.models import DAY_MS, WindowRecord, WindowState
from tests.pgserver import PASSWORD, PASSWORD_ROLE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from tests.pgserver import PgServer

S = WindowState
T0 = 1_700_006_400_000  # 2023-11-15T00:00Z
ROOT = __file__.rsplit("/tests/", 1)[0]
LEASE = 30_000
OpenAs: TypeAlias = "Callable[[str], Awaitable[PgLedger]]"  # opens a ledger as a worker


class Clock:
    """A ledger clock the test moves by hand (seconds, like ``time.time``)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def open_as(pg_url: str, clock: Clock) -> AsyncIterator[OpenAs]:
    """Opens a ledger on the test's database as the worker named, on the test's clock."""
    opened: list[PgLedger] = []

    async def open_(worker: str) -> PgLedger:
        ledger = await PgLedger.open(pg_url, worker=worker, clock=clock)
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        await ledger.close()


def _sql(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql.encode(), params)
        return cursor.fetchall() if cursor.description else []


async def _walk(ledger: PgLedger, record: WindowRecord, *states: S, **kw: str) -> WindowRecord:
    for state in states:
        record = await ledger.advance(record, state, **kw)  # type: ignore[arg-type]
    return record


# -- opening -------------------------------------------------------------------------------


async def test_processes_opening_a_new_database_at_once_migrate_it_once(pg_url: str) -> None:
    ledgers: list[PgLedger] = []

    async def open_one(n: int) -> None:
        ledgers.append(await PgLedger.open(pg_url, worker=f"w{n}"))

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(open_one, n)
    assert _sql(pg_url, "SELECT version FROM backfill_schema") == [(4,)]
    for ledger in ledgers:
        assert ledger.shared is True
        await ledger.close()
    _sql(pg_url, "UPDATE backfill_schema SET version = 99")
    with pytest.raises(LedgerError, match="newer than this backfill knows"):
        await PgLedger.open(pg_url, worker="w")


async def test_a_database_that_does_not_exist_is_a_ledger_error(pg_url: str) -> None:
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        await PgLedger.open(pg_url + "_missing", worker="w")


# -- claims --------------------------------------------------------------------------------


async def test_two_workers_claiming_at_once_never_get_the_same_window(
    open_as: OpenAs,
) -> None:
    one, two = await open_as("one"), await open_as("two")
    planned = await one.add_windows("a", T0, T0 + 60 * DAY_MS, size_ms=DAY_MS)
    await one.add_windows("b", T0, T0 + 20 * DAY_MS, size_ms=DAY_MS)
    got: dict[str, list[int]] = {"one": [], "two": []}

    async def drain(ledger: PgLedger) -> None:
        while True:
            claimed = await ledger.claim_next(["a"], lease_ms=LEASE, limit=3)
            if not claimed:  # all taken, or the rest locked by the other's claim right now
                if not await ledger.claimable(["a"]):
                    break
                await anyio.sleep(0.001)
                continue
            assert len(claimed) <= 3
            got[ledger.worker] += [r.id for r in claimed]
            assert {r.window.app for r in claimed} == {"a"}
            assert all([await ledger.holds(r.id) for r in claimed])
            for record in claimed:  # done with it (FAILED: finished, and the lease cleared)
                await ledger.advance(record, S.FAILED, error_class="Done")

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, one)
        tg.start_soon(drain, two)
    assert not set(got["one"]) & set(got["two"])
    assert sorted(got["one"] + got["two"]) == [r.id for r in planned]
    assert got["one"] and got["two"], "both workers took a share"
    after = await one.windows(apps=["a"])
    assert {(r.state, r.attempt, r.failures) for r in after} == {(S.FAILED, 0, 1)}, "no takeover"


async def test_claims_take_the_oldest_range_first_within_the_filters(
    open_as: OpenAs,
) -> None:
    ledger = await open_as("one")
    a = await ledger.add_windows("a", T0, T0 + 5 * DAY_MS, size_ms=DAY_MS)
    b = await ledger.add_windows("b", T0, T0 + 5 * DAY_MS, size_ms=DAY_MS)
    first = await ledger.claim_next(["a", "b"], lease_ms=LEASE, limit=3)
    assert [r.id for r in first] == [a[0].id, b[0].id, a[1].id]
    ranged = await ledger.claim_next(
        ["a"], lease_ms=LEASE, limit=10, start=T0 + 3 * DAY_MS, end=T0 + 4 * DAY_MS
    )
    assert [r.id for r in ranged] == [a[3].id]
    only = await ledger.claim_next(["b"], lease_ms=LEASE, limit=10, only=[b[4].id, a[4].id])
    assert [r.id for r in only] == [b[4].id]
    assert await ledger.claim_next(["a"], lease_ms=LEASE, limit=0) == []


async def _repull_group(ledger: PgLedger) -> tuple[WindowRecord, list[WindowRecord]]:
    """A committed window re-pulled and split in three: a group that must commit together."""
    (record,) = await ledger.add_windows("a", T0, T0 + 3 * DAY_MS, size_ms=3 * DAY_MS)
    record = await _walk(ledger, record, S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED,
                         S.COMMITTED)  # fmt: skip
    children = await ledger.split(await ledger.retry(record), planner.split(record.window, DAY_MS))
    return record, children


async def test_a_group_is_claimed_whole_or_not_at_all(open_as: OpenAs, pg_url: str) -> None:
    planner_, worker = await open_as("planner"), await open_as("worker")
    root, children = await _repull_group(planner_)
    single = await planner_.add_windows("a", T0 + 3 * DAY_MS, T0 + 4 * DAY_MS, size_ms=DAY_MS)
    _sql(pg_url, "UPDATE windows SET lease_owner = 'other', lease_until = %s WHERE id = %s",
         (10**15, children[1].id))  # fmt: skip
    assert [r.id for r in await worker.claim_next(["a"], lease_ms=LEASE, limit=5)] == [
        single[0].id
    ], "one member held by a live worker: the group waits"
    await worker.release()
    _sql(pg_url, "UPDATE windows SET lease_owner = NULL, lease_until = NULL")
    with psycopg.connect(pg_url) as conn:  # a member locked by another transaction right now
        conn.execute("SELECT id FROM windows WHERE id = %s FOR UPDATE", (children[2].id,))
        claimed = await worker.claim_next(["a"], lease_ms=LEASE, limit=5)
        assert [r.id for r in claimed] == [single[0].id]
        conn.rollback()
    await worker.release()
    claimed = await worker.claim_next(["a"], lease_ms=LEASE, limit=1)
    assert [r.id for r in claimed] == [c.id for c in children], "the group counts as one"
    assert {r.replaces for r in claimed} == {root.id}


# -- takeover and fencing ------------------------------------------------------------------


async def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off(
    open_as: OpenAs, clock: Clock
) -> None:
    one, two = await open_as("one"), await open_as("two")
    await one.add_windows("a", T0, T0 + 4 * DAY_MS, size_ms=DAY_MS)
    pending, downloaded, staged, bare = await one.claim_next(["a"], lease_ms=LEASE, limit=4)
    downloaded = await _walk(one, downloaded, S.SUBMITTED, S.READY, S.DOWNLOADED, request_id="26")
    staged = await _walk(one, staged, S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED,
                         request_id="27")  # fmt: skip
    bare = await _walk(one, bare, S.SUBMITTED, S.READY, S.DOWNLOADED)  # no request id known
    assert await two.claim_next(["a"], lease_ms=LEASE, limit=10) == [], "leases still live"
    clock.advance(LEASE / 1000 + 1)
    taken = {r.id: r for r in await two.claim_next(["a"], lease_ms=LEASE, limit=10)}
    assert [(taken[r.id].state, taken[r.id].attempt, taken[r.id].request_id) for r in
            (pending, downloaded, staged, bare)] == [
        (S.PENDING, 1, None), (S.READY, 1, "26"), (S.READY, 1, "27"), (S.PENDING, 1, None),
    ]  # fmt: skip
    assert await two.holds(staged.id) and not await one.holds(staged.id)
    with pytest.raises(StaleAttemptError):  # its attempt is superseded
        await one.advance(staged, S.COMMITTED)
    fresh = await one.get(downloaded.id)  # even with the current attempt: the lease is not its
    with pytest.raises(StaleAttemptError, match="another worker holds it"):
        await one.advance(fresh, S.DOWNLOADED)
    with pytest.raises(StaleAttemptError):
        await one.retry(fresh)
    with pytest.raises(StaleAttemptError):
        await one.split(await one.get(pending.id), planner.split(pending.window, DAY_MS // 2))
    assert await one.renew(lease_ms=LEASE) == set(), "nothing left to renew"
    moved = await two.advance(taken[downloaded.id], S.DOWNLOADED)
    assert moved.state is S.DOWNLOADED


async def test_a_group_taken_over_fences_the_old_holders_commit(
    open_as: OpenAs, clock: Clock
) -> None:
    one, two = await open_as("one"), await open_as("two")
    root, children = await _repull_group(one)
    claimed = await one.claim_next(["a"], lease_ms=LEASE, limit=1)
    staged = [await _walk(one, c, S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED) for c in claimed]
    clock.advance(LEASE / 1000 + 1)
    assert len(await two.claim_next(["a"], lease_ms=LEASE, limit=1)) == len(children)
    current = [await one.get(c.id) for c in staged]
    assert {c.state for c in current} == {S.PENDING}, "no request id: back to PENDING"
    with pytest.raises(StaleAttemptError):
        await one.commit_group(await one.get(root.id), [(c, {}) for c in staged])
    assert (await one.get(root.id)).committed_attempt == 0, "the old files are still live"


async def test_leases_follow_moves_splits_and_retries(open_as: OpenAs, pg_url: str) -> None:
    one, two = await open_as("one"), await open_as("two")
    await one.add_windows("a", T0, T0 + 2 * DAY_MS, size_ms=DAY_MS)
    parent, other = await one.claim_next(["a"], lease_ms=LEASE, limit=2)
    (until,) = _sql(pg_url, "SELECT lease_until FROM windows WHERE id = %s", (parent.id,))[0]
    children = await one.split(parent, planner.split(parent.window, DAY_MS // 4))
    leases = _sql(pg_url, "SELECT DISTINCT lease_owner, lease_until FROM windows "
                  "WHERE parent_id = %s", (parent.id,))  # fmt: skip
    assert leases == [("one", until)], "the children are leased like their parent was"
    assert _sql(pg_url, "SELECT lease_owner FROM windows WHERE id = %s", (parent.id,)) == [(None,)]
    assert await two.claim_next(["a"], lease_ms=LEASE, limit=10) == []
    retried = await one.retry(await one.advance(children[0], S.SUBMITTED, request_id="9"))
    assert await one.holds(retried.id), "a retry keeps the lease"
    failed = await one.advance(retried, S.FAILED, error_class="X", retryable=False)
    assert not await one.holds(failed.id), "FAILED clears the lease"
    done = await _walk(one, other, S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED, S.COMMITTED)
    assert _sql(pg_url, "SELECT lease_owner FROM windows WHERE id = %s", (done.id,)) == [(None,)]


async def test_renew_release_and_the_workers_table(open_as: OpenAs, clock: Clock) -> None:
    one, two = await open_as("one"), await open_as("two")
    await one.register("backfill run", "host-1", 101)
    await two.register("backfill run --apps b", "host-2", 202)
    a = await one.add_windows("a", T0, T0 + 3 * DAY_MS, size_ms=DAY_MS)
    held = await one.claim_next(["a"], lease_ms=LEASE, limit=3)
    clock.advance(20)
    assert await one.renew(lease_ms=LEASE) == {r.id for r in a}
    clock.advance(20)  # 40 s after the claim, 20 s after the renewal: still held
    assert all([await one.holds(r.id) for r in held])
    assert await two.claim_next(["a"], lease_ms=LEASE, limit=3) == []
    infos = {w.worker: w for w in await one.workers()}
    assert (infos["one"].host, infos["one"].pid, infos["one"].command) == ("host-1", 101,
                                                                           "backfill run")  # fmt: skip
    assert [(h[0], h[1], h[3]) for h in infos["one"].holding] == [(r.id, "a", "PENDING")
                                                                  for r in a]  # fmt: skip
    assert infos["one"].holding[0][2] == a[0].window.label
    assert infos["two"].holding == []
    await one.release([a[0].id])
    assert not await one.holds(a[0].id)
    assert [r.id for r in await two.claim_next(["a"], lease_ms=LEASE, limit=3)] == [a[0].id]
    await one.release()
    again = await two.claim_next(["a"], lease_ms=LEASE, limit=3)
    # The released ones; never a window it holds already (its run has that one in hand).
    assert [(r.id, r.attempt) for r in again] == [(r.id, 0) for r in a[1:]]
    await one.unregister()
    clock.advance(6 * 60)  # two's leases expired, and it was not seen for 6 minutes
    assert await one.workers() == []
    await two.renew(lease_ms=LEASE)
    assert [(w.worker, len(w.holding)) for w in await one.workers()] == [("two", 3)]


# -- planning ------------------------------------------------------------------------------

_PLAN_CHILD = textwrap.dedent(
    """
    import sys, time, anyio
    from backfill.ledger_pg import PgLedger

    async def main() -> None:
        ledger = await PgLedger.open(sys.argv[1], worker=sys.argv[2])
        while time.time() < float(sys.argv[3]):
            await anyio.sleep(0.005)
        for app in ("a", "b", "c"):
            await ledger.add_windows(app, 1_700_006_400_000, 1_700_006_400_000 + 90 * 86_400_000,
                                     size_ms=86_400_000)
        await ledger.close()

    anyio.run(main)
    """
)


async def test_planning_the_same_range_at_once_creates_each_window_once(
    open_as: OpenAs, pg_url: str
) -> None:
    ledgers = [await open_as(f"w{n}") for n in range(4)]
    async with anyio.create_task_group() as tg:
        for ledger in ledgers:
            tg.start_soon(partial(ledger.add_windows, "x", T0, T0 + 60 * DAY_MS, size_ms=DAY_MS))
    windows = await ledgers[0].windows(apps=["x"])
    assert [r.window for r in windows] == planner.plan("x", T0, T0 + 60 * DAY_MS, size_ms=DAY_MS)
    go = str(time.time() + 2.0)  # both processes plan at the same moment

    async def plan_in_a_process(name: str) -> None:
        await anyio.run_process([sys.executable, "-c", _PLAN_CHILD, pg_url, name, go], cwd=ROOT)

    async with anyio.create_task_group() as tg:
        for name in ("p1", "p2"):
            tg.start_soon(plan_in_a_process, name)
    for app in ("a", "b", "c"):
        spans = [r.window for r in await ledgers[0].windows(apps=[app])]
        assert spans == planner.plan(app, T0, T0 + 90 * DAY_MS, size_ms=DAY_MS), app


# -- the shared API budget -----------------------------------------------------------------


async def test_racing_workers_never_exceed_the_shared_caps(pg_url: str) -> None:
    ledgers = [await PgLedger.open(pg_url, worker=f"w{n}") for n in range(4)]
    holders: dict[str, int] = {"all": 0, "a": 0, "b": 0}
    peak: dict[str, int] = {"all": 0, "a": 0, "b": 0}
    taken = 0

    async def hammer(ledger: PgLedger, task: int) -> None:
        nonlocal taken
        for n in range(12):
            window_id, app = task * 1000 + n, "ab"[(task + n) % 2]
            while True:
                if await ledger.take_slot(
                    window_id, app, max_in_flight=5, max_per_app=3, lease_ms=60_000
                ):
                    break
                await anyio.sleep(0.002)
            taken += 1
            for key in ("all", app):
                holders[key] += 1
                peak[key] = max(peak[key], holders[key])
            await anyio.sleep(0.003)
            for key in ("all", app):
                holders[key] -= 1
            await ledger.give_slot(window_id)

    try:
        async with anyio.create_task_group() as tg:
            for task in range(16):
                tg.start_soon(hammer, ledgers[task % 4], task)
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert taken == 16 * 12
    assert peak["all"] <= 5 and peak["a"] <= 3 and peak["b"] <= 3, peak
    assert peak["all"] >= 3, f"the caps were actually contended: {peak}"


async def test_slots_are_kept_taken_over_and_expire(open_as: OpenAs, clock: Clock) -> None:
    one, two = await open_as("one"), await open_as("two")
    assert await one.take_slot(1, "a", max_in_flight=2, max_per_app=0, lease_ms=LEASE)
    assert await one.take_slot(1, "a", max_in_flight=2, max_per_app=0, lease_ms=LEASE)
    assert await two.take_slot(2, "a", max_in_flight=2, max_per_app=0, lease_ms=LEASE)
    assert not await two.take_slot(3, "b", max_in_flight=2, max_per_app=0, lease_ms=LEASE)
    assert await two.take_slot(1, "a", max_in_flight=2, max_per_app=0, lease_ms=LEASE), "over"
    clock.advance(LEASE / 1000 / 2)
    await two.renew(lease_ms=LEASE)  # two's slots (1 and 2) live on
    clock.advance(LEASE / 1000 / 2 + 1)
    assert not await one.take_slot(3, "b", max_in_flight=2, max_per_app=0, lease_ms=LEASE)
    clock.advance(LEASE / 1000 + 1)  # now every slot expired
    assert await one.take_slot(3, "b", max_in_flight=2, max_per_app=0, lease_ms=LEASE)
    await one.give_slot(3)
    await one.give_slot(3)  # freeing a free slot is nothing


async def test_the_shared_token_bucket_and_the_429_gate(open_as: OpenAs, clock: Clock) -> None:
    one, two = await open_as("one"), await open_as("two")
    waits = [await (one, two)[n % 2].take_call(per_minute=60) for n in range(7)]
    assert waits[:6] == [0.0] * 6, "a burst of a tenth of a minute's calls"
    assert waits[6] == pytest.approx(1.0)
    clock.advance(0.5)
    assert await two.take_call(per_minute=60) == pytest.approx(0.5), "nothing taken while waiting"
    clock.advance(0.5)
    assert await two.take_call(per_minute=60) == 0.0
    assert await one.take_call(per_minute=60) == pytest.approx(1.0)
    clock.advance(3600)
    assert [await one.take_call(per_minute=60) for _ in range(7)][-2:] == [0.0, pytest.approx(1.0)]
    assert await one.gate_until() == 0
    await one.close_gate(5_000)
    await two.close_gate(3_000)  # an earlier reopening does not shorten the gate
    assert await two.gate_until() == 5_000


# -- credentials ---------------------------------------------------------------------------


async def test_a_password_from_password_env_and_no_password_in_errors(
    pg_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = pg_server.create_database()
    url = pg_server.url(database, user=PASSWORD_ROLE)
    monkeypatch.setenv("BACKFILL_TEST_PG_PASSWORD", PASSWORD)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    ledger = await PgLedger.open(url, worker="w", password_env="BACKFILL_TEST_PG_PASSWORD")
    assert len(await ledger.add_windows("a", T0, T0 + 2 * DAY_MS, size_ms=DAY_MS)) == 2
    await ledger.close()
    wrong = "Wrong-Pass-0451"
    monkeypatch.setenv("BACKFILL_TEST_PG_PASSWORD", wrong)
    with pytest.raises(LedgerError) as caught:
        await PgLedger.open(url, worker="w", password_env="BACKFILL_TEST_PG_PASSWORD")
    assert "password authentication failed" in str(caught.value)
    assert wrong not in str(caught.value) and caught.value.__cause__ is None
    in_url = url.replace(f"{PASSWORD_ROLE}@", f"{PASSWORD_ROLE}:{wrong}@")
    with pytest.raises(LedgerError) as caught:
        await PgLedger.open(in_url, worker="w")
    assert wrong not in str(caught.value) and f"{PASSWORD_ROLE}:***@" in str(caught.value)
    with pytest.raises(LedgerError, match="BACKFILL_TEST_PG_UNSET is not set"):
        await PgLedger.open(url, worker="w", password_env="BACKFILL_TEST_PG_UNSET")
    with pytest.raises(LedgerError):  # trust is only for the superuser: no password, no entry
        await PgLedger.open(url, worker="w")


def test_urls_are_shown_with_their_password_masked() -> None:
    assert mask_url("postgresql://bf:hunter2@db:5432/ledger?sslmode=require") == (
        "postgresql://bf:***@db:5432/ledger?sslmode=require"
    )
    assert mask_url("postgresql://db/ledger?password=hunter2&user=bf") == (
        "postgresql://db/ledger?password=***&user=bf"
    )
    assert mask_url("host=db password=hunter2 dbname=ledger") == (
        "host=db password=*** dbname=ledger"
    )
    assert mask_url("postgresql://bf@db/ledger") == "postgresql://bf@db/ledger"
