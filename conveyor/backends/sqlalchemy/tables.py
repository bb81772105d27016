"""The SQL result backend's tables: Celery's task and group tables (with conveyor's extra
columns) and conveyor's counter table; UTC times as the columns hold them."""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_dialect

from conveyor.backends.sqlalchemy.ids import (
    id_type,
)

__all__ = ["counter_table", "group_table", "task_table"]

_UTC = timezone.utc
_KEY_LENGTH = 255
# Extended columns (Celery's result_extended) and the ResultRecord.extended keys they hold.
_EXTENDED_TEXT = ("name", "worker", "queue")
_EXTENDED_CODED = ("args", "kwargs")
# Columns a table created by an older Celery may lack; we then neither write nor read them.
_OPTIONAL = frozenset({"children", "stamps", *_EXTENDED_TEXT, *_EXTENDED_CODED, "retries"})
# Columns we add to Celery's tables when missing.
_OURS = ("expires_at", "group_id", "parent_id")


def _blob() -> sa.types.TypeEngine[bytes]:
    return sa.LargeBinary().with_variant(mysql_dialect.LONGBLOB(), "mysql", "mariadb")


def _datetime() -> sa.types.TypeEngine[datetime]:
    return sa.DateTime().with_variant(mysql_dialect.DATETIME(fsp=6), "mysql", "mariadb")


def _id_column(sequence: str, schema: str | None) -> sa.Column[int]:
    # Celery: Integer (BigInteger on MSSQL) with a named sequence, which PostgreSQL needs to
    # exist because Celery's ORM inserts call nextval() on it by name.
    return sa.Column(
        "id",
        sa.Integer().with_variant(sa.BigInteger(), "mssql"),
        sa.Sequence(sequence, schema=schema),
        primary_key=True,
        autoincrement=True,
    )


def task_table(metadata: sa.MetaData, name: str, *, schema: str | None) -> sa.Table:
    """Celery 5.7's ``celery_taskmeta`` (extended layout, as 5.7 always creates it) plus
    conveyor's ``expires_at`` (indexed), ``group_id`` and ``parent_id``."""
    return sa.Table(
        name,
        metadata,
        _id_column("task_id_sequence", schema),
        sa.Column("task_id", id_type(), unique=True),
        sa.Column("status", sa.String(50)),
        sa.Column("result", _blob(), nullable=True),
        sa.Column("date_done", _datetime(), nullable=True, index=True),
        sa.Column(
            "traceback",
            sa.Text().with_variant(mysql_dialect.LONGTEXT(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("children", _blob(), nullable=True),
        sa.Column("name", sa.String(155), nullable=True),
        sa.Column("args", _blob(), nullable=True),
        sa.Column("kwargs", _blob(), nullable=True),
        sa.Column("worker", sa.String(155), nullable=True),
        sa.Column("retries", sa.Integer(), nullable=True),
        sa.Column("queue", sa.String(155), nullable=True),
        sa.Column("stamps", _blob(), nullable=True),
        sa.Column("expires_at", _datetime(), nullable=True, index=True),
        sa.Column("group_id", sa.String(155), nullable=True),
        sa.Column("parent_id", sa.String(155), nullable=True),
        schema=schema,
        sqlite_autoincrement=True,
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def group_table(metadata: sa.MetaData, name: str, *, schema: str | None) -> sa.Table:
    """Celery 5.7's ``celery_tasksetmeta`` plus conveyor's ``expires_at`` (indexed)."""
    return sa.Table(
        name,
        metadata,
        _id_column("taskset_id_sequence", schema),
        sa.Column("taskset_id", id_type(), unique=True),
        sa.Column("result", _blob(), nullable=True),
        sa.Column("date_done", _datetime(), nullable=True, index=True),
        sa.Column("expires_at", _datetime(), nullable=True, index=True),
        schema=schema,
        sqlite_autoincrement=True,
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def counter_table(metadata: sa.MetaData, name: str, *, schema: str | None) -> sa.Table:
    """conveyor's counters and join sets.

    One head row per key (``member = ''``) holds the counter value, or the member count of
    a set, and the key's expiry; one row per set member (``member = '+' + name``).
    """
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("counter_key", id_type(_KEY_LENGTH), nullable=False),
        sa.Column("member", id_type(_KEY_LENGTH), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", _datetime(), nullable=True, index=True),
        sa.UniqueConstraint("counter_key", "member", name=f"uq_{name}_key_member"),
        schema=schema,
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )


def _utcnow() -> datetime:
    """Naive UTC wall time, the convention of Celery's ``date_done`` column."""
    return datetime.now(_UTC).replace(tzinfo=None)


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        return value
    return value.astimezone(_UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value.astimezone(_UTC)
