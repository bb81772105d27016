"""The SQL broker's table, its indexes, and the columns its statements use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_types

from conveyor._drivers.sql import index_name

__all__ = ["message_table"]

_QUEUE_COLUMN_LENGTH = 255  # a 200-character queue name plus a few ".dead" suffixes
# delivery_count is an INTEGER column (32 bits on PostgreSQL and MariaDB): a claim stops
# counting there instead of failing on the overflow; the count is then far past any
# worker_max_deliveries, so the message is refused, not run.
_COUNT_MAX = 2**31 - 1


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
