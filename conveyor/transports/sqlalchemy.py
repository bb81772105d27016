"""SQL broker on SQLAlchemy: SQLite, PostgreSQL and MariaDB/MySQL.

Capabilities:
    ``at_least_once`` (every delivery is a lease: owner token + expiry; an expired lease is
    delivered again with ``redelivered=True``), ``lease_extension`` (``extend``),
    ``delayed_delivery`` (a ``not_before`` column with an index: delayed messages stay in
    the table, never in worker memory), ``priority`` (0-9, higher first, FIFO within one
    priority), ``dead_letter`` (``reject(requeue=False)`` moves the row to the queue
    ``<queue>.dead`` and records the reason in the column ``dead_reason``, delivered as the
    header ``x-conveyor-dead-letter-reason``), ``queue_size``, ``durable``,
    ``cross_process`` (except SQLite ``:memory:``, which lives in one process; see below).

Limits and bad input:
    A delay is kept to the millisecond up to 2**52 ms (about 142,000 years: ``not_before`` is
    a double); a longer one raises ``ConfigurationError`` at publish. A claimed row that cannot
    become a delivery (headers that are not JSON or not a map, a priority or id of the wrong
    type: rows written by something else) is never handed out and never left to come back: in
    the claim's own batch it is moved to ``<queue>.dead`` with content type
    ``application/x-conveyor-undecodable``, its body kept, its original fields in the header
    ``x-conveyor-original`` and the reason recorded (``conveyor.transports._common``); the
    other rows of the claim are returned.

URL:
    ``sqla+<SQLAlchemy URL>`` or ``sqlalchemy+<SQLAlchemy URL>``, as in kombu:
    ``sqla+sqlite:////var/lib/app/conveyor.db`` (absolute path: four slashes),
    ``sqla+sqlite:///relative.db``, ``sqla+sqlite://`` (in-memory, one process only),
    ``sqla+postgresql+psycopg://user:pass@host:5432/db``,
    ``sqla+mysql+pymysql://user:pass@host:3306/db``. Query keys that are conveyor options
    (below) are removed before the URL reaches :func:`sqlalchemy.create_engine`; every other
    key (``sslmode``, ``charset``, ...) goes to the driver untouched.

Options (keyword > URL query > default; :class:`SQLAlchemyBrokerOptions`):
    ``lease_seconds`` (60.0), ``poll_interval`` (0.005) and ``max_poll_interval`` (0.2):
    the capped exponential backoff of a blocking ``receive``; ``promote_interval`` (0.1):
    how often one broker moves due delayed messages to ready; ``table_name``
    (``conveyor_message``), ``schema``; ``create_tables`` (True: create on first use);
    ``max_retries`` (10) for deadlocks and serialization failures; engine settings
    ``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_recycle`` (3600),
    ``connect_timeout`` (10), ``operation_timeout`` (30, sent to the server as
    ``statement_timeout``/``lock_timeout`` on PostgreSQL, read/write timeouts on PyMySQL, the
    write-lock wait on SQLite), ``sqlite_synchronous`` (``NORMAL``), ``echo``;
    ``async_settle`` (True: PostgreSQL settles without waiting for the WAL flush) and
    ``notify`` (True: PostgreSQL LISTEN/NOTIFY wake-ups).

Thread-safety:
    One instance may be shared by the threads of one process: the engine's pool gives each
    call its own connection, and the broker's own bookkeeping (held leases, settled receipts)
    is guarded by a lock. Never share an instance across ``fork()``: build one per process.
    SQLite ``:memory:`` uses one connection for every thread (the only way they see one
    database) and serialises on it.

How it works (``docs/backends/sql.md`` has the full table layout):

* One table, ``conveyor_message``. Rows are deleted by ``ack`` (kombu's SQL transport never
  deletes rows and never redelivers after a crash; this one does both).
* A claim is ONE transaction that selects the best ready rows and stamps them with a lease:
  PostgreSQL ``WITH c AS (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n) UPDATE ... RETURNING``;
  MariaDB/MySQL ``SELECT ... FOR UPDATE SKIP LOCKED`` then ``UPDATE`` in the same
  ``READ COMMITTED`` transaction; SQLite (WAL) ``BEGIN IMMEDIATE`` then
  ``UPDATE ... WHERE id IN (SELECT ...) RETURNING``.
* Time is the DATABASE clock on PostgreSQL (``now()``) and MariaDB/MySQL
  (``UNIX_TIMESTAMP(NOW(6))``), so hosts with skewed clocks agree on delays and leases;
  SQLite uses the client clock (its clients share the host). Times are float epoch seconds.
* Delayed rows carry ``delayed = true`` and are kept out of the claim index; every
  ``promote_interval`` a receiving broker flips the due ones to ready (``SKIP LOCKED``,
  at most 1000 per step). Thousands of future messages therefore never slow a claim down.
* Deadlocks (MariaDB 1213, lock wait 1205) and serialization failures (PostgreSQL
  40001/40P01) roll back and rerun the whole transaction, at most ``max_retries`` times with
  jittered backoff; SQLite "database is locked" is waited out with millisecond pauses up to
  ``operation_timeout``. Nothing is half-applied, nothing is lost.
* ``receive`` polls with capped backoff (5 ms doubling to 200 ms). On PostgreSQL (psycopg 3)
  a publish also sends ``NOTIFY`` in the same statement, and a consumer that has backed off
  completely waits on ``LISTEN``, so it wakes at once. On SQLite each poll reads first and
  takes the write lock only when something is ready.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_types
from sqlalchemy.engine import Connection, Engine, Row

from conveyor._sql import (
    Database,
    EngineSettings,
    create_all_race_safe,
    index_name,
    make_database,
    split_url,
    sql_identifier,
)
from conveyor.core.base import BrokerBase, HeldLeases, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    EncodeError,
    InvalidReceipt,
)
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    EXACT_MS_MAX_DELAY,
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
    check_delay,
    clamp_priority,
    clean_reason,
    undecodable_reason,
)

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "SQLAlchemyBroker",
    "SQLAlchemyBrokerOptions",
    "message_table",
]

log = logging.getLogger("conveyor.transports.sqlalchemy")

_SCHEMES = ("sqla", "sqlalchemy")
_QUEUE_COLUMN_LENGTH = 255  # a 200-character queue name plus a few ".dead" suffixes
_PROMOTE_BATCH = 1000
# delivery_count is an INTEGER column (32 bits on PostgreSQL and MariaDB): a claim stops
# counting there instead of failing on the overflow; the count is then far past any
# worker_max_deliveries, so the message is refused, not run.
_COUNT_MAX = 2**31 - 1
_PURGE_BATCH = 1000
_SETTLED_MEMORY = 10_000  # receipts remembered so a second ack/reject is a no-op
_MAX_MESSAGES = 1000
_DELAY_WHY = "not_before is a double of epoch seconds, exact to the millisecond below that"


@dataclass(frozen=True)
class SQLAlchemyBrokerOptions:
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
    pool_size: int | None = None
    max_overflow: int | None = None
    pool_timeout: float | None = None
    pool_recycle: float | None = 3600.0
    connect_timeout: float | None = 10.0
    operation_timeout: float | None = 30.0
    sqlite_synchronous: str = "NORMAL"
    echo: bool = False
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
        return EngineSettings(
            pool_size=self.pool_size,
            max_overflow=self.max_overflow,
            pool_timeout=self.pool_timeout,
            pool_recycle=self.pool_recycle,
            connect_timeout=self.connect_timeout,
            operation_timeout=self.operation_timeout,
            sqlite_synchronous=self.sqlite_synchronous,
            echo=self.echo,
        )


_OPTION_NAMES = frozenset(f.name for f in fields(SQLAlchemyBrokerOptions))


def message_table(
    metadata: sa.MetaData, name: str = "conveyor_message", *, schema: str | None, dialect: str
) -> sa.Table:
    """The message table, with the indexes the claim, promotion and purge queries use.

    PostgreSQL and SQLite get partial indexes (ready rows only / delayed rows only), which
    stay small however many delayed messages wait; MariaDB/MySQL has no partial indexes and
    gets the same columns with ``delayed`` as a key prefix.
    """
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PK = rowid alias
    blob = sa.LargeBinary().with_variant(mysql_types.LONGBLOB(), "mysql", "mariadb")
    text = sa.Text().with_variant(mysql_types.LONGTEXT(), "mysql", "mariadb")
    table = sa.Table(
        name,
        metadata,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(_QUEUE_COLUMN_LENGTH), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("delayed", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("not_before", sa.Double(), nullable=False),
        sa.Column("lease_expires", sa.Double(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("envelope_id", sa.Text(), nullable=False),
        sa.Column("body", blob, nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("content_encoding", sa.Text(), nullable=False),
        sa.Column("headers", text, nullable=False),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("reply_to", sa.Text(), nullable=True),
        sa.Column("published_at", sa.Double(), nullable=False),
        sa.Column("dead_from", sa.String(_QUEUE_COLUMN_LENGTH), nullable=True),
        sa.Column("dead_reason", sa.Text(), nullable=True),
        sa.Column("dead_at", sa.Double(), nullable=True),
        schema=schema,
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    c = table.c
    if dialect in ("postgresql", "sqlite"):
        ready, delayed = sa.not_(c.delayed), c.delayed
        sa.Index(
            index_name(name, "claim"),
            c.queue,
            c.priority.desc(),
            c.id,
            postgresql_where=ready,
            sqlite_where=ready,
        )
        sa.Index(
            index_name(name, "due"),
            c.queue,
            c.not_before,
            postgresql_where=delayed,
            sqlite_where=delayed,
        )
    else:
        sa.Index(index_name(name, "claim"), c.queue, c.delayed, c.priority.desc(), c.id)
        sa.Index(index_name(name, "due"), c.queue, c.delayed, c.not_before)
    return table


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``ack``/``reject``/``extend`` need: the row and the lease token of this claim."""

    row_id: int
    token: str


