"""Worker threads kept for the life of the process, shared by every conversion.

Theory of operation.  A conversion runs its inflating, parsing and Parquet writing on threads.
Starting and joining three or four threads per window costs milliseconds, which a day of
hundreds of small windows pays hundreds of times; so each kind of work has one executor,
created on first use and kept (its idle threads wait for the next window).  ``Tasks`` tracks
the jobs one conversion gave an executor, so that it can cancel what has not started and wait
for what has, without touching another conversion's jobs.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

__all__ = ["Tasks", "executor"]

T = TypeVar("T")

_EXECUTORS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


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
