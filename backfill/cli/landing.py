"""``convert`` into a managed root: a hand-downloaded file becomes a COMMITTED window.

Theory of operation.  A root is managed when it has a ledger (or ``--config`` names one).
Under the run lock, after the start-up recovery every run does, the file is converted once
into a scratch stage to check it and learn the UTC days its rows span (the window's range
unless ``--start``/``--end`` say otherwise).  Then:

- **Nothing planned over the range**: the range is planned as one window, moved to DOWNLOADED
  and landed by ``commit.land``, the engine's own commit protocol (stage, STAGED, publish,
  COMMITTED).  A kill before COMMITTED leaves a window that the next run pulls from the API.
- **Windows over the range** (``--replace`` when some hold committed files): each goes back to
  PENDING (its files stay live), the file is staged and published as a new window, and one
  ledger transaction retires the overlapped windows (SPLIT, files no longer live), commits the
  new one and plans their parts outside the range as PENDING windows.  Only then are their old
  files removed.  A kill before that transaction leaves the published files to no live attempt
  (the next run sweeps them) and the old windows PENDING (the next run pulls them again).

That transaction is ``Ledger.replace_range``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
from typing import TYPE_CHECKING

import anyio.to_thread

from backfill import commit
from backfill.cli import session
from backfill.errors import ConfigError
from backfill.models import DAY_MS, Window, WindowState, iso

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from backfill.ledger import Ledger
    from backfill.manifest import Manifest
    from backfill.models import WindowRecord
    from backfill.store import LocalStore

__all__ = ["convert"]

S = WindowState
_SCRATCH = 0  # the window id of the checking stage: the ledger's ids start at 1
_FAR = 1 << 62  # the checking stage accepts any instant


async def convert(args: argparse.Namespace, store: LocalStore, ledger_path: Path) -> str:
    """Land ``args.file`` as a COMMITTED window of ``args.app``; the line that reports it.

    Raises ``ConfigError`` (nothing changed) for a range that overlaps committed windows
    without ``--replace``, and ``BadDataError`` for a file that does not convert.
    """
    app = args.app
    with session.exclusive_at(ledger_path, wait=getattr(args, "wait", None)):
        async with session.open_ledger_at(ledger_path) as ledger:
            await commit.recover(ledger, store)
            scan = await anyio.to_thread.run_sync(_scan, store, app, args.file)
            start, end = _range(args, scan)
            hit = [
                r
                for r in await ledger.windows(apps=[app])
                if r.window.end > start and r.window.start < end
                and (r.state is not S.SPLIT or r.committed_attempt is not None)
            ]  # fmt: skip
            _refuse(app, hit, replace=args.replace)
            if hit:
                record = await _replace(ledger, store, app, start, end, hit, args.file)
            else:
                record = await _land(ledger, store, app, start, end, args.file)
    replaced = f"; replaced {len(hit)} window{'s' * (len(hit) != 1)}" if hit else ""
    return (
        f"converted {record.rows or 0:,} rows ({record.bytes or 0:,} bytes) into window "
        f"{record.id} of {app}, {record.window.label}, COMMITTED in the ledger{replaced}"
    )


def _scan(store: LocalStore, app: str, source: Path) -> Manifest:
    """Convert ``source`` once into a scratch stage (removed again): checks it, gives its days."""
    layout = store.layout
    try:
        return store.stage(
            app=app, window_id=_SCRATCH, attempt=0, start_ms=0, end_ms=_FAR, source=source
        )
    finally:
        shutil.rmtree(layout.stage_dir(app, _SCRATCH, 0), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            layout.rejects_path(app, _SCRATCH, 0).unlink()


def _day_ms(partition: str) -> int:
    day = dt.date.fromisoformat(partition.removeprefix("dt="))
    return int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp() * 1000)


def _range(args: argparse.Namespace, scan: Manifest) -> tuple[int, int]:
    """``--start``/``--end``, else the whole UTC days of the file's rows; checked against them."""
    days = sorted({_day_ms(f.partition) for f in scan.files})
    if not days and (args.start is None or args.end is None):
        raise ConfigError(f"{args.file}: no rows; give --start and --end for the range it holds")
    start = args.start if args.start is not None else days[0]
    end = args.end if args.end is not None else days[-1] + DAY_MS
    if end <= start:
        raise ConfigError(f"--end must be after --start (got {iso(start)} .. {iso(end)})")
    outside = [d for d in days if d + DAY_MS <= start or d >= end]
    if outside:
        raise ConfigError(
            f"{args.file}: holds rows of {iso(outside[0])[:10]}, outside the range "
            f"{iso(start)} .. {iso(end)}"
        )
    return start, end


