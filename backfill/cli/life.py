"""The commands for the life of an app's data after its backfill: ``refresh`` and ``forget``.

``refresh`` re-pulls committed windows on purpose (Flurry reprocessed data, the filters
changed, ``verify`` found damage): it sends them back to PENDING through the engine, which
replaces their files by range, and records the config's settings once every window of the app
was pulled with them.  ``forget`` removes an app's output and its ledger rows, for an app that
is retired or was added by mistake.  Both hold the run lock.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from backfill.cli import runs, session
from backfill.cli.exits import EXIT_OK, EXIT_USAGE
from backfill.errors import ConfigError
from backfill.models import WindowState

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

    from backfill.config import Settings
    from backfill.layout import Layout
    from backfill.models import WindowRecord
    from backfill.ports import LedgerPort

__all__ = ["app_folders", "forget", "refresh", "refresh_choice"]


async def refresh_choice(
    ledger: LedgerPort,
    settings: Settings,
    app: str,
    start: int | None,
    end: int | None,
    *,
    damaged: bool = False,
) -> list[WindowRecord]:
    """The windows ``refresh`` pulls again: ``app``'s committed ones overlapping the range.

    With ``damaged``, exactly the windows whose live files ``verify`` finds damaged (missing,
    changed, truncated, unreadable), whatever their state.
    """
    records = [
        r
        for r in await ledger.windows(apps=[app])
        if (start is None or r.window.end > start) and (end is None or r.window.start < end)
    ]
    if not damaged:
        return [r for r in records if r.state is WindowState.COMMITTED]
    from backfill import audit
    from backfill.objstore import open_store

    problems = await audit.verify(ledger, open_store(settings))
    broken = {p.window_id for p in problems if p.window_id is not None}
    return [r for r in records if r.id in broken and r.committed_attempt is not None]


async def refresh(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill refresh``: pull committed windows of one app again with the config's settings."""
    from backfill.api_flows import preparing_refresh

    session.check_order(args)
    settings, apps, token = session.prologue(args, env, names=[args.app])
    monitor = runs.Monitor.of(args, settings, info_out=sys.stdout)
    prepare, finished = preparing_refresh(
        settings, apps[0], args.start, args.end,
        damaged=args.damaged, accept_shrink=args.accept_shrink, say=monitor.say,
    )  # fmt: skip
    return await runs.drive(
        settings, token, apps, prepare, args.quiet, args.progress_interval,
        refreshing=apps[0].name, accept_shrink=args.accept_shrink, finished=finished,
        monitor=monitor, wait=args.wait,
    )  # fmt: skip


def app_folders(layout: Layout, app: str) -> list[Path]:
    """Every folder of ``app``'s output under the root (events, manifests, downloads, ...)."""
    from backfill.layout import partition_value

    value = partition_value(app)
    return [
        layout.inside(layout.events / f"app={value}"),
        layout.inside(layout.manifests / value),
        layout.inside(layout.downloads / value),
        layout.inside(layout.staging / value),
        layout.inside(layout.rejects / value),
    ]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _remove(layout: Layout, folder: Path) -> None:
    """Delete ``folder``; a link on the way or inside it is never followed (``remove_tree``)."""
    layout.remove_tree(folder)


async def forget(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill forget``: an app's output and ledger rows removed (with ``--yes``)."""
    from backfill.store import LocalStore

    settings = session.load(args, env)
    name = args.app
    if isinstance(settings.output.root, str):
        raise ConfigError(
            f"forget: output.root = {settings.output.root!r} is an object-store root; forget "
            "works on a local root only (delete the app's objects with the store's own tools)"
        )
    if not settings.ledger_exists():
        raise ConfigError(f"{settings.ledger_shown}: no ledger, nothing to forget")
    with session.exclusive(settings):
        async with session.open_ledger(settings) as ledger:
            records = await ledger.windows(apps=[name])
            known = await ledger.recorded_settings(name) is not None
            layout = LocalStore(Path(settings.output.root)).layout
            folders = [f for f in app_folders(layout, name) if f.exists() or f.is_symlink()]
            if not records and not known and not folders:
                raise ConfigError(f"forget: no app {name!r} in the ledger or under {layout.root}")
            size = sum([await anyio.to_thread.run_sync(_size, f) for f in folders])
            live = [r for r in records if r.committed_attempt is not None]
            rows = sum(r.rows or 0 for r in live)
            what = (
                f"{len(records)} windows ({len(live)} with landed files, {rows:,} rows) and "
                f"{size:,} bytes in {len(folders)} folders"
            )
            if not args.yes:
                print(f"forget {name}: would delete {what}:")
                for folder in folders:
                    print(f"  {folder}")
                print(f"run again with --yes to delete them: backfill forget --app {name} --yes")
                return EXIT_USAGE
            for folder in folders:  # the files first: a kill leaves rows to forget again
                await anyio.to_thread.run_sync(_remove, layout, folder)
            await ledger.forget(name)
    print(f"forgot {name}: removed {what}")
    if any(a.name == name for a in settings.apps):
        print(
            f"note: {name} is still in {settings.source}: the next run pulls it again",
            file=sys.stderr,
        )
    return EXIT_OK
