"""Worker threads kept for the life of the process, shared by every conversion.

Theory of operation.  A conversion runs its inflating, parsing and Parquet writing on threads.
Starting and joining three or four threads per window costs milliseconds, which a day of
hundreds of small windows pays hundreds of times; so each kind of work has one executor,
created on first use and kept (its idle threads wait for the next window).  ``Tasks`` tracks
the jobs one conversion gave an executor, so that it can cancel what has not started and wait
for what has, without touching another conversion's jobs.

The C heap is tuned once, at import, where glibc is the allocator, and Arrow is told to use it
too: blocks of megabytes pass from thread to thread, and by default glibc gives each thread its
own arena and raises its mmap threshold after each big free, while Arrow's bundled mimalloc keeps
what it freed; either way the peak RSS creeps up with the file.  Two arenas are kept and
buffers of 4 MB and more (a block and up) are mapped, so they go back to the system when freed.
Measured on 2 M CSV rows: 330 MB peak against 580 MB with a 16 MB threshold, for 2 to 3 s more
CPU in page faults (17 s in all); a 1 MB threshold (every numpy temporary mapped) cost a
quarter more CPU on JSON, mimalloc 50 MB more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

__all__ = ["Serial", "Tasks", "executor"]

T = TypeVar("T")

_EXECUTORS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_M_ARENA_MAX, _M_MMAP_THRESHOLD = -8, -3  # glibc's mallopt parameters (malloc.h)


def _tune_malloc() -> bool:
    """Map buffers of 4 MB and more, keep two arenas, Arrow allocating there (glibc only);
    True if it was done."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator is left alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (mallopt(_M_MMAP_THRESHOLD, 4 << 20) and mallopt(_M_ARENA_MAX, 2)):
        return False
    pa.set_memory_pool(pa.system_memory_pool())
    return True


_tune_malloc()


def executor(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's executor ``name`` with at most ``workers`` threads (made on first use)."""
    key = f"{name}/{workers}"
    with _LOCK:
        pool = _EXECUTORS.get(key)
        if pool is None:
            pool = _EXECUTORS[key] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return pool


class Tasks:
    """The jobs one conversion gave a shared executor."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._futures: set[Future[object]] = set()
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future = self._pool.submit(job)
        with self._lock:
            self._futures.add(future)  # type: ignore[arg-type]  # kept only to wait on
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[T]) -> None:
        with self._lock:
            self._futures.discard(future)

    def cancel(self) -> None:
        """Cancel the jobs not started; wait for the ones running to end."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        wait(futures)


class Serial:
    """Jobs run one after another, in order, on the shared executor ``name``, at most ``depth``
    waiting; the first error is raised at the next ``submit`` or at ``close``, and the jobs
    after it are skipped (but for those submitted with ``always``: clean-ups).

    ``inline``: each job runs on the caller's thread, at once (a small download's few jobs
    are not worth a thread hop each); its error is raised there and then, and kept for ``close``.
    """

    def __init__(self, name: str, depth: int = 2, *, inline: bool = False) -> None:
        self._tasks = None if inline else Tasks(executor(name, 4))
        self._room = threading.BoundedSemaphore(depth + 1)  # queued and running
        self._last: Future[None] | None = None
        self._error: BaseException | None = None

    def _run(self, job: Callable[[], None], before: Future[None] | None, always: bool) -> None:
        try:
            if before is not None:
                wait([before])  # one after another, as submitted
            if always or self._error is None:
                job()
        except BaseException as exc:  # kept for close(), which raises it
            if self._error is None:
                self._error = exc
        finally:
            self._room.release()

    def submit(self, job: Callable[[], None], *, always: bool = False) -> None:
        if self._error is not None and not always:
            raise self._error
        self._room.acquire()
        if self._tasks is None:
            self._run(job, None, always)
            if self._error is not None and not always:
                raise self._error
            return
        self._last = self._tasks.submit(functools.partial(self._run, job, self._last, always))

    def close(self) -> None:
        if self._last is not None:
            wait([self._last])
        if self._error is not None:
            raise self._error