def _refuse(app: str, hit: list[WindowRecord], *, replace: bool) -> None:
    """``ConfigError`` when the windows over the range cannot be replaced (or were not asked to)."""
    busy = [r for r in hit if r.state is S.SPLIT or r.replaces is not None]
    if busy:
        names = ", ".join(f"{r.id} {r.window.label}" for r in busy)
        raise ConfigError(
            f"convert: a re-pull of {app} over this range is under way (windows {names}); "
            "let `backfill run` finish it first"
        )
    holding = [r for r in hit if r.committed_attempt is not None]
    if holding and not replace:
        lines = "\n".join(
            f"  window {r.id} {r.window.label} ({r.rows or 0:,} rows)" for r in holding
        )
        raise ConfigError(
            f"convert: the range overlaps committed windows of {app}:\n{lines}\n"
            "  give --replace to replace them by range (their parts outside the file are "
            "planned again for the next run), or --start/--end that avoid them"
        )


async def _land(
    ledger: Ledger, store: LocalStore, app: str, start: int, end: int, source: Path
) -> WindowRecord:
    """Plan ``[start, end)`` as one window and land ``source`` by the engine's commit protocol."""
    size = -(-(end - start) // DAY_MS) * DAY_MS + DAY_MS  # one window, whatever the range
    (record,) = await ledger.add_windows(app, start, end, size_ms=size, tz=dt.UTC)
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED):
        record = await ledger.advance(record, state)
    return await commit.land(ledger, store, record, source)


async def _replace(
    ledger: Ledger,
    store: LocalStore,
    app: str,
    start: int,
    end: int,
    hit: list[WindowRecord],
    source: Path,
) -> WindowRecord:
    """Replace the windows ``hit`` over ``[start, end)`` by ``source``, by range (see above)."""
    pending = []
    for record in hit:
        if record.state is not S.PENDING:  # its files (if any) stay live while PENDING
            record = await ledger.retry(
                record, error_class=None, error_message="replaced by a converted file"
            )
        pending.append(record)
    # The run lock is held: no other writer can take this id before the swap inserts it.
    window_id = await ledger.next_id()
    manifest = await anyio.to_thread.run_sync(
        lambda: store.stage(
            app=app, window_id=window_id, attempt=0, start_ms=start, end_ms=end, source=source
        )
    )
    path = await anyio.to_thread.run_sync(store.publish, manifest)
    outside = [
        (Window(app=app, start=a, end=b), r.id)
        for r in pending
        for a, b in ((r.window.start, start), (end, r.window.end))
        if a < b
    ]
    new = Window(app=app, start=start, end=end)
    await ledger.replace_range(
        pending, outside, new, window_id=window_id, rows=manifest.rows, size=manifest.size,
        manifest=str(path),
    )  # fmt: skip
    for record in hit:  # only now: the converted window is the live one
        if record.committed_attempt is not None:
            old = await anyio.to_thread.run_sync(
                store.load, app, record.id, record.committed_attempt
            )
            if old is not None:
                await anyio.to_thread.run_sync(store.remove, old)
    return await ledger.get(window_id)
