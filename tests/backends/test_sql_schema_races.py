"""Schema set-up of the SQL result backend on every selected database when processes race
(issue 13, item 8): whether another process won is asked of the database, never read from
the error's text (which differs per server, version and language)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.sql import SqlTarget, make_target, sql_target_params

from conveyor._drivers.sql import create_all_race_safe
from conveyor.backends.sqlalchemy import SQLAlchemyResultBackend
from conveyor.core.errors import ConfigurationError
from conveyor.testing.support import unique_name


@pytest.fixture(params=sql_target_params(memory=False))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTarget:
    return make_target(request.param, tmp_path)


@pytest.fixture
def backend(target: SqlTarget) -> Iterator[SQLAlchemyResultBackend]:
    suffix = unique_name("r").replace("-", "_")
    names = {"task_table": f"rt_{suffix}", "group_table": f"rg_{suffix}"}
    names["counter_table"] = f"rc_{suffix}"
    made = SQLAlchemyResultBackend.from_url(f"db+{target.url}", **names)
    made.create_tables()
    yield made
    made.close()
    engine = sa.create_engine(target.url)
    try:
        with engine.begin() as conn:
            for table in names.values():
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    finally:
        engine.dispose()


def test_adding_a_column_another_process_just_added_is_not_an_error(
    backend: SQLAlchemyResultBackend,
) -> None:
    """The ALTER of the process that lost the race fails ("duplicate column" in each
    server's words); the column is there, so that is success."""
    backend._add_column(backend._tasks, "expires_at")
    backend._add_column(backend._groups, "group_id" if "group_id" in backend._groups.c else "id")


def _scratch(target: SqlTarget) -> tuple[sa.MetaData, str]:
    metadata = sa.MetaData()
    name = f"race_{unique_name('t').replace('-', '_')}"
    sa.Table(name, metadata, sa.Column("id", sa.Integer, primary_key=True))
    return metadata, name


def _drop(target: SqlTarget, name: str) -> None:
    engine = sa.create_engine(target.url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    finally:
        engine.dispose()


def test_creating_tables_another_process_created_meanwhile_is_not_an_error(
    target: SqlTarget, backend: SQLAlchemyResultBackend
) -> None:
    """The other process creates the table between our check and our CREATE, which then
    fails the way the loser's does ("already exists", or a unique violation in pg_type)."""
    metadata, name = _scratch(target)
    original = metadata.create_all
    calls: list[bool] = []

    def losing_the_race(bind: Any, checkfirst: bool = True) -> None:
        calls.append(checkfirst)
        if len(calls) == 1:
            original(bind, checkfirst=True)  # the other process wins
            original(bind, checkfirst=False)  # our CREATE fails
        else:
            original(bind, checkfirst=checkfirst)

    metadata.create_all = losing_the_race  # type: ignore[method-assign]
    try:
        create_all_race_safe(backend._db, metadata, what="create scratch table")
        assert len(calls) == 2  # retried once, then saw the table
    finally:
        _drop(target, name)


def test_a_create_error_that_is_no_race_is_raised_at_once(
    target: SqlTarget, backend: SQLAlchemyResultBackend
) -> None:
    metadata, _name = _scratch(target)
    calls: list[bool] = []

    def refused(bind: Any, checkfirst: bool = True) -> None:
        calls.append(checkfirst)
        raise sa.exc.ProgrammingError("CREATE TABLE", {}, Exception("no permission"))

    metadata.create_all = refused  # type: ignore[method-assign]
    with pytest.raises(ConfigurationError):
        create_all_race_safe(backend._db, metadata, what="create scratch table")
    assert len(calls) == 1
