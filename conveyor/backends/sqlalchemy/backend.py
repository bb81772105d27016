"""The SQL result backend (see :mod:`conveyor.backends.sqlalchemy` for URL, options, Celery
compatibility and ids)."""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from conveyor._drivers.sql import (
    Database,
    create_all_race_safe,
    make_database,
    split_url,
)
from conveyor.backends.sqlalchemy.ids import (
    ID_LENGTH,
    brief,
    check_landed,
    exact_counters,
    is_id,
    keep_other_row,
    loose_id_columns,
    text_value,
)
from conveyor.backends.sqlalchemy.options import OPTION_NAMES, SQLAlchemyResultBackendOptions
from conveyor.backends.sqlalchemy.tables import (
    _EXTENDED_CODED,
    _EXTENDED_TEXT,
    _KEY_LENGTH,
    _OPTIONAL,
    _OURS,
    _UTC,
    _aware,
    _naive_utc,
    _utcnow,
    counter_table,
    group_table,
    task_table,
)
from conveyor.core.base import ResultBackendBase
from conveyor.core.capabilities import Capability
from conveyor.core.celery import group_from_meta, group_meta, meta_from_record, record_from_meta
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    DecodeError,
    EncodeError,
)
from conveyor.core.options import build_options
from conveyor.core.serializers import SerializerRegistry
from conveyor.core.types import READY_STATES, GroupRecord, ResultRecord, State

__all__ = ["SQLAlchemyResultBackend"]

log = logging.getLogger("conveyor.backends.sqlalchemy")

_SCHEMES = ("db", "database")
_SUCCESS = State.SUCCESS.value
_FETCH_CHUNK = 500
_INT32 = (-(2**31), 2**31 - 1)


