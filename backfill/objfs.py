"""Object storage through ``pyarrow.fs``: a root URI, its filesystem, and guarded keys.

Theory of operation.  An object-store root is ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
``Bucket`` parses it and hands out keys (``bucket/prefix/...``, the paths ``pyarrow.fs``
takes) only after checking each stays under the prefix: no empty, ``.`` or ``..`` segment, no
backslash or control character, so no name read back from a manifest or an app's config can
reach another prefix.  ``filesystem`` opens ``pyarrow.fs.S3FileSystem`` or ``GcsFileSystem``
with their standard credential chains (environment, config files, instance metadata; no
secret passes through here), an ``endpoint_url`` for S3-compatible stores and a ``region``.
The helpers put, read, hash, list and delete objects; a PUT is atomic per object, so a reader
never sees half a file.  ``probe`` writes and deletes one tiny object, naming the bucket and
the cause when it cannot (never a credential).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from backfill.errors import ConfigError, IntegrityError, StorageError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Bucket", "delete", "filesystem", "info", "listing", "probe", "put", "read", "sha256"]

_ROOT = re.compile(r"(s3|gs)://([^/]+)((?:/[^/]+)*)/?")
_BAD = re.compile(r"[\x00-\x1f\x7f\\]")
_CHUNK = 1 << 20
# Causes that are the network's, not the configuration's: a run may be tried again later.
_TRANSIENT = ("NETWORK_CONNECTION", "Couldn't connect", "curlCode", "Timeout", "timed out")


@dataclass(frozen=True, slots=True)
class Bucket:
    """An object-store root: its scheme, bucket and prefix (without slashes at either end)."""

    scheme: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> Bucket:
        """The root at ``uri``; ``ValueError`` if it is not ``s3://`` or ``gs://BUCKET[/...]``."""
        match = _ROOT.fullmatch(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
        bucket = cls(match[1], match[2], match[3].strip("/"))
        bucket.key()  # the prefix itself is checked as any key is
        return bucket

    @property
    def base(self) -> str:
        """The root as a ``pyarrow.fs`` path: ``bucket/prefix``."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.base}"

    def key(self, *parts: str) -> str:
        """``bucket/prefix/part/...``, or ``IntegrityError`` if any part could leave the prefix."""
        segments = [s for part in (self.prefix, *parts) if part for s in part.split("/")]
        for segment in segments:
            if segment in ("", ".", "..") or _BAD.search(segment):
                raise IntegrityError(
                    f"refusing to touch {self.uri}/{'/'.join(parts)}: it would leave the "
                    f"prefix {self.uri}"
                )
        return "/".join([self.bucket, *segments])

    def to_uri(self, key: str) -> str:
        return f"{self.scheme}://{key}"

    def of_uri(self, uri: str) -> str:
        """The key of ``uri`` under this root, or ``IntegrityError``."""
        head = f"{self.uri}/"
        if not uri.startswith(head):
            raise IntegrityError(f"refusing to touch {uri}: not under the output root {self.uri}")
        return self.key(uri[len(head) :])


def filesystem(
    bucket: Bucket, *, endpoint_url: str | None = None, region: str | None = None
) -> Any:
    """The ``pyarrow.fs`` filesystem of ``bucket``, with the standard credential chain."""
    scheme = host = None
    if endpoint_url is not None:
        scheme, _, host = endpoint_url.partition("://")
        host = host.rstrip("/")
    if bucket.scheme == "gs":
        return pafs.GcsFileSystem(endpoint_override=host, scheme=scheme)
    # Delayed open: an object under one part goes up as ONE PutObject at close, not as three
    # multipart requests (errors still surface at close, which ``put`` waits for).
    return pafs.S3FileSystem(region=region, endpoint_override=host, scheme=scheme,
                             background_writes=False, allow_delayed_open=True)  # fmt: skip


def put(fs: Any, key: str, data: bytes | Path) -> None:
    """Write one object whole (the bytes, or the local file's), in one PUT at close."""
    with fs.open_output_stream(key) as out:
        if isinstance(data, bytes):
            out.write(data)
            return
        with data.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                out.write(chunk)


def read(fs: Any, key: str) -> bytes | None:
    """The object's bytes, or None if there is none."""
    try:
        with fs.open_input_stream(key) as handle:
            return bytes(handle.read())
    except FileNotFoundError:
        return None


def info(fs: Any, key: str) -> int | None:
    """The object's size, or None if there is no object at ``key``."""
    found = fs.get_file_info(key)
    return int(found.size) if found.type == pafs.FileType.File else None


def sha256(fs: Any, key: str) -> str:
    """The hex sha256 of the object, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with fs.open_input_stream(key) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def delete(fs: Any, key: str) -> bool:
    """Delete one object; returns whether it was there."""
    try:
        fs.delete_file(key)
    except FileNotFoundError:
        return False
    return True


def listing(fs: Any, base: str) -> list[tuple[str, int]]:
    """(key, size) of every object below ``base`` (directory markers are not objects)."""
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    found = fs.get_file_info(selector)
    return sorted((f.path, int(f.size)) for f in found if f.type == pafs.FileType.File)


def cause(exc: BaseException) -> str:
    """A short cause for a message: the error's first line, cut (no credential is in it)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def probe(bucket: Bucket, fs: Any, where: str) -> None:
    """Write and delete one tiny object under the prefix; ``ConfigError`` (credentials,
    permissions, no such bucket) or ``StorageError`` (unreachable) naming the bucket."""
    key = bucket.key(f".backfill-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        put(fs, key, b"")
        fs.delete_file(key)
    except (OSError, pa.ArrowException) as exc:
        text = f"{where}: cannot write to bucket {bucket.bucket!r} ({cause(exc)})"
        if any(marker in str(exc) for marker in _TRANSIENT):
            raise StorageError(f"{text}: the store is unreachable; try again later") from exc
        raise ConfigError(
            f"{text}: check the credentials (AWS_* / GOOGLE_* environment, config files or "
            "instance role), the bucket name, [output] region and endpoint_url"
        ) from exc
