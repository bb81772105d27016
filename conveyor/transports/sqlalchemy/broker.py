"""The SQL broker (see :mod:`conveyor.transports.sqlalchemy` for URL, options and
semantics)."""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from conveyor._drivers.sql import (
    Database,
    create_all_race_safe,
    make_database,
    split_url,
)
from conveyor.core.base import BrokerBase, HeldLeases, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConfigurationError, ConnectionLost, InvalidReceipt
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    EXACT_MS_MAX_DELAY,
    check_delay,
    clean_reason,
    undecodable_reason,
)
from conveyor.transports.sqlalchemy.listener import Listener
from conveyor.transports.sqlalchemy.options import OPTION_NAMES, SQLAlchemyBrokerOptions
from conveyor.transports.sqlalchemy.rows import (
    _Bumped,
    _int_or_0,
    _Receipt,
    _stand_in_fields,
    decode_row,
    encode_row,
)
from conveyor.transports.sqlalchemy.schema import (
    _COLUMNS,
    _INSERTED,
    _QUEUE_COLUMN_LENGTH,
    _STAND_IN,
    _Claim,
    _next_count,
    message_table,
)

__all__ = ["SQLAlchemyBroker"]

log = logging.getLogger("conveyor.transports.sqlalchemy")

_SCHEMES = ("sqla", "sqlalchemy")
_PROMOTE_BATCH = 1000
_PURGE_BATCH = 1000
_SETTLED_MEMORY = 10_000  # receipts remembered so a second ack/reject is a no-op
_MAX_MESSAGES = 1000
_DELAY_WHY = "not_before is a double of epoch seconds, exact to the millisecond below that"


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
        self._listener: Listener | None = None
        if self.options.notify and self._db.dialect == "postgresql":
            self._listener = Listener(self._db, self._channel)
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
        sa_url, query = split_url(url, prefixes=_SCHEMES, option_names=OPTION_NAMES)
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
        dead_values = {
            "queue": sa.bindparam("dead_queue"),
            "lease_owner": None,
            "lease_expires": 0.0,
            "delayed": False,
            "delivery_count": 0,
            "dead_from": sa.bindparam("dead_from"),
            "dead_reason": sa.bindparam("dead_reason"),
            "dead_at": now,
        }
        self._sql_dead = sa.update(t).where(guard).values(**dead_values)
        self._sql_dead_raw = (
            sa.update(t)
            .where(guard)
            .values(
                **dead_values,
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
        validate_queue_name(name)
        self._ensure_schema()

    # ------------------------------------------------------------------ publish
    def _insert(self, envelopes: Sequence[Envelope], queue: str, delay: float | None) -> None:
        check_delay(delay, EXACT_MS_MAX_DELAY, "the SQL broker", _DELAY_WHY)
        seconds = float(delay or 0.0)
        rows = [encode_row(e, queue, seconds) for e in envelopes]

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
        validate_queue_name(queue)
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
        validate_queue_name(queue)
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
        names = tuple(self._check_receive(queues, max_messages, timeout))
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
                deliveries.append(decode_row(row, token))
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
        dead = "" if requeue else self.dead_letter_queue(delivery.queue)
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
        validate_queue_name(queue)
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
        validate_queue_name(queue)
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
