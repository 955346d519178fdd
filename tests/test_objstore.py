"""The object-store output store against a real S3 API on loopback (moto): publish, finish,
remove, sweep, orphans, verify, hostile keys, a killed publish, the two-phase sweep, the config
and the probe, and ``backfill run`` end to end with an S3 root."""

from __future__ import annotations

import gzip
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pyarrow.dataset as ds
import pytest

from backfill import config, objfs
from backfill.commit import recover
from backfill.errors import ConfigError, IntegrityError, StorageError
from backfill.ledger import Ledger
from backfill.manifest import Manifest
from backfill.models import WindowState
from backfill.objstore import ObjectStore, check_output
from backfill.simulator import ground_truth
from backfill.simulator.data import encode_json
from tests.enginekit import ROOT, canonical, sim_settings, simulator_process, truth, write_config
from tests.s3server import REGION
from tests.simkit import SMALL, TOKEN
from tests.simkit import settings as simkit_settings

if TYPE_CHECKING:
    from pathlib import Path

    from tests.s3server import S3Root

S = WindowState
DAY = 86_400_000
START = 20_000 * DAY
ROWS = ground_truth(simkit_settings(), SMALL.api_key, START, START + 3 * DAY)


def _store(s3: S3Root, tmp_path: Path) -> ObjectStore:
    return ObjectStore(s3.uri, staging=tmp_path / "staging", endpoint_url=s3.endpoint_url,
                       region=REGION)  # fmt: skip


def _stage(store: ObjectStore, tmp_path: Path, window_id: int = 1, attempt: int = 0) -> Manifest:
    source = tmp_path / f"d{window_id}.{attempt}.gz"
    source.write_bytes(gzip.compress(encode_json(ROWS)))
    return store.stage(app="quest", window_id=window_id, attempt=attempt, start_ms=START,
                       end_ms=START + 3 * DAY, source=source)  # fmt: skip


def test_publish_lands_the_manifest_and_every_file_and_empties_staging(
    s3_root: S3Root, tmp_path: Path
) -> None:
    store = _store(s3_root, tmp_path)
    manifest = _stage(store, tmp_path)
    assert len(manifest.files) == 3
    uri = store.publish(manifest)
    assert uri == f"{s3_root.uri}/_manifests/quest/1.0.json"
    assert s3_root.keys() == ["_manifests/quest/1.0.json"] + [
        f"events/app=quest/{f.path}" for f in manifest.files
    ]
    assert not list((tmp_path / "staging").rglob("*.parquet")), "staged copies deleted"
    assert store.check_manifest(uri, manifest.rows) == []
    assert store.orphans({(1, 0)}) == []
    assert store.load("quest", 1, 0) == manifest and store.load("quest", 1, 1) is None
    store.remove(manifest)
    assert s3_root.keys() == []


def test_verify_finds_a_changed_truncated_or_missing_object(
    s3_root: S3Root, tmp_path: Path
) -> None:
    store = _store(s3_root, tmp_path)
    manifest = _stage(store, tmp_path)
    uri = store.publish(manifest)
    fs = s3_root.filesystem()
    first, second, third = (store.bucket.key("events/app=quest", f.path) for f in manifest.files)
    data = objfs.read(fs, first)
    assert data is not None
    objfs.put(fs, first, data[:-10])  # truncated
    changed = bytearray(objfs.read(fs, second) or b"")
    changed[10] ^= 0xFF
    objfs.put(fs, second, bytes(changed))  # same size, other bytes
    fs.delete_file(third)
    problems = store.check_manifest(uri, manifest.rows + 1)
    assert len(problems) == 4, problems
    assert "the ledger says" in problems[0]
    assert "bytes, the manifest says" in problems[1] and "sha256 differs" in problems[2]
    assert "missing" in problems[3]
    fs.delete_file(store.bucket.key("_manifests/quest/1.0.json"))
    assert "manifest of a committed window is missing" in store.check_manifest(uri, None)[0]


def test_hostile_keys_never_leave_the_prefix(s3_root: S3Root, tmp_path: Path) -> None:
    store = _store(s3_root, tmp_path)
    for bad in ("../x", "a/../../b", "a//b", "./a", "a\\b", "a\x00b"):
        with pytest.raises(IntegrityError, match="leave the prefix"):
            store.bucket.key(bad)
    with pytest.raises(IntegrityError, match="not under the output root"):
        store.load_manifest("s3://other-bucket/out/_manifests/quest/1.0.json")
    for uri in ("s3://", "s3:///x", "file:///tmp/x", "s3://b/../x", "s3://b/a//c"):
        with pytest.raises((ValueError, IntegrityError)):
            objfs.Bucket.parse(uri)
    manifest = _stage(store, tmp_path)
    store.publish(manifest)
    # A manifest doctored to name a file outside its app's partition folders is refused.
    item = manifest.files[0]
    evil = Manifest(**{**_fields(manifest), "files": (type(item)(**{**_fields(item),
                       "path": "../../../_manifests/quest/1.0.json"}),)})  # fmt: skip
    objfs.put(store.fs, store.bucket.key("_manifests/quest/2.0.json"), evil.to_json())
    problems = store.check_manifest(f"{s3_root.uri}/_manifests/quest/2.0.json", None)
    assert len(problems) == 1 and "not a file backfill writes" in problems[0]
    with pytest.raises(IntegrityError):
        store.remove(evil)
    assert "_manifests/quest/1.0.json" in s3_root.keys(), "nothing deleted outside"


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__slots__}


