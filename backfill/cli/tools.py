"""The commands that need no API: ``convert`` and ``simulate``.

``convert`` lands one hand-downloaded file with the store the engine uses (into a managed root
through ``landing``, as a COMMITTED window of the ledger); ``simulate`` serves the built-in API
simulator.  Neither needs a token.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, Literal

import anyio

from backfill.cli import session
from backfill.cli.exits import EXIT_FAILED_WINDOWS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from backfill.errors import ConfigError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping
    from pathlib import Path

    from backfill.store import LocalStore

__all__ = ["convert", "simulate"]


async def convert(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill convert``: one file into the Parquet layout; exit 4 if its data is bad.

    Into a managed root (a ledger there, or ``--config``) the file becomes a COMMITTED window
    (``landing``); into any other folder it lands on its own, as before.
    """
    import anyio.to_thread

    from backfill.cli import landing
    from backfill.errors import BadDataError, Stopped
    from backfill.store import LocalStore

    if not args.file.is_file():
        print(f"backfill: error: {args.file}: no such file", file=sys.stderr)
        return EXIT_USAGE
    root, ledger_path, on_bad_rows = _target(args)
    stop = threading.Event()  # set by Ctrl-C: the conversion gives up within a block's work
    store = LocalStore(root, on_bad_rows=on_bad_rows, stop=stop)
    codes: list[int] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_stop_on_signal, stop)
        try:
            if ledger_path is not None:
                print(await landing.convert(args, store, ledger_path))
            else:
                print(await anyio.to_thread.run_sync(_convert, args, store))
            codes.append(EXIT_OK)
        except BadDataError as exc:
            print(f"backfill: error: {args.file}: {exc.message}", file=sys.stderr)
            codes.append(EXIT_FAILED_WINDOWS)
        except Stopped:
            print(f"backfill: interrupted: nothing of {args.file} was kept", file=sys.stderr)
            codes.append(EXIT_INTERRUPTED)
        finally:
            group.cancel_scope.cancel()
    return codes[0]


async def _stop_on_signal(stop: threading.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


def _target(args: argparse.Namespace) -> tuple[Path, Path | None, Literal["fail", "quarantine"]]:
    """The root, its ledger (None: not a managed root) and what to do with bad rows."""
    from backfill import config

    if args.config is not None:
        settings = config.load(args.config)
        root = settings.output.root
        if isinstance(root, str):
            raise ConfigError(
                f"convert: output.root = {root!r} is an object-store root; convert lands into a "
                "local root only (convert into a local folder with --out, or let `backfill run` "
                "pull the window into the bucket)"
            )
        if args.out is not None and args.out.resolve() != root.resolve():
            raise ConfigError(f"--out {args.out}: not the output root of {args.config} ({root})")
        return root, settings.ledger_path, args.on_bad_rows or settings.output.on_bad_rows
    if args.out is None:
        raise ConfigError("convert: give --out (the output root) or --config")
    ledger = args.out / "_ledger.sqlite"
    if ledger.exists():
        return args.out, ledger, args.on_bad_rows or "fail"
    if args.replace or args.start is not None or args.end is not None:
        raise ConfigError(
            f"--replace, --start and --end need a managed root; {args.out} has no ledger"
        )
    return args.out, None, args.on_bad_rows or "fail"


def _convert(args: argparse.Namespace, store: LocalStore) -> str:
    """Stage and publish ``args.file`` (in a worker thread); the line that reports it."""
    import hashlib

    from backfill.layout import manifest_owner, partition_value

    digest = hashlib.sha256()
    with args.file.open("rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
    # The same file always lands as the same window of its app; a new attempt replaces the old
    # one.  The same file under another app is another window: its files are left alone.
    window_id = int(digest.hexdigest()[:12], 16)
    folder = store.layout.manifests / partition_value(args.app)
    earlier = [
        (owner[1], path)
        for path in (sorted(folder.glob("*.json")) if folder.exists() else [])
        if (owner := manifest_owner(path.name)) is not None and owner[0] == window_id
    ]
    attempt = 1 + max((a for a, _ in earlier), default=-1)
    manifest = store.stage(
        app=args.app,
        window_id=window_id,
        attempt=attempt,
        start_ms=0,
        end_ms=0,
        source=args.file,
    )
    store.publish(manifest)
    for _, path in earlier:
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
