"""Small downloads convert in worker processes: the same files, errors, rejects and crash points
as on the caller's thread; a dead process costs nothing; a killed run leaves none behind."""

from __future__ import annotations

import functools
import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, process
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import pytest
import structlog

from backfill import config, convertpool, crashpoints, decode
from backfill.errors import BadDataError, ConfigError
from backfill.objstore import open_store
from backfill.schema import Limits, Stopped
from backfill.simulator import ground_truth
from backfill.simulator.data import encode_csv, encode_json
from backfill.store import LocalStore
from tests.enginekit import ROOT, sim_settings, simulator_process, write_config
from tests.simkit import SMALL, TOKEN, settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from backfill.manifest import Manifest

pytestmark = pytest.mark.skipif(not convertpool.available(), reason="worker processes: Linux")

DAY = 86_400_000
START = 20_000 * DAY  # 2024-10-04


def _source(tmp_path: Path, fmt: str, *, bad_line: int | None = None) -> Path:
    """A small download of three days; ``bad_line``: that JSON line has a word for a time."""
    rows = ground_truth(settings(), SMALL.api_key, START, START + 3 * DAY)
    text = encode_json(rows) if fmt == "json" else encode_csv(rows)
    if bad_line is not None:
        lines = text.split(b"\n")
        lines[bad_line - 1] = b'{"sessionTimestamp": "soon"}'
        text = b"\n".join(lines)
    path = tmp_path / f"download.{fmt}.gz"
    path.write_bytes(gzip.compress(text))
    return path


def _stage(root: Path, source: Path, processes: int, **kw: Any) -> Manifest:
    store = LocalStore(root, processes=processes, **kw)
    return store.stage(
        app="quest", window_id=7, attempt=2, start_ms=START, end_ms=START + 3 * DAY, source=source
    )


