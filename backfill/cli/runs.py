"""The commands that run the engine: ``run``, ``sync``, ``retry`` and ``demo``.

They differ only in how they plan (a ``prepare`` step of ``api_flows``, shared with the Python
API); ``drive`` does the rest for all of them through ``api.execute`` (the run lock, the ledger,
the client, the store, the engine, the exit code from how the requested windows stand), under
signals with the progress view, and ``Monitor`` reports the end: the text summary or the JSON
record (``--summary-json``), the ``run.summary.done`` log line, the metrics file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from backfill import api, config, logs
from backfill.api_flows import preparing_retry, preparing_run, preparing_sync
from backfill.cli import session
from backfill.cli.eta import Remaining
from backfill.cli.inspection import print_status
from backfill.errors import BackfillError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence

    from backfill.api_flows import Finished, Prepare
    from backfill.config import AppSettings, Settings
    from backfill.engine import Engine
    from backfill.models import WindowRecord

__all__ = ["Monitor", "demo", "drive", "retry", "run", "sync"]


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill run``: plan ``--start``/``--end`` (clamped to the horizon) and run it."""
    settings, apps, token = session.prologue(args, env)
    session.check_order(args)
    monitor = Monitor.of(args, settings)
    prepare = preparing_run(apps, args.start, args.end, monitor.say)
    return await drive(settings, token, apps, prepare, args.quiet, args.progress_interval,
                       monitor=monitor, wait=args.wait)  # fmt: skip


async def sync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill sync``: the last days before each app's newest rows again, and every gap."""
    settings, apps, token = session.prologue(args, env)
    monitor = Monitor.of(args, settings)
    prepare = preparing_sync(apps, monitor.say)
    return await drive(settings, token, apps, prepare, args.quiet, args.progress_interval,
                       monitor=monitor, wait=args.wait)  # fmt: skip


