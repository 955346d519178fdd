"""Flurry's wire format, sans I/O: build request bodies, parse every response variant.

Each ``parse_*`` takes ``(status, headers, body)`` exactly as received and returns a value or
raises a typed error from ``backfill.errors`` carrying the app, window and request id.  The
client only sends and streams; it never looks inside a body itself.  The parsers are tolerant
where ``flurry-api.md`` says the real wording or shape is unknown: ids as strings or numbers,
errors as strings or objects, and the too-large rejection in any phrasing (``suggested_ms``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from backfill.errors import (
    AuthError,
    LinkExpiredError,
    RateLimitedError,
    RequestFailedError,
    RequestRejectedError,
    ResultsExpiredError,
    ServerError,
    TooLargeError,
    Where,
    WindowError,
)
from backfill.models import DAY_MS, HOUR_MS, WEEK_MS

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from backfill.models import Window

__all__ = [
    "JSON_API",
    "STATUS_FIELDS",
    "Processing",
    "Ready",
    "build_submit",
    "error_text",
    "is_too_large",
    "parse_download_error",
    "parse_status",
    "parse_submit",
    "status_path",
    "suggested_ms",
]

JSON_API = "application/vnd.api+json"
STATUS_FIELDS = "requestStatus,s3URI"
_MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Processing:
    """The request is still being processed (``Acknowledged``)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The request finished; ``url`` is the presigned link (a secret: log its path only)."""

    url: str


# -- building ------------------------------------------------------------------------------


def build_submit(
    window: Window,
    *,
    api_key: str,
    output_format: str = "JSON",
    app_versions: Sequence[str] = (),
    event_ids: Sequence[str] = (),
) -> bytes:
    """The POST body for ``window``: times as strings, ``endTime`` inclusive (``end - 1``)."""
    attributes: dict[str, str] = {
        "startTime": str(window.start),
        "endTime": str(window.end - 1),
        "outputFormat": output_format,
        "apiKey": api_key,
    }
    if app_versions:
        attributes["app_versions"] = ",".join(app_versions)
    if event_ids:
        attributes["eventIds"] = ",".join(event_ids)
    return json.dumps({"data": {"type": "rawData", "attributes": attributes}}).encode()


def status_path(request_id: str) -> str:
    """The status resource of ``request_id``, asking for the two fields we read."""
    return f"/rawData/{quote(request_id, safe='')}?fields%5BrawData%5D={quote(STATUS_FIELDS)}"


# -- the too-large rejection ----------------------------------------------------------------

_TOO_LARGE = re.compile(
    r"too\s+(large|big|much)|exceed|size\s+limit|data\s+volume|maximum\s+window|"
    r"smaller\s+window|reduce\s+the\s+window",
    re.IGNORECASE,
)
_UNIT_MS = {"w": WEEK_MS, "d": DAY_MS, "h": HOUR_MS, "m": _MINUTE_MS}
_WORDS = re.compile(
    r"\b(\d+|an?|one)\s*-?\s*(weeks?|wks?|w|days?|d|hours?|hrs?|h|minutes?|mins?)\b", re.IGNORECASE
)
_ADVERBS = {"weekly": WEEK_MS, "daily": DAY_MS, "hourly": HOUR_MS}
_ADVERB = re.compile(r"\b(weekly|daily|hourly)\b", re.IGNORECASE)
_ISO = re.compile(r"\bP(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?\b")
_MILLIS = re.compile(r"\b(\d{7,})\s*(?:ms|milliseconds?)?\b", re.IGNORECASE)


def is_too_large(text: str) -> bool:
    """Whether an error text is a window-too-large rejection (any phrasing)."""
    return bool(_TOO_LARGE.search(text))


def _iso_ms(match: re.Match[str]) -> int:
    weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return (weeks * 7 + days) * DAY_MS + hours * HOUR_MS + minutes * _MINUTE_MS + seconds * 1000


def suggested_ms(text: str) -> int | None:
    """The window size a too-large rejection suggests, in ms, or None if it names none.

    Reads ``1 week``, ``7 days``, ``a week``, ``weekly``, ``24 hours``, ISO-8601 durations
    (``P7D``, ``PT6H``) and bare milliseconds (``604800000``).  With several sizes named, the
    smallest wins (``the 30 days you asked are too large, use 7 days`` → 7 days).
    """
    sizes = [ms for m in _ISO.finditer(text) if (ms := _iso_ms(m)) > 0]
    for count, unit in _WORDS.findall(text):
        n = int(count) if count.isdigit() else 1
        sizes.append(n * _UNIT_MS[unit[0].lower()])
    sizes += [_ADVERBS[a.lower()] for a in _ADVERB.findall(text)]
    if not sizes:  # a bare number counts only when no unit was named, and in whole hours
        sizes = [int(n) for n in _MILLIS.findall(text) if int(n) % HOUR_MS == 0]
    sizes = [s for s in sizes if s > 0]
    return min(sizes) if sizes else None


# -- parsing -------------------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_text(body: bytes) -> str:
    """The human text of an error body: ``errors`` strings or objects, ``message``, or raw."""
    document = _json(body)
    if isinstance(document, dict):
        parts: list[str] = []
        errors = document.get("errors")
        for error in errors if isinstance(errors, list) else []:
            if isinstance(error, dict):
                parts += [str(error[k]) for k in ("detail", "title", "message") if error.get(k)]
            else:
                parts.append(str(error))
        if not parts and document.get("message"):
            parts.append(str(document["message"]))
        if parts:
            return "; ".join(parts)
    text = body.decode("utf-8", "replace")
    text = re.sub(r"<[^>]*>", " ", text)  # HTML and XML bodies: keep the words
    return " ".join(text.split())[:300] or "(empty body)"


def _number(headers: Mapping[str, str], name: str) -> float | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _api_error(status: int, headers: Mapping[str, str], body: bytes, ctx: Where) -> WindowError:
    """The error for a non-2xx API answer (raises ``AuthError`` itself: it is not a window's)."""
    text = error_text(body)
    if status in (401, 403):
        raise AuthError(f"the API refused the token ({status}: {text})")
    if status == 429:
        remaining = _number(headers, "X-RateLimit-Remaining")
        limit = _number(headers, "X-RateLimit-Limit")
        return RateLimitedError(
            f"rate limited (429: {text})",
            retry_after_s=_number(headers, "Retry-After"),
            refill_per_minute=_number(headers, "X-RateLimit-RefillPerMinute"),
            remaining=int(remaining) if remaining is not None else None,
            limit=int(limit) if limit is not None else None,
            **ctx,
        )
    if status >= 500:
        return ServerError(
            f"server error {status}: {text}", retry_after_s=_number(headers, "Retry-After"), **ctx
        )
    if status == 404:
        return ResultsExpiredError(f"request unknown to the API (404: {text})", **ctx)
    if is_too_large(text):
        return TooLargeError(text, suggested_ms=suggested_ms(text), **ctx)
    return RequestRejectedError(f"the API rejected the window ({status}: {text})", **ctx)


def _attributes(body: bytes, ctx: Where) -> tuple[str | None, dict[str, Any]]:
    document = _json(body)
    data = document.get("data") if isinstance(document, dict) else None
    attributes = data.get("attributes") if isinstance(data, dict) else None
    if not isinstance(attributes, dict):
        raise ServerError(f"unexpected response body: {error_text(body)[:120]}", **ctx)
    raw_id = data.get("id") if isinstance(data, dict) else None
    request_id = (
        str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
    )
    return request_id, attributes


def parse_submit(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    app: str | None = None,
    window: str | None = None,
) -> str:
    """The request id of an accepted POST; raises the typed error of any other answer."""
    ctx: Where = {"app": app, "window": window, "request_id": None}
    if not 200 <= status < 300:
        raise _api_error(status, headers, body, ctx)
    request_id, attributes = _attributes(body, ctx)
    if request_id is None or not request_id.strip():
        raise ServerError("accepted, but the answer has no request id", **ctx)
    state = str(attributes.get("requestStatus", "")).lower()
    if state != "acknowledged":
        ctx["request_id"] = request_id
        text = str(attributes.get("message") or attributes.get("requestStatus"))
        if is_too_large(text):
            raise TooLargeError(text, suggested_ms=suggested_ms(text), **ctx)
        raise RequestFailedError(f"the request did not go through ({text})", **ctx)
    return request_id


def parse_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    request_id: str,
    app: str | None = None,
    window: str | None = None,
) -> Processing | Ready:
    """``Processing`` or ``Ready(url)``; raises the typed error of a Failure, expiry or error."""
    ctx: Where = {"app": app, "window": window, "request_id": request_id}
    if not 200 <= status < 300:
        raise _api_error(status, headers, body, ctx)
    _, attributes = _attributes(body, ctx)
    state = str(attributes.get("requestStatus", "")).lower()
    if state in ("acknowledged", "processing", "pending", "inprogress", "in_progress"):
        return Processing()
    if state == "failure":
        text = str(attributes.get("message") or "")
        if is_too_large(text):
            raise TooLargeError(text, suggested_ms=suggested_ms(text), **ctx)
        raise RequestFailedError(f"Flurry reported Failure{': ' + text if text else ''}", **ctx)
    if state == "success":
        uri = attributes.get("s3URI")
        if isinstance(uri, str) and uri.startswith(("https://", "http://")):
            return Ready(uri)
        if isinstance(uri, str) and re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", uri.strip()):
            shown = uri.strip().split("?", 1)[0]  # a link's query may hold a signature
            raise ServerError(f"the download link is not an http(s) link ({shown})", **ctx)
        if isinstance(uri, str) and uri.strip():
            raise ResultsExpiredError(f"results expired ({uri})", **ctx)
        raise ServerError("Success without a download link", **ctx)
    raise ServerError(f"unknown requestStatus {attributes.get('requestStatus')!r}", **ctx)


def parse_download_error(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    request_id: str,
    app: str | None = None,
    window: str | None = None,
) -> WindowError:
    """The error to raise for a download that did not answer 200/206."""
    ctx: Where = {"app": app, "window": window, "request_id": request_id}
    text = error_text(body)
    if status == 403:
        return LinkExpiredError(f"the download link was refused ({text})", **ctx)
    if status == 404:
        return ResultsExpiredError(f"the download is gone ({text})", **ctx)
    retry_after = _number(headers, "Retry-After")
    return ServerError(f"download answered {status}: {text}", retry_after_s=retry_after, **ctx)
