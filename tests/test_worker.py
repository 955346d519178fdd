"""The engine through its ports: a scripted API, an in-memory store, a real SQLite ledger.

No server and no Parquet: each test runs in well under a second and shows one lifecycle rule
as the engine carries it out (what was called, in which order, where the ledger ends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from backfill.config import ApiSettings, AppSettings, OutputSettings, Settings, WindowSettings
from backfill.engine import Engine
from backfill.errors import AuthError
from backfill.ledger import Ledger
from backfill.models import WindowState
from backfill.policy import Policy
from backfill.protocol import Processing
from tests.fakes import FakeApi, FakeStore, rate_limited, refused, too_large

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

S = WindowState
DAY = 86_400_000
START = 20_000 * DAY  # a fixed UTC midnight


def _settings(root: Path, **api: Any) -> Settings:
    policy = Policy(poll_initial_s=0.001, poll_min_s=0.001, poll_max_s=0.01, backoff_base_s=0.001,
                    backoff_cap_s=0.5, max_attempts=3)  # fmt: skip
    return Settings(
        api=ApiSettings(**({"calls_per_minute": 100_000} | api)),
        policy=policy,
        windows=WindowSettings(history_days=730, lag_hours=24),
        output=OutputSettings(root=root),
        apps=(AppSettings(name="a", api_key="A" * 20), AppSettings(name="b", api_key="B" * 20)),
    )


class Run:
    def __init__(self, engine: Engine, api: FakeApi, store: FakeStore, ledger: Ledger) -> None:
        self.engine, self.api, self.store, self.ledger = engine, api, store, ledger

    async def plan(self, days: int, apps: tuple[str, ...] = ("a",)) -> None:
        chosen = [a for a in self.engine.settings.apps if a.name in apps]
        await self.engine.plan(chosen, START, START + days * DAY)

    async def go(self, apps: tuple[str, ...] = ("a",)) -> Any:
        return await self.engine.run([a for a in self.engine.settings.apps if a.name in apps])

    async def states(self) -> list[tuple[int, WindowState]]:
        return [(r.window.length // DAY, r.state) for r in await self.ledger.windows()]


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    api, store = FakeApi(), FakeStore(tmp_path / "downloads")
    settings = _settings(tmp_path)
    engine = Engine(
        settings=settings, ledger=ledger, store=store, api=api, now_ms=lambda: START + 800 * DAY
    )
    yield Run(engine, api, store, ledger)
    await ledger.close()


async def test_a_window_goes_submit_poll_download_land_commit(run: Run) -> None:
    run.api.polls[START, START + 30 * DAY] = [Processing(), Processing(), None]
    await run.plan(30)
    summary = await run.go()
    assert [kind for kind, _ in run.api.log] == ["submit", "status", "status", "status", "download"]
    assert await run.states() == [(30, S.COMMITTED)]
    (record,) = await run.ledger.windows()
    assert record.rows == 10 and record.request_id == "r1" and record.committed_attempt == 0
    assert (summary.committed, summary.rows, summary.failed) == (1, 10, 0)
    assert not run.api.processing, "every request was seen ready"


async def test_too_large_splits_into_the_suggested_size_and_the_app_learns_it(run: Run) -> None:
    run.api.submits[START, START + 30 * DAY] = [too_large(7)]
    await run.plan(30)
    summary = await run.go()
    assert sorted(await run.states()) == [(2, S.COMMITTED), *[(7, S.COMMITTED)] * 4, (30, S.SPLIT)]
    assert await run.ledger.learned_size("a") == 7 * DAY
    assert summary.split == 1 and summary.committed == 5
    assert run.api.calls.submit == 1 + 5
    await run.engine.plan(run.engine.settings.apps[:1], START + 30 * DAY, START + 44 * DAY)
    await run.go()
    assert run.api.calls.submit == 6 + 2, "later windows are planned at the learned week"


async def test_a_window_planned_before_its_size_was_learned_is_cut_without_a_call(run: Run) -> None:
    await run.plan(30)
    await run.ledger.learn_size("a", 7 * DAY)
    summary = await run.go()
    assert sorted(await run.states()) == [(2, S.COMMITTED), *[(7, S.COMMITTED)] * 4, (30, S.SPLIT)]
    assert run.api.calls.submit == 5 and summary.split == 1


async def test_flurry_failure_is_submitted_again_once_then_waits_for_a_person(run: Run) -> None:
    from backfill.errors import RequestFailedError

    run.api.polls[START, START + 30 * DAY] = [RequestFailedError("Failure")]
    await run.plan(30)
    summary = await run.go()
    (record,) = await run.ledger.windows()
    assert record.state is S.FAILED and not record.retryable and record.attempt == 1
    assert "Failure 2 times" in (record.error_message or "")
    assert record.error_class == "RequestFailedError"
    assert run.api.calls.submit == 2 and summary.failed == 1


async def test_a_429_at_submit_closes_the_gate_for_every_app_and_lowers_the_cap(run: Run) -> None:
    run.api.submits[START, START + 30 * DAY] = [rate_limited(0.3, limit=1), None]
    await run.plan(30, ("a", "b"))
    began = anyio.current_time()
    await run.go(("a", "b"))
    submits = [w for kind, w in run.api.log if kind == "submit"]
    assert len(submits) == 3 and anyio.current_time() - began >= 0.3
    assert run.engine.budget.in_flight.total_tokens == 1, "Flurry said its cap is 1"
    assert await run.states() == [(30, S.COMMITTED), (30, S.COMMITTED)]


async def test_requests_processing_never_exceed_the_cap(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    api, store = FakeApi(), FakeStore(tmp_path / "downloads")
    for day in range(12):
        api.polls[START + day * DAY, START + (day + 1) * DAY] = [Processing(), Processing(), None]
    settings = _settings(tmp_path, max_in_flight=3)
    engine = Engine(settings=settings, ledger=ledger, store=store, api=api)
    await ledger.learn_size("a", DAY)
    await engine.plan([settings.apps[0]], START, START + 12 * DAY)
    await engine.run([settings.apps[0]])
    await ledger.close()
    assert api.calls.download == 12 and api.peak_processing == 3


async def test_a_refused_token_stops_the_run_with_auth_error(run: Run) -> None:
    run.api.submits[START, START + 30 * DAY] = [refused()]
    await run.plan(30)
    with pytest.raises(AuthError):
        await run.go()
    assert await run.states() == [(30, S.PENDING)]


async def test_a_submitted_window_is_reattached_not_submitted_again(run: Run) -> None:
    await run.plan(30)
    (record,) = await run.ledger.windows()
    now = START + 800 * DAY  # the engine's clock: the request was accepted just now
    await run.ledger.advance(record, S.SUBMITTED, request_id="r-old", submitted_at=now)
    run.api.processing.add("r-old")
    await run.go()
    assert [kind for kind, _ in run.api.log] == ["status", "download"]
    assert run.api.log[0] == ("status", "r-old")
    assert await run.states() == [(30, S.COMMITTED)]


async def test_after_stop_no_request_is_submitted_and_windows_stay_resumable(run: Run) -> None:
    for day in range(0, 90, 30):
        run.api.polls[START + day * DAY, START + (day + 30) * DAY] = [Processing()]
    run.api.on_submit = run.engine.stop  # the signal lands during the first POST
    await run.plan(90)
    with anyio.fail_after(5):
        summary = await run.go()
    assert run.api.calls.submit == 1, "nothing submitted from the signal on"
    assert summary.interrupted
    assert sorted(s for _, s in await run.states()) == [S.PENDING, S.PENDING, S.SUBMITTED]


async def test_a_stop_during_a_long_backoff_ends_the_wait_at_once(run: Run) -> None:
    run.api.submits[START, START + 30 * DAY] = [rate_limited(60.0)]
    submitted = anyio.Event()
    run.api.on_submit = submitted.set
    await run.plan(30)
    with anyio.fail_after(5):  # the backoff alone is 60 s
        async with anyio.create_task_group() as group:
            group.start_soon(run.go)
            await submitted.wait()
            run.engine.stop()
    assert run.engine.summary.interrupted
    assert await run.states() == [(30, S.PENDING)]
    assert run.api.calls.submit == 1


async def _committed_month(run: Run) -> None:
    """One app with one committed 30-day window of 10 rows, sent back to be pulled again."""
    await run.plan(30)
    await run.go()
    await run.engine.requeue_committed(run.engine.settings.apps[0], START, START + 30 * DAY)


async def test_a_committed_window_split_on_its_re_pull_is_replaced_by_range_all_at_once(
    run: Run,
) -> None:
    await _committed_month(run)
    (old,) = await run.ledger.windows()
    run.api.submits[START, START + 30 * DAY] = [too_large(7)]
    run.api.rows = 3  # each week has 3 rows now: 15 in all, more than half of 10
    seen_live: list[int] = []

    def watch(event: Any) -> None:  # while children commit, the old files must stay live
        if event.name == "window.download.ok":
            seen_live.append(len(run.store.published))

    run.engine._listeners.append(watch)
    summary = await run.go()
    records = await run.ledger.windows()
    root = next(r for r in records if r.id == old.id)
    children = [r for r in records if r.parent_id == old.id]
    assert root.state is S.SPLIT and root.committed_attempt is None, "the old range is retired"
    assert len(children) == 5 and all(c.state is S.COMMITTED for c in children)
    assert all(c.replaces is None for c in children), "the replacement is over"
    assert (old.id, 0) in run.store.removed, "the old files were removed"
    assert sorted(run.store.published) == sorted((c.id, 0) for c in children)
    assert seen_live == [1] * 5, "the old window's files stayed the only live ones until the swap"
    assert summary.committed == 5


async def test_a_re_pull_with_far_fewer_rows_is_held_as_failed_unless_accepted(
    run: Run, tmp_path: Path
) -> None:
    await _committed_month(run)
    run.api.rows = 4  # under half of the 10 it would replace
    summary = await run.go()
    (record,) = await run.ledger.windows()
    assert record.state is S.FAILED and not record.retryable
    assert record.error_class == "ShrinkError"
    assert "4 rows where the attempt it replaces has 10" in (record.error_message or "")
    assert record.committed_attempt == 0 and run.store.published.keys() == {(record.id, 0)}
    assert summary.failed == 1
    accepting = Engine(settings=run.engine.settings, ledger=run.ledger, store=run.store,
                       api=run.api, accept_shrink=True)  # fmt: skip
    await run.ledger.retry(record)
    await accepting.run(run.engine.settings.apps[:1])
    (landed,) = await run.ledger.windows()
    assert (landed.state, landed.rows) == (S.COMMITTED, 4)


async def test_an_unexpected_exception_fails_its_window_and_the_run_goes_on(run: Run) -> None:
    run.api.polls[START, START + 30 * DAY] = [RuntimeError("surprise from a server")]
    await run.plan(60)
    summary = await run.go()
    first, second = await run.ledger.windows()
    assert (first.state, first.retryable, first.error_class) == (S.FAILED, True, "RuntimeError")
    assert "surprise from a server" in (first.error_message or "")
    assert second.state is S.COMMITTED and summary.committed == 1 and summary.failed == 1


async def test_what_a_server_echoes_reaches_the_ledger_and_the_summary_scrubbed(run: Run) -> None:
    from backfill.errors import ServerError

    echo = ServerError(
        "502: <pre>Authorization: Bearer SENTINEL-TOKEN-123\n"
        "GET https://bucket.example/x.gz?X-Amz-Signature=SENTINELSIG</pre>"
    )
    run.api.polls[START, START + 30 * DAY] = [echo]
    await run.plan(30)
    summary = await run.go()
    (record,) = await run.ledger.windows()
    assert record.state is S.FAILED
    seen = f"{record.error_message} {summary.failures}"
    assert "502" in seen and "SENTINEL" not in seen
