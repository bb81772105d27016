"""``conveyor._drivers.sql.translate_error`` on every selected database (issue 13, class 1): only a
lost connection or a time limit is transient (``OperationalError``). A value the database
refuses (too long, NUL, out of range, a bad string, one SQLAlchemy cannot bind) is an
``EncodeError``, a constraint violation a ``ConfigurationError``: a worker fails such a task
once instead of giving it back for ever. Errors are classified by class and code, never by
their text.

Each test makes a scratch table, provokes the error with a real statement and checks the
translated class; the first statement of each test is a control that succeeds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from support.sql import SqlTarget, make_target, sql_target_params

from conveyor._drivers.sql import Database, EngineSettings, make_database
from conveyor.core.errors import (
    ConfigurationError,
    EncodeError,
    OperationalError,
    SerializationError,
)


@pytest.fixture(params=sql_target_params(memory=False))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    return make_target(request.param, tmp_path)


@pytest.fixture
def db(target: SqlTarget) -> Iterator[tuple[Database, sa.Table]]:
    url = make_url(target.url)
    database = make_database(url, url_text=target.url, settings=EngineSettings(), max_retries=3)
    metadata = sa.MetaData()
    table = sa.Table(
        f"errcls_{uuid.uuid4().hex[:10]}",
        metadata,
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("label", sa.String(8), nullable=False),
        sa.Column("small", sa.SmallInteger),
        sa.Column("at", sa.DateTime),
    )
    metadata.create_all(database.engine)
    try:
        yield database, table
    finally:
        metadata.drop_all(database.engine)
        database.dispose()


def _write(database: Database, table: sa.Table, **values: Any) -> None:
    row = {"id": uuid.uuid4().hex[:20], "label": "ok", **values}

    def work(conn: Connection) -> None:
        conn.execute(sa.insert(table).values(**row))

    database.transaction(work, what="write a test row")


def _refused(database: Database, table: sa.Table, **values: Any) -> Exception:
    with pytest.raises(Exception) as info:
        _write(database, table, **values)
    error = info.value
    assert not isinstance(error, OperationalError), f"called transient: {error!r}"
    return error


def _servers_only(target: SqlTarget) -> None:
    if target.kind == "sqlite":
        pytest.skip("SQLite stores any value in any column (type affinity): nothing refused")


def test_a_value_longer_than_its_column_is_an_encode_error(
    target: SqlTarget, db: tuple[Database, sa.Table]
) -> None:
    """PostgreSQL 22001, MariaDB 1406 (strict mode)."""
    _servers_only(target)
    database, table = db
    _write(database, table, label="8 chars!")
    error = _refused(database, table, label="nine char")
    assert isinstance(error, EncodeError)
    assert "refused a value" in str(error)


def test_a_number_out_of_its_columns_range_is_an_encode_error(
    target: SqlTarget, db: tuple[Database, sa.Table]
) -> None:
    """PostgreSQL 22003, MariaDB 1264."""
    _servers_only(target)
    database, table = db
    _write(database, table, small=32767)
    assert isinstance(_refused(database, table, small=40000), EncodeError)


def test_a_nul_in_text_is_an_encode_error_on_postgresql(
    target: SqlTarget, db: tuple[Database, sa.Table]
) -> None:
    if target.kind != "postgres":
        pytest.skip("PostgreSQL text cannot hold NUL; MariaDB and SQLite can")
    database, table = db
    assert isinstance(_refused(database, table, label="a\x00b"), EncodeError)


def test_a_string_the_column_charset_cannot_hold_is_an_encode_error_on_mariadb(
    target: SqlTarget, tmp_path: Path
) -> None:
    """MariaDB 1366: a 4-byte character in a utf8mb3 column."""
    if target.kind != "mysql":
        pytest.skip("MariaDB only (error 1366)")
    database = make_database(
        make_url(target.url), url_text=target.url, settings=EngineSettings(), max_retries=3
    )
    name = f"errcs_{uuid.uuid4().hex[:10]}"
    with database.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {name} (v VARCHAR(10)) CHARACTER SET utf8mb3")
    try:

        def write(value: str) -> Callable[[Connection], None]:
            def work(conn: Connection) -> None:
                conn.exec_driver_sql(f"INSERT INTO {name} (v) VALUES (%s)", (value,))

            return work

        database.transaction(write("plain"), what="write")
        with pytest.raises(EncodeError):
            database.transaction(write("\U0001f600"), what="write")
    finally:
        with database.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {name}")
        database.dispose()


def test_a_constraint_violation_is_a_configuration_error(
    db: tuple[Database, sa.Table],
) -> None:
    database, table = db
    _write(database, table, id="same-id")
    error = _refused(database, table, id="same-id")
    assert isinstance(error, ConfigurationError)
    assert "constraint" in str(error)
    assert isinstance(_refused(database, table, label=None), ConfigurationError)


def test_a_value_sqlalchemy_cannot_bind_is_an_encode_error(
    target: SqlTarget, db: tuple[Database, sa.Table]
) -> None:
    """A str for a DateTime column: SQLite's type processor raises before the driver is
    reached (a StatementError wrapping TypeError); the servers refuse it as data."""
    database, table = db
    _write(database, table, at=datetime.now(timezone.utc).replace(tzinfo=None))
    error = _refused(database, table, at="not a time")
    assert isinstance(error, SerializationError | ConfigurationError)
    if target.kind == "sqlite":
        assert isinstance(error, EncodeError)


def test_an_unreachable_server_is_still_transient(target: SqlTarget) -> None:
    """The control: classifying by code did not make a lost connection a refusal."""
    database = make_database(
        make_url(target.unreachable_url),
        url_text=target.unreachable_url,
        settings=EngineSettings(connect_timeout=2.0),
        max_retries=1,
    )
    try:
        with pytest.raises(OperationalError):
            database.transaction(lambda conn: conn.exec_driver_sql("SELECT 1"), what="probe")
    finally:
        database.dispose()
