"""The simulated Data Download API, served by aiohttp on loopback.

Theory of operation.  A POST validates the window exactly as ``flurry-api.md`` says (token,
31 days, 2-year horizon, too large, 429 over the processing cap), then stores a request whose
fate is drawn once: its processing time grows with its row count, and a seeded fault generator
decides whether it will end in ``Success``, ``Failure`` or a late too-large ``Failure``.  Each
status GET of a finished request mints a fresh presigned-style link; a download checks the
link's signature and deadline like S3 and serves the gzip file built from the ground truth
(``data.rows``), with ``Content-Length``, ``ETag`` and byte ranges.  Every call is recorded in
``Simulator.calls`` (and, if asked, a JSON-lines log) so tests can count what a client did.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import math
import os
import random
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from backfill.simulator import data, wire
from backfill.simulator.settings import PHRASINGS, AppProfile, SimulatorSettings
from backfill.simulator.wire import API_PREFIX, CallRecord

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

__all__ = ["API_PREFIX", "CallRecord", "Simulator", "serve"]


class Simulator:
    """The API's state and its aiohttp handlers.  ``clock`` is monotonic seconds."""

    def __init__(
        self,
        settings: SimulatorSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        log_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.calls: list[CallRecord] = []
        self._clock = clock
        skew_ms = int(settings.clock_skew_s * 1000)
        self._wall_ms: Callable[[], int] = (lambda: wall_ms() + skew_ms) if skew_ms else wall_ms
        self._log = log_path.open("a", encoding="utf-8") if log_path else None
        self._rng = random.Random(settings.fault_seed)
        self._secret = os.urandom(16)
        self._requests: dict[str, wire.Request] = {}
        self._links: dict[str, tuple[str, float]] = {}  # signature -> (request id, deadline)
        self._next_id = 26  # the doc's example id

    # -- helpers ---------------------------------------------------------------------------

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def _record(self, record: CallRecord) -> None:
        self.calls.append(record)
        if self._log is not None:
            self._log.write(orjson.dumps(wire.as_dict(record)).decode() + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def processing(self, token: str) -> int:
        """Requests of ``token`` still being processed now."""
        now = self._clock()
        return sum(1 for r in self._requests.values() if r.token == token and r.ready_at > now)

    def _authorized(self, request: web.Request) -> bool:
        expected = f"Bearer {self.settings.token}".encode()
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, expected)

    def _maybe_5xx(self) -> web.Response | None:
        if self._roll(self.settings.faults.html_ok):  # a proxy's page where JSON belongs
            return web.Response(status=200, text=wire.HTML_5XX.format(code=200, reason="Welcome"),
                                content_type="text/html")  # fmt: skip
        if not self._roll(self.settings.faults.server_error):
            return None
        code = self._rng.choice((500, 502, 503, 504))
        reason = {
            500: "Internal Server Error",
            502: "Bad Gateway",
            503: "Service Unavailable",
            504: "Gateway Timeout",
        }[code]
        headers = {"Retry-After": str(self.settings.retry_after_s)} if code == 503 else {}
        html = wire.HTML_5XX.format(code=code, reason=reason)
        return web.Response(status=code, text=html, content_type="text/html", headers=headers)

    def _too_large_message(self, req_app: AppProfile, start_ms: int, end_ms: int) -> str:
        week = 7 * data.DAY_MS
        seed = self.settings.seed
        fits_week = all(
            data.count_rows(seed, req_app.data, s, min(s + week, end_ms)) <= req_app.too_large_rows
            for s in range(start_ms, end_ms, week)
        )
        phrasing = PHRASINGS[self._rng.choice(self.settings.too_large_phrasings)]
        return phrasing[0] if fits_week else phrasing[1]

    def _errors(self, message: str) -> dict[str, Any]:
        if self.settings.too_large_shape == "objects":
            return {"errors": [{"status": "400", "title": "Bad Request", "detail": message}]}
        return {"errors": [message]}

    # -- POST /rawData ---------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.Response:
        response, record = await self._submit(request)
        self._record(record)
        return response

    async def _submit(self, request: web.Request) -> tuple[web.Response, CallRecord]:
        if not self._authorized(request):
            return wire.json_answer(401, wire.UNAUTHORIZED), CallRecord("submit", 401)
        if (failed := self._maybe_5xx()) is not None:
            return failed, CallRecord("submit", failed.status)
        try:
            attributes = orjson.loads(await request.read())["data"]["attributes"]
            start_ms = wire.epoch_ms(attributes["startTime"])
            end_ms = wire.epoch_ms(attributes["endTime"]) + 1
            api_key = attributes["apiKey"]
            output_format = attributes.get("outputFormat", "JSON")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return wire.json_answer(400, {"errors": [f"Invalid request body: {exc}"]}), CallRecord(
                "submit", 400
            )
        record = CallRecord("submit", 400, None, api_key, start_ms, end_ms)
        profile = self.settings.app(api_key) if isinstance(api_key, str) else None
        if profile is None:  # the token lacks access to this app
            return wire.json_answer(401, wire.UNAUTHORIZED), wire.with_(record, status=401)
        if output_format not in ("JSON", "CSV"):
            return wire.json_answer(400, {"errors": ["outputFormat must be JSON or CSV"]}), record
        if end_ms <= start_ms:
            return wire.json_answer(
                400, {"errors": ["endTime must not be before startTime"]}
            ), record
        if end_ms - start_ms > wire.MAX_WINDOW_MS:
            return wire.json_answer(400, wire.TOO_LONG), record
        today = self._wall_ms() // data.DAY_MS * data.DAY_MS
        if start_ms < today - wire.HORIZON_DAYS * data.DAY_MS:
            return wire.json_answer(400, wire.TOO_OLD), record
        processing = self.processing(self.settings.token)
        faults = self.settings.faults
        if processing >= self.settings.max_processing or self._roll(faults.rate_limit_burst):
            return self._rate_limited(processing), wire.with_(record, status=429)
        rows = data.count_rows(self.settings.seed, profile.data, start_ms, end_ms)
        fate, message = "success", None
        if 0 < profile.too_large_rows < rows and end_ms - start_ms > data.DAY_MS:
            message = self._too_large_message(profile, start_ms, end_ms)
            if not self._roll(faults.too_large_at_poll):
                return wire.json_answer(400, self._errors(message)), record
            fate = "too_large"
        elif self._roll(faults.failure):
            fate = "failure"
        elif self._roll(faults.expired_results):
            fate = "expired"
        request_id = self._accept(profile, attributes, record, rows, fate, message)
        body = {
            "data": {
                "type": "rawData",
                "id": request_id,
                "attributes": {"requestStatus": "Acknowledged", "s3URI": None},
            }
        }
        return wire.json_answer(200, body), wire.with_(record, status=200, request_id=request_id)

    def _accept(
        self,
        profile: AppProfile,
        attributes: dict[str, Any],
        record: CallRecord,
        rows: int,
        fate: str,
        message: str | None,
    ) -> str:
        """Store an accepted request whose fate is drawn; returns its id."""
        settings, faults = self.settings, self.settings.faults
        stuck = self._roll(faults.stuck)
        latency = (
            settings.latency_base_s + settings.latency_per_krow_s * rows / 1000
        ) * settings.time_scale
        if stuck:
            latency = math.inf  # accepted, and never finished
        request_id = str(self._next_id)
        self._next_id += 1
        assert record.start_ms is not None and record.end_ms is not None
        self._requests[request_id] = wire.Request(
            id=request_id,
            token=settings.token,
            app=profile,
            start_ms=record.start_ms,
            end_ms=record.end_ms,
            output_format=attributes.get("outputFormat", "JSON"),
            app_versions=wire.comma_list(attributes.get("app_versions")),
            event_ids=wire.comma_list(attributes.get("eventIds")),
            ready_at=self._clock() + latency,
            fate=fate,
            message=message,
            members=self._rng.randint(2, 4) if self._roll(faults.multi_member) else 1,
            corrupt=self._roll(faults.corrupt_download),
            empty=self._roll(faults.empty_download),
            stray=self._roll(faults.stray_row),
        )
        return request_id

    def _rate_limited(self, processing: int) -> web.Response:
        cap = self.settings.max_processing
        headers = {
            "X-RateLimit-Limit": str(cap),
            "X-RateLimit-Remaining": str(max(0, cap - processing)),
            "X-RateLimit-RefillPerMinute": str(self.settings.refill_per_minute),
            "Retry-After": str(self.settings.retry_after_s),
        }
        return wire.json_answer(429, {"code": 429, "message": "Too Many Requests"}, headers)

    # -- GET /rawData/{id} -----------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        request_id = request.match_info["id"]
        record = CallRecord("status", 200, request_id)
        if not self._authorized(request):
            self._record(wire.with_(record, status=401))
            return wire.json_answer(401, wire.UNAUTHORIZED)
        if (failed := self._maybe_5xx()) is not None:
            self._record(wire.with_(record, status=failed.status))
            return failed
        req = self._requests.get(request_id)
        if req is None or req.token != self.settings.token:
            self._record(wire.with_(record, status=404))
            return wire.json_answer(404, {"errors": [f"Request {request_id} not found"]})
        record = wire.with_(
            record, api_key=req.app.api_key, start_ms=req.start_ms, end_ms=req.end_ms
        )
        now = self._clock()
        attributes: dict[str, Any] = {"requestStatus": "Acknowledged", "s3URI": None}
        if now >= req.ready_at:
            if req.fate in ("failure", "too_large"):
                attributes["requestStatus"] = "Failure"
                if req.message:
                    attributes["message"] = req.message
            elif req.fate == "expired" or now >= req.ready_at + self.settings.retention_s:
                attributes.update(requestStatus="Success", s3URI=wire.EXPIRED_URI)
            else:
                attributes.update(requestStatus="Success", s3URI=self._mint(request, req, now))
        attributes |= {
            "startTime": str(req.start_ms),
            "endTime": str(req.end_ms - 1),
            "outputFormat": req.output_format,
        }
        wanted = request.query.get("fields[rawData]")
        if wanted is not None:
            keep = set(wanted.split(","))
            attributes = {k: v for k, v in attributes.items() if k in keep or k == "message"}
        self._record(wire.with_(record, outcome=attributes.get("requestStatus")))
        body = {"data": {"type": "rawData", "id": req.id, "attributes": attributes}}
        return wire.json_answer(200, body)

    def _mint(self, request: web.Request, req: wire.Request, now: float) -> str:
        ttl = self.settings.link_ttl_s
        deadline = now if self._roll(self.settings.faults.expired_link) else now + ttl
        nonce = os.urandom(8).hex()
        signature = hmac.new(self._secret, f"{req.id}:{nonce}".encode(), hashlib.sha256).hexdigest()
        self._links[signature] = (req.id, deadline)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall_ms() / 1000))
        ext = "json" if req.output_format == "JSON" else "csv"
        return (
            f"{request.url.origin()}{wire.BUCKET}/{req.app.api_key}/{req.id}.{ext}.gz"
            f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=SIMULATED%2Fus-east-1%2Fs3"
            f"&X-Amz-Date={stamp}&X-Amz-Expires={int(ttl)}&X-Amz-SignedHeaders=host"
            f"&X-Amz-Nonce={nonce}&X-Amz-Signature={signature}"
        )

    # -- GET the presigned link ------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        signature = request.query.get("X-Amz-Signature", "")
        link = self._links.get(signature)
        record = CallRecord("download", 200, link[0] if link else None)
        if "Authorization" in request.headers:
            self._record(wire.with_(record, status=400))
            message = "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter"
            return wire.xml_answer(
                400,
                wire.S3_ERROR.format(code="InvalidArgument", message=message, rid=signature[:16]),
            )
        if link is None or link[0] != request.match_info["id"]:
            self._record(wire.with_(record, status=403))
            return wire.xml_answer(
                403,
                wire.S3_ERROR.format(
                    code="SignatureDoesNotMatch",
                    message="The request signature we calculated does not match",
                    rid=signature[:16],
                ),
            )
        request_id, deadline = link
        if self._clock() >= deadline:
            self._record(wire.with_(record, status=403))
            now = time.gmtime(self._wall_ms() / 1000)
            body = wire.S3_EXPIRED.format(
                ttl=int(self.settings.link_ttl_s),
                expires=time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
                now=time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
                rid=signature[:16].upper(),
                host=signature[16:40],
            )
            return wire.xml_answer(403, body)
        req = self._requests[request_id]
        payload = await self._payload(req)
        self._record(
            wire.with_(record, api_key=req.app.api_key, start_ms=req.start_ms, end_ms=req.end_ms)
        )
        return await self._send(request, payload)

    async def _payload(self, req: wire.Request) -> bytes:
        async with req.building:
            if req.body is None:
                req.body = await asyncio.to_thread(self._build, req)
            return req.body

    def _build(self, req: wire.Request) -> bytes:
        rows = data.rows(
            self.settings.seed,
            req.app.data,
            req.start_ms,
            req.end_ms,
            app_versions=req.app_versions,
            event_ids=req.event_ids,
        )
        if req.empty:
            return b""
        if req.stray:  # one more row, from the first millisecond after the window
            later = data.rows(
                self.settings.seed, req.app.data, req.end_ms, req.end_ms + data.DAY_MS
            )
            stray = {**next(later), "sessionTimestamp": req.end_ms}
            rows = itertools.chain(rows, [stray])
        encode = data.encode_json if req.output_format == "JSON" else data.encode_csv
        payload = data.gzip_members(encode(rows), req.members)
        if req.corrupt:  # damage the deflate stream and the CRC: no client can read it back
            middle = len(payload) // 2
            payload = (
                payload[:middle]
                + bytes(b ^ 0x5A for b in payload[middle : middle + 64])
                + payload[middle + 64 :]
            )
        return payload

    async def _send(self, request: web.Request, payload: bytes) -> web.StreamResponse:
        start, stop = 0, len(payload)
        status = 200
        headers = {
            "Content-Type": "application/octet-stream",
            **(
                {"Content-Encoding": self.settings.content_encoding}
                if self.settings.content_encoding
                else {}
            ),
            "ETag": f'"{hashlib.md5(payload).hexdigest()}"',
            "Accept-Ranges": "bytes",
        }
        if (match := wire.RANGE.match(request.headers.get("Range", ""))) is not None:
            first, last = match.groups()
            if first:
                start, stop = int(first), (int(last) + 1 if last else len(payload))
            elif last:
                start = max(0, len(payload) - int(last))
            stop = min(stop, len(payload))
            if start >= stop:
                return wire.xml_answer(
                    416,
                    wire.S3_ERROR.format(
                        code="InvalidRange",
                        message="The requested range is not satisfiable",
                        rid="0",
                    ),
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(payload)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = stop - start
        await response.prepare(request)
        faults = self.settings.faults
        body = payload[start:stop]
        if self._roll(faults.cut_download):
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.01)  # let the half reach the socket before the connection drops
            if request.transport is not None:
                request.transport.close()
            return response
        if self._roll(faults.slow_download):
            step = max(1, len(body) // 8)
            for i in range(0, len(body), step):
                await response.write(body[i : i + step])
                await asyncio.sleep(self.settings.slow_chunk_delay_s)
        else:
            await response.write(body)
        await response.write_eof()
        return response

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_post(f"{API_PREFIX}/rawData", self.submit)
        app.router.add_get(f"{API_PREFIX}/rawData/{{id}}", self.status)
        app.router.add_get(f"{wire.BUCKET}/{{api_key}}/{{id}}.{{ext}}.gz", self.download)
        return app


@contextlib.asynccontextmanager
async def serve(
    settings: SimulatorSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Callable[[], float] = time.monotonic,
    wall_ms: Callable[[], int] | None = None,
    log_path: Path | None = None,
) -> AsyncIterator[tuple[Simulator, str]]:
    """Serve the simulator on ``host:port`` (0: a free port); yields it and its API base URL."""
    kwargs: dict[str, Any] = {"clock": clock, "log_path": log_path}
    if wall_ms is not None:
        kwargs["wall_ms"] = wall_ms
    simulator = Simulator(settings, **kwargs)
    runner = web.AppRunner(simulator.application(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield simulator, f"http://{bound_host}:{bound_port}{API_PREFIX}"
    finally:
        await runner.cleanup()
        simulator.close()
