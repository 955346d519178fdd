"""The engine: plan → recover → claim → run each window → commit.  Wiring only.

This module holds the commit step every window ends with (``land``) and start-up recovery
(``recover``); the worker pool that drives windows through the API lives beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from backfill.models import WindowState

if TYPE_CHECKING:
    from pathlib import Path

    from backfill.ledger import Ledger
    from backfill.models import WindowRecord
    from backfill.writer import Manifest, Writer

__all__ = ["Recovery", "land", "recover"]


async def land(ledger: Ledger, writer: Writer, record: WindowRecord, source: Path) -> WindowRecord:
    """Convert a DOWNLOADED window's file, publish it and mark it COMMITTED.

    Stage (off the event loop) → STAGED → publish (manifest first, then the files) → COMMITTED
    → only then remove the files of the attempt committed before, if any.  The publish and the
    ledger's COMMITTED run shielded from cancellation, so an interrupt cannot split them;
    a crash between them is finished by ``recover``.
    """
    window = record.window
    manifest = await anyio.to_thread.run_sync(
        lambda: writer.stage(
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
        path = await anyio.to_thread.run_sync(writer.publish, manifest)
        previous = record.committed_attempt
        record = await ledger.advance(
            record,
            WindowState.COMMITTED,
            rows=manifest.rows,
            bytes=manifest.size,
            manifest=str(path),
        )
        if previous is not None and previous != record.attempt:
            await anyio.to_thread.run_sync(_remove_attempt, writer, window.app, record.id, previous)
    return record


def _remove_attempt(writer: Writer, app: str, window_id: int, attempt: int) -> None:
    path = writer.manifest_path(app, window_id, attempt)
    if path.exists():
        writer.remove(writer.load_manifest(path))


def _manifest_if_any(writer: Writer, path: Path) -> Manifest | None:
    return writer.load_manifest(path) if path.exists() else None


@dataclass(slots=True)
class Recovery:
    """What start-up recovery did."""

    finished: list[int] = field(default_factory=list)  # STAGED windows whose publish it completed
    requeued: list[int] = field(default_factory=list)  # windows sent back to PENDING
    swept: int = 0  # files and manifests of no live attempt, deleted


async def recover(ledger: Ledger, writer: Writer) -> Recovery:
    """Finish or discard what a killed run left between staging and COMMITTED, then sweep.

    A STAGED window whose manifest is on disk with every file either published or still staged
    is published and COMMITTED; any other STAGED window goes back to PENDING with its partial
    output removed.  Then staging is emptied and every event file or manifest that belongs to no
    committed attempt is deleted.  Call it before any window runs.
    """
    report = Recovery()
    for record in await ledger.windows(states=[WindowState.STAGED]):
        window = record.window
        path = writer.manifest_path(window.app, record.id, record.attempt)
        manifest = await anyio.to_thread.run_sync(_manifest_if_any, writer, path)
        if manifest is not None and await anyio.to_thread.run_sync(writer.finish, manifest):
            previous = record.committed_attempt
            await ledger.advance(
                record,
                WindowState.COMMITTED,
                rows=manifest.rows,
                bytes=manifest.size,
                manifest=str(path),
            )
            if previous is not None and previous != record.attempt:
                await anyio.to_thread.run_sync(
                    _remove_attempt, writer, window.app, record.id, previous
                )
            report.finished.append(record.id)
            continue
        if manifest is not None:
            await anyio.to_thread.run_sync(writer.remove, manifest)
        await ledger.retry(
            record, error_class="Interrupted", error_message="the run stopped while staging"
        )
        report.requeued.append(record.id)
    live = {
        (r.id, r.committed_attempt)
        for r in await ledger.windows()
        if r.committed_attempt is not None
    }
    await anyio.to_thread.run_sync(writer.discard_staging)
    report.swept = len(await anyio.to_thread.run_sync(writer.sweep, live))
    return report
