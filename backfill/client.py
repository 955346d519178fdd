"""The Flurry API over aiohttp: submit, status and download.  Nothing else touches aiohttp.

Two sessions: one for the API (bearer token, JSON:API headers) and one for downloads, which never
sends the Authorization header (S3 refuses a second auth mechanism, and the token must not leak
to the download host) and never decompresses (the body is gzip bytes served without
``Content-Encoding``).  Every aiohttp exception becomes a ``TransportError`` carrying the window and
request id; bodies are handed to ``protocol`` to interpret.  A download streams to a file in
chunks, checks ``Content-Length``, and after a cut connection resumes with a ``Range`` request
guarded by ``If-Range`` (the ETag), so a changed object is fetched again from the start.

Every wait and every body is bounded: an API body over ``max_body_bytes`` is a ``ServerError``
as soon as it passes the cap (it is never held whole); a download over ``max_download_bytes``
(the compressed-size limit) is a ``BadDataError`` as soon as it passes it; a download that
stalls (fewer than ``Timeouts.stall_bytes`` in any ``stall_s``, or no byte for ``read_s``) is a
``TransportError``, whatever its length.  Every error leaving the client has its text passed
through ``logs.scrub`` (the token, ``Authorization`` headers a server echoes, link signatures):
a server's body, aiohttp's own texts and a malformed link never carry a secret out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiofiles
import aiohttp
import anyio.to_thread

from backfill import crashpoints, logs, protocol
from backfill.errors import (
    BackfillError,
    BadDataError,
    IntegrityError,
    ServerError,
    TransportError,
    Where,
)
from backfill.schema import Limits

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from aiofiles.threadpool.binary import AsyncBufferedIOBase

    from backfill.models import Window

__all__ = ["ApiCalls", "FlurryClient", "Secret", "Timeouts", "safe_url"]


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def safe_url(url: str) -> str:
    """A URL without its query string (presigned links carry their signature there).

    Never raises: a link ``urlsplit`` refuses (``http://[::1/x?...``) is cut by ``logs.scrub``.
    """
    try:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    except ValueError:
        return logs.scrub(url.split("?", 1)[0])


MAX_BODY_BYTES = 1 << 20  # an API answer is a few hundred bytes; an error page a few KiB


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """How long the client waits; no wait is unbounded.

    A download has no whole-body limit (a big file on a slow line is fine) but must keep
    moving: at least ``stall_bytes`` in every ``stall_s`` (default: ``read_s``), and no silence
    longer than ``read_s``.
    """

    connect_s: float = 10.0
    read_s: float = 60.0  # between two reads of a response
    api_total_s: float = 120.0  # one API call, start to end
    stall_s: float | None = None  # the download progress window (None: ``read_s``)
    stall_bytes: int = 1024  # bytes a download must bring in each progress window


@dataclass(slots=True)
class ApiCalls:
    """What the client sent, by kind; the run summary prints it."""

    submit: int = 0
    status: int = 0
    download: int = 0
    rate_limited: int = 0
    resumed: int = 0


class FlurryClient:
    """``async with FlurryClient(...) as api``: submit, status and download for windows."""

    def __init__(
        self,
        *,
        base_url: str,
        token: Secret,
        timeouts: Timeouts | None = None,
        max_resumes: int = 5,
        chunk_bytes: int = 1 << 20,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_download_bytes: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        logs.register_secret(token.reveal())  # scrubbed from every text that leaves the client
        self.max_body_bytes = max_body_bytes
        self.max_download_bytes = (
            Limits().max_compressed_bytes if max_download_bytes is None else max_download_bytes
        )
        self.timeouts = timeouts or Timeouts()
        self.max_resumes = max_resumes
        self.chunk_bytes = chunk_bytes
        self.calls = ApiCalls()
        self._api: aiohttp.ClientSession | None = None
        self._downloads: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FlurryClient:
        t = self.timeouts
        self._api = aiohttp.ClientSession(
            headers={
                "Authorization": f"Bearer {self._token.reveal()}",
                "Accept": protocol.JSON_API,
                "Content-Type": protocol.JSON_API,
            },
            timeout=aiohttp.ClientTimeout(
                total=t.api_total_s, sock_connect=t.connect_s, sock_read=t.read_s
            ),
            connector=aiohttp.TCPConnector(limit=64),
        )
        self._downloads = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(  # no whole-body total: the stall watchdog bounds it
                total=None, sock_connect=t.connect_s, sock_read=t.read_s
            ),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=32),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._api, self._downloads):
            if session is not None:
                await session.close()

    # -- API calls -------------------------------------------------------------------------

    async def _call(
        self, method: str, url: str, where: Where, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._api is not None, "use the client as an async context manager"
        try:
            async with self._api.request(method, url, data=body) as response:
                raw = await _read_capped(response, self.max_body_bytes, where)
                return response.status, dict(response.headers), raw
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise TransportError(
                f"{method} {safe_url(url)} failed: {_describe(exc)}", **where
            ) from exc  # the cause stays for debugging; log renderings are scrubbed too

    async def submit(
        self,
        window: Window,
        *,
        api_key: str,
        output_format: str = "JSON",
        app_versions: tuple[str, ...] = (),
        event_ids: tuple[str, ...] = (),
    ) -> str:
        """POST the window; returns the request id or raises the typed error of the answer."""
        body = protocol.build_submit(
            window,
            api_key=api_key,
            output_format=output_format,
            app_versions=app_versions,
            event_ids=event_ids,
        )
        where: Where = {"app": window.app, "window": window.label}
        crashpoints.hit("client.submit")
        self.calls.submit += 1
        with _scrubbed():
            status, headers, raw = await self._call("POST", f"{self.base_url}/rawData", where, body)
            if status == 429:
                self.calls.rate_limited += 1
            request_id = protocol.parse_submit(
                status, headers, raw, app=window.app, window=window.label
            )
        crashpoints.hit("client.submit.accepted")  # accepted at Flurry, not yet in the ledger
        return request_id

    async def status(
        self, request_id: str, *, window: Window
    ) -> protocol.Processing | protocol.Ready:
        """GET the request's status: still processing, or ready with a fresh download link."""
        where: Where = {
            "app": window.app,
            "window": window.label,
            "request_id": request_id,
        }
        crashpoints.hit("client.status")
        self.calls.status += 1
        with _scrubbed():
            status, headers, raw = await self._call(
                "GET", self.base_url + protocol.status_path(request_id), where
            )
            if status == 429:
                self.calls.rate_limited += 1
            return protocol.parse_status(
                status, headers, raw, request_id=request_id, app=window.app, window=window.label
            )

    async def probe(self) -> int:
        """GET the status of an id that cannot exist (``rawData/0``): starts no report, counts
        no call.  Returns the HTTP status (404: the token is good; 401/403: refused); raises
        ``TransportError`` when the API does not answer.  One try: the caller retries."""
        with _scrubbed():
            status, _, _ = await self._call("GET", f"{self.base_url}/rawData/0", {})
        return status

    # -- download --------------------------------------------------------------------------

    async def download(self, url: str, target: Path, *, window: Window, request_id: str) -> int:
        """Stream the link's body into ``target``, fsynced; returns its size in bytes.

        Resumes a cut transfer with ``Range`` + ``If-Range`` up to ``max_resumes`` times; raises
        ``LinkExpiredError`` (poll again for a new link), ``TransportError`` (also for a stalled
        transfer), ``ServerError`` (also for an empty body, or a link that is not an
        ``http(s)`` URL) or ``BadDataError`` (more than ``max_download_bytes``).  ``target`` is
        opened without following a link; a failed download leaves no file behind."""
        where: Where = {"app": window.app, "window": window.label, "request_id": request_id}
        with _scrubbed():
            _check_link(url, where)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                return await self._download(url, target, where)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(target)  # a partial (or capped) body is no use to anyone
                raise

    async def _download(self, url: str, target: Path, where: Where) -> int:
        transfer = _Transfer()
        with anyio.CancelScope(shield=True):  # opened on a thread: a cancel must not drop it open
            out = await aiofiles.open(target, "wb", opener=_no_follow)
        try:
            while True:
                try:
                    await self._fetch(url, out, transfer, where)
                    break
                except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                    if transfer.resumes >= self.max_resumes or transfer.total is None:
                        raise TransportError(
                            f"download from {safe_url(url)} failed after {transfer.received} "
                            f"bytes: {_describe(exc)}",
                            **where,
                        ) from exc  # the cause stays for debugging; log renderings are scrubbed
                    transfer.resumes += 1
                    self.calls.resumed += 1
                    await out.flush()
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.fileno())  # on disk before DOWNLOADED
        finally:  # shielded: a run cancelled meanwhile must not leave the file open
            with anyio.CancelScope(shield=True):
                await out.close()
        if transfer.received == 0:
            raise ServerError("the download is empty (0 bytes), not a gzip file", **where)
        return transfer.received

    async def _fetch(
        self, url: str, out: AsyncBufferedIOBase, transfer: _Transfer, where: Where
    ) -> None:
        """One GET of the link (from where the last one stopped), written to ``out``."""
        assert self._downloads is not None, "use the client as an async context manager"
        headers = {}
        if transfer.received:
            headers["Range"] = f"bytes={transfer.received}-"
            if transfer.etag:
                headers["If-Range"] = transfer.etag
        self.calls.download += 1
        async with self._downloads.get(url, headers=headers) as response:
            if response.status not in (200, 206):
                raw = await _read_capped(response, self.max_body_bytes, where)
                raise protocol.parse_download_error(
                    response.status,
                    dict(response.headers),
                    raw,
                    request_id=where.get("request_id") or "",
                    app=where.get("app"),
                    window=where.get("window"),
                )
            if response.status == 200 and transfer.received:  # the object changed: start over
                await out.seek(0)
                await out.truncate()
                transfer.received = 0
            if transfer.total is None or response.status == 200:
                transfer.total = _total(response)
                transfer.etag = response.headers.get("ETag")
            self._check_size(transfer.total or 0, where)
            watch = _Watchdog(self.timeouts)
            async for piece in response.content.iter_chunked(self.chunk_bytes):
                transfer.received += len(piece)
                self._check_size(transfer.received, where)
                await out.write(piece)
                watch.moved(len(piece), where)
                crashpoints.hit("client.download.chunk")
        if transfer.total is not None and transfer.received != transfer.total:
            raise aiohttp.ClientPayloadError(
                f"received {transfer.received} of {transfer.total} bytes"
            )

    def _check_size(self, size: int, where: Where) -> None:
        if size > self.max_download_bytes:
            raise BadDataError(
                f"the download is over the {self.max_download_bytes:,}-byte compressed-size "
                f"limit ({size:,} bytes so far); refused while streaming",
                **where,
            )


