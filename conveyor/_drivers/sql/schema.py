"""SQL identifiers and schema creation shared by the SQL broker and result backend: table,
schema and index names, and ``create_all`` that tolerates another process creating the same
tables at the same time."""

from __future__ import annotations

import random
import time

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from conveyor._drivers.sql.engine import Database
from conveyor._drivers.sql.errors import _sqlite_locked, is_retryable, translate_error
from conveyor.core.errors import ConfigurationError, ConveyorError

__all__ = ["create_all_race_safe", "index_name", "sql_identifier", "tables_exist"]


def sql_identifier(name: str, what: str) -> str:
    """Validate a table or schema name given as an option (letters, digits, ``_``)."""
    if not name or not all(c.isalnum() or c == "_" for c in name) or len(name) > 60:
        raise ConfigurationError(f"{what} {name!r} must be 1-60 letters, digits or underscores")
    return name


def index_name(table: str, suffix: str) -> str:
    """``ix_<table>_<suffix>`` kept under every dialect's identifier limit (63)."""
    name = f"ix_{table}_{suffix}"
    if len(name) <= 60:
        return name
    import hashlib

    digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"ix_{table[:40]}_{digest}_{suffix[:8]}"


def tables_exist(db: Database, metadata: sa.MetaData) -> bool:
    """True when every table of ``metadata`` exists (a read-only check: on SQLite it does
    not take the write lock that ``create_all`` would)."""

    def check(conn: Connection) -> bool:
        inspector = sa.inspect(conn)
        return all(inspector.has_table(t.name, schema=t.schema) for t in metadata.sorted_tables)

    return db.transaction(check, what="inspect tables", readonly=True)


def _tables_appeared(db: Database, metadata: sa.MetaData) -> bool:
    """Whether any table of ``metadata`` exists now (another process is creating them)."""
    try:

        def check(conn: Connection) -> bool:
            inspector = sa.inspect(conn)
            return any(inspector.has_table(t.name, schema=t.schema) for t in metadata.sorted_tables)

        return db.transaction(check, what="inspect tables", readonly=True)
    except ConveyorError:
        return False


def create_all_race_safe(db: Database, metadata: sa.MetaData, *, what: str) -> None:
    """``metadata.create_all`` that tolerates another process creating the same objects.

    Two processes starting at once both see "no table" and both CREATE; the loser gets
    "already exists" (or, on PostgreSQL, a unique violation in ``pg_type``). When a table of
    ``metadata`` exists after such an error, it was a race: retrying sees the tables and
    does nothing; otherwise the error is raised at once. Bounded: 10 attempts (plus, on
    SQLite, waits for the write lock up to the operation timeout).
    """
    if tables_exist(db, metadata):
        return
    deadline = time.monotonic() + (db.sqlite_lock_wait or 0.0)
    attempt = 0
    while True:
        try:
            if db.lock is not None:
                with db.lock:
                    metadata.create_all(db.engine, checkfirst=True)
            else:
                metadata.create_all(db.engine, checkfirst=True)
            return
        except (sa_exc.ProgrammingError, sa_exc.IntegrityError, sa_exc.OperationalError) as exc:
            if _sqlite_locked(exc) and time.monotonic() < deadline:
                time.sleep(random.uniform(0, 0.005))
                continue
            attempt += 1
            # Lost a race when the tables are there now (asked of the database, never read
            # from the error's text, which differs per server, version and language).
            racing = is_retryable(exc) or _tables_appeared(db, metadata)
            if not racing or attempt >= 10:
                raise translate_error(exc, what=what, url=db.url_text) from exc
            time.sleep(0.01 * attempt * (0.5 + random.random()))
        except sa_exc.SQLAlchemyError as exc:
            raise translate_error(exc, what=what, url=db.url_text) from exc
