"""The ``backfill`` command line: argument parsing and exit codes.

Exit codes (DESIGN.md): 0 all requested windows committed; 2 usage or configuration error,
nothing started; 3 authentication refused; 4 finished but some windows FAILED; 5 ledger or
integrity problem; 75 transient failures exhausted, safe to re-run; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from backfill import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["EXIT_CODES", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_FAILED_WINDOWS = 4
EXIT_INTEGRITY = 5
EXIT_TRANSIENT = 75
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""exit codes:
  {EXIT_OK}    all requested windows committed
  {EXIT_USAGE}    usage or configuration error; nothing started
  {EXIT_AUTH}    authentication refused by the API
  {EXIT_FAILED_WINDOWS}    finished, but some windows FAILED (see `backfill status`)
  {EXIT_INTEGRITY}    ledger or integrity problem
  {EXIT_TRANSIENT}   transient failures exhausted; safe to re-run
  {EXIT_INTERRUPTED}  interrupted after a clean drain
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backfill",
        description="Pull raw analytics data out of Flurry's Data Download API into "
        "hive-partitioned Parquet, resumably.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"backfill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = commands.add_parser(
        "simulate",
        help="serve the built-in Flurry API simulator",
        description="Serve the built-in Flurry Data Download API simulator on loopback, "
        "configured by the [simulator] table of a config file.",
        epilog="example:\n  backfill simulate --config config/demo.toml --port 8080\n"
        "  curl -H 'Authorization: Bearer <[simulator].token>' "
        "http://127.0.0.1:8080/pulse/v1/rawData/26\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    simulate.add_argument(
        "--config",
        type=Path,
        default=Path("config/demo.toml"),
        help="TOML file with a [simulator] table (default: %(default)s)",
    )
    simulate.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    simulate.add_argument(
        "--port", type=int, default=8080, help="port, 0 for any free one (default: %(default)s)"
    )
    simulate.add_argument("--log-file", type=Path, help="append every API call as a JSON line here")

    convert = commands.add_parser(
        "convert",
        help="convert a file downloaded by hand into the Parquet layout",
        description="Convert one raw-data file that you downloaded yourself (the portal gives "
        "JSON or CSV, gzip, zip or plain; the format is read from the content) into "
        "events/app=NAME/dt=YYYY-MM-DD/*.parquet under --out, with a manifest.  Converting the "
        "same file again replaces its earlier output.",
        epilog="example:\n  backfill convert ~/Downloads/rawdata.csv.gz --app puzzle-quest "
        "--out data/flurry\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("file", type=Path, help="the downloaded file")
    convert.add_argument("--app", required=True, help="the app name: the partition value app=NAME")
    convert.add_argument("--out", type=Path, required=True, help="the output root")
    convert.add_argument("--on-bad-rows", choices=["fail", "quarantine"], default="fail",
                         help="fail on the first row that breaks the schema (default), or set "
                         "such rows aside in OUT/_rejects/")  # fmt: skip
    return parser


async def _simulate(args: argparse.Namespace) -> int:
    from backfill import simulator

    settings = simulator.load(args.config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with simulator.serve(
        settings, host=args.host, port=args.port, log_path=args.log_file
    ) as (
        _,
        base_url,
    ):
        apps = ", ".join(f"{a.name or '?'}={a.api_key}" for a in settings.apps) or "none"
        print(f"Flurry simulator serving {base_url}", flush=True)
        print(f"  token: the [simulator].token of {args.config}; apps: {apps}", flush=True)
        print("  stop with Ctrl-C", flush=True)
        await stop.wait()
    return EXIT_OK


async def _convert(args: argparse.Namespace) -> int:
    import hashlib

    import anyio.to_thread

    from backfill.errors import BadDataError
    from backfill.writer import Writer

    if not args.file.is_file():
        print(f"backfill: error: {args.file}: no such file", file=sys.stderr)
        return EXIT_USAGE
    writer = Writer(args.out, on_bad_rows=args.on_bad_rows)

    def run() -> str:
        digest = hashlib.sha256()
        with args.file.open("rb") as handle:
            while piece := handle.read(1 << 20):
                digest.update(piece)
        # The same file always lands as the same window; a new attempt replaces the old one.
        window_id = int(digest.hexdigest()[:12], 16)
        earlier = [p for p in writer.manifests() if p.name.startswith(f"{window_id}.")]
        attempt = 1 + max((int(p.name.split(".")[1]) for p in earlier), default=-1)
        manifest = writer.stage(app=args.app, window_id=window_id, attempt=attempt,
                                start_ms=0, end_ms=0, source=args.file)  # fmt: skip
        writer.publish(manifest)
        for path in earlier:
            writer.remove(writer.load_manifest(path))
        days = sorted({f.partition for f in manifest.files})
        span = f"{days[0]} .. {days[-1]}" if days else "no rows"
        return (
            f"converted {manifest.rows:,} rows into {len(manifest.files)} files "
            f"({manifest.size:,} bytes, {span}) under {args.out}"
            + (f"; {manifest.rejected:,} rows set aside in _rejects/" if manifest.rejected else "")
        )

    try:
        print(await anyio.to_thread.run_sync(run))
    except BadDataError as exc:
        print(f"backfill: error: {args.file}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED_WINDOWS
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    from backfill.simulator import SimulatorConfigError

    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_COMMANDS[args.command](args))
    except (SimulatorConfigError, OSError) as exc:
        print(f"backfill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


_COMMANDS = {"simulate": _simulate, "convert": _convert}

if __name__ == "__main__":
    sys.exit(main())
