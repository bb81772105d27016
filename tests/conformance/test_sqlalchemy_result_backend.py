"""The result backend conformance suite against SQLAlchemyResultBackend on every selected
database (``tests/sqlsupport.py``: SQLite file and ``:memory:``, PostgreSQL, MariaDB).

Every ``make()`` builds a new client with its own engine, except on ``:memory:``, where the
clients share one engine because that is the only way they share one database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlsupport import SqlTarget, sql_target  # noqa: F401 - fixture

from conveyor.backends.sqlalchemy import (
    SQLAlchemyResultBackend,
    SQLAlchemyResultBackendOptions,
)
from conveyor.core.options import build_options
from conveyor.testing.result_backend import ResultBackendConformance


class TestSQLAlchemyResultBackend(ResultBackendConformance):
    @pytest.fixture
    def make_result_backend(
        self,
        sql_target: SqlTarget,  # noqa: F811
    ) -> Iterator[Any]:
        url = f"db+{sql_target.url}"
        if not sql_target.memory:
            yield lambda **options: SQLAlchemyResultBackend.from_url(url, **options)
            return
        keeper = SQLAlchemyResultBackend.from_url(url)

        def make(**options: Any) -> SQLAlchemyResultBackend:
            opts = build_options(SQLAlchemyResultBackendOptions, None, options)
            return SQLAlchemyResultBackend(keeper.engine, opts)

        yield make
        keeper.close()
