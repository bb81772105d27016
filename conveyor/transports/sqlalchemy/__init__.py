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

How it works (``docs/stores/sql.md`` has the full table layout):

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

Modules: :mod:`.broker` (the broker), :mod:`.schema` (the table, its indexes and the columns
the statements use), :mod:`.rows` (envelopes as rows and back, undecodable rows' stand-ins),
:mod:`.listener` (PostgreSQL ``LISTEN`` wake-ups), :mod:`.options`; the URL, engine and error
plumbing it shares with the result backend is :mod:`conveyor._drivers.sql`.
"""

from __future__ import annotations

from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
)
from conveyor.transports.sqlalchemy.broker import SQLAlchemyBroker
from conveyor.transports.sqlalchemy.options import SQLAlchemyBrokerOptions
from conveyor.transports.sqlalchemy.schema import message_table

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "SQLAlchemyBroker",
    "SQLAlchemyBrokerOptions",
    "message_table",
]
