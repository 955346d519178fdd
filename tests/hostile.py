"""A hostile Flurry API and download host on loopback, for the tests that attack the client.

A raw asyncio HTTP server (not aiohttp's: it must be able to send what no well-behaved server
sends: a status line made of the request's headers, a lying ``Content-Length``, an endless body).
It answers the submit and status calls like Flurry and serves downloads itself.  ``mode`` picks
the attack, applied only to the windows of the app whose key is ``victim_key``; every other
window (and every window once ``mode`` is ``"good"``) gets a well-formed answer: an accepted
request, then ``Success`` with a signed link, then an empty gzip file (a window with no rows).

Every link carries ``SIGNATURE``, every request made with the token carries ``TOKEN``: the tests
assert neither ever shows in what a person or a file can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["MODES", "SIGNATURE", "TOKEN", "Hostile", "serve"]

TOKEN = "tok-HOSTILE-SENTINEL-0123456789"
SIGNATURE = "SIGSENTINEL0deadbeefcafe"
EMPTY_GZIP = gzip.compress(b"", mtime=0)

MODES = (
    "good",
    "echo-502",  # the status call answers 502 with a page echoing the request's headers
    "api-bad-status-line",  # the submit answer's status line is the echoed Authorization header
    "status-endless",  # the status answer is an endless body
    "redirect-loop",  # the link redirects to itself, signature and all
    "bad-content-length",  # the download's Content-Length is not a number (and names the link)
    "download-bad-status-line",  # the download's status line is the echoed request line
    "file-link",  # the link is a file:// URL with a signature
    "invalid-link",  # the link is http://[::1/x?... (unbalanced bracket)
    "endless-download",  # the download never ends (no Content-Length)
    "trickle",  # the download brings a byte now and then
)


@dataclass(slots=True)
class Hostile:
    """The server's state: the attack, whom it targets, and what it saw and sent."""

    victim_key: str
    mode: str = "good"
    base: str = ""
    requests: dict[str, str] = field(default_factory=dict)  # request id -> api key
    sent_bytes: int = 0  # body bytes sent by the endless modes
    calls: list[str] = field(default_factory=list)

    def _victim(self, request_id: str) -> bool:
        return self.mode != "good" and self.requests.get(request_id) == self.victim_key

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            self.calls.append(f"{method} {target.split('?')[0]}")
            await self._answer(method, target, head, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()

    async def _answer(
        self, method: str, target: str, head: bytes, body: bytes, out: asyncio.StreamWriter
    ) -> None:
        path = target.split("?", 1)[0]
        if method == "POST" and path.endswith("/rawData"):
            attributes = json.loads(body)["data"]["attributes"]
            request_id = str(len(self.requests) + 1)
            self.requests[request_id] = attributes["apiKey"]
            if self.mode == "api-bad-status-line" and attributes["apiKey"] == self.victim_key:
                auth = next(line for line in head.split(b"\r\n") if b"uthorization" in line)
                out.write(auth + b"\r\n\r\n")
                return
            accepted = {"data": {"type": "rawData", "id": request_id,
                                 "attributes": {"requestStatus": "Acknowledged"}}}  # fmt: skip
            _send(out, 200, json.dumps(accepted).encode())
        elif method == "GET" and "/rawData/" in path:
            await self._status(path.rsplit("/", 1)[1], head, out)
        elif method == "GET" and path.startswith("/dl/"):
            await self._download(path.rsplit("/", 1)[1], target, head, out)
        else:
            _send(out, 404, b"{}")

    async def _status(self, request_id: str, head: bytes, out: asyncio.StreamWriter) -> None:
        victim = self._victim(request_id)
        if victim and self.mode == "echo-502":
            page = b"<html><body><h1>502 Bad Gateway</h1><pre>" + head + b"</pre></body></html>"
            _send(out, 502, page, "text/html")
            return
        if victim and self.mode == "status-endless":
            out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.api+json\r\n\r\n")
            await self._endless(out, b'{"data": "' + b" " * 65535)
            return
        link = f"{self.base}/dl/{request_id}?X-Amz-Expires=900&X-Amz-Signature={SIGNATURE}"
        if victim and self.mode == "file-link":
            link = f"file:///etc/passwd?X-Amz-Signature={SIGNATURE}"
        if victim and self.mode == "invalid-link":
            link = f"http://[::1/x?X-Amz-Signature={SIGNATURE}"
        ready = {"data": {"type": "rawData", "id": request_id,
                          "attributes": {"requestStatus": "Success", "s3URI": link}}}  # fmt: skip
        _send(out, 200, json.dumps(ready).encode())

    async def _download(
        self, request_id: str, target: str, head: bytes, out: asyncio.StreamWriter
    ) -> None:
        mode = self.mode if self._victim(request_id) else "good"
        if mode == "redirect-loop":
            out.write(f"HTTP/1.1 302 Found\r\nLocation: {self.base}{target}\r\n"
                      "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
        elif mode == "bad-content-length":
            out.write(f"HTTP/1.1 200 OK\r\nContent-Length: {self.base}{target}\r\n"
                      "Connection: close\r\n\r\n".encode() + EMPTY_GZIP)  # fmt: skip
        elif mode == "download-bad-status-line":
            out.write(head.split(b"\r\n")[0] + b"\r\n\r\n")
        elif mode == "endless-download":
            out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            await self._endless(out, b"\x00" * 65536)
        elif mode == "trickle":
            out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100000):
                out.write(b"\x1f")
                await out.drain()
                self.sent_bytes += 1
                await asyncio.sleep(0.05)
        else:
            _send(out, 200, EMPTY_GZIP, "application/octet-stream")

    async def _endless(self, out: asyncio.StreamWriter, piece: bytes) -> None:
        while True:  # until the client hangs up (drain raises)
            out.write(piece)
            await out.drain()
            self.sent_bytes += len(piece)


def _send(out: asyncio.StreamWriter, status: int, body: bytes, kind: str = "") -> None:
    kind = kind or "application/vnd.api+json"
    out.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )


@contextlib.asynccontextmanager
async def serve(victim_key: str, mode: str = "good") -> AsyncIterator[Hostile]:
    """The hostile server on 127.0.0.1 (a free port); ``server.base`` is its base URL."""
    hostile = Hostile(victim_key=victim_key, mode=mode)
    server = await asyncio.start_server(hostile.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hostile.base = f"http://127.0.0.1:{port}"
    async with server:
        yield hostile
        server.close()
