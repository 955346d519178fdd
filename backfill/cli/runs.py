"""The commands that run the engine: ``run``, ``sync``, ``retry`` and ``demo``.

They differ only in how they plan (a ``prepare`` step); ``drive`` does the rest for all of
them: the run lock, the ledger, the API client and the output store, the engine run under
signals with its progress view, the summary, and the exit code from how the requested windows
stand.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio

from backfill import config, logs
from backfill.cli import recorded, session
from backfill.cli.exits import BY_STANDING, EXIT_INTERRUPTED, EXIT_OK
from backfill.cli.inspection import print_status

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Mapping

    from backfill.config import AppSettings, Settings
    from backfill.engine import Engine, Summary
    from backfill.ledger import Ledger

    # Plans the run on the engine; returns the range whose windows decide the exit code
    # (None: every window of the apps).
    _Prepare = Callable[[Engine], Awaitable[tuple[int | None, int | None]]]
    # Runs after a run whose requested windows all committed (``refresh`` records settings).
    _Finished = Callable[[Ledger], Awaitable[None]]

__all__ = ["demo", "drive", "retry", "run", "sync"]


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill run``: plan ``--start``/``--end`` (clamped to the horizon) and run it."""
    settings, apps, token = session.prologue(args, env)
    session.check_order(args)

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        start, end, notes = engine.clamp(args.start, args.end)
        for note in notes:
            print(f"backfill: warning: {note}", file=sys.stderr)
        await engine.plan(apps, start, end)
        _took_back(await engine.requeue_failed(apps, start, end, heal=True))
        return start, end

    return await drive(settings, token, apps, prepare, args.quiet, args.progress_interval)


def _took_back(count: int) -> None:
    if count:
        print(f"taking back {count} failed window{'s' * (count != 1)} (retryable; a failed "
              "night heals on the next one)", file=sys.stderr)  # fmt: skip


async def sync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill sync``: the last days before each app's newest rows again, and every gap."""
    settings, apps, token = session.prologue(args, env)

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        await engine.prepare_sync(apps)
        _took_back(await engine.requeue_failed(apps, heal=True))
        return None, None

    return await drive(settings, token, apps, prepare, args.quiet, args.progress_interval)


async def retry(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill retry``: the FAILED windows of the chosen apps, queued and run again."""
    settings, apps, token = session.prologue(args, env)

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        count = await engine.requeue_failed(apps)
        print(f"retrying {count} failed window{'s' * (count != 1)}")
        return None, None

    return await drive(settings, token, apps, prepare, args.quiet, args.progress_interval)


async def demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill demo``: the simulator in-process, the whole horizon of its apps, the status."""
    from backfill import audit, simulator

    path = args.config or session.demo_config()
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

        code = await drive(settings, sim.token, apps, prepare, args.quiet)
    async with session.open_ledger(settings) as ledger:
        print_status(await audit.status(ledger, [a.name for a in apps]))
    glob = f"{settings.output.root}/events/*/*/*.parquet"
    print("\nquery it with DuckDB (pip's duckdb is in .venv):")
    query = (
        "SELECT app, count(*) AS events, count(DISTINCT dt) AS days, "
        "max(eventParameters['level_id']) AS some_level "
        f"FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY app"
    )
    print(f'  .venv/bin/python -c "import duckdb; duckdb.sql(\\"{query}\\").show()"')
    return code


async def drive(
    settings: Settings,
    token: str,
    apps: list[AppSettings],
    prepare: _Prepare,
    quiet: bool,
    interval: float = 10.0,
    *,
    refreshing: str | None = None,
    accept_shrink: bool = False,
    finished: _Finished | None = None,
) -> int:
    """Open everything, run ``prepare`` (planning), run the engine under signals, summarise.

    Before ``prepare``, the apps' recorded settings are checked against the config (a refusal
    is a ``ConfigError``: nothing planned, nothing submitted) and recorded where missing; the
    app a ``refresh`` re-pulls (``refreshing``) is recorded by ``finished`` instead, which runs
    after a run whose requested windows all committed.
    """
    from backfill.audit import outcome_of_range
    from backfill.client import FlurryClient, Secret, Timeouts
    from backfill.engine import Engine
    from backfill.store import LocalStore

    config.check_writable(settings)
    timeouts = Timeouts(
        connect_s=settings.api.connect_timeout_s, read_s=settings.api.read_timeout_s
    )
    with session.exclusive(settings):
        async with (
            session.open_ledger(settings) as ledger,
            FlurryClient(
                base_url=settings.api.base_url, token=Secret(token), timeouts=timeouts
            ) as api,
        ):
            await recorded.check(ledger, apps, refreshing=refreshing)
            await recorded.record(ledger, [a for a in apps if a.name != refreshing])
            halt = threading.Event()  # the second signal: conversions under way give up too
            store = LocalStore(
                settings.output.root, on_bad_rows=settings.output.on_bad_rows, stop=halt
            )
            engine = Engine(
                settings=settings, ledger=ledger, store=store, api=api, accept_shrink=accept_shrink
            )
            start, end = await prepare(engine)
            summary = await _run_with_signals(engine, apps, quiet, interval, halt)
            if summary.fatal is None and not summary.interrupted:
                standing = await outcome_of_range(
                    ledger, [a.name for a in apps], start, end,
                    heal_runs=settings.windows.heal_runs,
                )  # fmt: skip
                summary.exit_code = BY_STANDING[standing]
            _print_summary(summary)
            if finished is not None and summary.exit_code == EXIT_OK:
                await finished(ledger)
            return summary.exit_code


async def _run_with_signals(
    engine: Engine,
    apps: list[AppSettings],
    quiet: bool,
    interval: float = 10.0,
    halt: threading.Event | None = None,
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
                    if halt is not None:
                        halt.set()
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


def _print_summary(summary: Summary) -> None:
    calls = ", ".join(f"{k} {v}" for k, v in summary.calls.items() if v)
    print(f"windows: {summary.committed} committed, {summary.split} split, {summary.failed} failed")
    print(f"landed:  {summary.rows:,} rows, {summary.bytes:,} bytes of Parquet")
    print(f"API:     {calls or 'no calls'}")
    print(f"time:    {summary.wall_s:.1f} s")
    for app, window, reason in summary.failures[:10]:
        print(f"failed:  {app} {window}: {logs.scrub(reason)}")
    if summary.interrupted:
        print(
            "interrupted: every request id is in the ledger; run the same command again to resume"
        )
