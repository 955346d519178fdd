"""A generic worker pool: N consumers of a bounded stream, handlers that return follow-ups.

Theory of operation.  A feeder sends the initial items into a bounded memory stream; N consumers
take them one at a time and call the handler, which returns follow-up items (a split window's
children) instead of enqueueing them itself.  Every item travels with its own clone of the
send stream, and every follow-up is sent by a task of its own that holds a clone too, so the
stream closes by itself when nothing is left to handle and nothing can be sent any more: the
clones are the count, and no consumer ever blocks on a full stream.  The pool knows nothing of
what the items are; stopping is the handler's business (it returns at once).  The items may
come from an async iterable that produces them as the pool goes (claims on a shared ledger).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["run_pool"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    """An item and its right to send follow-ups (a clone of the send stream)."""

    item: T
    sender: MemoryObjectSendStream[_Entry[T]]


async def run_pool(
    items: Iterable[T] | AsyncIterable[T],
    handle: Callable[[T], Awaitable[Iterable[T]]],
    *,
    workers: int,
) -> None:
    """Handle ``items`` and every follow-up they produce with ``workers`` consumers.

    Returns when all are handled; an exception from ``handle`` cancels the rest and propagates.
    """
    send, receive = anyio.create_memory_object_stream[_Entry[T]](workers)
    try:
        async with anyio.create_task_group() as group:
            pool = _Pool(handle, group)
            group.start_soon(pool.feed, send, items)
            for _ in range(workers):
                group.start_soon(pool.consume, receive.clone())
    finally:  # after an error, close what is left in the stream unhandled
        with receive:
            while True:
                try:
                    receive.receive_nowait().sender.close()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break


class _Pool(Generic[T]):
    def __init__(self, handle: Callable[[T], Awaitable[Iterable[T]]], group: TaskGroup) -> None:
        self.handle = handle
        self.group = group

    async def feed(
        self, send: MemoryObjectSendStream[_Entry[T]], items: Iterable[T] | AsyncIterable[T]
    ) -> None:
        async with send:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    await _put(send, item)
            else:
                for item in items:
                    await _put(send, item)

    async def consume(self, receive: MemoryObjectReceiveStream[_Entry[T]]) -> None:
        async with receive:
            async for entry in receive:
                with entry.sender:
                    for follow in await self.handle(entry.item):
                        self.group.start_soon(self.send, entry.sender.clone(), follow)

    async def send(self, sender: MemoryObjectSendStream[_Entry[T]], item: T) -> None:
        async with sender:
            await _put(sender, item)


async def _put(sender: MemoryObjectSendStream[_Entry[T]], item: T) -> None:
    """Send ``item`` with a clone of ``sender``; the clone is closed if it never arrives."""
    clone = sender.clone()
    try:
        await sender.send(_Entry(item, clone))
    except BaseException:
        clone.close()
        raise
