"""A throwaway PostgreSQL cluster for the tests: one per session (per xdist worker).

Theory of operation.  ``initdb`` makes a cluster in a temporary directory (as the ``postgres``
user through ``runuser`` when the tests run as root: PostgreSQL refuses to run as root),
``pg_ctl`` starts it on 127.0.0.1 on a free port with its socket in that directory, ``fsync``
off.  Authentication is ``trust`` except for the role ``pwuser``, which must give its password
(SCRAM), so one test checks password authentication for real.  ``pg_url`` creates a fresh
database per test.  If PostgreSQL cannot start, the tests that need it fail when ``CI`` is set
and are skipped otherwise, with the reason named.  The cluster stops at the end of the session.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

PASSWORD_ROLE = "pwuser"
PASSWORD = "s3cret-Pw-for-tests"  # a throwaway cluster's test role


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    superuser: str = "postgres"

    def url(self, database: str, user: str | None = None) -> str:
        return f"postgresql://{user or self.superuser}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
            conn.execute(f"GRANT ALL ON DATABASE {name} TO {PASSWORD_ROLE}")
            conn.execute(f"ALTER DATABASE {name} OWNER TO {PASSWORD_ROLE}")
        return name


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.getuid() == 0 else argv


def _start(base: Path) -> PgServer:
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL is not installed: no pg_ctl on PATH or in /usr/lib/postgresql"
        )
    if os.getuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "running as root and there is no `postgres` user to run initdb"
            ) from None
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", _free_port()
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
    _run([*initdb, "--no-sync", "-E", "UTF8"])
    hba = data / "pg_hba.conf"
    rules = (f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
             "host all all 127.0.0.1/32 trust\nlocal all all trust\n")  # fmt: skip
    hba.write_text(rules)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -F -c max_connections=200"
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log")]
    _run([*pg_ctl, "-o", options, "-w", "start"])
    server = PgServer("127.0.0.1", port)
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'")
    return server


def _run(argv: list[str]) -> None:
    subprocess.run(_as_postgres(argv), check=True, capture_output=True, text=True, timeout=120)


def _stop(base: Path) -> None:
    bindir = _bindir()
    if bindir is not None and (base / "data" / "postmaster.pid").exists():
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(base / "data"), "stop",
                                     "-m", "immediate"]), capture_output=True, timeout=60)  # fmt: skip


_shared: list[PgServer] = []  # this process's cluster for BACKFILL_TEST_LEDGER=postgres
_databases: dict[str, str] = {}


def database_for(key: str) -> str:
    """A database URL of this process's cluster, the same for the same ``key`` (an output root).

    For ``BACKFILL_TEST_LEDGER=postgres``: the cluster starts on first use and stops when the
    process exits; if it cannot start, the test fails naming why.
    """
    if not _shared:
        import atexit

        base = Path(tempfile.mkdtemp(prefix="backfill-pg-"))
        _shared.append(_start(base))

        def stop() -> None:
            _stop(base)
            shutil.rmtree(base, ignore_errors=True)

        atexit.register(stop)
    if key not in _databases:
        _databases[key] = _shared[0].url(_shared[0].create_database())
    return _databases[key]


def copy_database(source_key: str, key: str) -> None:
    """Make ``key``'s database a copy of ``source_key``'s (``CREATE DATABASE … TEMPLATE``), as
    copying a folder copies a SQLite ledger; nothing may be connected to the source."""
    server = _shared[0]
    name = f"test_{uuid.uuid4().hex[:12]}"
    source = _databases[source_key].rsplit("/", 1)[1]
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {source}")
    _databases[key] = server.url(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    base = Path(tempfile.mkdtemp(prefix="backfill-pg-"))
    try:
        try:
            server = _start(base)
        except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            reason = f"PostgreSQL could not start for the tests: {detail}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        yield server
    finally:
        _stop(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's cluster (trust auth, as its superuser)."""
    return pg_server.url(pg_server.create_database())