@dataclass(frozen=True)
class _Claim:
    """Prebuilt statements claiming from one tuple of queues (built once, reused: building
    SQLAlchemy expressions costs more than SQLite executing them)."""

    promote: Any  # PG/SQLite: UPDATE ... WHERE id IN (due); MariaDB: SELECT due ids
    claim: Any  # PG/SQLite: UPDATE ... RETURNING; MariaDB: SELECT ... FOR UPDATE SKIP LOCKED
    probe: Any  # SELECT 1 ... LIMIT 1: is anything deliverable or due? (read-only)


# Columns a publish fills from the envelope (the times come from the clock expression).
_INSERTED = (
    "queue",
    "priority",
    "delayed",
    "lease_expires",
    "delivery_count",
    "envelope_id",
    "body",
    "content_type",
    "content_encoding",
    "headers",
    "correlation_id",
    "reply_to",
)

# Columns an undecodable row's stand-in replaces (the body only when it is not binary).
_STAND_IN = (
    "body",
    "envelope_id",
    "content_type",
    "content_encoding",
    "headers",
    "priority",
    "correlation_id",
    "reply_to",
)

_COLUMNS = (
    "id",
    "queue",
    "priority",
    "delivery_count",
    "envelope_id",
    "body",
    "content_type",
    "content_encoding",
    "headers",
    "correlation_id",
    "reply_to",
    "dead_from",
    "dead_reason",
)


