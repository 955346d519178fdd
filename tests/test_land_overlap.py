"""Landing overlaps: only the conversion holds a conversions slot, not the publish or the ledger.

The engine runs against the fakes (a scripted API, a real SQLite ledger) with a store whose
steps note when they run: two windows convert at once when ``conversions_at_once = 2`` and
never more than the cap; with one slot, the next window converts while another publishes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from backfill import commit
from backfill.config import ApiSettings, AppSettings, OutputSettings, Settings, WindowSettings
from backfill.engine import Engine
from backfill.ledger import Ledger
from backfill.models import WindowState
from backfill.policy import Policy
from tests.fakes import FakeApi, FakeStore

if TYPE_CHECKING:
    from pathlib import Path

    from backfill.manifest import Manifest

S = WindowState
DAY = 86_400_000
START = 20_000 * DAY  # a fixed UTC midnight
WAIT_S = 10.0  # the longest any step waits for another (a loaded machine)


@dataclass
class WatchedStore(FakeStore):
    """A fake store that counts the conversions under way and can make steps wait."""

    converting: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    pair: threading.Barrier | None = None  # set: a stage waits until another is under way too
    staged_during_publish: threading.Event = field(default_factory=threading.Event)
    publish_started: threading.Event = field(default_factory=threading.Event)
    publishing: int = 0
    staged: int = 0

    def stage(
        self, *, app: str, window_id: int, attempt: int, start_ms: int, end_ms: int, source: Path
    ) -> Manifest:
        if self.staged:  # every conversion but the first starts once some publish is under way
            self.publish_started.wait(WAIT_S)
        with self.lock:
            self.staged += 1
            self.converting += 1
            self.peak = max(self.peak, self.converting)
            if self.publishing:
                self.staged_during_publish.set()
        try:
            if self.pair is not None:
                self.pair.wait()  # BrokenBarrierError if no second conversion comes
            time.sleep(0.01)
            return super().stage(app=app, window_id=window_id, attempt=attempt,
                                 start_ms=start_ms, end_ms=end_ms, source=source)  # fmt: skip
        finally:
            with self.lock:
                self.converting -= 1

    def publish(self, manifest: Manifest) -> Path:
        with self.lock:
            self.publishing += 1
        self.publish_started.set()
        try:  # a slow disk: long enough for the next window's conversion to start
            self.staged_during_publish.wait(WAIT_S)
            return super().publish(manifest)
        finally:
            with self.lock:
                self.publishing -= 1


def _settings(root: Path, conversions: int) -> Settings:
    policy = Policy(poll_initial_s=0.001, poll_min_s=0.001, poll_max_s=0.01, backoff_base_s=0.001,
                    backoff_cap_s=0.5, max_attempts=3)  # fmt: skip
    api = ApiSettings(calls_per_minute=100_000, conversions_at_once=conversions)
    return Settings(
        api=api,
        policy=policy,
        windows=WindowSettings(history_days=730, lag_hours=24, max_days=1),
        output=OutputSettings(root=root),
        apps=(AppSettings(name="a", api_key="A" * 20),),
    )


async def _run(tmp_path: Path, store: WatchedStore, conversions: int, days: int) -> Ledger:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    settings = _settings(tmp_path, conversions)
    engine = Engine(settings=settings, ledger=ledger, store=store, api=FakeApi(),
                    now_ms=lambda: START + 800 * DAY)  # fmt: skip
    await engine.plan(settings.apps, START, START + days * DAY)
    with anyio.fail_after(60):
        await engine.run(settings.apps)
    return ledger


async def test_two_windows_convert_at_once_with_two_slots_and_never_more(tmp_path: Path) -> None:
    store = WatchedStore(tmp_path / "downloads", pair=threading.Barrier(2, timeout=WAIT_S))
    store.staged_during_publish.set()  # publishes do not wait here
    store.publish_started.set()  # nor conversions
    ledger = await _run(tmp_path, store, conversions=2, days=6)
    try:
        records = await ledger.windows()
        assert len(records) == 6
        assert {r.state for r in records} == {S.COMMITTED}, "every pair met at the barrier"
        assert store.peak == 2
    finally:
        await ledger.close()


async def test_a_publish_does_not_hold_the_conversion_slot(tmp_path: Path) -> None:
    """One slot: the first window's publish waits until another window's conversion has
    started, and the others convert only once a publish is under way: both happen only if
    the publishing window gave its slot back after converting (else a 10 s wait, and fail)."""
    store = WatchedStore(tmp_path / "downloads")
    ledger = await _run(tmp_path, store, conversions=1, days=3)
    try:
        assert {r.state for r in await ledger.windows()} == {S.COMMITTED}
        assert store.staged_during_publish.is_set(), "a conversion ran during a publish"
        assert store.peak == 1
    finally:
        await ledger.close()


async def test_land_holds_the_slot_only_while_converting(tmp_path: Path) -> None:
    """``commit.land`` itself: the slot is free again when the publish starts."""
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    slots = anyio.CapacityLimiter(1)
    seen: list[float] = []

    class Store(FakeStore):
        def publish(self, manifest: Manifest) -> Path:
            seen.append(slots.borrowed_tokens)
            return super().publish(manifest)

    store = Store(tmp_path / "downloads")
    try:
        (record,) = await ledger.add_windows("a", START, START + DAY, size_ms=DAY)
        for state in (S.SUBMITTED, S.READY, S.DOWNLOADED):
            record = await ledger.advance(record, state)
        source = store.download_path("a", record.id, record.attempt)
        source.parent.mkdir(parents=True)
        source.write_bytes(b"rows:5")
        landed = await commit.land(ledger, store, record, source, conversions=slots)
        assert landed.state is S.COMMITTED and landed.rows == 5
        assert seen == [0], "the publish ran with no conversion slot held"
        assert slots.borrowed_tokens == 0
    finally:
        await ledger.close()