class _Watchdog:
    """Raises ``TransportError`` for a download bringing under ``stall_bytes`` per ``stall_s``.

    aiohttp's ``sock_read`` ends a silence; this ends a trickle (a byte now and then).
    """

    def __init__(self, timeouts: Timeouts) -> None:
        self.window_s = timeouts.stall_s if timeouts.stall_s is not None else timeouts.read_s
        self.need = timeouts.stall_bytes
        self.since = time.monotonic()
        self.bytes = 0

    def moved(self, size: int, where: Where) -> None:
        self.bytes += size
        now = time.monotonic()
        if now - self.since < self.window_s:
            return
        if self.bytes < self.need:
            raise TransportError(
                f"the download stalled: {self.bytes} bytes in {now - self.since:.1f} s "
                f"(at least {self.need} every {self.window_s:g} s expected)",
                **where,
            )
        self.since, self.bytes = now, 0


def _no_follow(path: str, flags: int) -> int:
    """``open``'s opener: never write through a link planted where the download goes."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(
                f"refusing to write the download to {path}: a symbolic link"
            ) from exc
        raise


def _check_link(url: str, where: Where) -> None:
    """A ``ServerError`` (its text scrubbed) for a link that is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise ServerError(f"the download link is malformed: {logs.scrub(url)}", **where)