async def test_a_killed_publish_is_finished_by_recovery(s3_root: S3Root, tmp_path: Path) -> None:
    store = _store(s3_root, tmp_path)
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    try:
        (record,) = await ledger.add_windows("quest", START, START + 3 * DAY, size_ms=3 * DAY)
        for state in (S.SUBMITTED, S.READY, S.DOWNLOADED):
            record = await ledger.advance(record, state)
        manifest = _stage(store, tmp_path, record.id, record.attempt)
        record = await ledger.advance(record, S.STAGED)
        store.intend(manifest)  # the kill: the manifest and one file landed, two still staged
        stage_dir = store.local.layout.stage_dir("quest", record.id, record.attempt)
        item = manifest.files[0]
        objfs.put(store.fs, store.bucket.key("events/app=quest", item.path), stage_dir / item.path)
        (stage_dir / item.path).unlink()
        report = await recover(ledger, _store(s3_root, tmp_path))
        assert report.finished == [record.id]
        (done,) = await ledger.windows()
        assert done.state is S.COMMITTED and done.manifest == store.manifest_path(
            "quest", done.id, done.attempt
        )
        assert store.check_manifest(done.manifest, done.rows) == []
        assert len([k for k in s3_root.keys() if k.startswith("events/")]) == 3
        again = await recover(ledger, store)
        assert (again.finished, again.requeued, again.swept) == ([], [], 0)
    finally:
        await ledger.close()


def test_a_sweep_deletes_only_what_its_listing_held(s3_root: S3Root, tmp_path: Path) -> None:
    store = _store(s3_root, tmp_path)
    store.publish(_stage(store, tmp_path, 1, 0))  # dead: not in live
    store.publish(_stage(store, tmp_path, 1, 1))  # live
    objfs.put(store.fs, store.bucket.key("events/app=quest/dt=2024-10-04/notes.txt"), b"x")
    listing = store.listing()  # first the listing ...
    late = _stage(store, tmp_path, 2, 0)
    store.publish(late)  # ... another worker publishes (not yet committed) ...
    removed = store.sweep({(1, 1)}, listing)  # ... then the ledger's live set, then the sweep
    assert {r.rsplit("/", 1)[1] for r in removed} == {
        "part-1-0-0.parquet", "part-1-0-1.parquet", "part-1-0-2.parquet", "1.0.json"
    }  # fmt: skip
    assert store.check_manifest(store.manifest_path("quest", 2, 0), late.rows) == []
    assert "events/app=quest/dt=2024-10-04/notes.txt" in s3_root.keys(), "not ours: kept"
    orphans = store.orphans({(1, 1)})
    assert any("notes.txt" not in o and "part-2-0-0" in o for o in orphans)
    assert store.sweep({(1, 1)}) != []  # a sweep of its own listing: the dead attempt goes
    assert store.orphans({(1, 1)}) == [
        f"{s3_root.uri}/events/app=quest/dt=2024-10-04/notes.txt: not a file backfill wrote"
    ]


def test_a_manifest_being_written_is_swept_only_when_its_attempt_is_dead(tmp_path: Path) -> None:
    from backfill.store import LocalStore

    store = LocalStore(tmp_path / "out")
    folder = tmp_path / "out" / "_manifests" / "quest"
    folder.mkdir(parents=True)
    (folder / "1.0.json.tmp").write_text("{")
    (folder / "2.0.json.tmp").write_text("{")
    store.sweep({(1, 0)})
    assert sorted(p.name for p in folder.iterdir()) == ["1.0.json.tmp"]


# -- the config, the probe, and the whole CLI ---------------------------------------------


def _document(root: str, **ledger: str) -> dict[str, Any]:
    return {
        "api": {"token_env": "T"},
        "output": {"root": root, "region": REGION},
        "apps": [{"name": "a", "api_key": "A" * 20}],
        **({"ledger": ledger} if ledger else {}),
    }


