"""The simulator's wire pieces: its constants, canned bodies, call records and small answers.

``server`` holds the API's state and handlers; this module holds what they say on the wire.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from backfill.simulator import data

if TYPE_CHECKING:
    from backfill.simulator.settings import AppProfile

__all__ = [
    "API_PREFIX",
    "BUCKET",
    "CallRecord",
    "EXPIRED_URI",
    "HORIZON_DAYS",
    "HTML_5XX",
    "JSON_API",
    "MAX_WINDOW_MS",
    "RANGE",
    "Request",
    "S3_ERROR",
    "S3_EXPIRED",
    "TOO_LONG",
    "TOO_OLD",
    "UNAUTHORIZED",
    "as_dict",
    "comma_list",
    "epoch_ms",
    "json_answer",
    "with_",
    "xml_answer",
]

API_PREFIX = "/pulse/v1"
JSON_API = "application/vnd.api+json"
HORIZON_DAYS = 730
MAX_WINDOW_MS = 31 * data.DAY_MS
BUCKET = "/flurry-rawdata"
RANGE = re.compile(r"bytes=(\d*)-(\d*)$")

UNAUTHORIZED = {"code": 401, "message": "Unauthorized"}
TOO_LONG = {"errors": ["Cannot request report for a period greater than 31 days"]}
TOO_OLD = {"errors": ["Cannot request data older than 2 years"]}
EXPIRED_URI = "Expired URI. Please resubmit request"
S3_EXPIRED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    "<Message>Request has expired</Message><X-Amz-Expires>{ttl}</X-Amz-Expires>"
    "<Expires>{expires}</Expires><ServerTime>{now}</ServerTime>"
    "<RequestId>{rid}</RequestId><HostId>{host}</HostId></Error>"
)
S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>{rid}</RequestId></Error>"
)
HTML_5XX = "<html><head><title>{code}</title></head><body><h1>{code} {reason}</h1></body></html>"


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call a client made: what, the answer's status, and the request/window it concerned."""

    kind: str  # submit | status | download
    status: int
    request_id: str | None = None
    api_key: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None  # exclusive
    outcome: str | None = None  # the requestStatus answered, for status calls


@dataclass(slots=True, kw_only=True)
class Request:
    id: str
    token: str
    app: AppProfile
    start_ms: int
    end_ms: int  # exclusive
    output_format: str
    app_versions: tuple[str, ...] | None
    event_ids: tuple[str, ...] | None
    ready_at: float
    fate: str  # success | failure | too_large | expired
    message: str | None = None
    body: bytes | None = None
    members: int = 1
    corrupt: bool = False
    empty: bool = False
    stray: bool = False
    building: asyncio.Lock = field(default_factory=asyncio.Lock)


def as_dict(record: CallRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def with_(record: CallRecord, **changes: Any) -> CallRecord:
    return CallRecord(**(as_dict(record) | changes))


def epoch_ms(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected epoch milliseconds, got {value!r}")
    return int(value)


def comma_list(value: Any) -> tuple[str, ...] | None:
    if value is None or value == "":
        return None
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def json_answer(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type=JSON_API, headers=headers
    )


def xml_answer(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="application/xml")
