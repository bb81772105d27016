"""Options of the SQL broker (documented in :mod:`conveyor.transports.sqlalchemy`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from conveyor._drivers.sql import EngineSettings, engine_settings, sql_identifier
from conveyor.core.errors import ConfigurationError

__all__ = ["OPTION_NAMES", "SQLAlchemyBrokerOptions"]


@dataclass(frozen=True)
class SQLAlchemyBrokerOptions(EngineSettings):
    """Options of :class:`SQLAlchemyBroker` (seconds as float).

    Attributes:
        lease_seconds: how long a delivery stays held without ``extend`` (> 0).
        poll_interval: first sleep of a blocking ``receive`` that found nothing.
        max_poll_interval: the backoff cap; also the worst-case latency of an idle consumer.
        promote_interval: minimum time between two "move due delayed rows to ready" steps
            of one broker (bounds how late a delayed message may be, on top of polling).
        table_name: the message table (letters, digits, ``_``).
        schema: database schema of the table, or None for the default.
        create_tables: create the table and its indexes on first use if missing.
        max_retries: attempts for transactions that hit deadlocks/serialization failures.
        pool_size, max_overflow, pool_timeout, pool_recycle: SQLAlchemy pool settings
            (None: SQLAlchemy's default).
        connect_timeout: seconds to establish a connection (PostgreSQL, MySQL drivers).
        operation_timeout: server-side statement/lock timeout (PostgreSQL), socket read and
            write timeout (PyMySQL), busy timeout (SQLite).
        sqlite_synchronous: ``PRAGMA synchronous`` for SQLite files. ``NORMAL`` (default)
            survives a crash of any process; only a power loss may drop the last commits.
            Use ``FULL`` for power-loss durability at a few ms per commit.
        echo: log every statement (SQLAlchemy ``echo``).
        async_settle: on PostgreSQL, commit claims, acks, rejects, extends and lease
            releases with ``synchronous_commit = off`` (no wait for the WAL flush, several
            times the throughput on a disk with slow fsync). A PostgreSQL crash may then
            forget the last fraction of a second of them, which can only cause a
            redelivery: at-least-once holds. Publishes always commit synchronously.
        notify: on PostgreSQL with psycopg 3, a publish sends ``NOTIFY`` and a waiting
            ``receive`` listens (one extra connection per broker), so an idle consumer
            wakes at once instead of at its next poll. Polling continues regardless (it is
            what finds due delayed messages and expired leases).
    """

    lease_seconds: float = 60.0
    poll_interval: float = 0.005
    max_poll_interval: float = 0.2
    promote_interval: float = 0.1
    table_name: str = "conveyor_message"
    schema: str | None = None
    create_tables: bool = True
    max_retries: int = 10
    async_settle: bool = True
    notify: bool = True

    def __post_init__(self) -> None:
        for name in ("lease_seconds", "poll_interval", "max_poll_interval"):
            value = getattr(self, name)
            if not (isinstance(value, float | int) and value > 0 and math.isfinite(value)):
                raise ConfigurationError(f"{name} must be a positive number of seconds: {value!r}")
        if self.max_poll_interval < self.poll_interval:
            raise ConfigurationError("max_poll_interval must be >= poll_interval")
        if not self.promote_interval >= 0:
            raise ConfigurationError("promote_interval must be >= 0")
        if self.max_retries < 1:
            raise ConfigurationError("max_retries must be >= 1")
        sql_identifier(self.table_name, "table_name")
        if self.schema is not None:
            sql_identifier(self.schema, "schema")

    def engine_settings(self) -> EngineSettings:
        """The engine knobs alone (inherited from :class:`EngineSettings`)."""
        return engine_settings(self)


OPTION_NAMES = frozenset(f.name for f in fields(SQLAlchemyBrokerOptions))
