"""The ``backfill`` argument parser, built from a table of commands.

``COMMANDS`` holds one frozen ``Command`` per subcommand: its name, help texts, example, the
shared option groups it takes (``GROUPS``) and its own arguments.  ``build()`` is one loop over
that table; the order of the table is the order of ``backfill --help``, and within a command the
groups come first, in the order given, then its own arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backfill import __version__
from backfill.cli.exits import EXIT_CODES

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["COMMANDS", "GROUPS", "Arg", "Command", "Group", "build"]


def _iso_instant(text: str) -> int:
    """``2026-01-01`` or ``2026-01-01T06:00[+02:00]`` as epoch ms; UTC unless a zone is given."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date or datetime (e.g. 2026-01-31)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Arg:
    """One ``add_argument`` call: its flags (or positional name) and its keyword options."""

    flags: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


def _arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags=flags, options=options)


class Group(StrEnum):
    """The option groups commands share."""

    BASE = "base"  # --config, --log-format, --quiet
    APPS = "apps"  # --app
    SPAN = "span"  # --start, --end
    TUNING = "tuning"  # --format, --max-in-flight
    JSON = "json"  # --json
    MONITOR = "monitor"  # --summary-json, --metrics-file


_LOG_FORMATS = ["auto", "console", "json"]

GROUPS: dict[Group, tuple[Arg, ...]] = {
    Group.BASE: (
        _arg(
            "--config",
            type=Path,
            help="the TOML config (default: $BACKFILL_CONFIG, else config/backfill.toml)",
        ),
        _arg(
            "--log-format",
            choices=_LOG_FORMATS,
            default="auto",
            help="log lines for people (console) or machines (json); auto: console on a terminal",
        ),
        _arg("--quiet", action="store_true", help="only warnings and errors"),
        _arg("--progress-interval", type=float, default=10.0, help=argparse.SUPPRESS),
    ),
    Group.APPS: (
        _arg(
            "--app",
            action="append",
            metavar="NAME",
            help="only this app (repeatable; default: every app)",
        ),
    ),
    Group.SPAN: (
        _arg(
            "--start",
            type=_iso_instant,
            help="ISO date/datetime, inclusive (default: 2 years ago)",
        ),
        _arg(
            "--end",
            type=_iso_instant,
            help="ISO date/datetime, exclusive (default: today less the lag)",
        ),
    ),
    Group.TUNING: (
        _arg("--format", choices=["JSON", "CSV"], help="the download format to ask Flurry for"),
        _arg(
            "--max-in-flight", type=int, metavar="N", help="requests processing at Flurry at once"
        ),
    ),
    Group.JSON: (_arg("--json", action="store_true", help="print JSON instead of a table"),),
    Group.MONITOR: (
        _arg(
            "--summary-json",
            action="store_true",
            help="print the end-of-run record as one JSON object instead of the text summary",
        ),
        _arg(
            "--metrics-file",
            type=Path,
            metavar="PATH",
            help="write the run's Prometheus metrics here, for node-exporter's textfile "
            "collector (default: [output].metrics_file, else none)",
        ),
    ),
}


