"""Helpers for talking to the simulator over real HTTP in tests: a fake clock and a tiny client."""

from __future__ import annotations

import contextlib
import gzip
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from backfill import simulator
from backfill.simulator import AppProfile, Faults, SimulatorSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

DAY = 86_400_000
TOKEN = "test-token-7f3a"
SMALL = AppProfile(name="small", api_key="SMALL00000000000APP1", sessions_per_day=6)
LARGE = AppProfile(
    name="large",
    api_key="LARGE0000000000APP33",
    sessions_per_day=40,
    events_per_session=3,
    spike_every_days=30,
    spike_factor=6,
    too_large_rows=1000,
)


@dataclass
class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings(**changes: Any) -> SimulatorSettings:
    """Test settings: instant processing, the two test apps, no faults unless asked."""
    base: dict[str, Any] = {
        "token": TOKEN,
        "seed": 11,
        "apps": (SMALL, LARGE),
        "latency_base_s": 0.0,
        "latency_per_krow_s": 0.0,
        "max_processing": 1000,
        "faults": Faults(),
    }
    return SimulatorSettings(**(base | changes))


def today_ms() -> int:
    import time

    return int(time.time() * 1000) // DAY * DAY


def body(start: int | str, end: int | str, api_key: str = SMALL.api_key, **extra: Any) -> bytes:
    attributes = {"startTime": start, "endTime": end, "outputFormat": "JSON", "apiKey": api_key}
    return orjson.dumps({"data": {"type": "rawData", "attributes": attributes | extra}})


@dataclass
class Api:
    """A bare client for the simulator: each call returns (status, headers, body bytes)."""

    base: str
    http: aiohttp.ClientSession
    token: str = TOKEN
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.headers = {
            "Authorization": f"Bearer {self.token}",
            "Accept": "application/vnd.api+json",
            "Content-Type": "application/vnd.api+json",
        }

    async def post(
        self, payload: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        async with self.http.post(
            f"{self.base}/rawData",
            data=payload,
            headers=self.headers if headers is None else headers,
        ) as r:
            return r.status, r.headers, await r.read()

    async def status(
        self, request_id: str, query: str = "?fields[rawData]=requestStatus,s3URI"
    ) -> tuple[int, Any, bytes]:
        url = f"{self.base}/rawData/{request_id}{query}"
        async with self.http.get(url, headers=self.headers) as r:
            return r.status, r.headers, await r.read()

    async def get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        async with self.http.get(url, headers=headers or {}, auto_decompress=False) as r:
            return r.status, r.headers, await r.read()

    async def submit(self, start: int, end: int, api_key: str = SMALL.api_key, **extra: Any) -> str:
        status, _, raw = await self.post(body(str(start), str(end - 1), api_key, **extra))
        assert status == 200, raw
        request_id: str = orjson.loads(raw)["data"]["id"]
        return request_id

    async def link(self, request_id: str) -> str:
        status, _, raw = await self.status(request_id)
        assert status == 200, raw
        attributes = orjson.loads(raw)["data"]["attributes"]
        assert attributes["requestStatus"] == "Success", attributes
        uri: str = attributes["s3URI"]
        return uri

    async def fetch_rows(
        self, start: int, end: int, api_key: str = SMALL.api_key, **extra: Any
    ) -> list[Any]:
        request_id = await self.submit(start, end, api_key, **extra)
        status, _, raw = await self.get(await self.link(request_id))
        assert status == 200
        return [orjson.loads(line) for line in gzip.decompress(raw).splitlines()]


@contextlib.asynccontextmanager
async def running(
    sim_settings: SimulatorSettings, clock: FakeClock | None = None
) -> AsyncIterator[tuple[simulator.Simulator, Api]]:
    clock = clock or FakeClock()
    async with (
        simulator.serve(sim_settings, clock=clock) as (sim, base),
        aiohttp.ClientSession() as http,
    ):
        yield sim, Api(base, http)


def to_toml(sim: SimulatorSettings) -> str:
    """The ``[simulator]`` table for ``sim``, so a test can serve it from a real subprocess."""
    import dataclasses

    def value(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = ["[simulator]"]
    for f in dataclasses.fields(sim):
        v = getattr(sim, f.name)
        if f.name not in ("apps", "faults"):
            lines.append(f"{f.name} = {value(v)}")
    lines.append("[simulator.faults]")
    lines += [
        f"{f.name} = {value(getattr(sim.faults, f.name))}" for f in dataclasses.fields(sim.faults)
    ]
    for app in sim.apps:
        lines.append("[[simulator.apps]]")
        lines += [f"{f.name} = {value(getattr(app, f.name))}" for f in dataclasses.fields(app)]
    return "\n".join(lines) + "\n"
