"""Landing a window and recovering from a kill at any step of it: real processes, SIGKILL."""

from __future__ import annotations

import gzip
import signal
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill.commit import land, recover
from backfill.ledger import Ledger
from backfill.models import WindowRecord, WindowState
from backfill.objstore import ObjectStore
from backfill.simulator import ground_truth
from backfill.simulator.data import encode_json
from tests.simkit import LARGE, settings
from tests.storekit import from_spec, spec

if TYPE_CHECKING:
    from pathlib import Path

    from tests.storekit import Store, Stores

S = WindowState
DAY = 86_400_000
START = 20_000 * DAY
ROOT = __file__.rsplit("/tests/", 1)[0]
ROWS = ground_truth(settings(), LARGE.api_key, START, START + 3 * DAY)

_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from backfill import crashpoints
    from backfill.commit import land
    from backfill.ledger import Ledger
    from tests.storekit import from_spec

    async def main() -> None:
        work = Path(sys.argv[1])
        ledger = await Ledger.open(work / "ledger.sqlite")
        (record,) = await ledger.windows(states=["DOWNLOADED"])
        crashpoints.arm(sys.argv[2])
        await land(ledger, from_spec(sys.argv[3]), record, work / "download.gz")

    anyio.run(main)
    """
)


async def _to_downloaded(ledger: Ledger, record: WindowRecord) -> WindowRecord:
    if record.state is not S.PENDING:
        record = await ledger.retry(record)
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED):
        record = await ledger.advance(record, state)
    return record


def _rows(stores: Stores, store: Store) -> list[tuple[Any, ...]]:
    return sorted(
        (
            r["sessionTimestamp"].timestamp(),
            r["eventOffset"],
            r["eventName"],
            str(r["eventParameters"]),
        )
        for r in stores.landed(store)
    )


def _truth() -> list[tuple[Any, ...]]:
    return sorted(
        (
            r["sessionTimestamp"] / 1000,
            r["eventOffset"],
            r["eventName"],
            str(list(r["eventParameters"].items())),
        )
        for r in ROWS
    )


async def _prepare(work: Path, store: Store, *, committed_first: bool) -> Ledger:
    (work / "download.gz").write_bytes(gzip.compress(encode_json(ROWS)))
    ledger = await Ledger.open(work / "ledger.sqlite")
    (record,) = await ledger.add_windows("quest", START, START + 3 * DAY, size_ms=3 * DAY)
    record = await _to_downloaded(ledger, record)
    if committed_first:  # a committed window being re-pulled: the old attempt must survive a kill
        record = await land(ledger, store, record, work / "download.gz")
        await _to_downloaded(ledger, record)
    return ledger


CRASHES = [
    "writer.stage:1",
    "writer.stage:2",
    "ledger.move:1",
    "writer.manifest:1",
    "writer.publish:1",
    "writer.publish:2",
    "ledger.move:2",
]


@pytest.mark.parametrize("committed_first", [False, True], ids=["first-attempt", "re-pull"])
@pytest.mark.parametrize("crash_at", CRASHES)
async def test_a_kill_at_any_landing_step_ends_with_each_row_exactly_once(
    tmp_path: Path, stores: Stores, crash_at: str, committed_first: bool
) -> None:
    writer = stores.make()
    ledger = await _prepare(tmp_path, writer, committed_first=committed_first)
    await ledger.close()
    done = await anyio.run_process(
        [sys.executable, "-c", _CHILD, str(tmp_path), crash_at, spec(writer)], cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    for name in stores.parquet(writer):  # whatever a reader can see has its footer
        assert pq.read_metadata(pa.BufferReader(stores.read(writer, name))).num_rows > 0

    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    writer = from_spec(spec(writer))  # a new process's store
    report = await recover(ledger, writer)
    (record,) = await ledger.windows()
    if record.state is not S.COMMITTED:
        assert record.id in report.requeued or record.state is S.DOWNLOADED
        record = await land(
            ledger, writer, await _to_downloaded(ledger, record), tmp_path / "download.gz"
        )
    assert record.state is S.COMMITTED
    assert _rows(stores, writer) == _truth(), "every row exactly once"
    manifests = [f for f in stores.files(writer) if f.startswith("_manifests/")]
    assert manifests == [f"_manifests/quest/{record.id}.{record.committed_attempt}.json"]
    assert record.committed_attempt is not None
    manifest = writer.load("quest", record.id, record.committed_attempt)
    assert manifest is not None
    listed = {f"events/app=quest/{f.path}" for f in manifest.files}
    assert set(stores.parquet(writer)) == listed, "no orphan file"
    staged = writer.local if isinstance(writer, ObjectStore) else writer
    assert not any(staged.layout.staging.rglob("*.parquet"))
    again = await recover(ledger, writer)
    assert (again.finished, again.requeued, again.swept) == ([], [], 0), (
        "a second recovery changes nothing"
    )
