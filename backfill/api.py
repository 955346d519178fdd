"""The Python API: plan, run, sync, retry, refresh and read status from Python, typed results.

Every command has two forms: ``run_async(...)`` awaits inside a running event loop (any anyio
backend), ``run(...)`` runs its own loop with ``anyio.run`` in the calling thread, so it works
from any thread (an Airflow task, a Dagster op).  Neither installs a signal handler: only the
command line does, and only on the main thread.  The token is the config's (``token_env`` or
``token_file``), unless ``token=`` is given; either way it is registered for redaction and never
logged.

Stopping.  ``stop=`` takes a ``threading.Event``: once set, the run stops gently (no new submit,
what is downloaded is converted, every request id stays in the ledger) and returns a result
with ``interrupted`` and exit code 130.  Cancelling ``run_async`` does the same and then lets
the cancellation go on: the run, its ledger and its client are closed while shielded, so a
cancelled run leaves a consistent ledger and the next run resumes it exactly.

``execute`` is the core the command line shares: the lock, the ledger, the client, the store,
the engine under the chosen stops, and the exit code from how the requested windows stand.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio

from backfill import config, logs
from backfill.api_flows import (
    preparing_refresh,
    preparing_retry,
    preparing_run,
    preparing_sync,
    spans,
    standing,
)
from backfill.api_results import (
    AppOutcome,
    Failure,
    PlannedWindow,
    PlanResult,
    RunResult,
    StatusResult,
    instant,
    plan_windows,
    result_of,
)
from backfill.errors import ConfigError, first_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

    from backfill.api_flows import Finished, Prepare
    from backfill.api_results import When
    from backfill.config import AppSettings, Settings
    from backfill.engine import Engine, Summary
    from backfill.events import WindowEvent
    from backfill.models import WindowRecord

__all__ = [
    "AppOutcome",
    "Failure",
    "Options",
    "PlanResult",
    "PlannedWindow",
    "RunResult",
    "StatusResult",
    "execute",
    "plan",
    "plan_async",
    "refresh",
    "refresh_async",
    "retry",
    "retry_async",
    "run",
    "run_async",
    "status",
    "status_async",
    "sync",
    "sync_async",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_STOP_POLL_S = 0.05  # how soon a set ``stop`` event reaches the engine


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """How ``execute`` drives a run (the command line and the API differ only here)."""

    signals: bool = False  # SIGINT/SIGTERM drain, then stop; honoured on the main thread only
    stops: tuple[threading.Event, ...] = ()  # any of them set: a gentle stop
    watch: Callable[[Engine], Coroutine[Any, Any, None]] | None = None  # a view; cancelled at end
    refreshing: str | None = None  # the app a refresh re-pulls (its settings recorded later)
    accept_shrink: bool = False
    finished: Finished | None = None  # after a run whose requested windows all committed
    wait: float | None = None  # queue this long behind a run holding the ledger (inf: no end)
    listeners: tuple[Callable[[WindowEvent], None], ...] = ()  # the engine's events (the ETA)
    # ``retry``'s: filled by ``prepare`` with exactly the windows to run (None: the range's)
    only: Sequence[WindowRecord] | None = None


def _log_note(level: str, text: str) -> None:
    log = logs.get("api")
    (log.info if level == "info" else log.warning)("run.note", note=text)


async def execute(
    settings: Settings, token: str, apps: list[AppSettings], prepare: Prepare,
    *, command: str, options: Options | None = None,
) -> RunResult:  # fmt: skip
    """Open everything, run ``prepare`` (planning), run the engine, say how it ended.

    The run lock is taken first: held by another run, it is a ``LockedError``, or with
    ``options.wait`` a wait of that many seconds at most.  Before ``prepare``, the apps'
    recorded settings are checked against the config (a refusal is a ``ConfigError``: nothing
    planned, nothing submitted, no call made), the API is probed (``cli.check.preflight``:
    unreachable, ``TransportError``; token refused, ``AuthError``: nothing planned or
    submitted; a token proven good lets a refused app key fail that app alone) and the
    settings are recorded where missing (but for ``options.refreshing``, recorded by
    ``options.finished``).  The engine takes the unfinished windows overlapping the range
    ``prepare`` returns, or exactly ``options.only`` once ``prepare`` filled it; the exit code
    is how those (and the windows split from them) stand afterwards.  A fatal error (a refused
    token, ledger trouble) is raised as itself, never as an exception group.
    """
    # The run lock, the ledger opener, the settings guard and the exit codes are the command
    # line's; the layers contract lets this module, and only it, use them.
    from backfill.cli import recorded, session
    from backfill.cli.check import preflight
    from backfill.cli.exits import BY_STANDING, EXIT_OK
    from backfill.client import FlurryClient, Secret, Timeouts
    from backfill.engine import Engine
    from backfill.objstore import check_output, open_store

    options = options or Options()
    check_output(settings)
    a = settings.api
    timeouts = Timeouts(connect_s=a.connect_timeout_s, read_s=a.read_timeout_s)
    with session.exclusive(settings, wait=options.wait):
        async with (
            session.open_ledger(settings, command=command) as ledger,
            FlurryClient(base_url=a.base_url, token=Secret(token), timeouts=timeouts) as client,
        ):
            await recorded.check(ledger, apps, refreshing=options.refreshing)
            token_checked = await preflight(settings, token)  # unreachable, refused: nothing starts
            await recorded.record(ledger, [x for x in apps if x.name != options.refreshing])
            halt = threading.Event()  # the second signal: conversions under way give up too
            store = open_store(settings, stop=halt)
            engine = Engine(
                settings=settings, ledger=ledger, store=store, api=client,
                accept_shrink=options.accept_shrink, listeners=options.listeners,
                token_checked=token_checked,
            )  # fmt: skip
            start, end = await prepare(engine)
            only = options.only
            ids = None if only is None else {r.id for r in only}
            go = functools.partial(engine.run, apps, start, end, only=ids)
            summary = await _drive(engine, go, options, halt)
            if summary.fatal is None and not summary.interrupted:
                ranges = [(x.name, start, end) for x in apps] if only is None else spans(only)
                stands = await standing(ledger, ranges, settings.windows.heal_runs)
                summary.exit_code = BY_STANDING[stands]
            if options.finished is not None and summary.exit_code == EXIT_OK:
                await options.finished(ledger)
            return result_of(command, summary, engine.tallies)


async def _drive(
    engine: Engine, go: Callable[[], Awaitable[Summary]], options: Options, halt: threading.Event
) -> Summary:
    """Run the engine (``go``) with its stops and its view; an interrupted run says so (exit
    130)."""
    from backfill.cli.exits import EXIT_INTERRUPTED

    result: list[Summary] = []
    try:
        async with anyio.create_task_group() as group:
            if options.signals and threading.current_thread() is threading.main_thread():
                group.start_soon(_watch_signals, engine, group.cancel_scope, halt)
            if options.stops:
                group.start_soon(_watch_stops, engine, options.stops)
            if options.watch is not None:
                group.start_soon(options.watch, engine)
            try:
                result.append(await go())
            finally:
                group.cancel_scope.cancel()
    except BaseExceptionGroup as error:  # the task group wraps what ended it
        found = first_of(error)
        if found is None:
            raise
        raise found from None
    summary = result[0] if result else engine.summary
    if engine.stopping or not result:
        summary.interrupted = True
        summary.exit_code = EXIT_INTERRUPTED
    return summary


async def _watch_signals(engine: Engine, scope: anyio.CancelScope, halt: threading.Event) -> None:
    """The first SIGINT/SIGTERM drains gently, the second stops at once."""
    import signal

    log = logs.get("cli")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not engine.stopping:
                log.warning(
                    "run.stop.requested",
                    signal=name,
                    hint="finishing conversions; a second signal stops at once",
                )
                engine.stop()
            else:
                log.warning("run.stop.now", signal=name)
                halt.set()
                scope.cancel()


async def _watch_stops(engine: Engine, stops: Sequence[threading.Event]) -> None:
    """A gentle stop once any of ``stops`` is set (they are set from other threads)."""
    # Polled: another thread sets them, where an anyio.Event cannot be set.
    while not any(s.is_set() for s in stops):  # noqa: ASYNC110 - threading events, see above
        await anyio.sleep(_STOP_POLL_S)
    logs.get("api").warning("run.stop.requested", hint="finishing conversions")
    engine.stop()


# -- the public commands ---------------------------------------------------------------------


def _open(
    config_path: str | os.PathLike[str], apps: Sequence[str] | None, token: str | None
) -> tuple[Settings, list[AppSettings], str]:
    """The config, the chosen apps and the token (registered for redaction)."""
    settings = config.load(Path(config_path))
    for warning in settings.warnings:
        logs.get("api").warning("config.load.warning", warning=warning)
    chosen = _chosen(settings, apps)
    token = token if token is not None else config.read_token(settings, os.environ)
    logs.register_secret(token)
    return settings, chosen, token


def _chosen(settings: Settings, names: Sequence[str] | None) -> list[AppSettings]:
    if not names:
        return list(settings.apps)
    known = [a.name for a in settings.apps]
    if unknown := [n for n in names if n not in known]:
        raise ConfigError(f"app {unknown[0]!r}: not an app of {settings.source} ({known})")
    return [a for a in settings.apps if a.name in names]


async def _cancellable(
    command: str, settings: Settings, token: str, apps: list[AppSettings],
    prepare: Prepare, stop: threading.Event | None, **extra: Any,
) -> RunResult:  # fmt: skip
    """``execute`` shielded; cancelling the caller stops the run gently, then cancels on."""
    cancelled = threading.Event()
    stops = (cancelled,) if stop is None else (cancelled, stop)
    options = Options(stops=stops, **extra)
    done = anyio.Event()
    box: list[RunResult] = []

    async def body() -> None:
        with anyio.CancelScope(shield=True):
            box.append(await execute(settings, token, apps, prepare, command=command,
                                     options=options))  # fmt: skip
        done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(body)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            cancelled.set()  # the shielded run drains, closes its ledger, then we cancel on
            raise
    return box[0]


def _sync_form(async_fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, _R]:
    """The form of ``async_fn`` that runs its own event loop in the calling thread."""

    @functools.wraps(async_fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return anyio.run(functools.partial(async_fn, *args, **kwargs))

    return call


async def run_async(
    config_path: str | os.PathLike[str], apps: Sequence[str] | None = None,
    start: When = None, end: When = None,
    *, token: str | None = None, stop: threading.Event | None = None,
) -> RunResult:  # fmt: skip
    """``backfill run``: plan ``[start, end)`` (dates, datetimes, ISO text or epoch ms; the
    horizon by default, clamped to it) and run it."""
    settings, chosen, token = _open(config_path, apps, token)
    lo, hi = instant(start), instant(end)
    if lo is not None and hi is not None and hi <= lo:
        raise ConfigError("end must be after start")
    prepare = preparing_run(chosen, lo, hi, _log_note)
    return await _cancellable("run", settings, token, chosen, prepare, stop)


async def sync_async(
    config_path: str | os.PathLike[str], apps: Sequence[str] | None = None,
    *, token: str | None = None, stop: threading.Event | None = None,
) -> RunResult:  # fmt: skip
    """``backfill sync``: the last days before each app's newest rows again, and every gap."""
    settings, chosen, token = _open(config_path, apps, token)
    prepare = preparing_sync(chosen, _log_note)
    return await _cancellable("sync", settings, token, chosen, prepare, stop)


