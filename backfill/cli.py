"""The ``backfill`` command line: argument parsing, the token, signals, summaries, exit codes.

This is the edge: the only module that reads ``os.environ`` (the config path and the token
variable) and builds sessions, connections and paths for the engine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from backfill import __version__, config, logs
from backfill.errors import AuthError, BackfillError, ConfigError, IntegrityError, first_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from backfill.config import AppSettings, Settings
    from backfill.engine import Engine, Summary
    from backfill.ledger import Ledger

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
  {EXIT_FAILED_WINDOWS}    finished, but some windows FAILED (`backfill status`; `backfill retry`)
  {EXIT_INTEGRITY}    ledger or integrity problem (see `backfill verify`)
  {EXIT_TRANSIENT}   transient failures exhausted; safe to re-run
  {EXIT_INTERRUPTED}  interrupted after a clean drain; run again to resume
"""
DEFAULT_CONFIG = Path("config/backfill.toml")


def demo_config() -> Path:
    """The demo's config file, shipped inside the package (``config/demo.toml`` links to it)."""
    return Path(str(resources.files("backfill.simulator").joinpath("demo.toml")))


# -- arguments -----------------------------------------------------------------------------


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


def _command(
    commands: Any,
    name: str,
    summary: str,
    description: str,
    example: str,
    common: list[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    return commands.add_parser(  # type: ignore[no-any-return]
        name,
        help=summary,
        description=description,
        epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=common,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backfill",
        description="Pull raw analytics data out of Flurry's Data Download API into "
        "hive-partitioned Parquet, resumably: a ledger records every window, so a run can be "
        "killed at any moment and started again with nothing lost and nothing duplicated.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"backfill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    base = argparse.ArgumentParser(add_help=False)
    base.add_argument(
        "--config",
        type=Path,
        help="the TOML config (default: $BACKFILL_CONFIG, else config/backfill.toml)",
    )
    base.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        default="auto",
        help="log lines for people (console) or machines (json); auto: console on a terminal",
    )
    base.add_argument("--quiet", action="store_true", help="only warnings and errors")
    base.add_argument("--progress-interval", type=float, default=10.0, help=argparse.SUPPRESS)
    apps = argparse.ArgumentParser(add_help=False)
    apps.add_argument(
        "--app",
        action="append",
        metavar="NAME",
        help="only this app (repeatable; default: every app)",
    )
    span = argparse.ArgumentParser(add_help=False)
    span.add_argument(
        "--start", type=_iso_instant, help="ISO date/datetime, inclusive (default: 2 years ago)"
    )
    span.add_argument(
        "--end",
        type=_iso_instant,
        help="ISO date/datetime, exclusive (default: today less the lag)",
    )
    tuning = argparse.ArgumentParser(add_help=False)
    tuning.add_argument(
        "--format", choices=["JSON", "CSV"], help="the download format to ask Flurry for"
    )
    tuning.add_argument(
        "--max-in-flight", type=int, metavar="N", help="requests processing at Flurry at once"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    _command(
        commands,
        "plan",
        "show the windows a run would request (dry run, no API call)",
        "Show, per app, the windows of the range with their ledger state (NEW when not yet "
        "planned), and how many requests a run would submit.  Changes nothing.",
        "backfill plan --start 2026-01-01 --end 2026-02-01 --json",
        [base, apps, span, as_json],
    )
    _command(
        commands,
        "run",
        "historical backfill over --start/--end (default: the whole horizon)",
        "Plan the range into windows of at most 30 days, then submit, poll, split, download "
        "and commit them.  Safe to interrupt and run again: committed windows are kept, "
        "requests still processing at Flurry are picked up again, nothing is duplicated.",
        "backfill run --start 2025-01-01 --end 2026-01-01 --app puzzle-quest",
        [base, apps, span, tuning],
    )
    _command(
        commands,
        "sync",
        "nightly incremental pull from each app's watermark",
        "Pull each app from the end of its contiguous committed history (less "
        "[windows].lookback_days, re-pulled for late data) up to today less the lag.  Run it "
        "from cron or a systemd timer.",
        "backfill sync --config /etc/backfill.toml",
        [base, apps, tuning],
    )
    _command(
        commands,
        "retry",
        "run the FAILED windows again",
        "Send every FAILED window (of the chosen apps) back to the queue and run them.",
        "backfill retry --app puzzle-quest",
        [base, apps, tuning],
    )
    status = _command(
        commands,
        "status",
        "coverage per app: windows, rows, bytes, gaps, failures",
        "Per app: windows committed/failed/pending/split, rows and bytes landed, "
        "the first and last day covered, the gaps, and each failed window's last error.",
        "backfill status --json",
        [base, apps, as_json],
    )
    del status
    _command(
        commands,
        "verify",
        "check the output against the manifests and the ledger",
        "Check every committed window's files against its manifest (present, size, sha256, "
        "row count), that no file outside a committed attempt is visible, and that windows do "
        "not overlap.  Exit 5 and name each problem if anything is wrong.",
        "backfill verify",
        [base],
    )

    convert = _command(
        commands,
        "convert",
        "convert a file downloaded by hand into the Parquet layout",
        "Convert one raw-data file that you downloaded yourself (JSON or CSV; gzip, "
        "zip or plain, read from the content) into events/app=NAME/dt=YYYY-MM-DD/"
        "*.parquet under --out, with a manifest.  Converting the same file again "
        "replaces its earlier output.",
        "backfill convert ~/Downloads/rawdata.csv.gz --app puzzle-quest --out data/flurry",
        [],
    )
    convert.add_argument("file", type=Path, help="the downloaded file")
    convert.add_argument("--app", required=True, help="the app name: the partition value app=NAME")
    convert.add_argument("--out", type=Path, required=True, help="the output root")
    convert.add_argument(
        "--on-bad-rows",
        choices=["fail", "quarantine"],
        default="fail",
        help="fail on the first row that breaks the schema (default), or set such rows "
        "aside in OUT/_rejects/",
    )

    simulate = _command(
        commands,
        "simulate",
        "serve the built-in Flurry API simulator",
        "Serve the built-in Flurry Data Download API simulator on loopback, configured "
        "by the [simulator] table of a config file (default: the demo's).",
        "backfill simulate --port 8080  # token: [simulator].token of config/demo.toml",
        [],
    )
    simulate.add_argument(
        "--config", type=Path, help="TOML file with a [simulator] table (default: the demo's)"
    )
    simulate.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    simulate.add_argument(
        "--port", type=int, default=8080, help="port, 0 for any free one (default: %(default)s)"
    )
    simulate.add_argument("--log-file", type=Path, help="append every API call as a JSON line here")

    demo = _command(
        commands,
        "demo",
        "simulator + two-year backfill + status, in one command",
        "Start the simulator in-process on a free port, backfill two years of the three "
        "demo apps into data/demo/, print their status and a DuckDB query to try.",
        "backfill demo",
        [],
    )
    demo.add_argument("--config", type=Path, help="the demo config (default: the one shipped)")
    demo.add_argument(
        "--log-format", choices=["auto", "console", "json"], default="auto", help=argparse.SUPPRESS
    )
    demo.add_argument("--quiet", action="store_true", help="only the final status")
    return parser


# -- set-up shared by the commands that touch the ledger ------------------------------------


def _load(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    path = args.config or Path(env.get("BACKFILL_CONFIG") or DEFAULT_CONFIG)
    settings = config.load(path)
    changes: dict[str, Any] = {}
    if getattr(args, "format", None):
        changes["format"] = args.format
    if getattr(args, "max_in_flight", None) is not None:
        if args.max_in_flight < 1:
            raise ConfigError(f"--max-in-flight {args.max_in_flight}: expected at least 1")
        changes["max_in_flight"] = args.max_in_flight
    if changes:
        settings = config.replace_api(settings, **changes)
    for warning in settings.warnings:
        print(f"backfill: warning: {warning}", file=sys.stderr)
    return settings


def _chosen(settings: Settings, names: list[str] | None) -> list[AppSettings]:
    if not names:
        return list(settings.apps)
    known = [a.name for a in settings.apps]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--app {name!r}: not an app of {settings.source} (apps: {', '.join(known)})"
            )
    return [a for a in settings.apps if a.name in names]


@contextlib.contextmanager
def _exclusive(settings: Settings) -> Any:
    """One run per ledger: a second one refuses clearly instead of sharing windows."""
    path = settings.ledger_path.with_name(settings.ledger_path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise IntegrityError(
                f"{settings.ledger_path}: another backfill run (pid {holder}) is using this "
                "ledger; wait for it or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.asynccontextmanager
async def _ledger(settings: Settings) -> AsyncIterator[Ledger]:
    from backfill.ledger import Ledger

    ledger = await Ledger.open(settings.ledger_path)
    try:
        yield ledger
    finally:
        await ledger.close()


async def _drive(
    settings: Settings,
    token: str,
    apps: list[AppSettings],
    prepare: Callable[[Engine], Awaitable[tuple[int | None, int | None]]],
    quiet: bool,
    interval: float = 10.0,
) -> int:
    """Open everything, run ``prepare`` (planning), run the engine under signals, summarise."""
    from backfill.audit import outcome_of_range
    from backfill.client import FlurryClient, Secret, Timeouts
    from backfill.engine import Engine
    from backfill.writer import Writer

    config.check_writable(settings)
    timeouts = Timeouts(
        connect_s=settings.api.connect_timeout_s, read_s=settings.api.read_timeout_s
    )
    with _exclusive(settings):
        async with (
            _ledger(settings) as ledger,
            FlurryClient(
                base_url=settings.api.base_url, token=Secret(token), timeouts=timeouts
            ) as api,
        ):
            writer = Writer(settings.output.root, on_bad_rows=settings.output.on_bad_rows)  # type: ignore[arg-type]
            engine = Engine(settings=settings, ledger=ledger, writer=writer, api=api)
            start, end = await prepare(engine)
            summary = await _run_with_signals(engine, apps, quiet, interval)
            if summary.fatal is None and not summary.interrupted:
                standing = await outcome_of_range(ledger, [a.name for a in apps], start, end)
                summary.exit_code = {
                    "done": EXIT_OK,
                    "failed": EXIT_FAILED_WINDOWS,
                    "retryable": EXIT_TRANSIENT,
                    "unfinished": EXIT_TRANSIENT,
                }[standing]
            _print_summary(summary)
            return summary.exit_code


async def _progress(engine: Engine, interval: float) -> None:
    """A live table on a terminal; elsewhere a ``run.progress`` log line every ``interval`` s."""
    began = time.monotonic()
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(stderr=True), refresh_per_second=2) as live:
            while True:
                live.update(_progress_table(engine, time.monotonic() - began))
                await anyio.sleep(0.5)
    log = logs.get("cli")
    while True:
        await anyio.sleep(interval)
        apps = {name: f"{t.committed}/{t.planned}" for name, t in sorted(engine.tallies.items())}
        totals = engine.totals()
        log.info(
            "run.progress",
            windows=apps,
            failed=totals.failed,
            rows=totals.rows,
            bytes=totals.bytes,
            processing=engine.processing,
            eta_s=_eta(time.monotonic() - began, totals.committed + totals.failed, totals.planned),
        )


def _eta(elapsed: float, done: int, total: int) -> int | None:
    return round(elapsed / done * (total - done)) if done else None


def _progress_table(engine: Engine, elapsed: float) -> Any:
    from rich.table import Table

    table = Table(
        title=f"backfill: {engine.processing} requests processing at Flurry", title_justify="left"
    )
    for column in ("app", "windows", "failed", "rows", "bytes", "eta"):
        table.add_column(column, justify="left" if column == "app" else "right")
    for name, t in sorted(engine.tallies.items()):
        eta = _eta(elapsed, t.committed + t.failed, t.planned)
        table.add_row(
            name,
            f"{t.committed}/{t.planned}",
            str(t.failed),
            f"{t.rows:,}",
            f"{t.bytes:,}",
            "-" if eta is None else f"{eta} s",
        )
    return table


async def _run_with_signals(
    engine: Engine, apps: list[AppSettings], quiet: bool, interval: float = 10.0
) -> Summary:
    """Run the engine; the first SIGINT/SIGTERM drains gently, the second stops at once."""
    log = logs.get("cli")
    result: list[Summary] = []

    async def watch(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if not engine.stopping:
                    log.warning(
                        "run.stop.requested",
                        signal=signal.Signals(signum).name,
                        hint="finishing conversions; a second signal stops at once",
                    )
                    engine.stop()
                else:
                    log.warning("run.stop.now", signal=signal.Signals(signum).name)
                    scope.cancel()

    async def progress() -> None:
        await _progress(engine, interval)

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        if not quiet:
            group.start_soon(progress)
        try:
            result.append(await engine.run(apps))
        finally:
            group.cancel_scope.cancel()
    summary = result[0] if result else engine.summary
    if engine.stopping or not result:
        summary.interrupted = True
        summary.exit_code = EXIT_INTERRUPTED
    return summary


def _print_summary(summary: Summary) -> None:
    calls = ", ".join(f"{k} {v}" for k, v in summary.calls.items() if v)
    print(f"windows: {summary.committed} committed, {summary.split} split, {summary.failed} failed")
    print(f"landed:  {summary.rows:,} rows, {summary.bytes:,} bytes of Parquet")
    print(f"API:     {calls or 'no calls'}")
    print(f"time:    {summary.wall_s:.1f} s")
    for app, window, reason in summary.failures[:10]:
        print(f"failed:  {app} {window}: {reason}")
    if summary.interrupted:
        print(
            "interrupted: every request id is in the ledger; run the same command again to resume"
        )


# -- the commands ---------------------------------------------------------------------------


def _prologue(
    args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[Settings, list[AppSettings], str]:
    """The config, the chosen apps and the token (registered for redaction) of a command."""
    settings = _load(args, env)
    apps = _chosen(settings, args.app)
    token = config.read_token(settings, env)
    logs.register_secret(token)
    return settings, apps, token


async def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings, apps, token = _prologue(args, env)
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise ConfigError(
            f"--end must be after --start (got {_day(args.start)} .. {_day(args.end)})"
        )

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        start, end, notes = engine.clamp(args.start, args.end)
        for note in notes:
            print(f"backfill: warning: {note}", file=sys.stderr)
        await engine.plan(apps, start, end)
        return start, end

    return await _drive(settings, token, apps, prepare, args.quiet, args.progress_interval)


async def _sync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings, apps, token = _prologue(args, env)

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        for app in apps:
            start, end = await engine.sync_range(app)
            mark = await engine.ledger.watermark(app.name)
            if mark is not None and start < mark:
                await engine.requeue_committed(app, start, mark)
            await engine.plan([app], start, end)
        return None, None

    return await _drive(settings, token, apps, prepare, args.quiet, args.progress_interval)


async def _retry(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings, apps, token = _prologue(args, env)

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        count = await engine.requeue_failed(apps)
        print(f"retrying {count} failed window{'s' * (count != 1)}")
        return None, None

    return await _drive(settings, token, apps, prepare, args.quiet, args.progress_interval)


def _day(ms: int) -> str:
    from backfill.models import iso

    return iso(ms)


async def _plan(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import zoneinfo

    from backfill import planner
    from backfill.models import iso

    settings = _load(args, env)
    apps = _chosen(settings, args.app)
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise ConfigError(
            f"--end must be after --start (got {_day(args.start)} .. {_day(args.end)})"
        )
    tz = zoneinfo.ZoneInfo(settings.windows.timezone)
    w = settings.windows
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    start, end, _ = planner.clamp(
        now, args.start, args.end, history_days=w.history_days, lag_hours=w.lag_hours, tz=tz
    )
    rows: list[dict[str, str]] = []
    exists = settings.ledger_path.exists()
    async with contextlib.AsyncExitStack() as stack:
        ledger = await stack.enter_async_context(_ledger(settings)) if exists else None
        for app in apps:
            records = await ledger.windows(apps=[app.name]) if ledger else []
            live = [
                r
                for r in records
                if r.state.value != "SPLIT" and r.window.end > start and r.window.start < end
            ]
            learned = await ledger.learned_size(app.name) if ledger else None
            size = planner.planned_size(w.max_days, learned)
            items = [(r.window.start, r.window.end, r.state.value) for r in live]
            for lo, hi in planner.gaps([(r.window.start, r.window.end) for r in live], start, end):
                items += [
                    (x.start, x.end, "NEW")
                    for x in planner.plan(app.name, lo, hi, size_ms=size, tz=tz)
                ]
            rows += [
                {"app": app.name, "start": iso(a), "end": iso(b), "state": st}
                for a, b, st in sorted(items)
            ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'app':20} {'start':22} {'end':22} state")
    for row in rows:
        print(f"{row['app']:20} {row['start']:22} {row['end']:22} {row['state']}")
    todo = sum(1 for r in rows if r["state"] not in ("COMMITTED",))
    done = sum(1 for r in rows if r["state"] == "COMMITTED")
    print(
        f"\n{len(rows)} windows: {done} already committed; "
        f"a run would submit at least {todo} requests"
    )
    return EXIT_OK


async def _status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from backfill import audit

    settings = _load(args, env)
    apps = _chosen(settings, args.app)
    if not settings.ledger_path.exists():
        report: list[audit.AppStatus] = []
    else:
        async with _ledger(settings) as ledger:
            report = await audit.status(ledger, [a.name for a in apps])
    if args.json:
        print(json.dumps([r.to_json() for r in report], indent=1))
        return EXIT_OK
    _print_status(report)
    return EXIT_OK


def _print_status(report: list[Any]) -> None:
    if not report:
        print("nothing in the ledger yet: run `backfill run` first")
        return
    print(
        f"{'app':18} {'committed':>9} {'failed':>6} {'pending':>7} {'split':>5} "
        f"{'rows':>12} {'bytes':>14}  days covered"
    )
    for r in report:
        span = f"{r.first_day} .. {r.last_day}" if r.first_day else "-"
        print(
            f"{r.app:18} {r.committed:>9} {r.failed:>6} {r.pending:>7} {r.split:>5} "
            f"{r.rows:>12,} {r.bytes:>14,}  {span}"
        )
        for a, b in r.gaps[:5]:
            print(f"{'':18} gap: {a} .. {b}")
        for window, error in r.errors[:5]:
            print(f"{'':18} failed {window}: {error}")


async def _verify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from backfill import audit
    from backfill.writer import Writer

    settings = _load(args, env)
    if not settings.ledger_path.exists():
        raise IntegrityError(f"{settings.ledger_path}: no ledger to verify against")
    async with _ledger(settings) as ledger:
        problems = await audit.verify(ledger, Writer(settings.output.root))
        committed = len(await ledger.windows(states=["COMMITTED"]))  # type: ignore[list-item]
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"{len(problems)} problem{'s' * (len(problems) != 1)} found", file=sys.stderr)
        return EXIT_INTEGRITY
    print(f"verified {committed} committed windows: every file matches its manifest, no orphan")
    return EXIT_OK


async def _simulate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from backfill import simulator

    path = args.config or demo_config()
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


async def _demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from backfill import audit, simulator

    path = args.config or demo_config()
    settings = config.load(path)
    sim = simulator.load(path)
    apps = list(settings.apps)
    assert settings.api.token_env is not None
    async with simulator.serve(sim) as (_, base_url):
        settings = config.replace_api(settings, base_url=base_url)
        print(
            f"demo: simulator on {base_url}; backfilling two years of {len(apps)} apps "
            f"into {settings.output.root}/",
            flush=True,
        )

        async def prepare(engine: Engine) -> tuple[int | None, int | None]:
            start, end, _ = engine.clamp(None, None)
            await engine.plan(apps, start, end)
            return start, end

        code = await _drive(settings, sim.token, apps, prepare, args.quiet)
    async with _ledger(settings) as ledger:
        _print_status(await audit.status(ledger, [a.name for a in apps]))
    glob = f"{settings.output.root}/events/*/*/*.parquet"
    print("\nquery it with DuckDB (pip's duckdb is in .venv):")
    query = (
        "SELECT app, count(*) AS events, count(DISTINCT dt) AS days, "
        "max(eventParameters['level_id']) AS some_level "
        f"FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY app"
    )
    print(f'  .venv/bin/python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"')
    return code


_COMMANDS: dict[str, Callable[[argparse.Namespace, Mapping[str, str]], Awaitable[int]]] = {
    "plan": _plan,
    "run": _run,
    "sync": _sync,
    "retry": _retry,
    "status": _status,
    "verify": _verify,
    "simulate": _simulate,
    "demo": _demo,
}


async def _convert(args: argparse.Namespace, env: Mapping[str, str]) -> int:
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
        manifest = writer.stage(
            app=args.app,
            window_id=window_id,
            attempt=attempt,
            start_ms=0,
            end_ms=0,
            source=args.file,
        )
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


_COMMANDS["convert"] = _convert


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    from backfill import crashpoints
    from backfill.simulator import SimulatorConfigError

    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    log_format: Any = getattr(args, "log_format", "auto")
    # On a terminal the live progress table says what info lines would; keep the screen clean.
    live = (
        log_format == "auto"
        and sys.stderr.isatty()
        and args.command in ("run", "sync", "retry", "demo")
    )
    logs.configure(fmt=log_format, level="warning" if quiet or live else "info")
    crashpoints.arm(env.get("BACKFILL_CRASH_AT"))  # the crash tests' seam; unset in real use
    if counts := env.get("BACKFILL_CRASH_COUNTS"):  # ... and where the sweep learns the steps
        atexit.register(lambda: Path(counts).write_text(json.dumps(crashpoints.counts())))
    try:
        try:
            return anyio.run(_COMMANDS[args.command], args, env)
        except BaseExceptionGroup as group:  # task groups wrap what ended them
            found = first_of(group)
            if found is None:
                raise
            raise found from None
    except (ConfigError, SimulatorConfigError) as exc:
        print(f"backfill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AuthError as exc:
        print(f"backfill: error: {exc}; check the token ({_token_hint(args)})", file=sys.stderr)
        return EXIT_AUTH
    except IntegrityError as exc:
        print(f"backfill: error: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY
    except BackfillError as exc:
        print(f"backfill: error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _token_hint(args: argparse.Namespace) -> str:
    return "[api].token_env or [api].token_file of the config"


if __name__ == "__main__":
    sys.exit(main())
