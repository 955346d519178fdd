"""Logging: the redaction processor called directly, then the configured logger end to end."""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from structlog.testing import capture_logs

from backfill import logs

if TYPE_CHECKING:
    from collections.abc import Iterator, MutableMapping

SECRET = "tok-SECRET-0123456789"
LINK = "https://s3.flurry.test/b/26.json.gz?X-Amz-Expires=900&X-Amz-Signature=deadbeefcafe"
CUT = "https://s3.flurry.test/b/26.json.gz?…"
EVENT_NAME = re.compile(r"^[a-z][a-z_]*\.[a-z][a-z_]*\.[a-z][a-z_]*$")
PACKAGE = Path(__file__).resolve().parent.parent / "backfill"


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test registers its own secrets; the suite's quiet configuration comes back after."""
    monkeypatch.setattr(logs, "_SECRETS", set())
    yield
    logs.configure(fmt="json", level="warning")


def _leaks(text: str) -> list[str]:
    return [s for s in (SECRET, "deadbeefcafe", "X-Amz-Signature") if s in text]


# -- the processor, called directly ----------------------------------------------------------


def test_redact_cuts_query_strings_and_replaces_secrets_in_every_value() -> None:
    logs.register_secret(SECRET)
    event = {
        "event": "window.download.failed",
        "url": LINK,
        "text": f"GET {LINK} with Bearer {SECRET} failed",
        "nested": {"deeper": [LINK, (SECRET, 3)]},
        "count": 7,
        "missing": None,
    }
    out = logs.redact(None, "info", event)
    assert out == {
        "event": "window.download.failed",
        "url": CUT,
        "text": f"GET {CUT} with Bearer *** failed",
        "nested": {"deeper": [CUT, ("***", 3)]},
        "count": 7,
        "missing": None,
    }
    assert isinstance(out["nested"]["deeper"][1], tuple)  # the container's type is kept
    assert event["url"] == LINK, "the caller's dict is not changed"


def test_redact_renders_an_exception_value_scrubbed() -> None:
    logs.register_secret(SECRET)
    out = logs.redact(None, "error", {"error": ValueError(f"{SECRET} refused at {LINK}")})
    assert out["error"] == f"ValueError: *** refused at {CUT}"


def test_redact_keeps_urls_without_a_query_and_fragments() -> None:
    plain = "https://api.flurry.test/pulse/v1/rawData/26"
    out = logs.redact(None, "info", {"a": plain, "b": "https://x.test/p?q=1#frag", "c": "no url?"})
    assert out == {"a": plain, "b": "https://x.test/p?…#frag", "c": "no url?"}


def test_a_secret_shorter_than_four_characters_is_not_registered() -> None:
    logs.register_secret("abc")  # would blank out every 'abc' in every line
    assert logs.redact(None, "info", {"event": "a.abc.ok"}) == {"event": "a.abc.ok"}


def test_every_registered_secret_is_replaced() -> None:
    logs.register_secret(SECRET)
    logs.register_secret("second-secret")
    out = logs.redact(None, "info", {"m": f"{SECRET} and second-secret"})
    assert out == {"m": "*** and ***"}


# -- the configured logger -------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[list[MutableMapping[str, Any]]]:
    """Events as the configured chain leaves them, just before rendering."""
    logs.configure(fmt="json", level="info", stream=io.StringIO())
    chain = list(structlog.get_config()["processors"])[:-1]  # all but the renderer
    with capture_logs(processors=chain) as entries:
        yield entries


def test_the_configured_chain_names_the_component_and_redacts(
    captured: list[MutableMapping[str, Any]],
) -> None:
    logs.register_secret(SECRET)
    log = logs.get("window")
    log.info("window.submit.ok", app="small", request_id="26")
    log.warning("window.download.retry", url=LINK, error=f"Bearer {SECRET} refused")
    log.debug("window.status.processing")  # below the configured level: dropped
    assert [(e["event"], e["component"], e["log_level"]) for e in captured] == [
        ("window.submit.ok", "window", "info"),
        ("window.download.retry", "window", "warning"),
    ]
    assert captured[1]["url"] == CUT and captured[1]["error"] == "Bearer *** refused"
    assert all("timestamp" in e for e in captured)
    assert _leaks(repr(captured)) == []