class SQLAlchemyResultBackend(ResultBackendBase):
    """Result backend in Celery's SQL tables; see the module docstring.

    Args:
        engine: a ready SQLAlchemy engine (not disposed by ``close``).
        options: :class:`SQLAlchemyResultBackendOptions`; defaults when None.
        serializers: the serializer registry (default: the process-wide one).
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.EXPIRY_SWEEP,
            Capability.GROUPS,
            Capability.COUNTERS,
            Capability.MULTI_READER,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
        }
    )

    def __init__(
        self,
        engine: Engine,
        options: SQLAlchemyResultBackendOptions | None = None,
        *,
        serializers: SerializerRegistry | None = None,
        _database: Database | None = None,
        _url: str | None = None,
    ) -> None:
        self.options = options or SQLAlchemyResultBackendOptions()
        opts = self.options
        if _database is None:
            _database = make_database(
                engine.url,
                url_text=engine.url.render_as_string(hide_password=True),
                settings=opts.engine_settings(),
                max_retries=opts.max_retries,
                engine=engine,
            )
        self._db = _database
        if self._db.memory:
            # SQLite :memory: lives in this process (see the SQL broker): the instance's
            # capabilities say so; the class keeps what the other databases give.
            object.__setattr__(
                self,
                "capabilities",
                type(self).capabilities - {Capability.DURABLE, Capability.CROSS_PROCESS},
            )
        self.url = _url or f"db+{self._db.engine.url.render_as_string(hide_password=True)}"
        self._set_up_results(opts, serializers)
        self._metadata = sa.MetaData()
        self._tasks = task_table(self._metadata, opts.task_table, schema=opts.schema)
        self._groups = group_table(self._metadata, opts.group_table, schema=opts.schema)
        self._counters = counter_table(self._metadata, opts.counter_table, schema=opts.schema)
        # Columns of the task table as it exists in the database (Celery may have created it).
        self._task_columns: frozenset[str] = frozenset(self._tasks.c.keys())
        self._schema_ready = False
        self._closed = False
        self._mysql = self._db.dialect == "mysql"
        # Tables whose id column compares loosely (MariaDB/MySQL, case-insensitive
        # collation): table name -> collation. Filled when the schema is checked.
        self._loose: dict[str, str] = {}

    @classmethod
    def from_url(
        cls, url: str, *, serializers: SerializerRegistry | None = None, **options: Any
    ) -> SQLAlchemyResultBackend:
        """Build a backend (and its own engine, disposed by ``close``) from ``url``.

        Does not connect; the first operation does (and creates/updates tables if allowed).

        Raises:
            InvalidURL, ConfigurationError, MissingDependency: see the SQL broker.
        """
        sa_url, query = split_url(url, prefixes=_SCHEMES, option_names=OPTION_NAMES)
        opts = build_options(SQLAlchemyResultBackendOptions, query, options, owner="db+ backend")
        db = make_database(
            sa_url, url_text=url, settings=opts.engine_settings(), max_retries=opts.max_retries
        )
        return cls(db.engine, opts, serializers=serializers, _database=db, _url=url)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine."""
        return self._db.engine

    # ------------------------------------------------------------------ schema
    def create_tables(self) -> None:
        """Create the three tables if missing and add conveyor's columns to a task/group
        table Celery created. Idempotent and safe when several processes race. Blocking."""
        self._check_open()
        create_all_race_safe(self._db, self._metadata, what="create result tables")
        self._task_columns = self._adopt(self._tasks)
        self._adopt(self._groups)
        if self._mysql:
            exact_counters(self._db, self._counters, self.options.schema, _KEY_LENGTH)
            self._loose = self._loose_id_columns()
        self._schema_ready = True

    def _adopt(self, table: sa.Table) -> frozenset[str]:
        """Add our missing columns to an existing table; return the columns it has."""
        present = self._columns_of(table)
        missing = [c for c in _OURS if c in table.c and c not in present]
        for name in missing:
            self._add_column(table, name)
        present = self._columns_of(table) if missing else present
        unusable = {c.name for c in table.c if c.name not in present} - _OPTIONAL
        if unusable:
            raise ConfigurationError(
                f"table {table.name!r} on {self._db.masked_url} lacks column(s) "
                f"{sorted(unusable)}; add them (nullable) or let conveyor create the table"
            )
        return frozenset(present)

    def _columns_of(self, table: sa.Table) -> set[str]:
        def work(conn: Connection) -> set[str] | None:
            try:
                columns = sa.inspect(conn).get_columns(table.name, table.schema)
            except sa_exc.NoSuchTableError:
                return None
            return {c["name"] for c in columns}

        found = self._db.transaction(work, what="inspect tables", readonly=True)
        if found is None:
            raise ConfigurationError(
                f"table {table.name!r} does not exist on {self._db.masked_url}; create it "
                "with create_tables() or let the backend create it (create_tables=True)"
            )
        return found

    def _add_column(self, table: sa.Table, name: str) -> None:
        column = table.c[name]
        dialect = self._db.engine.dialect
        prep = dialect.identifier_preparer
        ddl = (
            f"ALTER TABLE {prep.format_table(table)} ADD COLUMN "
            f"{prep.quote(name)} {column.type.compile(dialect)}"
        )
        log.info("adding column %s to %s", name, table.name)

        def work(conn: Connection) -> None:
            conn.exec_driver_sql(ddl)
            for index in table.indexes:
                if [c.name for c in index.columns] == [name]:
                    index.create(conn, checkfirst=True)

        try:
            self._db.transaction(work, what=f"add column {name} to {table.name}")
        except ConveyorError:
            # Another process's identical ALTER may have won the race: then the column is
            # there now (asked of the database, not read from the error's text).
            if name not in self._columns_of(table):
                raise

    def _ensure_schema(self) -> None:
        self._check_open()
        if self._schema_ready:
            return
        if self.options.create_tables:
            self.create_tables()
        else:
            self._task_columns = frozenset(self._columns_of(self._tasks))
            if self._mysql:
                self._loose = self._loose_id_columns()
            self._schema_ready = True

    def _loose_id_columns(self) -> dict[str, str]:
        return loose_id_columns(self._db, [self._tasks, self._groups], self.options.schema)

    # ------------------------------------------------------------------ ids
    def _check_id(self, value: object, what: str) -> str:
        """The base rules, then this store's: Celery's column lengths and, on
        MariaDB/MySQL, no trailing space (see Ids in the module docstring)."""
        text = super()._check_id(value, what)
        if len(text) > ID_LENGTH:
            raise ConfigurationError(
                f"{what} {brief(text)} is {len(text)} characters long; the SQL column holds "
                f"{ID_LENGTH} (Celery's task_id and taskset_id columns are String(155))"
            )
        if self._mysql and text.endswith(" "):
            raise ConfigurationError(
                f"{what} {brief(text)} ends with a space: MariaDB/MySQL compare strings "
                "ignoring trailing spaces, so it would be the same row as the id without them"
            )
        return text

    def _is(self, column: sa.ColumnElement[Any], value: str) -> sa.ColumnElement[bool]:
        return is_id(column, value, self._mysql)

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    # ------------------------------------------------------------------ encoding
    def _encode(self, value: Any) -> bytes:
        body, _, _ = self._serializers.encode(value, self._serializer.name)
        return body

    def _decode(self, data: bytes | None) -> Any:
        if data is None:
            return None
        raw = bytes(data)
        try:
            return self._serializers.decode(
                raw,
                self._serializer.content_type,
                self._serializer.content_encoding,
                accept=self._accept,
            )
        except DecodeError:
            # Rows written by Celery <= 5.6 hold a pickle whatever the serializer; read them
            # only where pickle was explicitly accepted (Celery reads them unconditionally).
            pickle_type = self._serializers.get("pickle").content_type
            if raw[:1] == b"\x80" and pickle_type in self._accept:
                try:
                    return pickle.loads(raw)  # noqa: S301 - opted in through `accept`
                except Exception as exc:  # any unpickling failure: the row is unreadable
                    raise DecodeError(f"cannot unpickle a stored value: {exc}") from exc
            raise

    def _expires(self, ttl: float | None) -> datetime | None:
        seconds = self._ttl(ttl)
        if seconds is None or math.isinf(seconds):
            return None
        try:
            return _utcnow() + timedelta(seconds=seconds)
        except OverflowError:  # past the year 9999: as good as never
            return None

    def _alive(self, table: sa.Table, now: datetime) -> sa.ColumnElement[bool]:
        """Rows not expired at ``now``: ours by ``expires_at``, Celery's (NULL
        ``expires_at``) by ``date_done`` + ``default_ttl``, as Celery's cleanup decides."""
        own = table.c.expires_at > now
        if self.default_ttl is None or math.isinf(self.default_ttl):
            return sa.or_(own, table.c.expires_at.is_(None))
        cutoff = now - timedelta(seconds=self.default_ttl)
        foreign = sa.and_(
            table.c.expires_at.is_(None),
            sa.or_(table.c.date_done.is_(None), table.c.date_done > cutoff),
        )
        return sa.or_(own, foreign)

    # ------------------------------------------------------------------ store
    def _values(self, record: ResultRecord, ttl: float | None) -> dict[str, Any]:
        task_id = self._check_id(record.task_id, "task id")
        group_id, parent_id = record.group_id or None, record.parent_id or None
        if group_id is not None:
            group_id = self._check_id(group_id, "group id")
        if parent_id is not None:
            parent_id = self._check_id(parent_id, "parent id")
        meta = meta_from_record(record, include_task_id=False)
        done = record.date_done
        if done is None and record.state in READY_STATES:
            done = datetime.now(_UTC)
        values: dict[str, Any] = {
            "task_id": task_id,
            "status": record.state.value,
            "result": self._encode(meta["result"]),
            "date_done": _naive_utc(done) if done is not None else None,
            "traceback": text_value(record.traceback),
            "children": None if record.children is None else self._encode(record.children),
            "expires_at": self._expires(ttl),
            "group_id": group_id,
            "parent_id": parent_id,
        }
        extended = dict(record.extended)
        for key in _EXTENDED_TEXT:
            values[key] = text_value(extended.get(key), ID_LENGTH)
        for key in _EXTENDED_CODED:
            values[key] = self._encode(extended[key]) if key in extended else None
        retries = extended.get("retries")
        if retries is not None and (
            isinstance(retries, bool)
            or not isinstance(retries, int)
            or not _INT32[0] <= retries <= _INT32[1]
        ):
            raise EncodeError(f"retries must be a 32-bit int for the SQL column, got {retries!r}")
        values["retries"] = retries
        if extended.get("stamped_headers"):
            info = {
                "stamped_headers": extended["stamped_headers"],
                "stamps": extended.get("stamps") or {},
            }
            values["stamps"] = self._encode(info)
        else:
            values["stamps"] = None
        return values

    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Upsert the row for ``record.task_id`` in one statement, unless it holds SUCCESS.

        ``ttl`` (seconds; None: ``default_ttl``) sets ``expires_at``. Blocking, one round
        trip (two on MariaDB/MySQL when the row exists: none extra). Thread-safe.

        Raises:
            ConfigurationError: a refused task id, group id or parent id (see
                ``validate_task_id``), or an id that collides with another under a
                case-insensitive collation (MariaDB/MySQL tables not created here).
            EncodeError: the result cannot be serialized.
            OperationalError: the database failed (nothing was written).
        """
        values = self._values(record, ttl)
        self._ensure_schema()
        values = {k: v for k, v in values.items() if k in self._task_columns}
        t = self._tasks
        task_id = values["task_id"]
        keep = t.c.status == _SUCCESS
        guard = keep_other_row(t, "task_id", task_id, self._loose)
        if guard is not None:
            keep = sa.or_(keep, guard)

        def work(conn: Connection) -> None:
            self._upsert(conn, t, ("task_id",), values, keep=keep)
            if guard is not None:
                check_landed(conn, t.c.task_id, task_id, "task id", self._loose)

        self._db.transaction(work, what="store result")

    def _upsert(
        self,
        conn: Connection,
        table: sa.Table,
        keys: Sequence[str],
        values: Mapping[str, Any],
        *,
        keep: sa.ColumnElement[bool] | None = None,
        update: Mapping[str, Any] | None = None,
        returning: sa.ColumnElement[Any] | None = None,
    ) -> Any:
        """INSERT, or UPDATE the row with the same ``keys`` unless ``keep`` holds for it.

        ``update`` overrides the values written on conflict (default: ``values``).
        ``returning``: a column to return from the written row where the dialect can in
        the same statement (PostgreSQL, SQLite); otherwise None is returned.
        """
        changes = dict(update if update is not None else values)
        for key in keys:
            changes.pop(key, None)
        dialect = self._db.dialect
        if dialect in ("postgresql", "sqlite"):
            module: Any = pg_dialect if dialect == "postgresql" else sqlite_dialect
            ins = module.insert(table).values(**values)
            sets = {k: (ins.excluded[k] if update is None else v) for k, v in changes.items()}
            where = None
            if keep is not None:
                # status <> 'SUCCESS' is NULL for a NULL status: still replace such a row.
                where = sa.or_(table.c.status.is_(None), sa.not_(keep))
            stmt = ins.on_conflict_do_update(
                index_elements=[table.c[k] for k in keys], set_=sets, where=where
            )
            if returning is not None:
                return conn.execute(stmt.returning(returning)).scalar_one()
            conn.execute(stmt)
        elif dialect == "mysql":
            ins = mysql_dialect.insert(table).values(**values)
            pairs: list[tuple[str, Any]] = []
            for k, v in changes.items():
                new = ins.inserted[k] if update is None else v
                pairs.append((k, new if keep is None else sa.func.if_(keep, table.c[k], new)))
            # MySQL applies assignments left to right and later ones see earlier results:
            # the guard column itself must be assigned last.
            pairs.sort(key=lambda kv: kv[0] == "status")
            conn.execute(ins.on_duplicate_key_update(pairs))
            return None
        else:
            match = sa.and_(*(table.c[k] == values[k] for k in keys))
            guard = match if keep is None else sa.and_(match, sa.not_(keep))
            if conn.execute(sa.update(table).where(guard).values(**changes)).rowcount:
                return None
            if conn.execute(sa.select(table.c.id).where(match)).first() is None:
                conn.execute(sa.insert(table).values(**values))
        return None

    # ------------------------------------------------------------------ fetch
    def _columns(self) -> list[sa.ColumnElement[Any]]:
        return [c for c in self._tasks.c if c.name in self._task_columns and c.name != "id"]

    def _record(self, row: Any) -> ResultRecord:
        data = row._mapping
        meta: dict[str, Any] = {
            "status": data["status"],
            "result": self._decode(data["result"]),
            "traceback": data["traceback"],
            "children": self._decode(data.get("children")),
            "date_done": _aware(data["date_done"]),
            "group_id": data.get("group_id"),
            "parent_id": data.get("parent_id"),
        }
        for key in (*_EXTENDED_TEXT, "retries"):
            if data.get(key) is not None:
                meta[key] = data[key]
        for key in _EXTENDED_CODED:
            if data.get(key) is not None:
                meta[key] = self._decode(data[key])
        stamps = self._decode(data.get("stamps"))
        if isinstance(stamps, dict) and stamps.get("stamped_headers"):
            meta["stamped_headers"] = stamps["stamped_headers"]
            meta["stamps"] = stamps.get("stamps") or {}
        return record_from_meta(meta, str(data["task_id"]))

    def fetch(self, task_id: str) -> ResultRecord | None:
        """The unexpired record for ``task_id`` or None. One query. Thread-safe.

        Raises:
            DecodeError, ContentDisallowed: the stored result cannot be decoded.
            OperationalError: the database failed.
        """
        task_id = self._check_id(task_id, "task id")
        self._ensure_schema()
        t = self._tasks

        def work(conn: Connection) -> Any:
            stmt = sa.select(*self._columns()).where(
                self._is(t.c.task_id, task_id), self._alive(t, _utcnow())
            )
            return conn.execute(stmt).first()

        row = self._db.transaction(work, what="fetch result", readonly=True)
        return None if row is None else self._record(row)

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Unexpired records for ``task_ids`` (missing ids absent): one ``IN`` query per 500
        ids, all in one read transaction."""
        ids = list(dict.fromkeys(self._check_ids(task_ids)))
        if not ids:
            return {}
        self._ensure_schema()
        t = self._tasks

        def work(conn: Connection) -> list[Any]:
            now = _utcnow()
            rows: list[Any] = []
            for start in range(0, len(ids), _FETCH_CHUNK):
                chunk = ids[start : start + _FETCH_CHUNK]
                stmt = sa.select(*self._columns()).where(
                    t.c.task_id.in_(chunk), self._alive(t, now)
                )
                rows.extend(conn.execute(stmt))
            return rows

        rows = self._db.transaction(work, what="fetch results", readonly=True)
        found = {str(row.task_id): self._record(row) for row in rows}
        return {task_id: found[task_id] for task_id in ids if task_id in found}

    def forget(self, task_id: str) -> None:
        """Delete the row of ``task_id``. Idempotent."""
        task_id = self._check_id(task_id, "task id")
        self._ensure_schema()
        t = self._tasks
        self._db.transaction(
            lambda conn: conn.execute(sa.delete(t).where(self._is(t.c.task_id, task_id))),
            what="forget result",
        )

    # ------------------------------------------------------------------ groups
    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        """Save (or replace) the group row: Celery's encoded group tuple. One statement."""
        record = self._check_group(record)
        group_id, members = record.group_id, record.task_ids
        self._ensure_schema()
        done = record.date_done or datetime.now(_UTC)
        values = {
            "taskset_id": group_id,
            "result": self._encode(group_meta(group_id, members)["result"]),
            "date_done": _naive_utc(done),
            "expires_at": self._expires(ttl),
        }
        g = self._groups
        guard = keep_other_row(g, "taskset_id", group_id, self._loose)

        def work(conn: Connection) -> None:
            self._upsert(conn, g, ("taskset_id",), values, keep=guard)
            if guard is not None:
                check_landed(conn, g.c.taskset_id, group_id, "group id", self._loose)

        self._db.transaction(work, what="store group")

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        """The unexpired group or None (Celery's rows included)."""
        group_id = self._check_id(group_id, "group id")
        self._ensure_schema()
        g = self._groups

        def work(conn: Connection) -> Any:
            stmt = sa.select(g.c.result, g.c.date_done).where(
                self._is(g.c.taskset_id, group_id), self._alive(g, _utcnow())
            )
            return conn.execute(stmt).first()

        row = self._db.transaction(work, what="fetch group", readonly=True)
        if row is None:
            return None
        group = group_from_meta(self._decode(row.result), group_id)
        return GroupRecord(group_id, tuple(group.task_ids), _aware(row.date_done))

    def forget_group(self, group_id: str) -> None:
        """Delete the group row (not its members' results). Idempotent."""
        group_id = self._check_id(group_id, "group id")
        self._ensure_schema()
        g = self._groups
        self._db.transaction(
            lambda conn: conn.execute(sa.delete(g).where(self._is(g.c.taskset_id, group_id))),
            what="forget group",
        )

    # ------------------------------------------------------------------ counters
    def _head_expired(self, now: datetime) -> sa.ColumnElement[bool]:
        c = self._counters
        return sa.and_(c.c.expires_at.is_not(None), c.c.expires_at <= now)

    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to counter ``key`` (expired or missing: 0 first); set
        its expiry to ``ttl`` from now. One upsert ``RETURNING`` the value (MariaDB/MySQL:
        the upsert, then a read of the row it locked)."""
        key = self._check_id(key, "counter key")
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int)
            or not -(2**63) <= amount < 2**63
        ):
            raise ConfigurationError(f"amount must be a 64-bit int, got {amount!r}")
        self._ensure_schema()
        c = self._counters
        expires = self._expires(ttl)

        def work(conn: Connection) -> int:
            now = _utcnow()
            values = {"counter_key": key, "member": "", "value": amount, "expires_at": expires}
            value = sa.case(
                (self._head_expired(now), sa.literal(amount)),
                else_=c.c.value + sa.literal(amount),
            )
            written = self._upsert(
                conn,
                c,
                ("counter_key", "member"),
                values,
                update={"value": value, "expires_at": expires},
                returning=c.c.value,
            )
            return int(written) if written is not None else self._head_value(conn, key)

        return self._db.transaction(work, what="incr")

    def _head_value(self, conn: Connection, key: str) -> int:
        c = self._counters
        stmt = sa.select(c.c.value).where(c.c.counter_key == key, c.c.member == "")
        return int(conn.execute(stmt).scalar_one())

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        """Add ``member`` to set ``key`` (a repeat counts once); return the set's size.

        Atomic across processes: the key's head row is locked (upserted) first, so
        concurrent adders of one key serialise and each sees the others' members.
        """
        key = self._check_id(key, "counter key")
        member = self._check_id(member, "member")
        self._ensure_schema()
        c = self._counters
        expires = self._expires(ttl)

        def work(conn: Connection) -> int:
            now = _utcnow()
            head = sa.and_(c.c.counter_key == key, c.c.member == "")
            stale = conn.execute(sa.select(c.c.id).where(head, self._head_expired(now))).first()
            if stale is not None:  # the previous generation of this key expired
                conn.execute(sa.delete(c).where(c.c.counter_key == key))
            # The head upsert locks the key: from here on its count cannot move under us.
            size = self._upsert(
                conn,
                c,
                ("counter_key", "member"),
                {"counter_key": key, "member": "", "value": 0, "expires_at": expires},
                update={"expires_at": expires},
                returning=c.c.value,
            )
            if size is None:
                size = self._head_value(conn, key)
            row = {"counter_key": key, "member": "+" + member, "value": 0, "expires_at": None}
            if self._db.dialect == "mysql":
                ignore = sa.insert(c).prefix_with("IGNORE").values(**row)
                added = conn.execute(ignore).rowcount == 1
            elif self._db.dialect in ("postgresql", "sqlite"):
                # RETURNING yields a row only when the member was new (rowcount is not
                # reliable for ON CONFLICT DO NOTHING across drivers).
                module: Any = pg_dialect if self._db.dialect == "postgresql" else sqlite_dialect
                ins = module.insert(c).values(**row).on_conflict_do_nothing()
                added = conn.execute(ins.returning(c.c.id)).first() is not None
            else:
                exists = sa.select(c.c.id).where(
                    c.c.counter_key == key, c.c.member == row["member"]
                )
                added = conn.execute(exists).first() is None
                if added:
                    conn.execute(sa.insert(c).values(**row))
            if not added:
                return int(size)
            conn.execute(sa.update(c).where(head).values(value=c.c.value + 1))
            return int(size) + 1

        return self._db.transaction(work, what="add_member")

    def forget_key(self, key: str) -> None:
        """Delete counter or set ``key`` with all its members. Idempotent."""
        key = self._check_id(key, "counter key")
        self._ensure_schema()
        c = self._counters
        self._db.transaction(
            lambda conn: conn.execute(sa.delete(c).where(c.c.counter_key == key)),
            what="forget key",
        )

    # ------------------------------------------------------------------ expiry
    def purge_expired(self, *, batch_size: int = 1000) -> int:
        """Delete expired results, groups and counters, ``batch_size`` rows per short
        transaction (ids picked with ``SKIP LOCKED`` where supported, then deleted by
        primary key), so no long table lock is ever taken. Returns the rows deleted.

        Safe to run from several processes at once. Blocks until nothing expired is left.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
        self._ensure_schema()
        now = _utcnow()
        total = 0
        for table in (self._tasks, self._groups):
            total += self._purge(table, table.c.expires_at <= now, batch_size)
            if self.default_ttl is not None and not math.isinf(self.default_ttl):
                cutoff = now - timedelta(seconds=self.default_ttl)
                celery_rows = sa.and_(table.c.expires_at.is_(None), table.c.date_done <= cutoff)
                total += self._purge(table, celery_rows, batch_size)
        total += self._purge_counters(now, batch_size)
        return total

    def _purge(self, table: sa.Table, expired: sa.ColumnElement[bool], batch: int) -> int:
        total = 0
        while True:

            def work(conn: Connection) -> tuple[int, int]:
                pick = (
                    sa.select(table.c.id)
                    .where(expired)  # no ORDER BY: walk the expiry index, not the PK
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
                ids = list(conn.execute(pick).scalars())
                if not ids:
                    return 0, 0
                deleted = conn.execute(sa.delete(table).where(table.c.id.in_(ids), expired))
                return len(ids), int(deleted.rowcount)

            seen, deleted = self._db.transaction(work, what=f"purge expired {table.name}")
            total += deleted
            if seen < batch:
                return total

    def _purge_counters(self, now: datetime, batch: int) -> int:
        c = self._counters
        total = 0
        while True:

            def work(conn: Connection) -> tuple[int, int]:
                pick = (
                    sa.select(c.c.counter_key)
                    .where(c.c.member == "", self._head_expired(now))
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
                keys = list(conn.execute(pick).scalars())
                if not keys:
                    return 0, 0
                deleted = conn.execute(sa.delete(c).where(c.c.counter_key.in_(keys)))
                return len(keys), int(deleted.rowcount)

            seen, deleted = self._db.transaction(work, what="purge expired counters")
            total += deleted
            if seen < batch:
                return total

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Dispose of the engine if this backend built it. Idempotent; afterwards every
        operation raises :class:`ConnectionLost`."""
        if self._closed:
            return
        self._closed = True
        self._db.dispose()