def test_the_config_takes_an_object_root_with_a_ledger_outside_it() -> None:
    settings = config.parse(_document("s3://bucket/some/prefix/", path="/var/lib/l.sqlite"))
    assert settings.output.root == "s3://bucket/some/prefix"
    assert config.parse(_document("gs://bucket", path="l.sqlite")).output.root == "gs://bucket"
    # A PostgreSQL ledger is outside the bucket too.
    shared = config.parse(_document("s3://bucket/p") | {"ledger": {"url": "postgresql://h/db"}})
    assert shared.ledger.url == "postgresql://h/db"
    with pytest.raises(
        ConfigError, match=r"add one to the config: \[ledger\] url = .*\[ledger\] path = "
    ):
        config.parse(_document("s3://bucket/p"))
    for bad in ("s3://bucket/a//b", "s3://bucket/../x", "abfs://c/x", "s3://"):
        with pytest.raises(ConfigError, match="output.root"):
            config.parse(_document(bad, path="/l.sqlite"))
    anchored = config.anchored(config.parse(_document("s3://bkt/p", path="l.sqlite")), ROOT_PATH)
    assert anchored.output.root == "s3://bkt/p" and anchored.staging_path == ROOT_PATH / "staging"


ROOT_PATH = __import__("pathlib").Path(ROOT)


def test_the_probe_names_the_bucket_and_the_cause(s3_root: S3Root, tmp_path: Path) -> None:
    def settings(root: str, endpoint: str) -> config.Settings:
        document = _document(root, path=str(tmp_path / "l.sqlite"))
        document["output"]["endpoint_url"] = endpoint
        return config.parse(document)

    check_output(settings(s3_root.uri, s3_root.endpoint_url))  # writes and deletes one object
    assert s3_root.keys() == []
    with pytest.raises(ConfigError, match="cannot write to bucket 'no-such-bucket-x'") as caught:
        check_output(settings("s3://no-such-bucket-x/p", s3_root.endpoint_url))
    assert "testing" not in str(caught.value), "no credential in the message"
    with pytest.raises(StorageError, match="unreachable"):
        check_output(settings(s3_root.uri, "http://127.0.0.1:9"))


def _s3_config(tmp_path: Path, base: str, s3: S3Root) -> Path:
    path = write_config(tmp_path, base, history_days=40)
    text = path.read_text().replace(
        f'root = "{tmp_path / "out"}"',
        f'root = "{s3.uri}"\nendpoint_url = "{s3.endpoint_url}"\nregion = "{REGION}"',
    )
    path.write_text(text + f'[ledger]\npath = "{tmp_path / "ledger.sqlite"}"\n')
    return path


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, env=env, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.timeout(300)
async def test_run_status_verify_and_refresh_on_an_s3_root_land_the_ground_truth(
    s3_root: S3Root, tmp_path: Path
) -> None:
    sim = sim_settings()
    env = os.environ | {"FLURRY_TOKEN": TOKEN} | s3_root.env
    async with simulator_process(sim, tmp_path) as (base, _):
        config_file = str(_s3_config(tmp_path, base, s3_root))
        code, out, err = await _cli("check", "--config", config_file, env=env)
        assert code == 0 and "(writable)" in out, out + err
        code, out, err = await _cli("run", "--config", config_file, env=env)
        assert code == 0, err
        code, out, err = await _cli("status", "--config", config_file, "--json", env=env)
        report = {r["app"]: r for r in json.loads(out)}
        assert code == 0 and all(r["windows"]["failed"] == 0 for r in report.values()), out
        code, out, err = await _cli("verify", "--config", config_file, env=env)
        assert code == 0 and "verified" in out, out + err
        await _rows_equal_the_ground_truth(s3_root, tmp_path, sim)
        assert not (tmp_path / "out").exists(), "nothing landed locally"
        # A damaged object is found, its window named, and `refresh --damaged` heals it.
        fs = s3_root.filesystem()
        victim = next(k for k in s3_root.keys() if k.endswith(".parquet"))
        key = f"{s3_root.uri.removeprefix('s3://')}/{victim}"
        objfs.put(fs, key, (objfs.read(fs, key) or b"")[:-10])
        code, out, _ = await _cli("verify", "--config", config_file, env=env)
        assert code == 5 and f"{s3_root.uri}/{victim}" in out
        app = victim.split("/")[1].removeprefix("app=")
        code, out, err = await _cli(
            "refresh", "--config", config_file, "--app", app, "--damaged", env=env
        )
        assert code == 0, out + err
        code, out, err = await _cli("verify", "--config", config_file, env=env)
        assert code == 0, out + err
        await _rows_equal_the_ground_truth(s3_root, tmp_path, sim)


async def _rows_equal_the_ground_truth(s3_root: S3Root, tmp_path: Path, sim: Any) -> None:
    """Every app's rows, read back from the bucket, are the simulator's over its windows."""
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    try:
        records = await ledger.windows()
    finally:
        await ledger.close()
    records = [r for r in records if r.state is not S.SPLIT]  # a split window's children count
    assert records and all(r.state is S.COMMITTED for r in records)
    fs = s3_root.filesystem()
    for app in {r.window.app for r in records}:
        mine = [r for r in records if r.window.app == app]
        lo, hi = min(r.window.start for r in mine), max(r.window.end for r in mine)
        table = ds.dataset(f"{s3_root.uri.removeprefix('s3://')}/events/app={app}",
                           format="parquet", filesystem=fs).to_table()  # fmt: skip
        assert canonical(table.to_pylist()) == truth(sim, app, lo, hi), app