async def retry_async(
    config_path: str | os.PathLike[str], apps: Sequence[str] | None = None,
    *, token: str | None = None, stop: threading.Event | None = None,
) -> RunResult:  # fmt: skip
    """``backfill retry``: the FAILED windows of the chosen apps, queued and run again: those
    and nothing else."""
    settings, chosen, token = _open(config_path, apps, token)
    taken: list[WindowRecord] = []
    prepare = preparing_retry(chosen, _log_note, taken)
    return await _cancellable("retry", settings, token, chosen, prepare, stop, only=taken)


async def refresh_async(
    config_path: str | os.PathLike[str], app: str, start: When = None, end: When = None,
    *, damaged: bool = False, accept_shrink: bool = False,
    token: str | None = None, stop: threading.Event | None = None,
) -> RunResult:  # fmt: skip
    """``backfill refresh``: ``app``'s committed windows (overlapping the range, or the damaged
    ones) pulled again with the config's settings."""
    settings, chosen, token = _open(config_path, [app], token)
    prepare, finished = preparing_refresh(
        settings, chosen[0], instant(start), instant(end),
        damaged=damaged, accept_shrink=accept_shrink, say=_log_note,
    )  # fmt: skip
    return await _cancellable(
        "refresh", settings, token, chosen, prepare, stop,
        refreshing=app, accept_shrink=accept_shrink, finished=finished,
    )  # fmt: skip


async def plan_async(
    config_path: str | os.PathLike[str], apps: Sequence[str] | None = None,
    start: When = None, end: When = None,
) -> PlanResult:  # fmt: skip
    """``backfill plan``: the windows of the range per app with their ledger state; no call."""
    settings = config.load(Path(config_path))
    chosen = _chosen(settings, apps)
    now = int(time.time() * 1000)
    return await plan_windows(settings, [a.name for a in chosen], instant(start), instant(end),
                              now)  # fmt: skip


async def status_async(
    config_path: str | os.PathLike[str], apps: Sequence[str] | None = None
) -> StatusResult:
    """``backfill status``: each app's coverage as the ledger and the output tell it."""
    from backfill import audit
    from backfill.cli import session

    settings = config.load(Path(config_path))
    chosen = _chosen(settings, apps)
    if not settings.ledger_exists():
        return StatusResult(apps=())
    async with session.open_ledger(settings) as ledger:
        report = await audit.status(ledger, [a.name for a in chosen])
    return StatusResult(apps=tuple(report))


run = _sync_form(run_async)
sync = _sync_form(sync_async)
retry = _sync_form(retry_async)
refresh = _sync_form(refresh_async)
plan = _sync_form(plan_async)
status = _sync_form(status_async)