async def _read_capped(response: aiohttp.ClientResponse, cap: int, where: Where) -> bytes:
    """The body, or ``ServerError`` naming the cap once it passes ``cap`` bytes."""
    length = response.content_length
    if length is not None and length > cap:
        raise ServerError(
            f"the answer's body is {length:,} bytes, over the {cap:,}-byte cap", **where
        )
    size, parts = 0, list[bytes]()
    async for piece in response.content.iter_chunked(64 << 10):
        size += len(piece)
        if size > cap:
            raise ServerError(f"the answer's body is over the {cap:,}-byte cap", **where)
        parts.append(piece)
    return b"".join(parts)


@contextlib.contextmanager
def _scrubbed() -> Iterator[None]:
    """Every ``BackfillError`` leaving the block has its text scrubbed (``logs.scrub``)."""
    try:
        yield
    except BackfillError as exc:
        exc.args = tuple(logs.scrub(a) if isinstance(a, str) else a for a in exc.args)
        if isinstance(getattr(exc, "message", None), str):
            exc.message = logs.scrub(exc.message)  # type: ignore[attr-defined]  # WindowError's
        raise


@dataclass(slots=True)
class _Transfer:
    """How far one download has come."""

    received: int = 0
    total: int | None = None
    etag: str | None = None
    resumes: int = 0


def _total(response: aiohttp.ClientResponse) -> int | None:
    if response.status == 206:
        size = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(size) if size.isdigit() else None
    return response.content_length


_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s?#\"'<>]+)\?[^\s#\"'<>]*")


def _describe(exc: BaseException) -> str:
    """The exception's class and text, with any URL's query string cut off, and scrubbed:
    aiohttp's own texts can carry the full URL (``InvalidURL``, ``TooManyRedirects``) or the
    request headers a hostile server echoed (``Bad status line``), and neither a presigned
    link's signature nor the token may reach an error message, the ledger or a log.
    """
    text = str(exc) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
    return logs.scrub(_QUERY.sub(r"\1", text))
