"""In-memory fakes of the engine's ports: a scripted API and a store that keeps manifests.

Like httpx's ``MockTransport``: the engine runs unchanged against them, with no server, no
Parquet and no sleeps longer than the policy's (tiny) numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from backfill.errors import AuthError, RateLimitedError, TooLargeError
from backfill.layout import Listing
from backfill.manifest import Manifest, ManifestFile
from backfill.protocol import Processing, Ready

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from backfill.models import Window


@dataclass
class Calls:
    submit: int = 0
    status: int = 0
    download: int = 0
    rate_limited: int = 0
    resumed: int = 0


# What a scripted API answers: a value, or an exception to raise.
Answer = object


@dataclass
class FakeApi:
    """Answers each window's calls from scripts; records every call in order.

    ``submits`` maps a window's (start, end) to the answers of its successive POSTs (the last
    one repeats); ``polls`` likewise for the status calls of a request; by default a POST is
    accepted and a request is ready at its first poll.
    """

    submits: dict[tuple[int, int], list[Answer]] = field(default_factory=dict)
    polls: dict[tuple[int, int], list[Answer]] = field(default_factory=dict)
    rows: int = 10
    calls: Calls = field(default_factory=Calls)
    log: list[tuple[str, str]] = field(default_factory=list)  # (kind, window label or id)
    processing: set[str] = field(default_factory=set)  # request ids not yet seen ready
    peak_processing: int = 0
    on_submit: Callable[[], None] | None = None
    _seen: dict[tuple[str, tuple[int, int]], int] = field(default_factory=lambda: defaultdict(int))
    _windows: dict[str, Window] = field(default_factory=dict)

    def _next(self, kind: str, script: list[Answer] | None, key: tuple[int, int]) -> Answer | None:
        if not script:
            return None
        n = self._seen[kind, key]
        self._seen[kind, key] = n + 1
        answer = script[min(n, len(script) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def submit(
        self,
        window: Window,
        *,
        api_key: str,
        output_format: str = "JSON",
        app_versions: tuple[str, ...] = (),
        event_ids: tuple[str, ...] = (),
    ) -> str:
        self.calls.submit += 1
        self.log.append(("submit", window.label))
        if self.on_submit is not None:
            self.on_submit()
        key = (window.start, window.end)
        try:
            self._next("submit", self.submits.get(key), key)
        except RateLimitedError:
            self.calls.rate_limited += 1
            raise
        request_id = f"r{self.calls.submit}"
        self._windows[request_id] = window
        self.processing.add(request_id)
        self.peak_processing = max(self.peak_processing, len(self.processing))
        return request_id

    async def status(self, request_id: str, *, window: Window) -> Processing | Ready:
        self.calls.status += 1
        self.log.append(("status", request_id))
        key = (window.start, window.end)
        answer = self._next("status", self.polls.get(key), key)
        if isinstance(answer, Processing):
            return answer
        self.processing.discard(request_id)
        return Ready(url=f"https://example.invalid/{request_id}.gz?X-Amz-Signature=secret")

    async def download(self, url: str, target: Path, *, window: Window, request_id: str) -> int:
        self.calls.download += 1
        self.log.append(("download", request_id))
        path = anyio.Path(target)
        await path.parent.mkdir(parents=True, exist_ok=True)
        return await path.write_bytes(b"rows:%d" % self.rows)


def too_large(days: int) -> TooLargeError:
    return TooLargeError("too large", suggested_ms=days * 86_400_000)


def rate_limited(after_s: float, limit: int | None = None) -> RateLimitedError:
    return RateLimitedError("429", retry_after_s=after_s, limit=limit)


def refused() -> AuthError:
    return AuthError("the API refused the token (401)")


@dataclass
class FakeStore:
    """Keeps manifests in memory; a download's file is its only real bytes (tmp_path)."""

    downloads: Path
    published: dict[tuple[int, int], Manifest] = field(default_factory=dict)
    removed: list[tuple[int, int]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.downloads

    def download_path(self, app: str, window_id: int, attempt: int) -> Path:
        return self.downloads / app / f"{window_id}.{attempt}.gz"

    def stage(
        self, *, app: str, window_id: int, attempt: int, start_ms: int, end_ms: int, source: Path
    ) -> Manifest:
        rows = int(source.read_bytes().split(b":")[1])
        item = ManifestFile(path=f"part-{window_id}-{attempt}-0", size=rows, sha256="-", rows=rows,
                            partition="dt=x")  # fmt: skip
        return Manifest(app=app, window_id=window_id, attempt=attempt, start_ms=start_ms,
                        end_ms=end_ms, rows=rows, rejected=0, size=rows, files=(item,))  # fmt: skip

    def publish(self, manifest: Manifest) -> Path:
        return self.intend(manifest)

    def intend(self, manifest: Manifest) -> Path:
        self.published[manifest.window_id, manifest.attempt] = manifest
        return self.manifest_path(manifest.app, manifest.window_id, manifest.attempt)

    def finish(self, manifest: Manifest) -> bool:
        return (manifest.window_id, manifest.attempt) in self.published

    def remove(self, manifest: Manifest) -> None:
        self.published.pop((manifest.window_id, manifest.attempt), None)
        self.removed.append((manifest.window_id, manifest.attempt))

    def load(self, app: str, window_id: int, attempt: int) -> Manifest | None:
        return self.published.get((window_id, attempt))

    def manifest_path(self, app: str, window_id: int, attempt: int) -> Path:
        return self.downloads / "manifests" / f"{window_id}.{attempt}.json"

    def check_manifest(self, path: Path | str, rows: int | None) -> list[str]:
        return []

    def orphans(self, live: set[tuple[int, int]]) -> list[str]:
        return [f"orphan {key}" for key in self.published if key not in live]

    def discard_staging(self) -> None:
        return None

    def listing(self) -> Listing:
        return Listing(owned=tuple((self.manifest_path("", *key), key) for key in self.published))

    def sweep(self, live: set[tuple[int, int]], listing: Listing | None = None) -> list[Path]:
        listed = {owner for _, owner in (listing or self.listing()).owned}
        gone = [key for key in self.published if key not in live and key in listed]
        for key in gone:
            del self.published[key]
        return [self.manifest_path("", *key) for key in gone]

    def work_listing(self) -> list[tuple[Path, tuple[int, int]]]:
        return []

    def sweep_work(
        self, keep: set[tuple[int, int]], listing: list[tuple[Path, tuple[int, int]]]
    ) -> int:
        return 0

    def sweep_downloads(self, keep: set[tuple[int, int]], apps: Iterable[str]) -> int:
        return 0
