"""The commands that stand apart from the ledger: ``convert`` and ``simulate``.

``convert`` lands one hand-downloaded file with the writer the engine uses; ``simulate`` serves
the built-in API simulator.  Neither reads the backfill config nor needs a token.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

import anyio

from backfill.cli import session
from backfill.cli.exits import EXIT_FAILED_WINDOWS, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

    from backfill.store import LocalStore

__all__ = ["convert", "simulate"]


async def convert(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill convert``: one file into the Parquet layout; exit 4 if its data is bad."""
    import anyio.to_thread

    from backfill.errors import BadDataError
    from backfill.store import LocalStore

    if not args.file.is_file():
        print(f"backfill: error: {args.file}: no such file", file=sys.stderr)
        return EXIT_USAGE
    store = LocalStore(args.out, on_bad_rows=args.on_bad_rows)
    try:
        print(await anyio.to_thread.run_sync(_convert, args, store))
    except BadDataError as exc:
        print(f"backfill: error: {args.file}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED_WINDOWS
    return EXIT_OK


def _convert(args: argparse.Namespace, store: LocalStore) -> str:
    """Stage and publish ``args.file`` (in a worker thread); the line that reports it."""
    import hashlib

    digest = hashlib.sha256()
    with args.file.open("rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
    # The same file always lands as the same window; a new attempt replaces the old one.
    window_id = int(digest.hexdigest()[:12], 16)
    earlier = [p for p in store.manifests() if p.name.startswith(f"{window_id}.")]
    attempt = 1 + max((int(p.name.split(".")[1]) for p in earlier), default=-1)
    manifest = store.stage(
        app=args.app,
        window_id=window_id,
        attempt=attempt,
        start_ms=0,
        end_ms=0,
        source=args.file,
    )
    store.publish(manifest)
    for path in earlier:
        store.remove(store.load_manifest(path))
    days = sorted({f.partition for f in manifest.files})
    span = f"{days[0]} .. {days[-1]}" if days else "no rows"
    return (
        f"converted {manifest.rows:,} rows into {len(manifest.files)} files "
        f"({manifest.size:,} bytes, {span}) under {args.out}"
        + (f"; {manifest.rejected:,} rows set aside in _rejects/" if manifest.rejected else "")
    )


async def simulate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill simulate``: serve the simulator on loopback until SIGINT or SIGTERM."""
    from backfill import simulator

    path = args.config or session.demo_config()
    settings = simulator.load(path)
    stopped = anyio.Event()

    async def on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stopped.set()
                return

    async with (
        anyio.create_task_group() as group,
        simulator.serve(settings, host=args.host, port=args.port, log_path=args.log_file) as (
            _,
            base_url,
        ),
    ):
        group.start_soon(on_signal)
        apps = ", ".join(f"{a.name or '?'}={a.api_key}" for a in settings.apps) or "none"
        print(f"Flurry simulator serving {base_url}", flush=True)
        print(f"  token: the [simulator].token of {path}; apps: {apps}", flush=True)
        print("  stop with Ctrl-C", flush=True)
        await stopped.wait()
        group.cancel_scope.cancel()
    return EXIT_OK