def _staged_bytes(root: Path) -> dict[str, bytes]:
    staged = root / "_staging"
    return {str(p.relative_to(staged)): p.read_bytes() for p in staged.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_process_stages_the_same_files_as_the_callers_thread(tmp_path: Path, fmt: str) -> None:
    source = _source(tmp_path, fmt)
    crashpoints.arm(None)
    there = _stage(tmp_path / "process", source, processes=2)
    hits_there = crashpoints.counts()
    assert decode.small(source, Limits()) and _pool_pids()  # it went to a process
    crashpoints.arm(None)
    here = _stage(tmp_path / "thread", source, processes=0)
    hits_here = crashpoints.counts()
    assert there.rows == here.rows > 0
    assert there.files == here.files  # paths, rows, sizes and digests
    assert _staged_bytes(tmp_path / "process") == _staged_bytes(tmp_path / "thread")
    # The crash points passed in the process are hit in the run, as many times.
    assert hits_there == hits_here
    assert hits_there["writer.stage"] == len(there.files)


def test_a_bad_row_fails_the_window_from_the_process_as_on_the_thread(tmp_path: Path) -> None:
    source = _source(tmp_path, "json", bad_line=5)
    with pytest.raises(BadDataError) as there:
        _stage(tmp_path / "process", source, processes=2)
    with pytest.raises(BadDataError) as here:
        _stage(tmp_path / "thread", source, processes=0)
    assert str(there.value) == str(here.value)
    assert "line 5" in str(there.value) and there.value.app == "quest"
    assert _staged_bytes(tmp_path / "process") == {}  # a failed stage leaves nothing staged


def test_quarantined_rows_are_written_by_the_process(tmp_path: Path) -> None:
    source = _source(tmp_path, "json", bad_line=9)
    there = _stage(tmp_path / "process", source, processes=2, on_bad_rows="quarantine")
    here = _stage(tmp_path / "thread", source, processes=0, on_bad_rows="quarantine")
    assert there.rows == here.rows
    rejects = [sorted((root / "_rejects").rglob("*.*")) for root in (tmp_path / "process",
                                                                    tmp_path / "thread")]  # fmt: skip
    assert [p.name for p in rejects[0]] == [p.name for p in rejects[1]] != []
    assert rejects[0][0].read_bytes() == rejects[1][0].read_bytes()


def _pool_pids() -> set[int]:
    pool = convertpool._pool  # the test kills what the module made
    assert pool is not None
    return set(pool._processes)  # the executor's own record of its processes


def test_a_dead_process_costs_the_conversion_nothing_and_the_pool_is_made_again(
    tmp_path: Path,
) -> None:
    source = _source(tmp_path, "json")
    first = _stage(tmp_path / "a", source, processes=2)
    doomed = _pool_pids()
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    second = _stage(tmp_path / "b", source, processes=2)  # on the caller's thread, this once
    third = _stage(tmp_path / "c", source, processes=2)  # a new pool
    assert first.files == second.files == third.files
    assert _pool_pids().isdisjoint(doomed)


def _stage_into(folder: Path, source: Path, i: int) -> Manifest:
    return _stage(folder / str(i), source, processes=4)


def _at_once(convert: Callable[[int], Any], count: int) -> list[Any]:
    """``convert(i)`` for each i on threads of their own, let go together; what each returned
    or raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = convert(i)
        except BaseException as exc:  # asserted by the caller
            results[i] = exc

    workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def test_conversions_that_find_the_pool_broken_at_once_all_land_on_their_threads(
    tmp_path: Path,
) -> None:
    """Several conversions asked for as a process dies each see the broken pool, and each ends
    it: none may fail (closing its queues twice was a ``StorageError``; a refusal, threads from
    then on) or hang (a process started meanwhile was joined forever)."""
    source = _source(tmp_path, "json")
    expected = _stage(tmp_path / "first", source, processes=4)
    for round_ in range(3):
        for pid in _pool_pids():
            os.kill(pid, signal.SIGKILL)
        folder = tmp_path / f"round-{round_}"
        results = _at_once(functools.partial(_stage_into, folder, source), 6)
        assert [type(r).__name__ for r in results] == ["Manifest"] * 6, results
        assert all(r.files == expected.files for r in results)
        _stage(tmp_path / f"again-{round_}", source, processes=4)  # a pool again, to kill
        assert len(_pool_pids()) == 4  # all its processes started at once


def test_a_submit_that_the_pools_end_overtakes_does_not_wait_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPython 3.11's pool ends itself after a death without the lock a submit holds: a submit
    filing its work meanwhile gets a future nothing completes.  The window is widened here by
    a second's sleep inside the submit, while its process is killed."""
    source = _source(tmp_path, "json")
    expected = _stage(tmp_path / "first", source, processes=2)
    pids = _pool_pids()

    class _Slow(process._WorkItem):  # type: ignore[type-arg]  # made under the submit's lock
        def __init__(self, *args: Any) -> None:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)  # the pool finds the death and ends itself meanwhile
            super().__init__(*args)

    monkeypatch.setattr(process, "_WorkItem", _Slow)
    results: list[Any] = []
    late = threading.Thread(
        target=lambda: results.append(_stage(tmp_path / "late", source, processes=2)), daemon=True
    )
    late.start()
    late.join(timeout=60)  # it waited forever on that future
    assert not late.is_alive() and results[0].files == expected.files


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):  # ended meanwhile
            continue
    return parents


def _children(pid: int) -> set[int]:
    return {child for child, parent in _parents().items() if parent == pid}


def test_a_conversion_asked_for_after_the_stop_gives_up_at_once(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        _stage(tmp_path / "out", _source(tmp_path, "json"), processes=2, stop=stop)


class _NoProcesses(ProcessPoolExecutor):
    """A pool whose processes cannot start, as under a process limit."""

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")


def test_when_no_process_can_start_every_conversion_runs_on_threads_after_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convertpool, "ProcessPoolExecutor", _NoProcesses)
    monkeypatch.setattr(convertpool, "_pool", None)
    monkeypatch.setattr(convertpool, "_refused", None)
    source = _source(tmp_path, "json")
    here = _stage(tmp_path / "thread", source, processes=0)
    with structlog.testing.capture_logs() as logged:
        first = _stage(tmp_path / "a", source, processes=2)
        second = _stage(tmp_path / "b", source, processes=2)
    assert first.files == second.files == here.files
    assert convertpool._pool is None  # and no second pool was tried
    refused = [e for e in logged if e["event"] == "run.processes.refused"]
    assert len(refused) == 1 and "Resource temporarily unavailable" in refused[0]["reason"]


