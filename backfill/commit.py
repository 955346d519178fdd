"""The commit protocol: DOWNLOADED windows become COMMITTED, and recovery after a kill.

Theory of operation.  ``land`` stages one window's download as Parquet (off the event loop,
holding a slot of the run's conversions cap for that step alone, so the next window converts
while this one publishes), moves it to STAGED, publishes (manifest first, then the files), moves
it to COMMITTED, and only then removes the files of the attempt committed before, if
any.  ``land_group`` does the same for the windows that replace one committed range together (the
children of a committed window split when it was pulled again, ``WindowRecord.replaces``): it
stages every one of them, writes every manifest, moves every file, then commits them all and
retires the old range in ONE ledger transaction, then removes the old files.  Readers see the old
range or the new one, and both together only for the moments of the swap.  A re-pull with fewer
rows than ``min_share`` of what it replaces raises ``ShrinkError`` and changes nothing.

Publishing and the ledger's COMMITTED run shielded from cancellation, so an interrupt cannot
split them; a kill between them is finished (or undone) by ``recover``, which every run calls
before any window moves, and which then sweeps every file that belongs to no live attempt.
Only the ports are used: any ledger, any store.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import anyio
import anyio.to_thread

from backfill import logs
from backfill.errors import ShrinkError, StaleAttemptError, StorageError
from backfill.models import UNFINISHED, WindowRecord, WindowState

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from backfill.manifest import Manifest
    from backfill.models import Changes
    from backfill.ports import LedgerPort, SharedLedger, StorePort

__all__ = ["Recovery", "land", "land_group", "recover", "sweep"]

S = WindowState


async def _stage(
    store: StorePort, record: WindowRecord, source: Path, conversions: anyio.CapacityLimiter | None
) -> Manifest:
    """The conversion, the one CPU-bound step: the only one that holds a ``conversions`` slot."""
    window = record.window
    async with conversions or contextlib.nullcontext():
        return await anyio.to_thread.run_sync(
            lambda: store.stage(app=window.app, window_id=record.id, attempt=record.attempt,
                                start_ms=window.start, end_ms=window.end, source=source)
        )  # fmt: skip


def _check_share(rows: int, before: int | None, min_share: float, what: str) -> None:
    if before and rows < min_share * before:
        raise ShrinkError(
            f"{what} has {rows:,} rows where the attempt it replaces has {before:,} (under "
            f"{min_share:.0%}): held as FAILED; if the data really shrank, run `backfill refresh "
            "--accept-shrink` for this range"
        )


async def land(
    ledger: LedgerPort,
    store: StorePort,
    record: WindowRecord,
    source: Path,
    *,
    min_share: float = 0.0,
    conversions: anyio.CapacityLimiter | None = None,
) -> WindowRecord:
    """Convert a DOWNLOADED window's file, publish it and mark it COMMITTED.

    Only the conversion holds a slot of ``conversions`` (the run's cap on conversions at
    once); the publish and the ledger's moves, waits on the disk and the ledger, do not, so the
    next window converts meanwhile.  Raises ``BadDataError`` (an unusable download),
    ``ShrinkError`` (a re-pull under ``min_share`` of the rows it replaces) with nothing
    published, or ``StorageError``.
    """
    try:
        manifest = await _stage(store, record, source, conversions)
        before = record.rows if record.committed_attempt is not None else None
        try:
            _check_share(manifest.rows, before, min_share, "the re-pull")
        except ShrinkError:
            await anyio.to_thread.run_sync(store.remove, manifest)
            raise
        with anyio.CancelScope(shield=True):
            try:
                record = await ledger.advance(record, S.STAGED)
            except StaleAttemptError:
                await anyio.to_thread.run_sync(store.remove, manifest)
                raise
            path = await anyio.to_thread.run_sync(store.publish, manifest)
            try:
                record = await _commit(ledger, store, record, manifest, path)
            except StaleAttemptError:  # taken over: this attempt's files are no one's
                await anyio.to_thread.run_sync(store.remove, manifest)
                raise
    except OSError as exc:  # disk full, permissions: no window can land until it is fixed
        raise StorageError(f"cannot write under {store.root}: {exc.strerror or exc}") from exc
    return record


async def land_group(
    ledger: LedgerPort,
    store: StorePort,
    root: WindowRecord,
    members: Sequence[tuple[WindowRecord, Path]],
    *,
    min_share: float = 0.0,
    conversions: anyio.CapacityLimiter | None = None,
) -> list[WindowRecord]:
    """Land every DOWNLOADED window replacing ``root``'s range, and retire ``root`` at once.

    A member whose download is unusable raises its error with the member's record attached
    (``error.record``); nothing is published then, and the others stay DOWNLOADED.  Each
    member's conversion holds a slot of ``conversions``; the swap holds none.
    """
    manifests: list[Manifest] = []
    try:
        for record, source in members:
            try:
                manifests.append(await _stage(store, record, source, conversions))
            except Exception as exc:
                exc.record = record  # type: ignore[attr-defined]  # which member it was
                raise
        rows = sum(m.rows for m in manifests)
        _check_share(rows, root.rows, min_share, f"the re-pull of {root.window.label}")
    except BaseException:
        for manifest in manifests:
            await anyio.to_thread.run_sync(store.remove, manifest)
        raise
    records = [r for r, _ in members]
    try:
        with anyio.CancelScope(shield=True):
            committed = await _swap(ledger, store, root, records, manifests)
    except OSError as exc:
        raise StorageError(f"cannot write under {store.root}: {exc.strerror or exc}") from exc
    return committed


async def _swap(
    ledger: LedgerPort,
    store: StorePort,
    root: WindowRecord,
    records: list[WindowRecord],
    manifests: list[Manifest],
) -> list[WindowRecord]:
    try:
        staged = [await ledger.advance(r, S.STAGED) for r in records]
        paths = [await anyio.to_thread.run_sync(store.intend, m) for m in manifests]
        for manifest in manifests:
            await anyio.to_thread.run_sync(store.finish, manifest)
        return await _commit_group(ledger, store, root, staged, manifests, paths)
    except StaleAttemptError:  # taken over: these attempts' files are no one's
        for manifest in manifests:
            await anyio.to_thread.run_sync(store.remove, manifest)
        raise


async def _commit_group(
    ledger: LedgerPort,
    store: StorePort,
    root: WindowRecord,
    staged: list[WindowRecord],
    manifests: list[Manifest],
    paths: Sequence[Path | str],
) -> list[WindowRecord]:
    changes: list[tuple[WindowRecord, Changes]] = [
        (r, {"rows": m.rows, "bytes": m.size, "manifest": str(p)})
        for r, m, p in zip(staged, manifests, paths, strict=True)
    ]
    committed = await ledger.commit_group(root, changes)
    if root.committed_attempt is not None:
        await anyio.to_thread.run_sync(
            _remove_attempt, store, root.window.app, root.id, root.committed_attempt
        )
    return committed


async def _commit(
    ledger: LedgerPort,
    store: StorePort,
    record: WindowRecord,
    manifest: Manifest,
    path: Path | str,
) -> WindowRecord:
    """STAGED → COMMITTED for a published manifest, then drop the attempt committed before."""
    previous = record.committed_attempt
    record = await ledger.advance(
        record, S.COMMITTED, rows=manifest.rows, bytes=manifest.size, manifest=str(path)
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

    def log(self) -> None:
        """One ``run.recover.ok`` line, if recovery did anything."""
        if self.finished or self.requeued or self.swept:
            logs.get("engine").info("run.recover.ok", finished=len(self.finished),
                                    requeued=len(self.requeued), swept=self.swept)  # fmt: skip


async def recover(ledger: LedgerPort, store: StorePort) -> Recovery:
    """Finish or undo what a killed run left between staging and COMMITTED, then sweep.

    A STAGED window whose manifest is on disk with every file either published or still staged
    is published and COMMITTED; a group replacing one range is finished only when every member
    is so, else undone whole.  Any other STAGED window goes back to PENDING with its partial
    output removed.  Then staging is emptied and every event file or manifest that belongs to
    no live attempt is deleted.  Call it before any window runs.

    On a shared ledger a STAGED window is another worker's publish under way, or one a dead
    worker left, which ``claims`` takes over (a new attempt): only the sweep runs, and
    staging, which other workers on this machine may be using, is left alone.
    """
    report = Recovery()
    if ledger.shared:
        await _take_over_staged(cast("SharedLedger", ledger), report)
    else:
        staged = await ledger.windows(states=[S.STAGED])
        for record in [r for r in staged if r.replaces is None]:
            await _recover_one(ledger, store, record, report)
        for root_id in sorted({r.replaces for r in staged if r.replaces is not None}):
            await _recover_group(ledger, store, await ledger.get(root_id), report)
        await anyio.to_thread.run_sync(store.discard_staging)
    report.swept = await sweep(ledger, store)
    return report


async def _take_over_staged(ledger: SharedLedger, report: Recovery) -> None:
    """STAGED windows whose holder's lease ran out (it died mid-publish): taken over at once
    (a new attempt, back to READY) and released, so that the sweep after this removes what the
    dead worker had published, and any worker re-fetches them."""
    staged = await ledger.windows(states=[S.STAGED])
    if not staged:
        return
    apps = sorted({r.window.app for r in staged})
    ids = {r.id for r in staged}
    taken = await ledger.claim_next(apps, lease_ms=1000, limit=len(ids), only=ids)
    await ledger.release([r.id for r in taken])
    report.requeued += [r.id for r in taken]


async def sweep(ledger: LedgerPort, store: StorePort) -> int:
    """Delete every event file and manifest of no live attempt; returns how many.

    Live: the committed attempt of each window, and the current attempt of each STAGED one (a
    publish under way).  The store is listed before the ledger is read, so a file published
    while the sweep runs is never taken for an orphan: its window was STAGED before the file
    appeared, and is STAGED or COMMITTED at that attempt when the ledger is read, or no one's.
    On a shared ledger the local work (staging folders, downloads) is swept the same way:
    kept while its window is unfinished at that attempt.
    """
    listing = await anyio.to_thread.run_sync(store.listing)
    work = await anyio.to_thread.run_sync(store.work_listing) if ledger.shared else []
    records = await ledger.windows()
    live = {(r.id, r.committed_attempt) for r in records if r.committed_attempt is not None}
    live |= {(r.id, r.attempt) for r in records if r.state is S.STAGED}
    if ledger.shared:  # another worker's stage under way writes its quarantine file early
        live |= {(r.id, r.attempt) for r in records if r.state in UNFINISHED}
    if work:  # staging and downloads that no unfinished attempt owns: a dead worker's
        keep = {(r.id, r.attempt) for r in records if r.state in UNFINISHED}
        await anyio.to_thread.run_sync(store.sweep_work, keep, work)
    return len(await anyio.to_thread.run_sync(store.sweep, live, listing))


async def _recover_one(
    ledger: LedgerPort, store: StorePort, record: WindowRecord, report: Recovery
) -> None:
    window = record.window
    manifest = await anyio.to_thread.run_sync(store.load, window.app, record.id, record.attempt)
    if manifest is not None and await anyio.to_thread.run_sync(store.finish, manifest):
        path = store.manifest_path(window.app, record.id, record.attempt)
        await _commit(ledger, store, record, manifest, path)
        report.finished.append(record.id)
        return
    await _undo(ledger, store, record, manifest, report)


async def _recover_group(
    ledger: LedgerPort, store: StorePort, root: WindowRecord, report: Recovery
) -> None:
    members = await ledger.group(root.id)
    found = [
        await anyio.to_thread.run_sync(store.load, m.window.app, m.id, m.attempt) for m in members
    ]
    complete = all(m.state is S.STAGED for m in members) and all(found)
    manifests = [m for m in found if m is not None]
    if complete and all([await anyio.to_thread.run_sync(store.finish, m) for m in manifests]):
        paths = [store.manifest_path(m.window.app, m.id, m.attempt) for m in members]
        await _commit_group(ledger, store, root, members, manifests, paths)
        report.finished += [m.id for m in members]
        return
    for member, manifest in zip(members, found, strict=True):
        if member.state is S.STAGED:
            await _undo(ledger, store, member, manifest, report)


async def _undo(
    ledger: LedgerPort,
    store: StorePort,
    record: WindowRecord,
    manifest: Manifest | None,
    report: Recovery,
) -> None:
    if manifest is not None:
        await anyio.to_thread.run_sync(store.remove, manifest)
    await ledger.retry(
        record, error_class="Interrupted", error_message="the run stopped while staging"
    )
    report.requeued.append(record.id)
