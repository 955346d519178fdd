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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    from backfill.simulator import SimulatorConfigError

    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_COMMANDS[args.command](args))
    except (SimulatorConfigError, OSError) as exc:
        print(f"backfill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


_COMMANDS = {"simulate": _simulate}

if __name__ == "__main__":
    sys.exit(main())
