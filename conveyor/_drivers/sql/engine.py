"""The SQL engine both the broker and the result backend run on: one long-lived
:class:`~sqlalchemy.engine.Engine` per instance with the settings each dialect needs (SQLite:
WAL, ``BEGIN IMMEDIATE`` write transactions, busy timeout; MySQL/MariaDB: ``READ COMMITTED`` so
claims take no gap locks, the packet guard; all: ``pool_pre_ping``, ``hide_parameters`` so
message bodies never reach exception text), the engine options both take
(:class:`EngineSettings`, :func:`engine_settings`), and :class:`Database`, which runs a
transaction with a bounded, jittered retry of deadlocks and serialization failures."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import StaticPool

from conveyor._drivers.sql.errors import (
    TooLarge,
    _brief,
    _masked,
    _sqlite_locked,
    is_retryable,
    translate_error,
)
from conveyor._drivers.sql.packet import install_packet_guard
from conveyor.core.errors import ConfigurationError, ConveyorError, MissingDependency
from conveyor.core.urls import mask_url

__all__ = ["SQLITE_BEGIN", "Database", "EngineSettings", "engine_settings", "make_database"]

log = logging.getLogger("conveyor.sql")
T = TypeVar("T")

# Execution option read by the SQLite "begin" hook: "IMMEDIATE" (default: take the write lock
# up front, so a claim can never fail half-way with SQLITE_BUSY on lock upgrade) or "DEFERRED"
# (read-only work: WAL readers never block writers).
SQLITE_BEGIN = "conveyor_sqlite_begin"


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


def engine_settings(options: Any) -> EngineSettings:
    """The :class:`EngineSettings` of a broker's or result backend's options (both option
    classes inherit these fields from it)."""
    return EngineSettings(**{f.name: getattr(options, f.name) for f in fields(EngineSettings)})


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
            except (sa_exc.SQLAlchemyError, ConveyorError, UnicodeEncodeError, TooLarge) as exc:
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
            install_packet_guard(engine)
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
        install_packet_guard(built)
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
