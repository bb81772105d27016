"""Private SQLAlchemy plumbing shared by the ``sqla+`` broker and the ``db+`` result backend.

Not a public API. It owns the things both implementations must do identically:

* splitting a ``sqla+<url>`` / ``db+<url>`` into the SQLAlchemy URL and conveyor's options
  (conveyor's keys are removed from the query; driver keys pass through untouched),
* building one long-lived :class:`~sqlalchemy.engine.Engine` per instance with the settings
  each dialect needs (SQLite: WAL, ``BEGIN IMMEDIATE`` write transactions, busy timeout;
  MySQL/MariaDB: ``READ COMMITTED`` so claims take no gap locks; all: ``pool_pre_ping``,
  ``hide_parameters`` so message bodies never reach exception text),
* running a transaction with a bounded, jittered retry of deadlocks and serialization
  failures, and translating every remaining driver error in ONE place
  (:func:`translate_error`) into conveyor's tree, chained with ``from``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    EncodeError,
    InvalidURL,
    MissingDependency,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.options import closest
from conveyor.core.urls import mask_text, mask_url, refuse_ambiguous_credentials

__all__ = [
    "Database",
    "EngineSettings",
    "driver_query_keys",
    "is_retryable",
    "make_database",
    "split_url",
    "translate_error",
]

log = logging.getLogger("conveyor.sql")
T = TypeVar("T")

# Execution option read by the SQLite "begin" hook: "IMMEDIATE" (default: take the write lock
# up front, so a claim can never fail half-way with SQLITE_BUSY on lock upgrade) or "DEFERRED"
# (read-only work: WAL readers never block writers).
SQLITE_BEGIN = "conveyor_sqlite_begin"

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


def split_url(
    url: str, *, prefixes: Collection[str], option_names: Collection[str]
) -> tuple[URL, dict[str, str]]:
    """Split ``sqla+postgresql+psycopg://u:p@h/db?lease_seconds=5&sslmode=require``.

    Returns the SQLAlchemy URL without conveyor's option keys and the option keys found.
    A URL without one of ``prefixes`` is taken as a plain SQLAlchemy URL.

    Raises:
        InvalidURL: the remainder is not a SQLAlchemy URL.
    """
    text = url.strip()
    head, plus, rest = text.partition("+")
    inner = rest if plus and head.lower() in prefixes else text
    # A raw '?' or '#' in credentials reads differently in SQLAlchemy than here: refuse it
    # before SQLAlchemy parses it (and quotes a piece of the password as a host).
    refuse_ambiguous_credentials(url)
    try:
        sa_url = make_url(inner)
    except (sa_exc.ArgumentError, ValueError) as exc:  # ValueError: a non-numeric port
        raise InvalidURL(
            f"{mask_url(url)!r} is not a SQLAlchemy URL: {_masked(exc, url)}"
        ) from None
    ours: dict[str, str] = {}
    for key, value in sa_url.query.items():
        if key in option_names:
            # A repeated key arrives as a tuple; the last one wins, as everywhere in conveyor.
            ours[key] = value[-1] if isinstance(value, tuple) else value
    if ours:
        sa_url = sa_url.difference_update_query(list(ours))
    _check_driver_keys(sa_url, url, option_names)
    return sa_url, ours


# SQLAlchemy's own query keys: ``plugin`` (every dialect), the ``ssl_*`` keys its MySQL
# dialects turn into the driver's ``ssl`` dict, and pysqlite's connect arguments and the SQLite
# URI parameters it passes on with ``uri=true`` (sqlalchemy/dialects/sqlite/pysqlite.py).
_SA_KEYS = frozenset({"plugin"})
_SA_MYSQL_SSL = frozenset(
    {"ssl_ca", "ssl_key", "ssl_cert", "ssl_capath", "ssl_cipher", "ssl_check_hostname"}
)
_PYSQLITE_KEYS = frozenset(
    {"uri", "timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)
_SQLITE_URI_KEYS = frozenset({"vfs", "mode", "cache", "psow", "nolock", "immutable", "modeof"})


def driver_query_keys(sa_url: URL) -> frozenset[str] | None:
    """The URL query keys the URL's driver accepts, read from the driver's own table of
    connection options (libpq's ``PQconndefaults`` through psycopg 3, PyMySQL's ``connect``
    signature, pysqlite's documented arguments), plus SQLAlchemy's own keys. ``None`` when
    the driver has no such table (other drivers): their keys pass through unchecked."""
    try:
        backend, driver = sa_url.get_backend_name(), sa_url.get_driver_name()
    except Exception:  # an unknown dialect: make_database reports it
        return None
    keys: set[str] = set()
    try:
        if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
            import psycopg  # psycopg2 has no such table; psycopg 3 reads libpq's

            keys = {o.keyword.decode() for o in psycopg.pq.Conninfo.get_defaults()}
        elif backend in ("mysql", "mariadb") and driver == "pymysql":
            pymysql = importlib.import_module("pymysql.connections")  # no type stubs
            signature = inspect.signature(pymysql.Connection.__init__)
            named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            keys = {n for n, p in signature.parameters.items() if p.kind in named}
            keys |= _SA_MYSQL_SSL
        elif backend == "sqlite" and driver == "pysqlite":
            keys = set(_PYSQLITE_KEYS)
            if str(sa_url.query.get("uri", "")).lower() in ("1", "true", "yes", "on"):
                keys |= _SQLITE_URI_KEYS
        else:
            return None
    except Exception:  # the driver is missing or changed shape: do not guess
        return None
    keys.discard("self")
    return frozenset(keys | _SA_KEYS) if keys else None


def _check_driver_keys(sa_url: URL, url: str, option_names: Collection[str]) -> None:
    """Refuse query keys that are neither conveyor's options nor the driver's (a typo such as
    ``lease_secnds`` would otherwise reach the driver: a raw ``TypeError`` from PyMySQL at
    the first connect, an error at the first query on PostgreSQL, silence on SQLite)."""
    if not sa_url.query:
        return
    known = driver_query_keys(sa_url)
    if known is None:
        return
    for key in sa_url.query:
        if key in known:
            continue
        hint = closest(key, option_names) or closest(key, known)
        did = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigurationError(
            f"unknown option {key!r} in {mask_url(url)!r}.{did} conveyor options: "
            f"{', '.join(sorted(option_names))}; any other key must be a connection option "
            f"of the {sa_url.get_driver_name()} driver"
        )


@dataclass(frozen=True)
class EngineSettings:
    """Engine knobs common to both implementations (all seconds as float).

    ``None`` leaves SQLAlchemy's or the driver's default in place.
    """

    pool_size: int | None = None
    max_overflow: int | None = None
    pool_timeout: float | None = None
    pool_recycle: float | None = 3600.0
    connect_timeout: float | None = 10.0
    operation_timeout: float | None = 30.0
    sqlite_synchronous: str = "NORMAL"
    echo: bool = False


def _is_sqlite_memory(url: URL) -> bool:
    database = url.database or ""
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    )


@dataclass
class Database:
    """One engine plus what the implementations need to know about its dialect.

    Thread-safe: the engine's pool hands each thread its own connection. For SQLite
    ``:memory:`` every thread shares one connection (there is no other way to share the
    database), so :meth:`transaction` serialises on ``lock``.
    """

    engine: Engine
    owned: bool
    url_text: str
    memory: bool = False
    max_retries: int = 10
    lock: threading.RLock | None = None
    sqlite_lock_wait: float | None = None
    retries: int = 0
    lock_waits: int = 0
    _retry_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _writers: threading.RLock | None = field(default=None, repr=False)

    @property
    def dialect(self) -> str:
        """``postgresql``, ``mysql`` (MariaDB too), ``sqlite`` or another SQLAlchemy name."""
        name = str(self.engine.dialect.name)
        return "mysql" if name == "mariadb" else name

    @property
    def is_mariadb(self) -> bool:
        return bool(getattr(self.engine.dialect, "is_mariadb", False))

    @property
    def masked_url(self) -> str:
        return mask_url(self.url_text)

    def transaction(
        self,
        fn: Callable[[Connection], T],
        *,
        what: str,
        readonly: bool = False,
        relaxed: bool = False,
    ) -> T:
        """Run ``fn(conn)`` in one transaction, retrying deadlocks/serialization failures.

        Blocks for the duration of the transaction plus bounded retries (``max_retries``
        attempts with jittered exponential backoff, 2 ms doubling to 0.25 s). ``fn`` must not
        change Python-side state before it returns: it may run several times and only the
        last run commits.

        ``readonly`` work runs in a deferred (non-locking) transaction on SQLite. ``relaxed``
        work commits asynchronously on PostgreSQL (``synchronous_commit = off``).

        Raises:
            OperationalError: (or a subclass) when the database failed or retries ran out;
                the transaction was rolled back.
            ConfigurationError: the database refused the statement itself (permissions,
                missing objects that cannot be created, ...).
        """
        attempt = 0
        backoff = 0.002
        started = time.monotonic()
        lock_pause = 0.0005
        while True:
            try:
                if self.lock is not None:
                    with self.lock:
                        return self._once(fn, readonly, relaxed)
                if self.sqlite_lock_wait and not readonly:
                    # SQLite has one write lock per file: threads of this engine queue for
                    # it here, in order, instead of all spinning on "database is locked".
                    with self._write_lock():
                        return self._once(fn, readonly, relaxed)
                return self._once(fn, readonly, relaxed)
            except (sa_exc.SQLAlchemyError, ConveyorError, UnicodeEncodeError, _TooLarge) as exc:
                if isinstance(exc, ConveyorError):
                    raise
                if (
                    self.sqlite_lock_wait
                    and _sqlite_locked(exc)
                    and time.monotonic() - started < self.sqlite_lock_wait
                ):
                    # SQLite's own busy handler sleeps up to 100 ms per try while the write
                    # lock is usually free again within a millisecond; with many writer
                    # processes that wastes most of the time. Its timeout is kept tiny and
                    # we retry here with short jittered pauses until the operation timeout.
                    with self._retry_lock:
                        self.lock_waits += 1
                    time.sleep(random.uniform(0, lock_pause))
                    lock_pause = min(lock_pause * 2, 0.008)
                    continue
                attempt += 1
                if is_retryable(exc) and attempt < self.max_retries:
                    with self._retry_lock:
                        self.retries += 1
                    log.debug("retrying %s after %s (attempt %d)", what, _brief(exc), attempt)
                    time.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 0.25)
                    continue
                raise translate_error(exc, what=what, url=self.url_text) from exc

    def _write_lock(self) -> threading.RLock:
        if self._writers is None:
            self._writers = _shared_lock(self.engine, "_conveyor_write_lock")
        return self._writers

    def _once(self, fn: Callable[[Connection], T], readonly: bool, relaxed: bool) -> T:
        with self.engine.connect() as conn:
            if readonly and self.dialect == "sqlite":
                conn.execution_options(**{SQLITE_BEGIN: "DEFERRED"})
            with conn.begin():
                if relaxed and self.dialect == "postgresql":
                    # Commit without waiting for the WAL flush. Only for transactions whose
                    # loss in a server crash merely causes a redelivery (see the broker).
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                return fn(conn)

    def dispose(self) -> None:
        if self.owned:
            self.engine.dispose()


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
    if isinstance(exc, _TooLarge):
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


def make_database(
    url: URL,
    *,
    url_text: str,
    settings: EngineSettings,
    max_retries: int,
    engine: Engine | None = None,
) -> Database:
    """Build (or wrap) the engine for ``url``.

    Args:
        url: the SQLAlchemy URL (conveyor's options already removed).
        url_text: the user's URL, kept only for masked messages.
        settings: pool and timeout settings, applied only when the engine is built here.
        max_retries: transaction attempts for retryable errors.
        engine: a ready engine to use instead (not disposed by ``close``). For SQLite it
            must have been built by :func:`make_database` or carry equivalent settings.

    Raises:
        MissingDependency: the URL's driver is not installed.
        ConfigurationError: SQLAlchemy rejected the URL or the settings.
    """
    if engine is not None:
        if engine.dialect.name in ("mysql", "mariadb"):
            _install_packet_guard(engine)
        memory = engine.dialect.name == "sqlite" and _is_sqlite_memory(engine.url)
        lock = _shared_lock(engine) if memory else None
        file_sqlite = engine.dialect.name == "sqlite" and not memory
        wait = (settings.operation_timeout or 30.0) if file_sqlite else None
        return Database(engine, False, url_text, memory, max_retries, lock, wait)
    backend = url.get_backend_name()
    kwargs: dict[str, Any] = {
        # A local SQLite file cannot drop a connection; servers can (restarts, idle kills).
        "pool_pre_ping": backend != "sqlite",
        "hide_parameters": True,
        "echo": settings.echo,
        "future": True,
    }
    connect_args: dict[str, Any] = {}
    try:
        driver = url.get_driver_name()  # loads the dialect
    except sa_exc.NoSuchModuleError as exc:
        raise ConfigurationError(
            f"unknown SQL dialect in {mask_url(url_text)}: {_masked(exc, url_text)} (e.g. "
            "sqlite, postgresql+psycopg, mysql+pymysql)"
        ) from None
    memory = backend == "sqlite" and _is_sqlite_memory(url)
    lock_wait: float | None = None
    if backend == "sqlite":
        connect_args["check_same_thread"] = False
        if not memory:
            # See Database.transaction: a short busy wait in SQLite, the rest in Python.
            connect_args["timeout"] = 0.005
            lock_wait = settings.operation_timeout or 30.0
        if memory:
            # One connection shared by every thread: the only way threads see one database.
            kwargs["poolclass"] = StaticPool
    else:
        for name in ("pool_size", "max_overflow", "pool_timeout"):
            value = getattr(settings, name)
            if value is not None:
                kwargs[name] = value
        if settings.pool_recycle is not None:
            kwargs["pool_recycle"] = int(settings.pool_recycle)
        if backend in ("mysql", "mariadb"):
            # READ COMMITTED: no gap locks, so SKIP LOCKED claims and inserts stop deadlocking
            # each other on index gaps (the remaining 1213s are retried).
            kwargs["isolation_level"] = "READ COMMITTED"
    _driver_timeouts(backend, driver, url, settings, connect_args)
    if connect_args:
        kwargs["connect_args"] = connect_args
    try:
        built = sa.create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        extra = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}.get(backend)
        raise MissingDependency(url.drivername, extra or "sqlalchemy", exc.name or driver) from None
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, TypeError, ValueError) as exc:
        # ValueError: a query value the dialect cannot convert (``?timeout=abc``).
        # SQLAlchemy's text may quote query values (a password among them): masked.
        raise ConfigurationError(
            f"cannot build an engine for {mask_url(url_text)}: {_masked(exc, url_text)}"
        ) from None
    if backend == "sqlite":
        _install_sqlite_hooks(built, memory=memory, synchronous=settings.sqlite_synchronous)
    if backend in ("mysql", "mariadb"):
        _install_packet_guard(built)
    lock = _shared_lock(built) if memory else None
    return Database(built, True, url_text, memory, max_retries, lock, lock_wait)


_LOCKS_GUARD = threading.Lock()


def _shared_lock(engine: Engine, name: str = "_conveyor_lock") -> threading.RLock:
    # Several brokers/backends may wrap one engine (tests share a :memory: store that way);
    # they must serialise on the same lock, so it lives on the engine.
    with _LOCKS_GUARD:
        lock: threading.RLock | None = engine.__dict__.get(name)
        if lock is None:
            lock = threading.RLock()
            engine.__dict__[name] = lock
        return lock


# ------------------------------------------------------------------ MariaDB/MySQL packets
# A statement longer than the server's max_allowed_packet is not refused with an error: the
# server drops the connection (2006 "gone away", 2013), which reads as a transient outage and
# would be retried for ever. The guard below refuses such a statement before it is sent.
_PACKET_GUARD = "_conveyor_packet_guard"
_PACKET_FLOOR = 64 << 10  # statements smaller than this are never checked (nor looked up)
_ESCAPED = ("\\", "'", '"', "\0", "\n", "\r", "\x1a")  # sent as two bytes each by the drivers
_ESCAPED_BYTES = tuple(c.encode() for c in _ESCAPED)


class _TooLarge(Exception):
    """Raised by the packet guard, translated to :class:`EncodeError` by the transaction."""


def _install_packet_guard(engine: Engine) -> None:
    """Refuse (``EncodeError``, nothing sent) a statement whose text with its escaped
    values would exceed ``@@max_allowed_packet``, read once per engine, the first time a
    statement of more than 64 KiB is seen. Idempotent."""
    with _LOCKS_GUARD:
        if engine.__dict__.get(_PACKET_GUARD) is not None:
            return
        limit: dict[str, int] = {}
        engine.__dict__[_PACKET_GUARD] = limit

    def check(conn: Any, _c: Any, statement: str, params: Any, _x: Any, many: bool) -> None:
        rows = params if many else [params]
        rough = len(statement) + max((_packet_bound(r) for r in rows), default=0)
        if rough <= _PACKET_FLOOR:
            return
        if "max" not in limit:
            found = _read_max_allowed_packet(conn)
            if found is None:
                return  # unknown: the statement goes as before
            limit["max"] = found
        if rough <= limit["max"]:
            return
        size = len(statement.encode()) + max((_packet_size(r) for r in rows), default=0)
        if size > limit["max"]:
            raise _TooLarge(
                f"a statement of {size} bytes is more than the server takes "
                f"(max_allowed_packet = {limit['max']} bytes): the value cannot be stored"
            )

    event.listen(engine, "before_cursor_execute", check)


def _read_max_allowed_packet(conn: Connection) -> int | None:
    try:  # a cursor of its own, outside SQLAlchemy's events (this runs inside one)
        raw: Any = conn.connection.dbapi_connection
        cursor = raw.cursor()
        try:
            cursor.execute("SELECT @@max_allowed_packet")
            row = cursor.fetchone()
        finally:
            cursor.close()
        return int(row[0])
    except Exception as exc:  # a broken connection: the statement itself will say so
        log.debug("could not read max_allowed_packet: %s", _brief(exc))
        return None


def _packet_values(row: Any) -> Collection[Any]:
    if isinstance(row, Mapping):
        return row.values()
    return row if isinstance(row, list | tuple) else ()


def _packet_bound(row: Any) -> int:
    """An upper bound of the escaped size of one parameter set, computed without copies."""
    total = 0
    for v in _packet_values(row):
        if isinstance(v, str):
            total += 8 * len(v) + 2  # 4 UTF-8 bytes, each escaped at worst
        elif isinstance(v, bytes | bytearray | memoryview):
            total += 2 * len(v) + 10
        else:
            total += 32
    return total


def _packet_size(row: Any) -> int:
    """The size of one parameter set as the drivers send it (quoted, escaped)."""
    total = 0
    for v in _packet_values(row):
        if isinstance(v, str):
            total += len(v.encode("utf-8", "replace")) + sum(map(v.count, _ESCAPED)) + 2
        elif isinstance(v, bytes | bytearray | memoryview):
            data = bytes(v)
            total += len(data) + sum(map(data.count, _ESCAPED_BYTES)) + 10
        else:
            total += 32
    return total


def _driver_timeouts(
    backend: str,
    driver: str,
    url: URL,
    settings: EngineSettings,
    connect_args: dict[str, Any],
) -> None:
    """Map conveyor's timeouts onto the drivers we know; a URL query value wins."""
    query: Mapping[str, Any] = url.query
    if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        if settings.connect_timeout is not None and "connect_timeout" not in query:
            connect_args["connect_timeout"] = max(1, round(settings.connect_timeout))
        if settings.operation_timeout is not None and "options" not in query:
            ms = int(settings.operation_timeout * 1000)
            connect_args["options"] = f"-c statement_timeout={ms} -c lock_timeout={ms}"
    elif backend in ("mysql", "mariadb") and driver in ("pymysql", "mysqldb"):
        if settings.connect_timeout is not None and "connect_timeout" not in query:
            connect_args["connect_timeout"] = max(1, round(settings.connect_timeout))
        if settings.operation_timeout is not None:
            for key in ("read_timeout", "write_timeout"):
                if key not in query:
                    connect_args[key] = max(1, round(settings.operation_timeout))


def _install_sqlite_hooks(engine: Engine, *, memory: bool, synchronous: str) -> None:
    sync = synchronous.upper()
    if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigurationError(f"sqlite_synchronous must be OFF/NORMAL/FULL/EXTRA, not {sync!r}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not the sqlite3 module's implicit BEGIN) decide when a transaction
        # starts, so the "begin" hook below can say IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sync}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


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
