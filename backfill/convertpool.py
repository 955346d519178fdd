"""Small downloads convert in worker processes, so that two conversions use two cores.

Theory of operation.  A small download (``decode.small``: a window of a few thousand rows)
converts on one thread, start to finish.  Two such conversions on two threads of one process
share its GIL: measured on 100 windows of 4 k rows, two threads ran 1.66 times as fast as one,
on 10 % more CPU.  The same conversions in two processes ran 1.95 times as fast, and 500 small
windows landed in 1.4 times the time of their rows as one file instead of 1.7 times.

``stage`` runs ``staging.stage`` in a process of a ``ProcessPoolExecutor`` (one per process,
made at the first small download; its processes start as they are needed, up to ``size``):

- The processes come from a fork server, never from a fork of the run (which has threads).
- Each process dies with the run: a thread of it waits on a pidfd of the run and SIGKILLs its
  own process once the run has ended, however it ended, so a killed run leaves no conversion
  behind to write into a staging folder that the next run owns.  (The processes themselves keep
  the fork server and each other's queues open: without this they would outlive the run.)
  Where there are no pidfds (not Linux 5.3 or later), ``available()`` is False and small
  downloads convert on the caller's thread.
- A process ignores SIGINT and SIGTERM: the run decides how to stop.  A small conversion ends
  within a fraction of a second, so a stop waits for it rather than interrupting it.
- The crash points a conversion passes (``decode.block``, ``writer.stage``) are counted in the
  process and hit again here when it returns, so a crash test still dies at the k-th one (after
  the conversion rather than inside it: the window is DOWNLOADED with a staging folder either
  way).
- An error the conversion raises (``BadDataError``, ``OSError``) is raised here as itself.  A
  process that dies (killed, out of memory) breaks the pool: it is thrown away, the next
  conversion makes a new one, and this conversion runs on the caller's thread instead.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal

from backfill import crashpoints, staging

if TYPE_CHECKING:
    from backfill.layout import Layout
    from backfill.manifest import Manifest
    from backfill.schema import Limits

__all__ = ["available", "shutdown", "stage"]

_pool: ProcessPoolExecutor | None = None
_lock = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether worker processes can be made to die with the run (a pidfd: Linux 5.3 or later)."""
    if sys.platform != "linux" or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an older kernel, or a sandbox that refuses the call
        return False
    return True


def _pool_of(size: int) -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["backfill.staging"])
            _pool = ProcessPoolExecutor(
                max(1, size), mp_context=context, initializer=_started, initargs=(os.getpid(),)
            )
        return _pool


def _started(run: int) -> None:
    """In each new process: die with the run (``run``, its pid); leave stopping to the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        watched = os.pidfd_open(run)
    except OSError:  # the run has ended already
        os._exit(1)
    threading.Thread(target=_die_with, args=(watched,), name="die-with-run", daemon=True).start()


def _die_with(watched: int) -> None:
    select.select([watched], [], [])  # readable once that process has ended
    os.kill(os.getpid(), signal.SIGKILL)


def _run(
    layout: Layout,
    limits: Limits,
    on_bad_rows: Literal["fail", "quarantine"],
    kwargs: dict[str, Any],
) -> tuple[Manifest | BaseException, dict[str, int]]:
    """In a process: the stage's manifest (or what it raised), and the crash points it hit."""
    crashpoints.arm(None)  # counts from zero; never armed here
    try:
        result: Manifest | BaseException = staging.stage(layout, limits, on_bad_rows, **kwargs)
    except Exception as exc:  # raised again in the run, as itself
        result = exc
    return result, crashpoints.counts()


def stage(
    layout: Layout,
    limits: Limits,
    on_bad_rows: Literal["fail", "quarantine"],
    *,
    size: int,
    stop: threading.Event | None,
    **kwargs: Any,  # staging.stage's window and source
) -> Manifest:
    """``staging.stage`` in a worker process (``size``: the most at once); see the module."""
    global _pool
    pool = _pool_of(size)
    try:
        result, hits = pool.submit(_run, layout, limits, on_bad_rows, kwargs).result()
    except BrokenProcessPool:
        with _lock:
            if _pool is pool:
                _pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        return staging.stage(layout, limits, on_bad_rows, stop=stop, **kwargs)
    for name, times in hits.items():
        for _ in range(times):
            crashpoints.hit(name)
    if isinstance(result, BaseException):
        raise result
    return result


def shutdown() -> None:
    """End the worker processes (they end with the run anyway)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
