"""The generic pool: follow-ups run too, the stream closes by itself, errors end it cleanly."""

from __future__ import annotations

import gc

import anyio
import pytest

from backfill.pool import run_pool


async def test_every_item_and_every_follow_up_is_handled_once_with_at_most_n_at_once() -> None:
    seen: list[int] = []
    running = peak = 0

    async def handle(n: int) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.001)
        seen.append(n)
        running -= 1
        return [n * 10 + k for k in range(3)] if n < 100 else []

    await run_pool([1, 2], handle, workers=3)
    second = [n * 10 + k for n in (1, 2) for k in range(3)]
    third = [n * 10 + k for n in second for k in range(3)]
    expected = [1, 2, *second, *third]
    assert sorted(seen) == sorted(expected)
    assert peak == 3


async def test_no_items_ends_at_once() -> None:
    async def handle(n: int) -> list[int]:
        raise AssertionError("never called")

    with anyio.fail_after(1):
        await run_pool([], handle, workers=2)


async def test_an_error_in_a_handler_ends_the_pool_and_leaves_no_stream_open() -> None:
    async def handle(n: int) -> list[int]:
        if n == 3:
            raise ValueError("boom")
        await anyio.sleep(0.01)
        return [n + 100]

    with pytest.raises(ExceptionGroup) as caught:
        await run_pool(range(50), handle, workers=4)
    assert caught.group_contains(ValueError)
    gc.collect()  # an unclosed stream would warn here, and warnings are errors
