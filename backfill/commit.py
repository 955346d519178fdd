"""The commit protocol: a DOWNLOADED window becomes COMMITTED, and recovery after a kill.

Theory of operation.  ``land`` stages the download as Parquet (off the event loop), moves the
window to STAGED, publishes (manifest first, then the files), moves it to COMMITTED, and only then
removes the files of the attempt committed before, if any.  The publish and the ledger's
COMMITTED run shielded from cancellation, so an interrupt cannot split them; a kill between them
is finished by ``recover``, which every run calls before any window moves: it completes or
discards what the ledger shows between staging and COMMITTED, then sweeps every file that belongs
to no committed attempt.  Only the ports are used: any ledger, any store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from backfill.errors import StorageError
from backfill.models import WindowRecord, WindowState

if TYPE_CHECKING:
    from pathlib import Path

    from backfill.manifest import Manifest
    from backfill.ports import LedgerPort, StorePort

__all__ = ["Recovery", "land", "recover"]


async def land(
    ledger: LedgerPort, store: StorePort, record: WindowRecord, source: Path
) -> WindowRecord:
    """Convert a DOWNLOADED window's file, publish it and mark it COMMITTED.

    Stage (off the event loop) → STAGED → publish (manifest first, then the files) → COMMITTED
    → only then remove the files of the attempt committed before, if any.  The publish and the
    ledger's COMMITTED run shielded from cancellation, so an interrupt cannot split them;
    a crash between them is finished by ``recover``.
    """
    window = record.window
    try:
        manifest = await anyio.to_thread.run_sync(
            lambda: store.stage(
                app=window.app,
                window_id=record.id,
                attempt=record.attempt,
                start_ms=window.start,
                end_ms=window.end,
                source=source,
            )
        )
        with anyio.CancelScope(shield=True):
            record = await ledger.advance(record, WindowState.STAGED)
            path = await anyio.to_thread.run_sync(store.publish, manifest)
            record = await _commit(ledger, store, record, manifest, path)
    except OSError as exc:  # disk full, permissions: no window can land until it is fixed
        raise StorageError(f"cannot write under {store.root}: {exc.strerror or exc}") from exc
    return record


async def _commit(
    ledger: LedgerPort, store: StorePort, record: WindowRecord, manifest: Manifest, path: Path
) -> WindowRecord:
    """STAGED → COMMITTED for a published manifest, then drop the attempt committed before."""
    previous = record.committed_attempt
    record = await ledger.advance(
        record, WindowState.COMMITTED, rows=manifest.rows, bytes=manifest.size, manifest=str(path)
    )
    if previous is not None and previous != record.attempt:
        await anyio.to_thread.run_sync(
            _remove_attempt, store, record.window.app, record.id, previous
        )
    return record


def _remove_attempt(store: StorePort, app: str, window_id: int, attempt: int) -> None:
    manifest = store.load(app, window_id, attempt)
    if manifest is not None:
        store.remove(manifest)


@dataclass(slots=True)
class Recovery:
    """What start-up recovery did."""

    finished: list[int] = field(default_factory=list)  # STAGED windows whose publish it completed
    requeued: list[int] = field(default_factory=list)  # windows sent back to PENDING
    swept: int = 0  # files and manifests of no live attempt, deleted


async def recover(ledger: LedgerPort, store: StorePort) -> Recovery:
    """Finish or discard what a killed run left between staging and COMMITTED, then sweep.

    A STAGED window whose manifest is on disk with every file either published or still staged
    is published and COMMITTED; any other STAGED window goes back to PENDING with its partial
    output removed.  Then staging is emptied and every event file or manifest that belongs to no
    committed attempt is deleted.  Call it before any window runs.
    """
    report = Recovery()
    for record in await ledger.windows(states=[WindowState.STAGED]):
        window = record.window
        manifest = await anyio.to_thread.run_sync(store.load, window.app, record.id, record.attempt)
        if manifest is not None and await anyio.to_thread.run_sync(store.finish, manifest):
            path = store.manifest_path(window.app, record.id, record.attempt)
            await _commit(ledger, store, record, manifest, path)
            report.finished.append(record.id)
            continue
        if manifest is not None:
            await anyio.to_thread.run_sync(store.remove, manifest)
        await ledger.retry(
            record, error_class="Interrupted", error_message="the run stopped while staging"
        )
        report.requeued.append(record.id)
    live = {
        (r.id, r.committed_attempt)
        for r in await ledger.windows()
        if r.committed_attempt is not None
    }
    await anyio.to_thread.run_sync(store.discard_staging)
    report.swept = len(await anyio.to_thread.run_sync(store.sweep, live))
    return report
