"""The result backend conformance suite against SQLAlchemyResultBackend on every selected
database (``tests/support/sql.py``: SQLite file and ``:memory:``, PostgreSQL, MariaDB).

Every ``make()`` builds a new client with its own engine, except on ``:memory:``, where the
clients share one engine because that is the only way they share one database.

On the servers each test session (each xdist worker) uses tables of its own, dropped at the
end: several tests call ``purge_expired``, which sweeps every expired row of a table, and a
sweep running in a parallel worker or tox env on shared tables would delete (and count) the
rows another test is about to sweep and count itself. The default Celery table names are
exercised by tests/compat and tests/backends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from support.sql import SqlTarget, sql_target  # noqa: F401 - fixture

from conveyor.backends.sqlalchemy import (
    SQLAlchemyResultBackend,
    SQLAlchemyResultBackendOptions,
)
from conveyor.core.options import build_options
from conveyor.testing.result_backend import ResultBackendConformance

_TABLES = ("task_table", "group_table", "counter_table")


@pytest.fixture(scope="session")
def server_tables() -> Iterator[dict[str, dict[str, str]]]:
    """Per server URL, the private table names of this session; dropped at the end."""
    made: dict[str, dict[str, str]] = {}
    yield made
    for url, names in made.items():
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                for name in names.values():
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        finally:
            engine.dispose()


class TestSQLAlchemyResultBackend(ResultBackendConformance):
    @pytest.fixture
    def make_result_backend(
        self,
        sql_target: SqlTarget,  # noqa: F811
        server_tables: dict[str, dict[str, str]],
    ) -> Iterator[Any]:
        url = f"db+{sql_target.url}"
        if sql_target.memory:
            keeper = SQLAlchemyResultBackend.from_url(url)

            def make(**options: Any) -> SQLAlchemyResultBackend:
                opts = build_options(SQLAlchemyResultBackendOptions, None, options)
                return SQLAlchemyResultBackend(keeper.engine, opts)

            yield make
            keeper.close()
            return
        tables: dict[str, str] = {}
        if sql_target.kind in ("postgres", "mysql"):
            run = uuid.uuid4().hex[:8]
            tables = server_tables.setdefault(
                sql_target.url, {t: f"cf_{run}_{t.split('_')[0]}" for t in _TABLES}
            )
        yield lambda **options: SQLAlchemyResultBackend.from_url(url, **{**tables, **options})
