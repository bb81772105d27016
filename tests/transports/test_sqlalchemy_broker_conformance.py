"""The broker conformance suite against SQLAlchemyBroker on every selected database.

Databases: see ``tests/support/sql.py`` (SQLite file, SQLite ``:memory:``, PostgreSQL,
MariaDB). Every ``make_broker()`` call builds a new broker with its own engine (as a second
worker process would), except on ``:memory:``, where the brokers share one engine because
that is the only way they can share one database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support.sql import SqlTarget, sql_target  # noqa: F401 - fixture

from conveyor.core.options import build_options
from conveyor.testing.broker import BrokerConformance, BrokerFactory
from conveyor.transports.sqlalchemy import SQLAlchemyBroker, SQLAlchemyBrokerOptions


class TestSQLAlchemyBroker(BrokerConformance):
    # Every operation is a committed transaction (an fsync on PostgreSQL/MariaDB): give the
    # lease tests room on a loaded CI machine running several suites at once.
    short_lease = 2.0
    timing_slack = 1.5

    @pytest.fixture(autouse=True)
    def _database(self, sql_target: SqlTarget) -> SqlTarget:  # noqa: F811
        # The suite asks for make_broker dynamically; requesting the parametrized target
        # here puts it in every test's static closure, so each test runs per database.
        return sql_target

    @pytest.fixture
    def make_broker(self, sql_target: SqlTarget) -> Iterator[BrokerFactory]:  # noqa: F811
        url = f"sqla+{sql_target.url}"
        if not sql_target.memory:
            yield lambda **options: SQLAlchemyBroker.from_url(url, **options)
            return
        keeper = SQLAlchemyBroker.from_url(url)

        def make(**options: Any) -> SQLAlchemyBroker:
            opts = build_options(SQLAlchemyBrokerOptions, None, options)
            return SQLAlchemyBroker(keeper.engine, opts)

        yield make
        keeper.close()

    @pytest.fixture
    def unreachable_broker_url(self, sql_target: SqlTarget) -> str:  # noqa: F811
        return f"sqla+{sql_target.unreachable_url}"
