"""Small downloads convert in worker processes, so that two conversions use two cores.

Theory of operation.  A small download (``decode.small``: a window of a few thousand rows)
converts on one thread, start to finish.  Two such conversions on two threads of one process
share its GIL: measured on 100 windows of 4 k rows, two threads ran 1.66 times as fast as one,
on 10 % more CPU.  The same conversions in two processes ran 1.95 times as fast, and 500 small
windows landed in about 1.5 times the time of their rows as one file instead of 1.7 times.

``stage`` runs ``staging.stage`` in a process of a ``ProcessPoolExecutor`` (one per process,
made at the first small download, its ``size`` processes all started then):

- The processes come from a fork server, never from a fork of the run (which has threads).
- Each process dies with the run: a thread of it waits on a pidfd of the run and SIGKILLs its
  own process once the run has ended, however it ended, so a killed run leaves no conversion
  behind to write into a staging folder that the next run owns.  (The processes themselves keep
  the fork server and each other's queues open: without this they would outlive the run.)  The
  run's start time is checked beside its pid, so a pid used again is never mistaken for it.
  Where there are no pidfds (not Linux 5.3 or later), ``available()`` is False and small
  downloads convert on the caller's thread.
- A process is its own process group and ignores SIGINT: a Ctrl-C at the terminal reaches the
  run alone, which decides how to stop.  A small download's conversion is short (its input is
  bounded: at most an eighth of a block compressed, and what that may inflate to), so a stop
  waits for it; one asked for after the stop converts on the caller's thread, which gives up at
  once.
- The crash points a conversion passes (``decode.block``, ``writer.stage``) are counted in the
  process and hit again here when it returns, so a crash test still dies at the k-th one (after
  the conversion rather than inside it: the window is DOWNLOADED with a staging folder either
  way).
- An error the conversion raises (``BadDataError``, ``OSError``) is raised here as itself; a
  surprise carries the process's traceback as a note.  A process that dies (killed, out of
  memory) breaks the pool: its other processes are ended and waited for, the next conversion
  makes a new pool, and the conversions it held run on their callers' threads.  If processes
  cannot start at all (a process limit, a sandbox), one warning says why and every conversion
  of this process runs on threads.
- The pool lives as long as the process that made it (a command: until it exits); a program
  that runs the engine through the Python API and wants its memory back calls ``shutdown``.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from backfill import crashpoints, logs, staging
from backfill.errors import BackfillError

if TYPE_CHECKING:
    from backfill.layout import Layout
    from backfill.manifest import Manifest
    from backfill.schema import Limits

__all__ = ["available", "shutdown", "stage"]

_Result = tuple["Manifest | BaseException", dict[str, int]]  # what a process hands back
_pool: ProcessPoolExecutor | None = None
_refused: str | None = None  # why processes could not start here: threads from then on
_lock = threading.Lock()
_ending = threading.Lock()  # one thread at a time ends a pool: closing its queues twice raises


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


def _born(pid: int) -> int:
    """When process ``pid`` started (clock ticks after boot): a pid and this name one process."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _pool_of(size: int) -> ProcessPoolExecutor | None:
    """The process's pool, made on first use; None once processes could not start here."""
    global _pool
    with _lock:
        if _pool is None and _refused is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["backfill.staging"])
            run = os.getpid()
            _pool = ProcessPoolExecutor(
                max(1, size), mp_context=context, initializer=_started, initargs=(run, _born(run))
            )
            # All its processes start at the first submit, none later: CPython 3.11's pool,
            # ending itself when a process dies, misses (and then joins forever) a process that
            # a submit is starting meanwhile, or fails on its dict of processes changing.
            _pool._safe_to_dynamically_spawn_children = False  # type: ignore[attr-defined]
            logs.get("store").info("run.processes.start", at_most=max(1, size))
        return _pool


def _started(run: int, born: int) -> None:
    """In each new process: die with the run (pid ``run``, started at ``born``), and be out of
    reach of the terminal's signals (its own process group); the run decides how to stop."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        watched = os.pidfd_open(run)
        if _born(run) != born:  # that pid is another process's now: the run has ended
            os._exit(1)
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
) -> _Result:
    """In a process: the stage's manifest (or what it raised), and the crash points it hit."""
    crashpoints.arm(None)  # counts from zero; never armed here
    try:
        result: Manifest | BaseException = staging.stage(layout, limits, on_bad_rows, **kwargs)
    except Exception as exc:  # raised again in the run, as itself
        if not isinstance(exc, BackfillError):  # a surprise: keep where it came from
            exc.add_note(traceback.format_exc())
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
    pool = _pool_of(size)
    if pool is not None and not (stop is not None and stop.is_set()):  # else: gives up at once
        try:
            result, hits = _outcome(pool, pool.submit(_run, layout, limits, on_bad_rows, kwargs))
        except BrokenProcessPool:  # a process died: the others were ended with it
            _discard(pool, None)
        except Exception as exc:  # no process could start (a process limit, no /dev/shm, seccomp)
            with _lock:  # ... unless a process died and the pool is broken, closing its pipes
                broken = _pool is not pool or bool(getattr(pool, "_broken", False))
            _discard(pool, None if broken else f"{type(exc).__name__}: {exc}")
        else:
            for name, times in hits.items():
                for _ in range(times):
                    crashpoints.hit(name)
            if isinstance(result, BaseException):
                raise result
            return result
    return staging.stage(layout, limits, on_bad_rows, stop=stop, **kwargs)


def _outcome(pool: ProcessPoolExecutor, future: Future[_Result]) -> _Result:
    """``future``'s result; ``BrokenProcessPool`` once the pool has broken without completing it.
    (CPython 3.11's pool, ending itself after a death, does not take the lock under which a
    ``submit`` files its work: a submit in between gets a future that nothing completes.  No
    process holds that work, and none still runs any once the pool is broken.)"""
    while True:
        try:
            return future.result(timeout=0.5)
        except TimeoutError:
            if getattr(pool, "_broken", False) and not future.done():
                raise BrokenProcessPool("the pool broke before it took this conversion") from None


def _discard(pool: ProcessPoolExecutor, refused: str | None) -> None:
    """Forget ``pool`` (the next conversion makes another, unless ``refused`` says why not)
    and wait until its processes have ended: none may write on into a staging folder that
    the caller is about to fill."""
    global _pool, _refused
    with _lock:
        if _pool is pool:
            _pool = None
        if refused is not None and _refused is None:
            _refused = refused
            logs.get("store").warning("run.processes.refused", reason=refused)
    if refused is not None:  # the first submit started some processes before one failed
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, ValueError):  # ended, or never begun
                process.kill()
    with _ending:  # one at a time: closing a pool's queues twice raises
        pool.shutdown(wait=True, cancel_futures=True)  # a broken pool's processes are killed


def shutdown() -> None:
    """End the worker processes (they end with the run anyway)."""
    pool = _pool
    if pool is not None:
        _discard(pool, None)
