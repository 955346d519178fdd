"""The engine's seams: what it needs of the API, the ledger and the output store.

Theory of operation.  The engine, its worker and the commit protocol see only these
``Protocol``s; the command line builds the adapters (``client.FlurryClient``, ``ledger.Ledger``
on SQLite, ``store.LocalStore`` on a local folder) and injects them.  Tests inject in-memory
fakes the same way, as httpx tests inject a ``MockTransport``.  A PostgreSQL ledger or an
object store is one more adapter beside these, with no change to the engine.

The ledger stores windows and applies moves as compare-and-set on ``(id, attempt, state)``;
it never decides them (``lifecycle`` does).  The store's calls block (file I/O, Parquet); the
engine runs them in worker threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Collection, Iterable, Sequence
    from pathlib import Path
    from typing import Unpack

    from backfill.layout import Listing
    from backfill.manifest import Manifest
    from backfill.models import Changes, Window, WindowRecord, WindowState
    from backfill.protocol import Processing, Ready

__all__ = ["Api", "ApiCounts", "LedgerPort", "SharedLedger", "StorePort"]


class ApiCounts(Protocol):
    """The calls an API adapter made, by kind (the run summary prints them)."""

    submit: int
    status: int
    download: int
    rate_limited: int
    resumed: int


class Api(Protocol):
    """What the engine needs of the Flurry API (``client.FlurryClient`` in production)."""

    @property
    def calls(self) -> ApiCounts: ...

    async def submit(
        self,
        window: Window,
        *,
        api_key: str,
        output_format: str = ...,
        app_versions: tuple[str, ...] = ...,
        event_ids: tuple[str, ...] = ...,
    ) -> str: ...

    async def status(self, request_id: str, *, window: Window) -> Processing | Ready: ...

    async def download(self, url: str, target: Path, *, window: Window, request_id: str) -> int: ...


class LedgerPort(Protocol):
    """What the engine needs of the ledger (``ledger.Ledger`` on SQLite in production)."""

    # False: one process at a time (the run lock); True: a ``SharedLedger`` many workers share.
    shared: bool
    worker: str  # this process's id in the ledger (its leases, its API slots)

    async def windows(
        self, *, apps: Iterable[str] | None = None, states: Iterable[WindowState] | None = None
    ) -> list[WindowRecord]: ...

    async def add_windows(
        self, app: str, start: int, end: int, *, size_ms: int, tz: dt.tzinfo = ...
    ) -> list[WindowRecord]: ...

    async def advance(
        self, record: WindowRecord, target: WindowState, **changes: Unpack[Changes]
    ) -> WindowRecord: ...

    async def retry(self, record: WindowRecord, **changes: Unpack[Changes]) -> WindowRecord: ...

    async def split(
        self, record: WindowRecord, children: Sequence[Window]
    ) -> list[WindowRecord]: ...

    async def get(self, window_id: int) -> WindowRecord: ...

    async def group(self, root_id: int) -> list[WindowRecord]: ...

    async def commit_group(
        self, root: WindowRecord, members: Sequence[tuple[WindowRecord, Changes]]
    ) -> list[WindowRecord]: ...

    async def newest_committed_end(self, app: str) -> int | None: ...

    async def learned_size(self, app: str) -> int | None: ...

    async def learn_size(self, app: str, size_ms: int) -> None: ...


class SharedLedger(LedgerPort, Protocol):
    """A ledger many workers share (``ledger_pg.PgLedger``): leases, and the API's budget.

    Every move of a window is fenced by its lease: a worker whose window was taken over (its
    lease ran out; the taker's attempt is one higher) gets ``StaleAttemptError``.
    """

    async def claim_next(
        self,
        apps: Sequence[str],
        *,
        lease_ms: int,
        limit: int,
        start: int | None = None,
        end: int | None = None,
        only: Collection[int] | None = None,
    ) -> list[WindowRecord]: ...

    async def renew(self, *, lease_ms: int) -> set[int]: ...

    async def release(self, ids: Collection[int] | None = None) -> None: ...

    async def take_slot(
        self, window_id: int, app: str, *, max_in_flight: int, max_per_app: int, lease_ms: int
    ) -> bool: ...

    async def give_slot(self, window_id: int) -> None: ...

    async def take_call(self, *, per_minute: int) -> float: ...

    async def close_gate(self, until_ms: int) -> None: ...

    async def gate_until(self) -> int: ...


class StorePort(Protocol):
    """What the engine needs of the output store (``store.LocalStore`` on a folder,
    ``objstore.ObjectStore`` on S3 or GCS).

    Every call blocks; the engine runs them in worker threads.  Where output lies is a
    ``Path`` for a local store and a URI (``s3://bucket/prefix/...``) for an object store;
    downloads and staging are local for both.  A sweep is two-phase: ``listing()`` first,
    then the ledger read for ``live``, then ``sweep(live, listing)``.
    """

    @property
    def root(self) -> Path | str: ...

    def download_path(self, app: str, window_id: int, attempt: int) -> Path: ...

    def stage(
        self, *, app: str, window_id: int, attempt: int, start_ms: int, end_ms: int, source: Path
    ) -> Manifest: ...

    def publish(self, manifest: Manifest) -> Path | str: ...

    def intend(self, manifest: Manifest) -> Path | str: ...

    def finish(self, manifest: Manifest) -> bool: ...

    def remove(self, manifest: Manifest) -> None: ...

    def load(self, app: str, window_id: int, attempt: int) -> Manifest | None: ...

    def manifest_path(self, app: str, window_id: int, attempt: int) -> Path | str: ...

    def check_manifest(self, path: Path | str, rows: int | None) -> list[str]: ...

    def orphans(self, live: set[tuple[int, int]]) -> list[str]: ...

    def work_listing(self) -> list[tuple[Path, tuple[int, int]]]: ...

    def sweep_work(
        self, keep: set[tuple[int, int]], listing: list[tuple[Path, tuple[int, int]]]
    ) -> int: ...

    def discard_staging(self) -> None: ...

    def listing(self) -> Listing: ...

    def sweep(
        self, live: set[tuple[int, int]], listing: Listing | None = None
    ) -> Sequence[Path | str]: ...

    def sweep_downloads(self, keep: set[tuple[int, int]], apps: Iterable[str]) -> int: ...
