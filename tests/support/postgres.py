"""A real PostgreSQL server for integration tests, and one empty database per test.

``ensure_postgres()`` picks the server in this order:

1. ``$POSTGRES_URL``, when set (a server someone else runs, e.g. a CI service);
2. a testcontainers ``PostgresContainer``, when a Docker daemon answers;
3. the project's own server: ``deploy/postgres/pg.sh up`` (PostgreSQL from the OS packages, data
   in var/postgres/, 127.0.0.1:$PG_PORT, default 55432; reuses a server already running there;
   it is left running afterwards, stop it with ``deploy/postgres/pg.sh down``).

``fresh_database(url)`` creates a new, uniquely named, empty database on that server and returns
its URL, so tests never see each other's tables.
"""

from __future__ import annotations

import atexit
import importlib
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.support.kafka import _docker_available

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PG_SH = PROJECT_ROOT / "deploy" / "postgres" / "pg.sh"

POSTGRES_IMAGE = os.environ.get("POSTGRES_IMAGE", "postgres:16-alpine")

# Module-level references: the container must stay alive for the whole test session.
_container: Any | None = None
_url: str | None = None

_DRIVER_SUFFIX = re.compile(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://")
_NAME_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def plain_url(url: str) -> str:
    """``postgresql+psycopg2://...`` (SQLAlchemy style) -> ``postgresql://...`` (libpq style)."""
    return _DRIVER_SUFFIX.sub("postgresql://", url, count=1)


def _start_container() -> str:
    global _container
    try:  # testcontainers >= 4.15 moved it; the old path still works with a DeprecationWarning
        module = importlib.import_module("testcontainers.community.postgres")
    except ImportError:
        module = importlib.import_module("testcontainers.postgres")
    container = module.PostgresContainer(
        POSTGRES_IMAGE,
        username="voucher_bridge",
        password="voucher_bridge",
        dbname="voucher_bridge",
        driver=None,
    )
    container.start()
    _container = container
    atexit.register(container.stop)
    return plain_url(str(container.get_connection_url(driver=None)))


def _start_local_server() -> str:
    # pg.sh writes only the URL to stdout (its progress goes to stderr, shown as is). The server
    # it starts does not inherit the stdout pipe, so this returns as soon as pg.sh exits.
    done = subprocess.run(
        ["bash", str(PG_SH), "up"], check=True, timeout=900, stdout=subprocess.PIPE, text=True
    )
    urls = [line for line in done.stdout.splitlines() if line.startswith("postgresql://")]
    if not urls:
        raise RuntimeError(f"{PG_SH} up printed no URL: {done.stdout!r}")
    return urls[-1]


def ensure_postgres() -> str:
    """Return the URL of a running PostgreSQL server (superuser access), starting one if needed."""
    global _url
    if _url is None:
        env = os.environ.get("POSTGRES_URL", "").strip()
        if env:
            _url = plain_url(env)
        elif _docker_available():
            _url = _start_container()
        else:
            _url = _start_local_server()
    return _url


def with_database(url: str, name: str) -> str:
    """The same server URL (user, password, host, port, query) pointing at database ``name``."""
    parts = urlsplit(plain_url(url))
    return urlunsplit(parts._replace(path="/" + name))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def fresh_database(url: str, prefix: str = "test") -> str:
    """Create a new, empty, uniquely named database on the server of ``url``; return its URL.

    ``url`` must allow ``CREATE DATABASE`` (the URLs of ``ensure_postgres()`` do).
    """
    if not _NAME_PREFIX.match(prefix):
        raise ValueError(f"database name prefix must match {_NAME_PREFIX.pattern}: {prefix!r}")
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain_url(url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(url, name)


def drop_database(url: str) -> None:
    """Drop the database that ``url`` points at (e.g. one from ``fresh_database``), if it exists.

    Connects to the server's ``postgres`` database; open sessions on the dropped one are ended.
    """
    import psycopg
    from psycopg import sql

    name = database_name(url)
    if not name or name in {"postgres", "template0", "template1"}:
        raise ValueError(f"refusing to drop database {name!r}")
    with psycopg.connect(
        with_database(url, "postgres"), autocommit=True, connect_timeout=10
    ) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