class SQLAlchemyBroker(BrokerBase):
    """Broker on a SQL table; see the module docstring for URL, options and semantics.

    Args:
        engine: a ready SQLAlchemy engine (not disposed by ``close``). For SQLite, prefer
            :meth:`from_url`, which also sets WAL mode and ``BEGIN IMMEDIATE``; with an
            engine of another broker (``SQLAlchemyBroker(other.engine)``) that is inherited.
        options: :class:`SQLAlchemyBrokerOptions`; defaults when None.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.AT_LEAST_ONCE,
            Capability.LEASE_EXTENSION,
            Capability.DELAYED_DELIVERY,
            Capability.PRIORITY,
            Capability.DEAD_LETTER,
            Capability.QUEUE_SIZE,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
        }
    )

    def __init__(
        self,
        engine: Engine,
        options: SQLAlchemyBrokerOptions | None = None,
        *,
        _database: Database | None = None,
        _url: str | None = None,
    ) -> None:
        self.options = options or SQLAlchemyBrokerOptions()
        if _database is None:
            rendered = engine.url.render_as_string(hide_password=True)
            _database = make_database(
                engine.url,
                url_text=rendered,
                settings=self.options.engine_settings(),
                max_retries=self.options.max_retries,
                engine=engine,
            )
        self._db = _database
        if self._db.memory:
            # SQLite :memory: lives in this process: nothing survives it and no other process
            # sees it. The instance says so (the suites, the worker and `conveyor check` read
            # the instance's set); the class keeps what the other databases give.
            object.__setattr__(
                self,
                "capabilities",
                type(self).capabilities - {Capability.DURABLE, Capability.CROSS_PROCESS},
            )
        self.url = _url or f"sqla+{self._db.engine.url.render_as_string(hide_password=True)}"
        self._metadata = sa.MetaData()
        self._table = message_table(
            self._metadata,
            self.options.table_name,
            schema=self.options.schema,
            dialect=self._db.dialect,
        )
        self._mysql = self._db.dialect == "mysql"
        self._returning = bool(self._db.engine.dialect.update_returning) and not self._mysql
        self._client_clock = self._db.dialect not in ("postgresql", "mysql")
        self._instance = secrets.token_hex(8)
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()
        self._leases = HeldLeases(_SETTLED_MEMORY)
        self._promote_at: dict[str, float] = {}
        self._claims: OrderedDict[tuple[str, ...], _Claim] = OrderedDict()
        self._schema_ready = False
        self._closed = False
        self._channel = f"conveyor_{self.options.table_name}"[:63]
        self._listener: _Listener | None = None
        if self.options.notify and self._db.dialect == "postgresql":
            self._listener = _Listener(self._db, self._channel)
        self._build_statements()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLAlchemyBroker:
        """Build a broker (and its own engine, disposed by ``close``) from ``url``.

        Does not connect: the first operation does (and creates the table if allowed).

        Raises:
            InvalidURL: not a SQLAlchemy URL after the ``sqla+`` prefix.
            ConfigurationError: unknown option or bad value (with a did-you-mean).
            MissingDependency: the URL's driver is not installed.
        """
        sa_url, query = split_url(url, prefixes=_SCHEMES, option_names=_OPTION_NAMES)
        opts = build_options(SQLAlchemyBrokerOptions, query, options, owner="sqla+ broker")
        db = make_database(
            sa_url, url_text=url, settings=opts.engine_settings(), max_retries=opts.max_retries
        )
        return cls(db.engine, opts, _database=db, _url=url)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (share it with another broker on the same database)."""
        return self._db.engine

    @property
    def retries(self) -> int:
        """Transactions rerun after a deadlock or serialization failure (plus, on SQLite,
        short waits for the write lock). Diagnostics; monotonic per engine."""
        return self._db.retries + self._db.lock_waits

    def create_tables(self) -> None:
        """Create the message table and its indexes if missing. Idempotent, race-safe.

        Blocks for a few round trips. Use it in deployment scripts when the runtime user may
        not create tables (then pass ``create_tables=False``).
        """
        self._check_open()
        create_all_race_safe(self._db, self._metadata, what="create tables")
        self._schema_ready = True

    def _ensure_schema(self) -> None:
        if self._schema_ready or not self.options.create_tables:
            return
        self.create_tables()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    # ------------------------------------------------------------------ statements
    def _now_sql(self) -> sa.ColumnElement[float]:
        """Current time as epoch seconds: the database's clock where it has a usable one
        (PostgreSQL ``now()``: the transaction start, one instant per transaction;
        MariaDB/MySQL ``NOW(6)``: the statement start), else the bound ``now_`` parameter
        (SQLite: every client runs on the database's host)."""
        dialect = self._db.dialect
        if dialect == "postgresql":
            return sa.cast(sa.func.extract("epoch", sa.func.now()), sa.Double())
        if dialect == "mysql":
            return sa.func.unix_timestamp(sa.func.now(6), type_=sa.Double())
        return sa.bindparam("now_", type_=sa.Double())

    def _params(self, **values: Any) -> dict[str, Any]:
        if self._client_clock:
            values["now_"] = time.time()
        return values

    def _build_statements(self) -> None:
        t = self._table
        now = self._now_sql()
        guard = sa.and_(t.c.id == sa.bindparam("row_id"), t.c.lease_owner == sa.bindparam("token"))
        self._sql_insert = sa.insert(t).values(
            not_before=now + sa.bindparam("delay_", type_=sa.Double()), published_at=now
        )
        self._sql_ack = sa.delete(t).where(guard)
        self._sql_exists = sa.select(t.c.id).where(t.c.id == sa.bindparam("row_id"))
        self._sql_requeue = sa.update(t).where(guard).values(lease_owner=None, lease_expires=0.0)
        self._sql_dead = (
            sa.update(t)
            .where(guard)
            .values(
                queue=sa.bindparam("dead_queue"),
                lease_owner=None,
                lease_expires=0.0,
                delayed=False,
                delivery_count=0,
                dead_from=sa.bindparam("dead_from"),
                dead_reason=sa.bindparam("dead_reason"),
                dead_at=now,
            )
        )
        self._sql_dead_raw = (
            sa.update(t)
            .where(guard)
            .values(
                queue=sa.bindparam("dead_queue"),
                lease_owner=None,
                lease_expires=0.0,
                delayed=False,
                delivery_count=0,
                dead_from=sa.bindparam("dead_from"),
                dead_reason=sa.bindparam("dead_reason"),
                dead_at=now,
                **{c: sa.bindparam(f"raw_{c}", type_=t.c[c].type) for c in _STAND_IN},
            )
        )
        self._sql_extend = (
            sa.update(t)
            .where(guard)
            .values(lease_expires=now + sa.bindparam("seconds", type_=sa.Double()))
        )
        self._sql_stamp = {
            "lease_owner": sa.bindparam("token"),
            "lease_expires": now + sa.bindparam("lease", type_=sa.Double()),
            "delivery_count": _next_count(t.c.delivery_count),
        }
        self._sql_stamp_ids = (
            sa.update(t)
            .where(t.c.id.in_(sa.bindparam("ids", expanding=True)))
            .values(**self._sql_stamp)
        )
        self._sql_notify = sa.select(
            sa.func.pg_notify(sa.bindparam("channel"), sa.bindparam("payload"))
        )
        # PostgreSQL: INSERT and NOTIFY in one statement, so a single publish stays one
        # round trip (NOTIFY is delivered at commit, never before the row is visible).
        columns: dict[str, Any] = {c: sa.bindparam(c, type_=t.c[c].type) for c in _INSERTED}
        inserted = (
            sa.insert(t)
            .values(
                **columns,
                not_before=now + sa.bindparam("delay_", type_=sa.Double()),
                published_at=now,
            )
            .returning(t.c.id)
            .cte("inserted")
        )
        self._sql_insert_notify = sa.select(
            sa.func.pg_notify(sa.bindparam("channel"), sa.bindparam("payload"))
        ).select_from(inserted)
        self._sql_promote_ids = (
            sa.update(t)
            .where(t.c.id.in_(sa.bindparam("ids", expanding=True)))
            .values(delayed=False)
        )

    def _claim_statements(self, names: tuple[str, ...]) -> _Claim:
        with self._lock:
            cached = self._claims.get(names)
            if cached is not None:
                self._claims.move_to_end(names)
                return cached
        t = self._table
        now = self._now_sql()
        in_queues = t.c.queue == names[0] if len(names) == 1 else t.c.queue.in_(names)
        due = (
            sa.select(t.c.id)
            .where(in_queues, t.c.delayed, t.c.not_before <= now)
            .order_by(t.c.not_before)
            .limit(_PROMOTE_BATCH)
            .with_for_update(skip_locked=True)
        )
        order: list[Any] = [t.c.priority.desc()]
        if len(names) > 1:
            order.append(sa.case({q: i for i, q in enumerate(names)}, value=t.c.queue))
        order.append(t.c.id)
        ready = (
            sa.select(t.c.id)
            .where(in_queues, sa.not_(t.c.delayed), t.c.lease_expires <= now)
            .order_by(*order)
            .limit(sa.bindparam("limit_", type_=sa.Integer()))
            .with_for_update(skip_locked=True)
        )
        columns = [t.c[name] for name in _COLUMNS]
        if self._mysql:
            # MariaDB has no UPDATE ... RETURNING and refuses LIMIT inside IN (subquery):
            # lock the rows with SELECT ... FOR UPDATE SKIP LOCKED, then update by id.
            claim: Any = ready.with_only_columns(*columns)
            promote: Any = due
        elif self._db.dialect == "postgresql":
            picked = ready.cte("claim")
            stmt = sa.update(t).where(t.c.id == picked.c.id).values(**self._sql_stamp)
            claim = stmt.returning(*columns)
            promote = sa.update(t).where(t.c.id.in_(due.scalar_subquery())).values(delayed=False)
        elif self._returning:
            stmt = sa.update(t).where(t.c.id.in_(ready.scalar_subquery()))
            claim = stmt.values(**self._sql_stamp).returning(*columns)
            promote = sa.update(t).where(t.c.id.in_(due.scalar_subquery())).values(delayed=False)
        else:  # another dialect without UPDATE ... RETURNING: the MariaDB way
            claim = ready.with_only_columns(*columns)
            promote = due
        anything = sa.or_(
            sa.and_(sa.not_(t.c.delayed), t.c.lease_expires <= now),
            sa.and_(t.c.delayed, t.c.not_before <= now),
        )
        probe = sa.select(t.c.id).where(in_queues, anything).limit(1)
        built = _Claim(promote=promote, claim=claim, probe=probe)
        with self._lock:
            self._claims[names] = built
            while len(self._claims) > 64:
                self._claims.popitem(last=False)
        return built

    # ------------------------------------------------------------------ queues
    def declare_queue(self, name: str) -> None:
        """Validate ``name`` and make sure the table exists. Queues are implicit rows, so
        there is nothing else to create. Idempotent; blocks only the first time."""
        self._check_open()
        _check_queue(name)
        self._ensure_schema()

    def dead_letter_queue(self, queue: str) -> str:
        """``queue + ".dead"``: an ordinary queue (receive, ack, purge, size work)."""
        return f"{queue}{DEAD_LETTER_SUFFIX}"

    # ------------------------------------------------------------------ publish
    def _row(self, envelope: Envelope, queue: str, delay: float) -> dict[str, Any]:
        try:
            headers = json.dumps(dict(envelope.headers), ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise EncodeError(
                f"envelope {envelope.id!r} has headers JSON cannot hold: {exc}"
            ) from exc
        return {
            "queue": queue,
            "priority": envelope.priority,
            "delayed": delay > 0,
            "delay_": delay,
            "lease_expires": 0.0,
            "delivery_count": 0,
            "envelope_id": envelope.id,
            "body": bytes(envelope.body),
            "content_type": envelope.content_type,
            "content_encoding": envelope.content_encoding,
            "headers": headers,
            "correlation_id": envelope.correlation_id,
            "reply_to": envelope.reply_to,
        }

    def _insert(self, envelopes: Sequence[Envelope], queue: str, delay: float | None) -> None:
        check_delay(delay, EXACT_MS_MAX_DELAY, "the SQL broker", _DELAY_WHY)
        seconds = float(delay or 0.0)
        rows = [self._row(e, queue, seconds) for e in envelopes]

        def work(conn: Connection) -> None:
            if self._client_clock:
                now = time.time()
                for row in rows:
                    row["now_"] = now
            if self._listener is None or seconds > 0:
                conn.execute(self._sql_insert, rows)
            elif len(rows) == 1:
                note = {"channel": self._channel, "payload": queue}
                conn.execute(self._sql_insert_notify, {**rows[0], **note})
            else:
                conn.execute(self._sql_insert, rows)
                conn.execute(self._sql_notify, {"channel": self._channel, "payload": queue})

        self._db.transaction(work, what=f"publish to {queue!r}")

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Insert one row (one transaction, one round trip plus commit). Blocking.

        Raises:
            ConfigurationError: bad queue name, priority or delay.
            EncodeError: headers that JSON cannot represent.
            OperationalError: the database failed; the message was not accepted.
            ConnectionLost: the broker is closed.
        """
        self._check_open()
        _check_queue(queue)
        self._check_publish(envelope, delay)
        self._ensure_schema()
        self._insert([envelope], queue, delay)

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Insert all envelopes in ONE transaction (executemany): all or none are accepted.

        Returns:
            The number published.
        """
        self._check_open()
        _check_queue(queue)
        batch = list(envelopes)
        for envelope in batch:
            self._check_publish(envelope, delay)
        if not batch:
            return 0
        self._ensure_schema()
        self._insert(batch, queue, delay)
        return len(batch)

    # ------------------------------------------------------------------ receive
    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Claim up to ``max_messages`` ready messages, each under a lease.

        Order: higher priority first, then the order of ``queues``, then publish order
        (a redelivered message keeps its place, so it comes before newer ones). Blocks up
        to ``timeout`` seconds, polling with capped backoff; ``timeout=0`` claims once.

        Raises:
            ConfigurationError: no queue, a bad name, ``max_messages`` < 1 or ``timeout`` < 0.
            OperationalError: the database failed (nothing was claimed).
            ConnectionLost: the broker is closed.
        """
        self._check_open()
        names = (queues,) if isinstance(queues, str) else tuple(dict.fromkeys(queues))
        if not names:
            raise ConfigurationError("receive() needs at least one queue")
        for name in names:
            _check_queue(name)
        if not isinstance(max_messages, int) or max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages!r}")
        if timeout is None or timeout < 0 or timeout != timeout:
            raise ConfigurationError(f"timeout must be >= 0 seconds, got {timeout!r}")
        limit = min(max_messages, _MAX_MESSAGES)
        self._ensure_schema()
        statements = self._claim_statements(names)
        deadline = time.monotonic() + timeout
        pause = self.options.poll_interval
        while True:
            if not self._nothing_ready(names, statements):
                deliveries = self._claim(names, statements, limit)
                if deliveries:
                    return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = min(pause, remaining)
            # Only a consumer that has backed off completely (idle for about half a second)
            # waits on LISTEN: waking every consumer on every publish of a busy queue would
            # turn batch claims into a herd of one-message claims.
            if self._listener is not None and pause >= self.options.max_poll_interval:
                if self._listener.wait(names, wait):
                    pause = self.options.poll_interval  # woken by a publish: claim at once
            else:
                time.sleep(wait)
                pause = min(pause * 2, self.options.max_poll_interval)
            self._check_open()

    def _nothing_ready(self, names: tuple[str, ...], statements: _Claim) -> bool:
        """SQLite only: a read (WAL readers take no lock) telling a poll it can skip the claim
        transaction, which would take the database's one write lock for nothing. Idle
        consumers then never queue up behind producers for the write lock."""
        if self._db.dialect != "sqlite" or self._promotion_pending(names):
            return False

        def work(conn: Connection) -> bool:
            return conn.execute(statements.probe, self._params()).first() is None

        return self._db.transaction(work, what="poll", readonly=True)

    def _promotion_pending(self, names: Sequence[str]) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(now >= self._promote_at.get(q, 0.0) for q in names)

    def _promotion_due(self, names: Sequence[str]) -> bool:
        now = time.monotonic()
        with self._lock:
            if all(now < self._promote_at.get(q, 0.0) for q in names):
                return False
            for q in names:
                self._promote_at[q] = now + self.options.promote_interval
        return True

    def _claim(self, names: tuple[str, ...], statements: _Claim, limit: int) -> list[Delivery]:
        token = f"{self._instance}:{next(self._sequence)}"
        promote = self._promotion_due(names)
        params = self._params(token=token, lease=float(self.options.lease_seconds), limit_=limit)

        def work(conn: Connection) -> list[Any]:
            if promote:
                # Flip due delayed rows to ready: bounded, skipping rows another promoter
                # holds, in the claim's transaction so the claim below sees them.
                if self._returning or self._db.dialect == "postgresql":
                    conn.execute(statements.promote, params)
                else:
                    ids = list(conn.execute(statements.promote, params).scalars())
                    if ids:
                        conn.execute(self._sql_promote_ids, {"ids": ids})
            if self._returning or self._db.dialect == "postgresql":
                return list(conn.execute(statements.claim, params))
            rows = list(conn.execute(statements.claim, params))
            if rows:
                conn.execute(self._sql_stamp_ids, {**params, "ids": [r.id for r in rows]})
            return [_Bumped(r) for r in rows]

        rows = self._db.transaction(
            work, what=f"receive from {list(names)!r}", relaxed=self.options.async_settle
        )
        if not rows:
            return []
        rank = {q: i for i, q in enumerate(names)}
        # A foreign row may hold anything (SQLite keeps any type in any column): sort safely.
        rows.sort(key=lambda r: (-_int_or_0(r.priority), rank.get(r.queue, 0), r.id))
        deliveries: list[Delivery] = []
        bad: list[tuple[Any, str]] = []
        for row in rows:
            try:
                deliveries.append(self._delivery(row, token))
            except Exception as exc:  # any shape of bad row: dead-letter it, never raise
                bad.append((row, undecodable_reason(exc)))
        self._leases.hold((d.receipt.row_id, token) for d in deliveries)
        for row, reason in bad:
            self._dead_letter_undecodable(row, token, reason)
        return deliveries

    def _dead_letter_undecodable(self, row: Any, token: str, reason: str) -> None:
        """Move a claimed row that is not a message to ``<queue>.dead`` as a readable
        stand-in (its body kept). Never raises: on a database error the lease runs out and
        the next claim of the row tries again."""
        receipt = _Receipt(int(row.id), token)
        try:
            source = str(row.queue)
            log.error("dead-lettering a row of %r (id %s): %s", source, row.id, reason)
            dead = self.dead_letter_queue(source)
            if len(dead) > _QUEUE_COLUMN_LENGTH:
                log.error("%r is too long a queue name: the row is dropped instead", dead)
                self._guarded(self._sql_ack, receipt, "drop an undecodable row")
            else:
                self._guarded(
                    self._sql_dead_raw, receipt, "dead-letter", dead_queue=dead,
                    dead_from=source, dead_reason=reason, **_stand_in_fields(row),
                )  # fmt: skip
        except Exception as exc:
            log.warning("could not dead-letter row %s (it comes back later): %s", row.id, exc)
        self._settle(receipt)

    def _delivery(self, row: Any, token: str) -> Delivery:
        headers = json.loads(row.headers) if isinstance(row.headers, str) else None
        if not isinstance(headers, dict):
            raise DecodeError(f"row headers are not a JSON object: {row.headers!r:.100}")
        if row.dead_from is not None:
            headers[DEAD_LETTER_REASON_HEADER] = str(row.dead_reason or "")
            headers[DEAD_LETTER_SOURCE_HEADER] = row.dead_from
        for name in ("envelope_id", "content_type", "content_encoding"):
            if not isinstance(getattr(row, name), str):
                raise DecodeError(f"row column {name} is not text")
        for name in ("correlation_id", "reply_to"):
            if not isinstance(getattr(row, name), str | None):
                raise DecodeError(f"row column {name} is not text")
        if not isinstance(row.body, bytes | bytearray | memoryview):
            raise DecodeError("row column body is not binary")
        envelope = Envelope(
            id=row.envelope_id,
            body=bytes(row.body),
            content_type=row.content_type,
            content_encoding=row.content_encoding,
            headers=headers,
            priority=clamp_priority(row.priority),
            correlation_id=row.correlation_id,
            reply_to=row.reply_to,
        )
        # A claimed row has been delivered at least once, whatever a foreign writer stored.
        count = max(int(row.delivery_count), 1)
        return Delivery(
            envelope=envelope,
            queue=row.queue,
            receipt=_Receipt(int(row.id), token),
            redelivered=count > 1,
            delivery_count=count,
        )

    # ------------------------------------------------------------------ settle
    @staticmethod
    def _receipt(delivery: Delivery) -> _Receipt:
        receipt = getattr(delivery, "receipt", None)
        if not isinstance(receipt, _Receipt):
            raise InvalidReceipt(f"not a delivery of a SQLAlchemyBroker: {delivery!r}")
        return receipt

    def _was_settled(self, receipt: _Receipt) -> bool:
        return self._leases.was_settled(receipt.row_id, receipt.token)

    def _settle(self, receipt: _Receipt) -> None:
        self._leases.settle(receipt.row_id, receipt.token)

    def _guarded(self, statement: Any, receipt: _Receipt, what: str, **params: Any) -> bool:
        """Run ``statement`` guarded by (row id, lease token); True when the lease was lost
        (nothing matched and the row still exists: held by a newer delivery or back in a
        queue). A row that is gone means someone settled it: not an error."""
        values = self._params(row_id=receipt.row_id, token=receipt.token, **params)

        def work(conn: Connection) -> bool:
            if conn.execute(statement, values).rowcount:
                return False
            return conn.execute(self._sql_exists, values).first() is not None

        return self._db.transaction(work, what=what, relaxed=self.options.async_settle)

    def _lost_lease(self, delivery: Delivery, receipt: _Receipt) -> None:
        if self._was_settled(receipt):
            return  # settled by this very delivery before: a repeat is a no-op
        self._settle(receipt)
        raise InvalidReceipt(
            f"delivery of {delivery.envelope.id!r} on {delivery.queue!r} no longer holds its "
            "message (its lease expired and it was delivered again)"
        )

    def ack(self, delivery: Delivery) -> None:
        """Delete the row if this delivery still holds it. Idempotent. One transaction.

        Raises:
            InvalidReceipt: the lease was lost and the message was redelivered (it will be,
                or was, processed again; nothing is lost).
            ConnectionLost: the broker is closed.
        """
        self._check_open()
        receipt = self._receipt(delivery)
        if self._guarded(self._sql_ack, receipt, "ack"):
            self._lost_lease(delivery, receipt)
        self._settle(receipt)

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Requeue (ready now, ``redelivered`` next time) or move to ``<queue>.dead``.

        Idempotent: rejecting the same delivery again does nothing.

        Raises:
            InvalidReceipt: the lease was lost to another consumer before this call.
            ConnectionLost: the broker is closed.
        """
        self._check_open()
        receipt = self._receipt(delivery)
        dead = self.dead_letter_queue(delivery.queue)
        if requeue:
            lost = self._guarded(self._sql_requeue, receipt, "reject")
        elif len(dead) > _QUEUE_COLUMN_LENGTH:
            # A dead-letter queue name the column cannot hold: drop the message instead.
            lost = self._guarded(self._sql_ack, receipt, "reject")
        else:
            lost = self._guarded(
                self._sql_dead,
                receipt,
                "reject",
                dead_queue=dead,
                dead_from=delivery.queue,
                dead_reason=clean_reason(reason),
            )
        if lost:
            self._lost_lease(delivery, receipt)
        self._settle(receipt)

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Hold ``delivery`` for ``seconds`` from now (database clock). One statement.

        Raises:
            InvalidReceipt: the delivery is settled or its lease was taken over.
            ConfigurationError: ``seconds`` is not a positive number.
        """
        self._check_open()
        if not (isinstance(seconds, float | int) and seconds > 0 and math.isfinite(seconds)):
            raise ConfigurationError(f"seconds must be a positive number: {seconds!r}")
        receipt = self._receipt(delivery)
        params = self._params(row_id=receipt.row_id, token=receipt.token, seconds=float(seconds))

        def work(conn: Connection) -> int:
            return int(conn.execute(self._sql_extend, params).rowcount)

        if self._db.transaction(work, what="extend", relaxed=self.options.async_settle) == 0:
            raise InvalidReceipt(
                f"delivery of {delivery.envelope.id!r} on {delivery.queue!r} is not held by "
                "this consumer any more"
            )

    # ------------------------------------------------------------------ purge, size
    def purge(self, queue: str) -> int:
        """Delete ready and delayed rows of ``queue`` (not held ones); return the count.

        Deletes in batches of 1000 rows, one short transaction each, so a large purge never
        holds long locks. Rows locked by a claim in progress are skipped (they are being
        delivered).
        """
        self._check_open()
        _check_queue(queue)
        self._ensure_schema()
        t = self._table
        now = self._now_sql()
        unheld = sa.or_(t.c.lease_owner.is_(None), t.c.lease_expires <= now)
        pick = (
            sa.select(t.c.id)
            .where(t.c.queue == queue, unheld)
            # No ORDER BY: ordering by id would let MariaDB walk the primary key, briefly
            # locking other queues' rows, which their SKIP LOCKED claims would then skip.
            .limit(_PURGE_BATCH)
            .with_for_update(skip_locked=True)
        )
        delete = sa.delete(t).where(t.c.id.in_(sa.bindparam("ids", expanding=True)), unheld)
        total = 0
        while True:

            def work(conn: Connection) -> tuple[int, int]:
                params = self._params()
                ids = list(conn.execute(pick, params).scalars())
                if not ids:
                    return 0, 0
                return len(ids), int(conn.execute(delete, {**params, "ids": ids}).rowcount)

            seen, deleted = self._db.transaction(work, what=f"purge {queue!r}")
            total += deleted
            if seen < _PURGE_BATCH:
                return total

    def size(self, queue: str) -> int:
        """Count ready rows of ``queue``: due, not held (an expired lease counts as ready)."""
        self._check_open()
        _check_queue(queue)
        self._ensure_schema()
        t = self._table
        now = self._now_sql()
        stmt = (
            sa.select(sa.func.count())
            .select_from(t)
            .where(t.c.queue == queue, t.c.not_before <= now, t.c.lease_expires <= now)
        )

        def work(conn: Connection) -> int:
            return int(conn.execute(stmt, self._params()).scalar_one())

        return self._db.transaction(work, what=f"size of {queue!r}", readonly=True)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Give back every message this broker still holds (ready at once, delivered next
        with ``redelivered=True``) and dispose of the engine if this broker built it.

        Idempotent; never raises for a database that is gone (the leases then simply
        expire). Afterwards every method raises :class:`ConnectionLost`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held = self._leases.take_all()
        try:
            if held:
                self._release(held)
        except Exception:  # close must not fail; the leases expire on their own
            log.warning(
                "could not release %d held message(s) on close of %r; they will be "
                "redelivered when their leases expire",
                len(held),
                self,
                exc_info=True,
            )
        finally:
            if self._listener is not None:
                self._listener.close()
            self._db.dispose()

    def _release(self, held: dict[int, str]) -> None:
        t = self._table
        ids = sorted(held)
        prefix = f"{self._instance}:"
        release = (
            sa.update(t)
            .where(
                t.c.id.in_(sa.bindparam("ids", expanding=True)),
                t.c.lease_owner.startswith(prefix, autoescape=True),
            )
            .values(lease_owner=None, lease_expires=0.0)
        )
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]

            def work(conn: Connection, chunk: list[int] = chunk) -> None:
                conn.execute(release, {"ids": chunk})

            self._db.transaction(work, what="release leases", relaxed=self.options.async_settle)


class _Listener:
    """PostgreSQL ``LISTEN`` on one dedicated psycopg 3 connection, for waking ``receive``.

    One thread waits on it at a time; other threads of the broker poll as before. Any
    failure (server gone, another driver than psycopg 3) turns it off for good: polling alone
    is always correct, notifications only make it faster.
    """

    def __init__(self, db: Database, channel: str) -> None:
        self._db = db
        self._channel = channel
        self._lock = threading.Lock()
        self._conn: Any = None
        self._broken = False

    def _connect(self) -> Any:
        if self._conn is None:
            raw = self._db.engine.raw_connection()
            conn: Any = raw.driver_connection
            raw.detach()  # ours alone, never returned to the pool; closed by _drop
            self._conn = conn
            if not hasattr(conn, "notifies") or not type(conn).__module__.startswith("psycopg"):
                raise TypeError("LISTEN wake-ups need psycopg 3")
            conn.autocommit = True
            conn.execute(f'LISTEN "{self._channel}"')
        return self._conn

    def wait(self, names: Sequence[str], timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True as soon as a publish to one of ``names``
        is notified (also for one that happened since the last wait)."""
        if self._broken or not self._lock.acquire(blocking=False):
            time.sleep(timeout)
            return False
        start = time.monotonic()
        try:
            if self._conn is None:
                self._connect()
                # A publish committed between the caller's claim and this LISTEN sent its
                # notification to nobody: have the caller claim once more right away.
                return True
            conn = self._conn
            for note in conn.notifies(timeout=timeout):
                if note.payload in names:
                    return True
                if time.monotonic() - start >= timeout:
                    break
            return False
        except Exception:
            log.warning(
                "LISTEN wake-ups disabled for %r; polling only", self._channel, exc_info=True
            )
            self._broken = True
            self._drop()
            time.sleep(max(0.0, timeout - (time.monotonic() - start)))
            return False
        finally:
            self._lock.release()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._broken = True
            self._drop()


def _check_queue(name: str) -> None:
    """Queue names as everywhere, plus dead-letter names (``<name>.dead``, maybe repeated),
    which may exceed the 200-character limit of user-chosen names."""
    base = name
    while base.endswith(DEAD_LETTER_SUFFIX) and len(base) > len(DEAD_LETTER_SUFFIX):
        base = base[: -len(DEAD_LETTER_SUFFIX)]
    if base != name and len(name) > _QUEUE_COLUMN_LENGTH:
        raise ConfigurationError(f"queue name longer than {_QUEUE_COLUMN_LENGTH} characters")
    validate_queue_name(base if base != name else name)


def _stand_in_fields(row: Any) -> dict[str, Any]:
    """The columns that make an undecodable row a readable stand-in (``_common``)."""
    original = {c: _plain_column(getattr(row, c)) for c in _STAND_IN if c != "body"}
    body = row.body
    if not isinstance(body, bytes | bytearray | memoryview):
        body = str(_plain_column(body)).encode("utf-8", "backslashreplace")
    ident = original["envelope_id"]
    if not (isinstance(ident, str) and len(ident) <= 255):
        ident = hashlib.sha256(repr(original).encode()).hexdigest()[:32]
    return {
        "raw_body": bytes(body),
        "raw_envelope_id": ident,
        "raw_content_type": UNDECODABLE_CONTENT_TYPE,
        "raw_content_encoding": "binary",
        "raw_headers": json.dumps({ORIGINAL_HEADER: original}, separators=(",", ":")),
        "raw_priority": 0,
        "raw_correlation_id": None,
        "raw_reply_to": None,
    }


def _next_count(count: Any) -> Any:
    """The claim's new delivery_count (SQL for a column, Python for a value read before the
    claim): a count below 0 (planted, it would lift worker_max_deliveries) restarts at 1, a
    count at the column's maximum stays there (``+ 1`` would overflow and fail every claim
    of the queue), anything else grows by one. SQLite may hold text: left as it is (a
    claim then dead-letters the row)."""
    if isinstance(count, sa.ColumnElement):
        return sa.case((count >= _COUNT_MAX, count), (count < 0, 1), else_=count + 1)
    if type(count) is not int:
        return count
    return count if count >= _COUNT_MAX else 1 if count < 0 else count + 1


def _int_or_0(value: Any) -> int:
    return value if type(value) is int else 0


def _plain_column(value: Any) -> Any:
    """A column value as JSON can hold it (for the stand-in's ``x-conveyor-original``)."""
    if value is None or (isinstance(value, str | int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


class _Bumped:
    """A row read before its claim UPDATE, seen as after it (see :func:`_next_count`)."""

    __slots__ = ("_row",)

    def __init__(self, row: Row[Any]) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._row, name)
        return _next_count(value) if name == "delivery_count" else value
