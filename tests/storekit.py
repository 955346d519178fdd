"""Store-level tests run over both output stores: a folder (``LocalStore``) and a bucket on the
loopback S3 server (``ObjectStore``), through one ``stores`` fixture.

``Stores.make(name)`` builds a fresh store of the test's kind (for S3: a fresh bucket with the
prefix ``name``, staging in ``tmp_path``); ``files``, ``read``, ``write`` and ``landed`` look at
what it holds by key relative to its root, whatever the kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from backfill.objstore import ObjectStore
from backfill.store import LocalStore
from tests.s3server import REGION, new_root

if TYPE_CHECKING:
    from backfill.schema import Limits

Store = LocalStore | ObjectStore


@dataclass
class Stores:
    kind: str  # "local" or "s3"
    tmp: Path

    def make(self, name: str = "out", *, limits: Limits | None = None, **kw: Any) -> Store:
        if self.kind == "local":
            return LocalStore(self.tmp / name, limits=limits, **kw)
        root = new_root(prefix=name)
        return ObjectStore(root.uri, staging=self.tmp / f"{name}-staging",
                           endpoint_url=root.endpoint_url, region=REGION, limits=limits,
                           **kw)  # fmt: skip

    def files(self, store: Store) -> list[str]:
        """Every file of the store's root, relative to it; for a bucket, every object in it
        (one outside the prefix keeps its full key, so a test sees it)."""
        if isinstance(store, LocalStore):
            root = store.root.resolve()
            return sorted(
                str(p.resolve().relative_to(root)) for p in root.rglob("*") if p.is_file()
            )
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(store.bucket.bucket, recursive=True)
        head = f"{store.bucket.base}/"
        return sorted(
            f.path.removeprefix(head)
            for f in store.fs.get_file_info(selector)
            if f.type == pafs.FileType.File
        )

    def read(self, store: Store, relative: str) -> bytes:
        if isinstance(store, LocalStore):
            return (store.root / relative).read_bytes()
        with store.fs.open_input_stream(store.bucket.key(relative)) as handle:
            return bytes(handle.read())

    def write(self, store: Store, relative: str, data: bytes) -> None:
        if isinstance(store, LocalStore):
            path = store.root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        with store.fs.open_output_stream(store.bucket.key(relative)) as out:
            out.write(data)

    def parquet(self, store: Store) -> list[str]:
        """The Parquet files a reader sees under ``events/`` (relative to the root)."""
        return [f for f in self.files(store) if f.startswith("events/") and f.endswith(".parquet")]

    def landed(self, store: Store) -> list[dict[str, Any]]:
        """Every row under ``events/``, read as a hive-partitioned dataset (pyarrow)."""
        if isinstance(store, LocalStore):
            source: Any = store.root / "events"
            fs = None
        else:
            source, fs = store.bucket.key("events"), store.fs
        table: pa.Table = ds.dataset(
            source, format="parquet", partitioning="hive", filesystem=fs
        ).to_table()
        rows: list[dict[str, Any]] = table.to_pylist()
        return rows


def spec(store: Store) -> str:
    """``store`` as one string a child process rebuilds it from (``from_spec``)."""
    if isinstance(store, LocalStore):
        return json.dumps({"root": str(store.root)})
    return json.dumps({"root": store.root, "staging": str(store.local.root),
                       "endpoint_url": store.endpoint_url})  # fmt: skip


def from_spec(text: str) -> Store:
    fields = json.loads(text)
    if "staging" not in fields:
        return LocalStore(Path(fields["root"]))
    return ObjectStore(fields["root"], staging=Path(fields["staging"]),
                       endpoint_url=fields["endpoint_url"], region=REGION)  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    """Each store-level test once on a folder and once on a bucket (loopback S3)."""
    if request.param == "s3":
        request.getfixturevalue("s3_root")  # the server (or a loud skip), and the credentials
    return Stores(kind=request.param, tmp=tmp_path)