class _SecondCannotStart(ProcessPoolExecutor):
    """A pool whose second process cannot start (a process limit reached part-way)."""

    started: ClassVar[list[int]] = []

    def _spawn_process(self) -> None:
        if self._processes:
            raise OSError(11, "Resource temporarily unavailable")
        super()._spawn_process()  # type: ignore[misc]
        _SecondCannotStart.started.extend(self._processes)


def test_processes_started_before_one_could_not_are_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convertpool, "ProcessPoolExecutor", _SecondCannotStart)
    _SecondCannotStart.started.clear()
    monkeypatch.setattr(convertpool, "_pool", None)
    monkeypatch.setattr(convertpool, "_refused", None)
    source = _source(tmp_path, "json")
    with structlog.testing.capture_logs() as logged:
        assert _stage(tmp_path / "a", source, processes=2).rows > 0  # on the thread
    assert [e["event"] for e in logged].count("run.processes.refused") == 1
    assert len(_SecondCannotStart.started) == 1
    assert not _alive(_SecondCannotStart.started[0])  # ended, not left to fail on its own


def _descendants(pid: int) -> set[int]:
    parents = _parents()
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        here = frontier.pop()
        children = {child for child, parent in parents.items() if parent == here}
        frontier.extend(children - found)
        found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(120)
async def test_a_killed_run_leaves_no_conversion_process_behind(tmp_path: Path) -> None:
    sim = sim_settings(latency_base_s=0.05)
    env = os.environ | {"FLURRY_TOKEN": TOKEN}
    async with simulator_process(sim, tmp_path) as (base, _calls):
        config = write_config(tmp_path, base, history_days=120)
        command = [sys.executable, "-m", "backfill.cli", "run", "--config", str(config), "--quiet"]
        quiet = subprocess.DEVNULL  # no pipe to fill up
        async with await anyio.open_process(
            command, cwd=ROOT, env=env, stdout=quiet, stderr=quiet
        ) as process:
            helpers: set[int] = set()
            with anyio.fail_after(60):  # until a conversion process (the fork server's child)
                while process.returncode is None and not helpers - _children(process.pid):
                    await anyio.sleep(0.05)
                    helpers = _descendants(process.pid)
            assert process.returncode is None, "the run ended before converting in processes"
            process.send_signal(signal.SIGKILL)
            await process.wait()
        with anyio.fail_after(10):  # other processes' ends: no event to await, so poll /proc
            while any(_alive(pid) for pid in helpers):  # noqa: ASYNC110  # see above
                await anyio.sleep(0.05)


def test_the_runs_store_converts_in_processes_unless_the_config_says_not(tmp_path: Path) -> None:
    base = "http://127.0.0.1:9/pulse/v1"  # never called
    for name in "abc":
        (tmp_path / name).mkdir()
    default = config.load(write_config(tmp_path / "a", base, history_days=4))
    assert default.api.conversion_processes is True
    store = open_store(default)
    assert isinstance(store, LocalStore)
    assert store.processes == default.api.conversions_at_once == 2
    off = config.load(
        write_config(tmp_path / "b", base, history_days=4, extra_api="conversion_processes = false")
    )
    store = open_store(off)
    assert isinstance(store, LocalStore)
    assert store.processes == 0
    with pytest.raises(ConfigError, match=r"api\.conversion_processes = 'yes': expected true or"):
        config.load(
            write_config(
                tmp_path / "c", base, history_days=4, extra_api='conversion_processes = "yes"'
            )
        )
