"""SQL error translation: SQLAlchemy's and the drivers' exceptions as conveyor's, in ONE place
for the SQL broker and result backend (the spelling every driver module shares, see
:mod:`conveyor._drivers`), and which failures a transaction simply reruns
(:func:`is_retryable`)."""

from __future__ import annotations

import contextlib
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from conveyor._drivers import translating as _translating
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    EncodeError,
    MissingDependency,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.urls import mask_text, mask_url

__all__ = ["TooLarge", "is_retryable", "translate_error", "translating"]

# PostgreSQL SQLSTATEs that mean "your transaction was rolled back; run it again".
_PG_RETRY = frozenset({"40001", "40P01"})
# ... and ones that mean a time limit was hit.
_PG_TIMEOUT = frozenset({"57014", "55P03"})
# MySQL / MariaDB: 1213 deadlock, 1205 lock wait timeout (both roll back the statement or
# transaction; we always roll back and rerun the whole transaction).
_MYSQL_RETRY = frozenset({1213, 1205})
_MYSQL_LOST = frozenset({2002, 2003, 2006, 2013, 2055, 1927, 4031})
_MYSQL_TIMEOUT = frozenset({3024, 1969})
# MySQL / MariaDB: a value the column cannot hold (1406 data too long, 1366 incorrect string
# value, 1264 out of range), whatever class the driver gives them.
_MYSQL_DATA = frozenset({1406, 1366, 1264})
# SQLite primary result codes (extended codes keep them in their low byte): 1 is an SQL
# mistake (no such table or column, syntax), 8 a read-only database.
_SQLITE_ERROR, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 1, 5, 6, 8


class TooLarge(Exception):
    """Raised by the packet guard (:mod:`.packet`), translated to :class:`EncodeError`."""


def _masked(exc: BaseException, url: str = "") -> str:
    """``str(exc)`` with every secret masked, and the raw URL's password too (a driver may
    quote the URL it was given, or a piece of it)."""
    text = mask_text(str(exc))
    password = _password_of(url)
    if password and len(password) > 2:
        text = text.replace(password, "***")
    return text


def _password_of(url: str) -> str:
    try:
        _, plus, rest = url.partition("+")
        return str(make_url(rest if plus and "://" in rest else url).password or "")
    except Exception:  # not a URL SQLAlchemy reads: nothing more to hide than mask_text does
        return ""


