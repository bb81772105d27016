"""Ids and column values of the SQL result backend (:mod:`conveyor.backends.sqlalchemy`):
Celery's column lengths, text no SQL text type holds, and exact id comparison on
MariaDB/MySQL, whose default collations take ``'ABC'``, ``'abc'`` and ``'abc '`` for one key.

Why here: the rules are the backend's, but they are a subject of their own (collations,
guards against overwriting another id's row) and the backend module is big enough.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.engine import Connection

from conveyor._drivers.sql import Database
from conveyor.core.errors import ConfigurationError

__all__ = [
    "EXACT_COLLATION",
    "ID_LENGTH",
    "brief",
    "check_landed",
    "exact_counters",
    "id_type",
    "is_id",
    "keep_other_row",
    "loose_id_columns",
    "text_value",
]

log = logging.getLogger("conveyor.backends.sqlalchemy")

#: Celery's id and informational string columns: ``String(155)``.
ID_LENGTH = 155
#: Where a table is created here, ids compare exactly on MariaDB/MySQL (trailing spaces
#: aside, which is why ids ending in one are refused there).
EXACT_COLLATION = "utf8mb4_bin"
_ID_COLUMNS = ("task_id", "taskset_id", "counter_key", "member")


def brief(value: str) -> str:
    """An id as error messages show it: its ``repr``, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def id_type(length: int = ID_LENGTH) -> sa.types.TypeEngine[str]:
    """An id column: exact (binary collation) on MariaDB/MySQL, whose default is not."""
    exact = mysql_dialect.VARCHAR(length, collation=EXACT_COLLATION)
    return sa.String(length).with_variant(exact, "mysql", "mariadb")


def text_value(value: Any, limit: int | None = None) -> Any:
    """A text column's value: NUL and lone surrogates escaped (no SQL text type holds them),
    cut to ``limit`` characters. Non-strings are left for the driver."""
    if not isinstance(value, str):
        return value
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value if limit is None else value[:limit]


def is_id(column: sa.ColumnElement[Any], value: str, mysql: bool) -> sa.ColumnElement[bool]:
    """``column = value``, exactly: on MariaDB/MySQL also byte for byte (the index finds the
    row, the bytes reject the other id of a case-insensitive collation)."""
    match = column == value
    if not mysql:
        return match
    binary = mysql_dialect.BINARY()
    return sa.and_(match, sa.cast(column, binary) == sa.cast(sa.literal(value), binary))


def keep_other_row(
    table: sa.Table, column: str, value: str, loose: dict[str, str]
) -> sa.ColumnElement[bool] | None:
    """For a table with a loose collation: the condition under which an upsert must keep the
    existing row (it belongs to another id). None for exact tables."""
    if str(table.name) not in loose:
        return None
    binary = mysql_dialect.BINARY()
    return sa.cast(table.c[column], binary) != sa.cast(sa.literal(value), binary)


def check_landed(
    conn: Connection, column: sa.Column[Any], value: str, what: str, loose: dict[str, str]
) -> None:
    """After a guarded upsert into a loose table: raise if ``value`` met another id's row
    (which the guard left alone)."""
    table = column.table
    found = conn.execute(sa.select(column).where(column == value)).scalar()
    if found is not None and found != value:
        raise ConfigurationError(
            f"{what} {brief(value)} cannot be stored in {table.name}: its {column.name} "
            f"column's collation {loose.get(str(table.name), '?')} makes it the same key as "
            f"the stored {brief(found)}; make the column exact: ALTER TABLE {table.name} "
            f"MODIFY {column.name} VARCHAR(155) CHARACTER SET utf8mb4 COLLATE "
            f"{EXACT_COLLATION}"
        )


def _collations(
    db: Database, tables: Sequence[sa.Table], schema: str | None
) -> dict[tuple[str, str], str]:
    """MariaDB/MySQL: ``(table, column) -> collation`` of the id columns of ``tables``."""
    names = [str(t.name) for t in tables]

    def work(conn: Connection) -> list[Any]:
        stmt = sa.text(
            "SELECT TABLE_NAME, COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME IN :names"
            " AND COLUMN_NAME IN :columns"
        ).bindparams(sa.bindparam("names", expanding=True), sa.bindparam("columns", expanding=True))
        params = {"schema": schema, "names": names, "columns": list(_ID_COLUMNS)}
        return list(conn.execute(stmt, params))

    rows = db.transaction(work, what="inspect id collations", readonly=True)
    return {(str(r[0]), str(r[1])): str(r[2] or "") for r in rows}


def _exact(collation: str) -> bool:
    return not collation or collation == "binary" or collation.endswith("_bin")


def loose_id_columns(
    db: Database, tables: Sequence[sa.Table], schema: str | None
) -> dict[str, str]:
    """Tables among ``tables`` whose id column compares loosely (a case- or
    accent-insensitive collation): table name -> collation. Each is logged once, with the
    statement that makes it exact."""
    loose: dict[str, str] = {}
    for (table, column), collation in _collations(db, tables, schema).items():
        if _exact(collation):
            continue
        loose[table] = collation
        log.warning(
            "%s.%s compares ids with the case-insensitive collation %s: two ids that differ "
            "only in case or accents cannot both be stored (such a store raises "
            "ConfigurationError); make it exact with ALTER TABLE %s MODIFY %s VARCHAR(155) "
            "CHARACTER SET utf8mb4 COLLATE %s",
            table,
            column,
            collation,
            table,
            column,
            EXACT_COLLATION,
        )
    return loose


def exact_counters(db: Database, table: sa.Table, schema: str | None, length: int) -> None:
    """Convert conveyor's own counter table to exact id columns if an older conveyor created
    it with the server's (case-insensitive) default collation. Idempotent."""
    if all(_exact(collation) for collation in _collations(db, [table], schema).values()):
        return
    prep = db.engine.dialect.identifier_preparer
    column = f"VARCHAR({length}) CHARACTER SET utf8mb4 COLLATE {EXACT_COLLATION} NOT NULL"
    ddl = (
        f"ALTER TABLE {prep.format_table(table)} "
        f"MODIFY {prep.quote('counter_key')} {column}, MODIFY {prep.quote('member')} {column}"
    )
    log.info("making the id columns of %s exact (%s)", table.name, EXACT_COLLATION)
    db.transaction(lambda conn: conn.exec_driver_sql(ddl), what="convert counters")
