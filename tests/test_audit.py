"""``verify`` finds what it must: planted states, a real ledger, an in-memory store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backfill import audit
from backfill.ledger import Ledger
from backfill.models import DAY_MS, WindowState
from tests.fakes import FakeStore

if TYPE_CHECKING:
    from pathlib import Path

S = WindowState
T0 = 20_000 * DAY_MS


async def _commit(ledger: Ledger, record: object) -> None:
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED, S.COMMITTED):
        record = await ledger.advance(record, state, rows=1)  # type: ignore[arg-type]  # a record


async def test_a_split_window_still_live_beside_its_committed_children_is_reported(
    tmp_path: Path,
) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    (parent,) = await ledger.add_windows("a", T0, T0 + 2 * DAY_MS, size_ms=2 * DAY_MS)
    await _commit(ledger, parent)
    (parent,) = await ledger.windows()
    parent = await ledger.retry(parent)  # pulled again: its files stay live
    children = await ledger.split(parent, [
        type(parent.window)(app="a", start=T0, end=T0 + DAY_MS),
        type(parent.window)(app="a", start=T0 + DAY_MS, end=T0 + 2 * DAY_MS),
    ])  # fmt: skip
    assert all(c.replaces == parent.id for c in children), "children replace the parent's range"
    store = FakeStore(tmp_path)
    assert await audit.verify(ledger, store) == [], "mid-replacement, only the old files are live"
    await _commit(ledger, children[0])  # committed alone, as the old engine did: rows twice
    problems = await audit.verify(ledger, store)
    assert any("live files overlap" in p.text for p in problems)
    await ledger.close()