def _seconds(text: str) -> float:
    """``--wait``'s value: seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 3600)")
    return value


# Queue behind a run holding the ledger (exit 6 without it); bare: as long as it takes.
_WAIT = _arg(
    "--wait",
    nargs="?",
    const=math.inf,
    type=_seconds,
    metavar="SECONDS",
    help="if another run holds the ledger, wait for it (at most SECONDS; default: as long as it "
    "takes) instead of exiting 6",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One subcommand as ``--help`` shows it: texts, shared groups, its own arguments."""

    name: str
    summary: str  # the one line in ``backfill --help``
    description: str
    example: str
    groups: tuple[Group, ...] = ()
    args: tuple[Arg, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command(
        name="plan",
        summary="show the windows a run would request (dry run, no API call)",
        description="Show, per app, the windows of the range with their ledger state (NEW when "
        "not yet planned), and how many requests a run would submit.  Changes nothing.",
        example="backfill plan --start 2026-01-01 --end 2026-02-01 --json\n"
        "  backfill plan --refresh --app puzzle-quest --damaged",
        groups=(Group.BASE, Group.APPS, Group.SPAN, Group.JSON),
        args=(
            _arg(
                "--refresh",
                action="store_true",
                help="show what `backfill refresh` would pull again (one --app; COMMITTED "
                "windows show as REFRESH); with --start/--end, only windows overlapping them",
            ),
            _arg(
                "--damaged",
                action="store_true",
                help="with --refresh: only the windows `verify` finds damaged",
            ),
        ),
    ),
    Command(
        name="run",
        summary="historical backfill over --start/--end (default: the whole horizon)",
        description="Plan the range into windows of at most 30 days, then submit, poll, split, "
        "download and commit them.  Safe to interrupt and run again: committed windows are "
        "kept, requests still processing at Flurry are picked up again, nothing is duplicated.",
        example="backfill run --start 2025-01-01 --end 2026-01-01 --app puzzle-quest",
        groups=(Group.BASE, Group.APPS, Group.SPAN, Group.TUNING, Group.MONITOR),
        args=(_WAIT,),
    ),
    Command(
        name="sync",
        summary="nightly pull: late data before each app's newest rows, and every gap",
        description="For each app, pull the last [windows].lookback_days before its newest "
        "committed rows again (late data; the old files stay live until the new rows replace "
        "them), whatever failed elsewhere, then every day up to today less the lag that no "
        "window covers yet.  Run it from cron or a systemd timer.",
        example="backfill sync --config /etc/backfill.toml",
        groups=(Group.BASE, Group.APPS, Group.TUNING, Group.MONITOR),
        args=(_WAIT,),
    ),
    Command(
        name="retry",
        summary="run the FAILED windows again",
        description="Send every FAILED window (of the chosen apps) back to the queue and run them.",
        example="backfill retry --app puzzle-quest",
        groups=(Group.BASE, Group.APPS, Group.TUNING, Group.MONITOR),
        args=(_WAIT,),
    ),
    Command(
        name="refresh",
        summary="pull committed windows of one app again, with the config's settings",
        description="Pull the committed windows of --app again (all of them, those overlapping "
        "--start/--end, or with --damaged exactly those `verify` finds damaged) with the "
        "settings of the config, replacing their files by range: the old files stay visible "
        "until the new rows of the range are committed.  Use it when Flurry reprocessed data, "
        "when you changed api_key, app_versions or event_ids (run and sync refuse until then), "
        "or to repair what `verify` reports.  Once every window of the app is pulled with the "
        "new settings, they are recorded.  `backfill plan --refresh --app NAME` shows what it "
        "would do.",
        example="backfill refresh --app puzzle-quest --start 2025-06-01 --end 2025-07-01",
        groups=(Group.BASE, Group.SPAN, Group.TUNING, Group.MONITOR),
        args=(
            _arg("--app", required=True, metavar="NAME", help="the app to pull again"),
            _arg(
                "--damaged",
                action="store_true",
                help="only the windows whose files `verify` finds missing, changed or truncated",
            ),
            _arg(
                "--accept-shrink",
                action="store_true",
                help="accept a re-pull with far fewer rows than the files it replaces",
            ),
            _WAIT,
        ),
    ),
    Command(
        name="forget",
        summary="remove an app's output and ledger rows (a retired or mistaken app)",
        description="Remove everything of --app under the output root (events/app=NAME/, its "
        "manifests, downloads, staging and rejects) and its rows in the ledger (windows, "
        "learned size, recorded settings).  The app need not be in the config any more.  "
        "Without --yes, say what would be deleted and exit 2.",
        example="backfill forget --app old-name --yes",
        groups=(Group.BASE,),
        args=(
            _arg("--app", required=True, metavar="NAME", help="the app to forget"),
            _arg("--yes", action="store_true", help="really delete (default: only show)"),
        ),
    ),
    Command(
        name="check",
        summary="check the config, the output root, the ledger and the token (one cheap call)",
        description="Check, one line each: the config parses; the output root and the ledger's "
        "folder are writable; the ledger opens (and is migrated); the API answers and accepts "
        "the token, asked for the status of a request that cannot exist (it starts no report). "
        "run, sync, retry and refresh make the same call first: an unreachable API or a refused "
        "token ends them before anything is submitted.  Exit codes: 0 all ok, 2 config or root, "
        "3 token refused, 5 ledger, 75 API unreachable.",
        example="backfill check --config /etc/backfill.toml",
        groups=(Group.BASE,),
    ),
    Command(
        name="status",
        summary="coverage per app: a calendar of the days with rows, gaps, failures",
        description="Per app: windows committed/failed/pending/split, rows and bytes landed, "
        "how many days of the planned span (first planned day to last) have committed rows, "
        "a calendar of those days (one row per month, one character per UTC day: # committed, "
        "x failed, . pending or in flight, - never asked), the gaps (days without rows) and "
        "each FAILED window with its last error.  Lists show their first 10 entries and how "
        "many more; --all shows every one.  Reads only the ledger: `backfill verify` checks "
        "the files.",
        example="backfill status --app puzzle-quest\n  backfill status --check --json",
        groups=(Group.BASE, Group.APPS, Group.JSON),
        args=(
            _arg("--all", action="store_true", help="list every gap and failure"),
            _arg(
                "--check",
                action="store_true",
                help="exit 4 if a FAILED window needs a person (not retryable, or failed "
                "[windows].heal_runs times, so no run or sync takes it back); 0 otherwise",
            ),
        ),
    ),
    Command(
        name="verify",
        summary="check the output against the manifests and the ledger",
        description="Check every committed window's files against its manifest (present, size, "
        "sha256, row count), that no file outside a committed attempt is visible, and that "
        "windows do not overlap.  Exit 5 and name each problem if anything is wrong.",
        example="backfill verify",
        groups=(Group.BASE,),
    ),
    Command(
        name="convert",
        summary="convert a file downloaded by hand into the Parquet layout",
        description="Convert one raw-data file that you downloaded yourself (JSON or CSV; gzip, "
        "zip or plain, read from the content) into events/app=NAME/dt=YYYY-MM-DD/"
        "*.parquet under --out, with a manifest.  Into a managed root (one with a ledger, "
        "or --config given) it takes the run lock and records the file in the ledger as a "
        "COMMITTED window of the app over --start/--end (default: the whole UTC days its "
        "rows span), so runs keep it; it refuses to overlap committed windows unless "
        "--replace, which replaces them by range (their parts outside the file are planned "
        "again).  Into a plain folder, converting the same file again replaces its output.",
        example="backfill convert ~/Downloads/rawdata.csv.gz --app puzzle-quest --out data/flurry",
        args=(
            _arg("file", type=Path, help="the downloaded file"),
            _arg("--app", required=True, help="the app name: the partition value app=NAME"),
            _arg("--out", type=Path, help="the output root (default: the config's)"),
            _arg("--config", type=Path, help="the TOML config whose root and ledger to use"),
            _arg("--start", type=_iso_instant, help="the range the file holds, inclusive"),
            _arg("--end", type=_iso_instant, help="the range the file holds, exclusive"),
            _arg(
                "--replace",
                action="store_true",
                help="replace committed windows the range overlaps (managed roots)",
            ),
            _arg(
                "--on-bad-rows",
                choices=["fail", "quarantine"],
                help="fail on the first row that breaks the schema (default), or set such rows "
                "aside in OUT/_rejects/",
            ),
            _WAIT,
        ),
    ),
    Command(
        name="simulate",
        summary="serve the built-in Flurry API simulator",
        description="Serve the built-in Flurry Data Download API simulator on loopback, "
        "configured by the [simulator] table of a config file (default: the demo's).",
        example="backfill simulate --port 8080  # token: [simulator].token of config/demo.toml",
        args=(
            _arg(
                "--config",
                type=Path,
                help="TOML file with a [simulator] table (default: the demo's)",
            ),
            _arg("--host", default="127.0.0.1", help="address to bind (default: %(default)s)"),
            _arg(
                "--port",
                type=int,
                default=8080,
                help="port, 0 for any free one (default: %(default)s)",
            ),
            _arg("--log-file", type=Path, help="append every API call as a JSON line here"),
        ),
    ),
    Command(
        name="demo",
        summary="simulator + two-year backfill + status, in one command",
        description="Start the simulator in-process on a free port, backfill two years of the "
        "three demo apps into data/demo/, print their status and a DuckDB query to try.",
        example="backfill demo",
        args=(
            _arg("--config", type=Path, help="the demo config (default: the one shipped)"),
            _arg("--log-format", choices=_LOG_FORMATS, default="auto", help=argparse.SUPPRESS),
            _arg("--quiet", action="store_true", help="only the final status"),
        ),
    ),
)


def build() -> argparse.ArgumentParser:
    """The parser of ``backfill``: one subparser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="backfill",
        description="Pull raw analytics data out of Flurry's Data Download API into "
        "hive-partitioned Parquet, resumably: a ledger records every window, so a run can be "
        "killed at any moment and started again with nothing lost and nothing duplicated.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"backfill {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            epilog=f"example:\n  {command.example}\n\n{EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for arg in [a for g in command.groups for a in GROUPS[g]] + list(command.args):
            sub.add_argument(*arg.flags, **arg.options)
    return parser