def test_json_lines_carry_no_secret_and_no_signature_even_in_a_traceback() -> None:
    logs.register_secret(SECRET)
    stream = io.StringIO()
    logs.configure(fmt="json", level="info", stream=stream)
    log = logs.get("engine")
    try:
        raise RuntimeError(f"download of {LINK} with {SECRET} failed")
    except RuntimeError:
        log.exception("window.download.failed", app="small")
    log.info("run.finish.ok", link=LINK)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["component"], e["level"]) for e in lines] == [
        ("window.download.failed", "engine", "error"),
        ("run.finish.ok", "engine", "info"),
    ]
    assert f"download of {CUT} with *** failed" in lines[0]["exception"]
    assert lines[1]["link"] == CUT
    assert _leaks(stream.getvalue()) == []


def test_console_lines_are_redacted_too_and_the_level_filters() -> None:
    logs.register_secret(SECRET)
    stream = io.StringIO()
    logs.configure(fmt="console", level="warning", stream=stream)
    log = logs.get("cli")
    log.info("run.start.ok", link=LINK)  # below warning: not written
    log.warning("run.stop.now", link=LINK, token=SECRET)
    text = stream.getvalue()
    assert "run.stop.now" in text and "run.start.ok" not in text
    assert CUT in text and "***" in text
    assert _leaks(text) == []


def test_auto_is_json_off_a_terminal() -> None:
    stream = io.StringIO()  # not a tty
    logs.configure(fmt="auto", level="info", stream=stream)
    logs.get("cli").info("run.start.ok")
    assert json.loads(stream.getvalue())["event"] == "run.start.ok"


def _event_names() -> list[tuple[str, str]]:
    """Every literal event name passed to a logger call in the package: (file:line, name)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value)
            levels = ("debug", "info", "warning", "error", "exception")
            if node.func.attr in levels and "log" in receiver and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.append((f"{path.name}:{node.lineno}", first.value))
    return found


def test_every_event_the_package_logs_is_named_component_action_outcome() -> None:
    names = _event_names()
    assert names, "the package logs events"
    odd = [(where, n) for where, n in names if not EVENT_NAME.match(n) and n not in _TWO_PARTS]
    assert odd == []


# cli.py's periodic line predates the convention and tests/test_cli_runs.py reads it by this
# name; renaming it (``run.progress.tick``) belongs to the CLI's owner, then this set goes.
_TWO_PARTS = {"run.progress"}


# -- scrub: the one redaction for every text a person or a file can see ------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.DEF-123\r\nAccept: x", "Authorization: ***\r\nAccept: x"),
        ("{'Authorization': 'Bearer abc'}", "{'Authorization': '***'}"),
        ("Host: h Authorization: Bearer abc Accept: x", "Host: h Authorization: *** Accept: x"),
        ("sent with bearer abc.def", "sent with bearer ***"),
        ("GET /b/26.gz?X-Amz-Expires=900&X-Amz-Signature=dead HTTP/1.1",
         "GET /b/26.gz?X-Amz-Expires=***&X-Amz-Signature=*** HTTP/1.1"),
        ("link file:///etc/passwd?X-Amz-Signature=dead", "link file:///etc/passwd?…"),
        ("bad http://[::1/x?X-Amz-Signature=dead here", "bad http://[::1/x?… here"),
        ("URL('https://s3.test/b?Signature=dead&a=1')", "URL('https://s3.test/b?…')"),
        ("Expired URI. Please resubmit request", "Expired URI. Please resubmit request"),
    ],
)  # fmt: skip
def test_scrub_blanks_every_form_a_secret_takes_even_unregistered(text: str, expected: str) -> None:
    assert logs.scrub(text) == expected


def test_scrub_replaces_a_registered_secret_wherever_it_stands() -> None:
    logs.register_secret(SECRET)
    assert logs.scrub(f"b'{SECRET}\\r\\n' and {SECRET}") == "b'***\\r\\n' and ***"
    assert logs.redact(None, "info", {"m": f"Bearer {SECRET}"}) == {"m": "Bearer ***"}
