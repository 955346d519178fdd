"""The pieces the conversion's speed rests on: CSV framing by quote parity, growing blocks,
the shared worker threads, and small windows through the whole stage."""

from __future__ import annotations

import gzip
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill import threads
from backfill.framing import Block, blocks, frame
from backfill.schema import Limits
from backfill.simulator import ground_truth
from backfill.simulator.data import encode_csv, encode_json
from backfill.store import LocalStore
from tests.simkit import LARGE
from tests.simkit import settings as sim_settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

DAY = 86_400_000
START = 20_000 * DAY


def _reference_ends(data: bytes) -> list[int]:
    """Record-ending newlines, byte by byte: a newline after an odd number of quotes is inside
    a cell; a blank line (or a lone carriage return) ends no record."""
    ends, quotes, last = [], 0, -1
    for at, byte in enumerate(data):
        if byte == 34:
            quotes += 1
        elif byte == 10 and quotes % 2 == 0:
            text = data[last + 1 : at]
            if text not in (b"", b"\r"):
                ends.append(at)
            last = at
    return ends


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b'"', b"\n", b"a", b",", b"\r", b'""']), max_size=200))
def test_csv_framing_finds_exactly_the_newlines_outside_quotes(parts: list[bytes]) -> None:
    data = b"".join(parts) + b"\n"
    block, _ = frame(data, 1, True, len(data) + 1, {})
    assert block.ends.tolist() == _reference_ends(data)


def test_quote_parity_holds_across_word_and_step_boundaries() -> None:
    # A quoted cell with newlines straddling 8-byte words and the 1 MB scanning step.
    row = b'1,"a\nb""c\n",x\n'
    data = row * ((3 << 20) // len(row))
    block, last = frame(data, 1, True, 1 << 20, {})
    assert len(block.ends) == data.count(b"\n") // 3
    assert last == len(data) - 1


def test_a_small_download_is_one_block_and_a_bigger_one_keeps_every_record() -> None:
    """Each block costs the parser a fixed few milliseconds: a window of a few thousand rows
    is one block (small windows convert side by side instead)."""
    lines = [b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * 200) for i in range(10_000)]
    data = b"".join(lines)  # about 2 MB: under one block
    assert len(list(blocks([data], Limits(), False, {}))) == 1
    framed = list(blocks([data], Limits(block_bytes=512 << 10), False, {}))
    assert len(framed) >= 4
    assert len(framed[0].data) <= 2 * (512 << 10)
    assert b"".join(b.data for b in framed) == data
    assert sum(len(b.ends) for b in framed) == len(lines)
    assert [b.first_line for b in framed][1] == framed[0].count + 1


def test_blocks_never_exceed_the_configured_size_by_more_than_a_record() -> None:
    data = b"".join(b'{"n":%d}\n' % i for i in range(200_000))
    framed = list(
        blocks(
            [data[i : i + 4096] for i in range(0, len(data), 4096)],
            Limits(block_bytes=64 << 10),
            False,
            {},
        )
    )
    assert max(len(b.data) for b in framed) <= (64 << 10) + 4096 + 16
    assert b"".join(b.data for b in framed) == data


def test_pieces_bigger_than_blocks_are_cut_before_more_is_read() -> None:
    """A block smaller than the inflated pieces: what is held stays under a block and a piece
    (it once grew by a piece a block: quadratic copying and memory)."""
    data = b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"y" * 50) for i in range(200_000))
    piece = 1 << 20
    read = 0

    def pieces() -> Iterator[bytes]:
        nonlocal read
        for i in range(0, len(data), piece):
            read += 1
            yield data[i : i + piece]

    limits = Limits(block_bytes=64 << 10)
    framed: list[Block] = []
    for block in blocks(pieces(), limits, False, {}):
        # Never more than one piece read ahead of the blocks handed out.
        assert read * piece - sum(len(b.data) for b in framed) <= 2 * piece + limits.block_bytes
        framed.append(block)
    assert max(len(b.data) for b in framed) <= 2 * limits.block_bytes
    assert b"".join(b.data for b in framed) == data


def test_tasks_cancel_waits_for_running_jobs_and_drops_queued_ones() -> None:
    pool = threads.executor("test-tasks", 1)
    tasks = threads.Tasks(pool)
    started, release, ran = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        release.wait(5)
        ran.append("slow")

    tasks.submit(slow)
    queued = tasks.submit(lambda: ran.append("queued"))
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    began = time.monotonic()
    tasks.cancel()
    assert time.monotonic() - began >= 0.1  # it waited for the running job
    assert ran == ["slow"] and queued.cancelled()


def test_the_executors_are_made_once_per_name_and_size() -> None:
    assert threads.executor("test-once", 2) is threads.executor("test-once", 2)
    assert threads.executor("test-once", 2) is not threads.executor("test-once", 3)


@pytest.mark.parametrize("encoding", ["json", "csv"])
def test_many_small_windows_start_no_new_threads_and_land_whole(
    tmp_path: Path, encoding: str
) -> None:
    rows = ground_truth(sim_settings(), LARGE.api_key, START, START + DAY)
    encode = encode_json if encoding == "json" else encode_csv
    store = LocalStore(tmp_path / "out")
    counts = []
    for window in range(6):
        part = rows[window::6]
        source = tmp_path / f"w{window}.gz"
        source.write_bytes(gzip.compress(encode(part)))
        manifest = store.stage(
            app="small", window_id=window + 1, attempt=0, start_ms=START, end_ms=START + DAY,
            source=source,
        )  # fmt: skip
        store.publish(manifest)
        assert manifest.rows == len(part)
        counts.append(threading.active_count())
        for item in manifest.files:
            table = pq.read_table(store.layout.event_path("small", item.path))
            stamps = table.column("sessionTimestamp").cast(pa.int64()).to_numpy()
            assert bool(np.all(np.diff(stamps) >= 0))
    assert counts[-1] == counts[1]  # threads are reused from the second window on