def _brief(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return mask_text(f"{type(orig or exc).__name__}: {orig or exc}")


def _mysql_code(orig: Any) -> int | None:
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def _sqlite_code(orig: Any) -> int | None:
    """The primary SQLite result code of a sqlite3 error (Python >= 3.11), else None."""
    if orig is None or not type(orig).__module__.startswith("sqlite3"):
        return None
    code = getattr(orig, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _sqlite_locked(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    if orig is None or not type(orig).__module__.startswith("sqlite3"):
        return False
    code = _sqlite_code(orig)  # Python >= 3.11: no text to read
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(orig).lower()
    return "database is locked" in text or "database table is locked" in text


def _sqlite_mistake(orig: Any) -> bool:
    """A sqlite3 error that no retry can change: an SQL mistake or a read-only database
    (sqlite3 reports those as OperationalError too)."""
    code = _sqlite_code(orig)
    if code is not None:
        return code in (_SQLITE_ERROR, _SQLITE_READONLY)
    # Python 3.10 gives no result code: its messages are all there is.
    text = str(orig).lower()
    mistakes = ("no such table", "no such column", "syntax error", "readonly", "read-only")
    return any(m in text for m in mistakes)


def _refused_value(exc: BaseException, orig: Any, sqlstate: Any, code: int | None) -> bool:
    """The database (or the driver, binding it) refused a value: retrying cannot help.
    PostgreSQL SQLSTATE class 22 (data exception: value too long, NUL in text, numeric
    overflow, bad encoding), MySQL 1406/1366/1264, any driver's DataError, and a value
    SQLAlchemy could not bind (a StatementError wrapping ValueError/TypeError)."""
    if isinstance(sqlstate, str) and sqlstate.startswith("22"):
        return True
    if code in _MYSQL_DATA and type(orig).__module__.startswith(("pymysql", "MySQLdb")):
        return True
    if isinstance(exc, sa_exc.DataError):
        return True
    return (
        isinstance(exc, sa_exc.StatementError)
        and not isinstance(exc, sa_exc.DBAPIError)
        and isinstance(orig, ValueError | TypeError)
    )


def is_retryable(exc: BaseException) -> bool:
    """True for failures that rolled the transaction back and should simply be rerun:
    PostgreSQL 40001/40P01, MySQL/MariaDB 1213/1205, SQLite "database is locked"."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _PG_RETRY:
        return True
    code = _mysql_code(orig)
    if code in _MYSQL_RETRY and type(orig).__module__.startswith(("pymysql", "MySQLdb")):
        return True
    return _sqlite_locked(exc)


def translate_error(exc: BaseException, *, what: str, url: str) -> ConveyorError:
    """The ONE mapping from SQLAlchemy/driver errors to conveyor's tree.

    The message names the operation and the masked URL and the driver's own message, masked
    (never statement parameters: engines are built with ``hide_parameters``). Callers chain
    it: ``raise translate_error(exc, ...) from exc``.

    Only a lost connection, a time limit and contention that outlasted the retries are an
    :class:`OperationalError` (a retry may succeed). A value the database refuses (too long,
    NUL, out of range, not bindable) is an :class:`EncodeError`; a constraint violation or
    an SQL mistake a :class:`ConfigurationError` (ids are checked before they reach the
    database, so what remains is the schema's or the caller's).
    """
    where = f"{what} on {mask_url(url)}"
    orig = getattr(exc, "orig", None)
    raw = str(orig if orig is not None else exc).strip().splitlines()
    detail = _masked(Exception(raw[0][:500] if raw else type(exc).__name__), url)
    if isinstance(exc, ModuleNotFoundError):
        return MissingDependency(url.partition(":")[0], "sqlalchemy", exc.name or "driver")
    if isinstance(exc, TooLarge):
        return EncodeError(f"{where}: {exc}")
    if isinstance(exc, UnicodeEncodeError) or isinstance(orig, UnicodeEncodeError):
        # Text the database's encoding cannot hold (a lone surrogate): drivers raise it raw,
        # while binding, before anything is sent.
        return EncodeError(f"{where}: the text cannot be encoded for the database: {detail}")
    sqlstate = getattr(orig, "sqlstate", None)
    code = _mysql_code(orig)
    # Classified by error classes and codes, never by message text (it changes with the
    # server's version and language). Only connection loss and time limits are transient.
    if _refused_value(exc, orig, sqlstate, code):
        return EncodeError(f"{where}: the database refused a value: {detail}")
    if isinstance(exc, sa_exc.IntegrityError) and not is_retryable(exc):
        # A constraint (unique id, not null): the same statement fails the same way again.
        return ConfigurationError(f"{where}: a constraint refused the write: {detail}")
    if isinstance(exc, sa_exc.DisconnectionError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        return ConnectionLost(f"{where}: connection lost: {detail}")
    if is_retryable(exc):
        return OperationTimeout(f"{where}: still contended after retries: {detail}")
    if sqlstate in _PG_TIMEOUT or code in _MYSQL_TIMEOUT:
        return OperationTimeout(f"{where}: timed out: {detail}")
    if isinstance(exc, sa_exc.TimeoutError):  # pool checkout timeout
        return OperationTimeout(f"{where}: no free connection in the pool: {detail}")
    if (
        isinstance(exc, sa_exc.InterfaceError)
        or (sqlstate is not None and sqlstate.startswith("08"))
        or code in _MYSQL_LOST
    ):
        return ConnectionLost(f"{where}: {detail}")
    if _sqlite_mistake(orig):
        return ConfigurationError(f"{where}: {detail}")
    if isinstance(exc, sa_exc.OperationalError):
        # Connection refused, unknown host, server shutting down, disk full: all transient.
        return ConnectionLost(f"{where}: {detail}")
    if isinstance(exc, sa_exc.ProgrammingError | sa_exc.ArgumentError | sa_exc.NoSuchModuleError):
        return ConfigurationError(f"{where}: {detail}")
    return OperationalError(f"{where}: {detail}")


#: What a statement may raise that :func:`translate_error` maps.
_CATCH: tuple[type[BaseException], ...] = (sa_exc.SQLAlchemyError, UnicodeEncodeError, TooLarge)


def translating(what: str, url: str) -> contextlib.AbstractContextManager[None]:
    """Raise :func:`translate_error`'s error (the cause chained) from any SQLAlchemy or driver
    exception raised inside; conveyor's own errors pass through."""
    return _translating(_CATCH, translate_error, what=what, url=url)
