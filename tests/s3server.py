"""A real S3 API on loopback for the object-store tests: moto's server, once per test process.

``s3_root`` gives each test a fresh bucket (``S3Root``: its ``uri`` with a prefix, the
``endpoint_url``, and the dummy credentials in ``env``, also set in this process's environment
for the test's length).  If moto cannot start, the tests that need it fail loudly when ``CI`` is
set and are skipped with the reason otherwise.  ``BACKFILL_TEST_STORE=s3`` makes the engine
helpers (``tests/enginekit.py``) put their output root on this server too (``shared_root``).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

# Dummy credentials for the loopback server only; no real account has them.
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
REGION = "us-east-1"

_server: list[Any] = []  # the process's one server, started on first use


def endpoint() -> str:
    """The URL of this process's moto server, started on first use; fails or skips loudly."""
    if not _server:
        try:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
        except Exception as exc:  # any reason at all: say it, and how loudly depends on CI
            reason = f"the moto S3 server could not start ({type(exc).__name__}: {exc})"
            if os.environ.get("CI"):
                pytest.fail(f"{reason}; the object-store tests cannot run", pytrace=False)
            pytest.skip(f"OBJECT-STORE TESTS NOT RUN: {reason}")
        _server.append(server)
    host, port = _server[0].get_host_and_port()
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class S3Root:
    """A fresh bucket on the loopback server, and what a client needs to reach it."""

    uri: str
    endpoint_url: str
    env: dict[str, str] = field(default_factory=lambda: dict(ENV))

    @property
    def bucket(self) -> str:
        return self.uri.removeprefix("s3://").split("/")[0]

    def filesystem(self) -> Any:
        import pyarrow.fs as pafs

        scheme, _, host = self.endpoint_url.partition("://")
        return pafs.S3FileSystem(
            endpoint_override=host, scheme=scheme, region=REGION, allow_bucket_creation=True
        )

    def keys(self, folder: str = "") -> list[str]:
        """Every object below ``folder`` of the root (relative keys, sorted)."""
        import pyarrow.fs as pafs

        base = self.uri.removeprefix("s3://") + (f"/{folder}" if folder else "")
        found = self.filesystem().get_file_info(
            pafs.FileSelector(base, recursive=True, allow_not_found=True)
        )
        head = self.uri.removeprefix("s3://") + "/"
        return sorted(f.path.removeprefix(head) for f in found if f.type == pafs.FileType.File)


def new_root(prefix: str = "out") -> S3Root:
    """A new bucket on this process's server (the credentials must be in the environment)."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    root = S3Root(uri=f"s3://test-{uuid.uuid4().hex[:16]}/{prefix}", endpoint_url=endpoint())
    root.filesystem().create_dir(root.bucket)
    return root


@pytest.fixture
def s3_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Root]:
    """A fresh bucket on the loopback S3 server, with dummy credentials in the environment."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    yield new_root()
