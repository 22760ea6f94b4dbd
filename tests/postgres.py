"""PostgreSQL for the tests: a throwaway server started for the session (or $FASTPADIM_TEST_POSTGRES_URL), and a
fresh database per test.

The server is Debian's (``scripts/postgres-for-tests.sh`` installs it): initdb and pg_ctl from
/usr/lib/postgresql/*/bin or the PATH, run as the user ``postgres`` when the tests run as root (PostgreSQL refuses
to run as root). Without them the PostgreSQL tests are skipped, unless FASTPADIM_REQUIRE_POSTGRES=1 (CI): then
they fail.
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
from pathlib import Path

import pytest

USER = "fastpadim"  # the superuser of the throwaway cluster (trust authentication, 127.0.0.1 only)


def _unavailable(reason: str):
    if os.environ.get("FASTPADIM_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (FASTPADIM_REQUIRE_POSTGRES=1) but {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL: {reason} (run scripts/postgres-for-tests.sh, or set FASTPADIM_TEST_POSTGRES_URL)")


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a PostgreSQL server's maintenance database (``…/postgres``), as a superuser."""
    if os.environ.get("FASTPADIM_TEST_POSTGRES_URL"):
        yield os.environ["FASTPADIM_TEST_POSTGRES_URL"]
        return
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        _unavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on the PATH")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="fastpadim-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            _unavailable("the tests run as root and there is no user 'postgres' to run the server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", USER, "-E", "UTF8"],
                       check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                        "-o", f"-k {root} -p {port} -h 127.0.0.1 -F", "start"],
                       check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (root / "log").read_text(errors="replace")[-2000:] if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"the throwaway server did not start: {getattr(exc, 'stderr', '') or exc} {log}".strip())
    try:
        yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_url):
    """The URL of a new, empty database on the server, dropped after the test."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"test_{uuid.uuid4().hex[:12]}"
    server = make_url(postgres_url).set(drivername="postgresql")
    admin = server.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield server.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
