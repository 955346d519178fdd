"""The Flurry API over aiohttp: submit, status and download.  Nothing else touches aiohttp.

Two sessions: one for the API (bearer token, JSON:API headers) and one for downloads, which never
sends the Authorization header (S3 refuses a second auth mechanism, and the token must not leak
to the download host) and never decompresses (the body is gzip bytes served without
``Content-Encoding``).  Every aiohttp exception becomes a ``TransportError`` carrying the window and
request id; bodies are handed to ``protocol`` to interpret.  A download streams to a file in
chunks, checks ``Content-Length``, and after a cut connection resumes with a ``Range`` request
guarded by ``If-Range`` (the ETag), so a changed object is fetched again from the start.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiofiles
import aiohttp
import anyio.to_thread

from backfill import crashpoints, protocol
from backfill.errors import ServerError, TransportError, Where

if TYPE_CHECKING:
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
    """A URL without its query string (presigned links carry their signature there)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect_s: float = 10.0
    read_s: float = 60.0  # between two reads of a response
    api_total_s: float = 120.0  # one API call, start to end
    download_total_s: float = 3600.0  # one download, start to end


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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
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
            timeout=aiohttp.ClientTimeout(
                total=t.download_total_s, sock_connect=t.connect_s, sock_read=t.read_s
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
                return response.status, dict(response.headers), await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransportError(
                f"{method} {safe_url(url)} failed: {_describe(exc)}", **where
            ) from exc

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
        status, headers, raw = await self._call(
            "GET", self.base_url + protocol.status_path(request_id), where
        )
        if status == 429:
            self.calls.rate_limited += 1
        return protocol.parse_status(
            status, headers, raw, request_id=request_id, app=window.app, window=window.label
        )

    # -- download --------------------------------------------------------------------------

    async def download(self, url: str, target: Path, *, window: Window, request_id: str) -> int:
        """Stream the link's body into ``target``, fsynced; returns its size in bytes.

        Resumes a cut transfer with ``Range`` + ``If-Range`` up to ``max_resumes`` times; raises
        ``LinkExpiredError`` (poll again for a new link), ``TransportError`` or ``ServerError``
        (also for an empty body: under the contract even a window with no rows is a gzip file).
        """
        assert self._downloads is not None, "use the client as an async context manager"
        where: Where = {"app": window.app, "window": window.label, "request_id": request_id}
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer = _Transfer()
        async with aiofiles.open(target, "wb") as out:
            while True:
                try:
                    await self._fetch(url, out, transfer, window, request_id)
                    break
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    if transfer.resumes >= self.max_resumes or transfer.total is None:
                        raise TransportError(
                            f"download from {safe_url(url)} failed after {transfer.received} "
                            f"bytes: {_describe(exc)}",
                            **where,
                        ) from exc
                    transfer.resumes += 1
                    self.calls.resumed += 1
                    await out.flush()
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.fileno())  # on disk before DOWNLOADED
        if transfer.received == 0:
            raise ServerError("the download is empty (0 bytes), not a gzip file", **where)
        return transfer.received

    async def _fetch(
        self,
        url: str,
        out: AsyncBufferedIOBase,
        transfer: _Transfer,
        window: Window,
        request_id: str,
    ) -> None:
        """One GET of the link (from where the last one stopped), written to ``out``."""
        assert self._downloads is not None
        headers = {}
        if transfer.received:
            headers["Range"] = f"bytes={transfer.received}-"
            if transfer.etag:
                headers["If-Range"] = transfer.etag
        self.calls.download += 1
        async with self._downloads.get(url, headers=headers) as response:
            if response.status not in (200, 206):
                raw = await response.read()
                raise protocol.parse_download_error(
                    response.status, dict(response.headers), raw, request_id=request_id,
                    app=window.app, window=window.label,
                )  # fmt: skip
            if response.status == 200 and transfer.received:  # the object changed: start over
                await out.seek(0)
                await out.truncate()
                transfer.received = 0
            if transfer.total is None or response.status == 200:
                transfer.total = _total(response)
                transfer.etag = response.headers.get("ETag")
            async for piece in response.content.iter_chunked(self.chunk_bytes):
                await out.write(piece)
                transfer.received += len(piece)
                crashpoints.hit("client.download.chunk")
        if transfer.total is not None and transfer.received != transfer.total:
            raise aiohttp.ClientPayloadError(
                f"received {transfer.received} of {transfer.total} bytes"
            )


@dataclass(slots=True)
class _Transfer:
    """How far one download has come."""

    received: int = 0
    total: int | None = None
    etag: str | None = None
    resumes: int = 0


def _total(response: aiohttp.ClientResponse) -> int | None:
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        size = content_range.rpartition("/")[2]
        return int(size) if size.isdigit() else None
    length = response.content_length
    return length


_QUERY = re.compile(r"(https?://[^\s?#\"']+)\?[^\s#\"']*")


def _describe(exc: BaseException) -> str:
    """The exception's class and text, with any URL's query string cut off.

    aiohttp's own texts can carry the full URL (``InvalidURL``, ``TooManyRedirects``), and a
    presigned link's signature must not reach an error message, the ledger or a log.
    """
    text = str(exc) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
    return _QUERY.sub(r"\1", text)
