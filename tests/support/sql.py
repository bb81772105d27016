"""Which SQL databases the SQLAlchemy tests run against, and fixtures to reach them.

Selection (the tox envs ``sqla-sqlite``, ``sqla-postgres``, ``sqla-mysql`` set it):

* ``CONVEYOR_TEST_SQL`` = comma-separated subset of ``sqlite``, ``postgres``, ``mysql``.
  A selected server that does not answer is :func:`service_unavailable` (skip locally, fail
  under ``CI=true`` / ``CONVEYOR_REQUIRE_SERVICES=1``).
* Unset: SQLite always, plus PostgreSQL and MariaDB/MySQL when they answer right now and
  their driver is installed.

Server URLs: ``CONVEYOR_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and ``CONVEYOR_TEST_MYSQL_URL``
(default ``mysql+pymysql://root@127.0.0.1:3306/test``): plain SQLAlchemy URLs, the tests add
``sqla+`` / ``db+``.

SQLite runs twice where it makes sense: a file in the test's temporary directory (WAL, what
production uses) and ``:memory:`` (``sqlite-memory``; one process, one shared connection).
Tests share the PostgreSQL/MariaDB database ``test`` with other runs and xdist workers, so
every test uses unique queue names / task ids.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from conveyor.testing.support import service_unavailable

__all__ = [
    "MYSQL_URL",
    "POSTGRES_URL",
    "SqlTarget",
    "selected",
    "server_url",
    "sql_target",
    "sql_target_params",
]

POSTGRES_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("CONVEYOR_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
_SERVERS = {"postgres": POSTGRES_URL, "mysql": MYSQL_URL}
_KNOWN = ("sqlite", "postgres", "mysql")


def server_url(kind: str) -> str:
    """The plain SQLAlchemy URL of server ``kind`` (``postgres`` or ``mysql``)."""
    return _SERVERS[kind]


@functools.cache
def _answers(kind: str) -> bool:
    """The server's port accepts connections and its driver is installed (an env without
    the driver, such as tox's ``memory``, tests SQLite only unless told otherwise)."""
    url = make_url(_SERVERS[kind])
    try:
        dialect = url.get_dialect()
        dialect.import_dbapi()
    except Exception:
        return False
    port = url.port or {"postgres": 5432, "mysql": 3306}[kind]
    try:
        with socket.create_connection((url.host or "127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@functools.cache
def selected() -> tuple[str, ...]:
    """The database kinds this run tests (see the module docstring)."""
    raw = os.environ.get("CONVEYOR_TEST_SQL", "").strip()
    if raw:
        kinds = tuple(k.strip().lower() for k in raw.split(",") if k.strip())
        unknown = [k for k in kinds if k not in _KNOWN]
        if unknown:
            raise pytest.UsageError(f"CONVEYOR_TEST_SQL: unknown {unknown}; use {_KNOWN}")
        return kinds
    return ("sqlite", *(k for k in ("postgres", "mysql") if _answers(k)))


def sql_target_params(*, memory: bool = True) -> list[str]:
    """Parameter ids for :func:`sql_target`: ``sqlite`` (file), ``sqlite-memory``,
    ``postgres``, ``mysql``, restricted to :func:`selected`."""
    params: list[str] = []
    for kind in selected():
        params.append(kind)
        if kind == "sqlite" and memory:
            params.append("sqlite-memory")
    return params


@dataclass(frozen=True)
class SqlTarget:
    """One database to test against.

    Attributes:
        kind: ``sqlite``, ``sqlite-memory``, ``postgres`` or ``mysql``.
        url: the plain SQLAlchemy URL.
        unreachable_url: a SQLAlchemy URL of the same dialect whose server cannot answer.
    """

    kind: str
    url: str
    unreachable_url: str

    @property
    def memory(self) -> bool:
        return self.kind == "sqlite-memory"

    @property
    def dialect(self) -> str:
        return {"postgres": "postgresql", "mysql": "mysql"}.get(self.kind, "sqlite")


def _check_server(kind: str, url: str) -> None:
    """Connect once per run; skip or fail (CI) when the server does not answer."""
    error = _reachable(url)
    if error is not None:
        service_unavailable(kind, url, error)


@functools.cache
def _reachable(url: str) -> str | None:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, connect_args=_connect_timeout(url))
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _connect_timeout(url: str) -> dict[str, int]:
    backend = make_url(url).get_backend_name()
    return {"connect_timeout": 3} if backend in ("postgresql", "mysql", "mariadb") else {}


def _unreachable(url: str) -> str:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    return make_url(url).set(host="127.0.0.1", port=1).render_as_string(hide_password=False)


def make_target(kind: str, tmp_path: Path) -> SqlTarget:
    """Build the target for ``kind``; skip/fail when its server does not answer."""
    if kind == "sqlite":
        return SqlTarget(
            kind,
            f"sqlite:///{tmp_path / 'conveyor.db'}",
            f"sqlite:///{tmp_path / 'missing-dir' / 'sub' / 'conveyor.db'}",
        )
    if kind == "sqlite-memory":
        return SqlTarget(
            kind, "sqlite://", f"sqlite:///{tmp_path / 'missing-dir' / 'sub' / 'conveyor.db'}"
        )
    url = _SERVERS[kind]
    _check_server(kind, url)
    return SqlTarget(kind, url, _unreachable(url))


@pytest.fixture(params=sql_target_params())
def sql_target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    """Each selected database in turn (SQLite file and :memory:, PostgreSQL, MariaDB)."""
    return make_target(request.param, tmp_path)