async def retry(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill retry``: the FAILED windows of the chosen apps, listed, queued and run again:
    those and nothing else (a window pending for another reason waits for ``run``/``sync``)."""
    settings, apps, token = session.prologue(args, env)
    monitor = Monitor.of(args, settings, info_out=sys.stdout)
    taken: list[WindowRecord] = []
    prepare = preparing_retry(apps, monitor.say, taken)
    return await drive(settings, token, apps, prepare, args.quiet, args.progress_interval,
                       monitor=monitor, wait=args.wait, only=taken)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Monitor:
    """Where a run's end goes besides the exit code: the text summary or one JSON object on
    stdout, the ``run.summary.done`` log line in JSON mode, a Prometheus metrics file."""

    command: str = "run"
    summary_json: bool = False
    json_log: bool = False
    metrics_file: Path | None = None
    info_out: TextIO | None = None  # where the planning notes go (None: stderr)

    @classmethod
    def of(
        cls, args: argparse.Namespace, settings: Settings, *, info_out: TextIO | None = None
    ) -> Monitor:
        """The monitoring asked for by ``--summary-json``, ``--log-format``, ``--metrics-file``
        (else ``[output].metrics_file``)."""
        fmt = getattr(args, "log_format", "auto")
        summary_json = bool(getattr(args, "summary_json", False))
        return cls(
            command=args.command,
            summary_json=summary_json,
            json_log=fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()),
            metrics_file=getattr(args, "metrics_file", None) or settings.output.metrics_file,
            info_out=None if summary_json else info_out,  # stdout holds only the record then
        )

    def say(self, level: str, text: str) -> None:
        """A planning note: a warning on stderr, anything else where ``info_out`` says."""
        if level == "warning":
            print(f"backfill: warning: {text}", file=sys.stderr)
        elif level == "note":
            print(f"note: {text}", file=sys.stderr)
        else:
            print(text, file=self.info_out or sys.stderr)

    def report(self, result: api.RunResult) -> None:
        """The end of a run, everywhere it was asked for."""
        record = result.to_json()
        if self.summary_json:
            print(json.dumps(record), flush=True)
        else:
            _print_summary(result)
        if self.json_log:
            logs.get("cli").info("run.summary.done", **record)
        self.write_metrics(result.exit_code, result)

    def write_metrics(self, exit_code: int, result: api.RunResult | None = None) -> None:
        """The metrics file, if asked for; a fatal error has no counts, only its exit code."""
        if self.metrics_file is None:
            return
        from backfill import metrics

        apps = None if result is None else {a.app: {
            "committed": a.committed, "failed": a.failed, "split": a.split, "rows": a.rows,
            "bytes": a.bytes} for a in result.apps}  # fmt: skip
        metrics.write(
            self.metrics_file, command=self.command, exit_code=exit_code, finished_at=time.time(),
            wall_s=None if result is None else result.wall_s,
            interrupted=False if result is None else result.interrupted, apps=apps,
        )  # fmt: skip


async def demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill demo``: the simulator in-process, the whole horizon of its apps, the status."""
    from backfill import audit, simulator

    path = args.config or session.demo_config()
    settings = config.load(path)
    if args.config is None:  # the shipped config lives in the package: land in ./data/demo
        settings = dataclasses.replace(
            settings, output=dataclasses.replace(settings.output, root=_DEMO_ROOT)
        )
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


_DEMO_ROOT = Path("data/demo")  # under the working directory, as `make demo` promises


async def drive(
    settings: Settings,
    token: str,
    apps: list[AppSettings],
    prepare: Prepare,
    quiet: bool,
    interval: float = 10.0,
    *,
    refreshing: str | None = None,
    accept_shrink: bool = False,
    finished: Finished | None = None,
    monitor: Monitor | None = None,
    wait: float | None = None,
    only: Sequence[WindowRecord] | None = None,
) -> int:
    """``api.execute`` under signals with the progress view; the end reported (``Monitor``).

    ``wait`` (``--wait``) queues behind a run holding the ledger; ``only`` (``retry``'s, filled
    by ``prepare``) is exactly the windows to run.  The view's ETA follows the span of data
    left (``Remaining``), so that splits do not move it.  A fatal error still writes
    the metrics file (its exit code) before it ends the command.
    """
    from backfill.cli.exits import code_of

    monitor = monitor or Monitor()

    remaining = Remaining()

    async def progress(engine: Engine) -> None:
        await _progress(engine, interval, remaining)

    options = api.Options(
        signals=True,
        watch=None if quiet else progress,
        refreshing=refreshing,
        accept_shrink=accept_shrink,
        finished=finished,
        wait=wait,
        listeners=(remaining,),
        only=only,
    )
    try:
        result = await api.execute(
            settings, token, apps, prepare, command=monitor.command, options=options
        )
    except BackfillError as exc:
        monitor.write_metrics(code_of(exc))
        raise
    monitor.report(result)
    return result.exit_code


async def _progress(engine: Engine, interval: float, remaining: Remaining) -> None:
    """A live table on a terminal; elsewhere a ``run.progress`` log line every ``interval`` s.
    The ETA is ``remaining``'s: by the span of data left, so that splits do not move it."""
    began = time.monotonic()
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(stderr=True), refresh_per_second=2) as live:
            while True:
                live.update(_progress_table(engine, remaining, time.monotonic() - began))
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
            eta_s=remaining.eta(time.monotonic() - began),
        )


def _progress_table(engine: Engine, remaining: Remaining, elapsed: float) -> Any:
    from rich.table import Table

    table = Table(
        title=f"backfill: {engine.processing} requests processing at Flurry", title_justify="left"
    )
    for column in ("app", "windows", "failed", "rows", "bytes", "eta"):
        table.add_column(column, justify="left" if column == "app" else "right")
    for name, t in sorted(engine.tallies.items()):
        eta = remaining.eta(elapsed, name)
        table.add_row(
            name,
            f"{t.committed}/{t.planned}",
            str(t.failed),
            f"{t.rows:,}",
            f"{t.bytes:,}",
            "-" if eta is None else f"{eta} s",
        )
    return table


def _print_summary(result: api.RunResult) -> None:
    calls = ", ".join(f"{k} {v}" for k, v in result.calls.items() if v)
    print(f"windows: {result.committed} committed, {result.split} split, {result.failed} failed")
    print(f"landed:  {result.rows:,} rows, {result.bytes:,} bytes of Parquet")
    print(f"API:     {calls or 'no calls'}")
    print(f"time:    {result.wall_s:.1f} s")
    for failure in result.failures[:10]:
        print(f"failed:  {failure.app} {failure.window}: {failure.reason}")
    if result.interrupted:
        print(
            "interrupted: every request id is in the ledger; run the same command again to resume"
        )
