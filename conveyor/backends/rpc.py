"""``rpc://`` result backend: results as AMQP messages to the client's reply queue.

Capabilities:
    ``wait`` (push: a consumer on the reply queue wakes waiters), ``native_ttl`` (each result
    message carries an AMQP ``expiration`` = its ttl and RabbitMQ drops it when due; the
    reply queue has ``x-expires``; results read into memory expire on the same clock),
    ``cross_process``. NOT ``multi_reader``: only the client that owns the reply queue can
    read a result (several readers would split the messages between them). NOT ``durable``:
    results are transient messages in an auto-delete queue, gone when the client
    disconnects or restarts. Use a stored backend (``redis://``, ``db+``...) when results
    must be read by others, later, or more than once per client process.

URL:
    ``rpc://``: results travel over the AMQP broker. The broker URL comes from the
    ``broker_url`` option: ``App`` passes its own broker URL (unless
    ``result_backend_transport_options`` sets one), and the connection options in that URL's
    query (``heartbeat``, ``ssl_*``, ``max_message_size``...) apply here too.

Options (keyword > URL query > default; :class:`RPCResultBackendOptions`):
    ``broker_url`` (required), ``reply_to`` (the reply queue; default ``None``: a new UUID,
    like Celery's ``oid``; it must be the ``reply_to`` the client puts in its tasks, the
    app's ``oid``), ``default_ttl`` (86400.0:
    also the queue's ``x-expires``, as Celery's ``result_expires``), ``persistent``
    (False: delivery mode 1), ``serializer`` (``json``), ``accept`` (``("json",)``),
    ``accept_compression`` (methods a compressed result may use; default: every built-in
    one; decompression stops at 64 MiB), ``max_cached`` (100000 records kept in memory,
    oldest dropped first), plus the AMQP connection options of
    :class:`~conveyor._drivers.amqp.options.AMQPConnectionOptions` (among them
    ``max_message_size``: a result body over it, 128 MiB by default as RabbitMQ's, raises
    ``EncodeError`` and nothing is sent; RabbitMQ would close the connection over it).

Thread-safety:
    One instance may be shared by the threads of one process: it owns one AMQP connection
    driven by one I/O thread (:class:`~conveyor._drivers.amqp.link.AMQPLink`), and the records
    read so far sit behind a lock. Never share it across ``fork()``.

Compatible with Celery's rpc backend in both directions
(``docs/celery-compat.md#rpc-replies``): a worker publishes each state to exchange ``""``
with routing key = the task's ``reply_to`` and
``correlation_id`` = the task id, delivery mode 1 (2 with ``persistent``), priority 0, no
headers, body = the result meta with ``task_id``; the client consumes its own reply queue and
keeps the latest state per task id.

Reading: the first ``fetch``/``wait`` declares the reply queue exactly as Celery does
(``durable=True, auto_delete=True, x-expires=default_ttl``, no binding) and consumes it with
``no_ack``. ``fetch`` (and ``fetch_many``, ``forget``) first publishes a marker message to the
reply queue and waits until the consumer sees it: every result confirmed before the call is
then in memory (read-your-writes, one round trip). Marker messages are recognised by their
correlation id and never reach a reader.

Routing on the writer side: ``store`` sends to ``record.extended["reply_to"]`` with
``record.extended["correlation_id"]`` (both removed from the stored meta). The worker puts
them there for backends declaring the capability ``routes_by_reply_to``. An empty
``reply_to`` sends nothing (Celery's rule); a record without the key goes to this client's
own reply queue (the client storing for itself, as the conformance suite does).

Ids: the rules of :meth:`~conveyor.core.base.ResultBackendBase.validate_task_id` (a non-empty
``str``, no NUL, valid UTF-8) with at most 255 bytes: a task id travels as the AMQP
``correlation_id``, a short string. Checked on every method; a refused id raises
``ConfigurationError`` and nothing is sent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from conveyor._drivers.amqp.fields import Properties
from conveyor._drivers.amqp.link import AMQPLink, Op, rpc
from conveyor._drivers.amqp.options import (
    AMQPConnectionOptions,
    check_message_size,
    parse_amqp_url,
    redact_url,
)
from conveyor.core.base import DEFAULT_RESULT_TTL, ResultBackendBase, check_default_ttl
from conveyor.core.capabilities import Capability
from conveyor.core.celery import decode_meta, encode_meta
from conveyor.core.compression import (
    BUILTIN_METHODS,
    DEFAULT_MAX_SIZE,
)
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    InvalidURL,
    OperationTimeout,
    SerializationError,
)
from conveyor.core.options import build_options
from conveyor.core.types import ResultRecord, State
from conveyor.core.urls import parse_url, scheme_of

__all__ = ["BARRIER_PREFIX", "RPCResultBackend", "RPCResultBackendOptions"]

log = logging.getLogger("conveyor.backends.rpc")

#: Correlation ids of the marker messages ``fetch`` uses as a read barrier.
BARRIER_PREFIX = "conveyor.rpc.barrier."
_BARRIER_CONTENT_TYPE = "application/x-conveyor-barrier"
_MISSING = object()
_CONNECTION_FIELDS = frozenset(f.name for f in fields(AMQPConnectionOptions))


@dataclass(frozen=True)
class RPCResultBackendOptions(AMQPConnectionOptions):
    """Options of :class:`RPCResultBackend`; connection fields as for the AMQP broker.

    Attributes:
        broker_url: the AMQP broker the results travel through.
        reply_to: this client's reply queue (None: a new UUID).
        default_ttl: seconds a result lives when stored with ``ttl=None``; also the reply
            queue's ``x-expires`` (Celery's ``result_expires``). None or 0: no expiry.
        persistent: send results with delivery mode 2 (Celery's ``result_persistent``).
        serializer: result serializer name (Celery's ``result_serializer``).
        accept: serializers accepted when reading (Celery's ``result_accept_content``).
        accept_compression: compression methods a Celery 5.7 compressed result may use
            (the app's ``accept_compression``); None or empty: none.
        max_cached: records kept in memory; the oldest are dropped beyond it.
    """

    broker_url: str | None = field(default=None, repr=False)  # it may carry a password
    reply_to: str | None = None
    default_ttl: float | None = DEFAULT_RESULT_TTL
    persistent: bool = False
    serializer: str = "json"
    accept: tuple[str, ...] = ("json",)
    accept_compression: tuple[str, ...] | None = BUILTIN_METHODS
    max_cached: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_default_ttl(self.default_ttl)
        if self.max_cached < 1:
            raise ConfigurationError("max_cached must be >= 1")
        if self.reply_to is not None and not self.reply_to:
            raise ConfigurationError("reply_to must be a non-empty queue name")


@dataclass(slots=True)
class _Cached:
    record: ResultRecord
    expires: float | None


class RPCResultBackend(ResultBackendBase):
    """Celery-compatible ``rpc://`` results; see the module docstring.

    Args:
        options: :class:`RPCResultBackendOptions` with ``broker_url`` set.
        url: the backend URL (``rpc://``), for ``repr``.
    """

    #: ``routes_by_reply_to``: the worker puts the task's ``reply_to``/``correlation_id`` in
    #: ``ResultRecord.extended`` (results are routed, not stored under a key);
    #: ``compressed_results``: the app passes its ``accept_compression``.
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.WAIT,
            Capability.NATIVE_TTL,
            Capability.CROSS_PROCESS,
            Capability.ROUTES_BY_REPLY_TO,
            Capability.COMPRESSED_RESULTS,
        }
    )
    #: A task id travels as the AMQP ``correlation_id`` property: a short string.
    max_id_bytes: ClassVar[int] = 255

    def __init__(self, options: RPCResultBackendOptions, *, url: str = "rpc://") -> None:
        if not options.broker_url:
            raise ConfigurationError(
                "rpc:// sends results over the AMQP broker: pass broker_url='amqp://...' "
                "(in result_backend_transport_options)"
            )
        if scheme_of(options.broker_url) not in ("amqp", "amqps", "pyamqp"):
            raise ConfigurationError(
                f"rpc:// needs an AMQP broker (amqp://, amqps://), not "
                f"{redact_url(options.broker_url)!r}"
            )
        self.options = options
        self.url = url
        self._set_up_results(options, None)
        self.reply_to = options.reply_to or str(uuid.uuid4())
        endpoints, _query = parse_amqp_url(options.broker_url)
        self._link = AMQPLink(
            endpoints, options, name="conveyor-rpc-backend", url=options.broker_url
        )
        self._link.on_lost = self._on_lost
        self._link.on_channel_reset = self._on_channel_reset
        self._link.on_consumer_cancelled = self._on_cancelled
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._records: OrderedDict[str, _Cached] = OrderedDict()
        self._barriers: dict[str, threading.Event] = {}
        self._reader_gen = 0  # generation whose consumer is running; 0: none
        self._declared_gen = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RPCResultBackend:
        """Build the backend from ``rpc://`` and options (``broker_url`` is required).

        The broker URL's own query keys that are connection options (``heartbeat``,
        ``ssl_*``...) apply here too; keywords and ``rpc://?...`` keys win.

        Raises:
            InvalidURL: not an ``rpc://`` URL.
            ConfigurationError: no ``broker_url``, or a bad option.
        """
        parsed = parse_url(url)
        if parsed.scheme != "rpc":
            raise InvalidURL(f"{redact_url(url)!r} is not an rpc:// URL")
        merged: dict[str, Any] = dict(parsed.query)
        merged.update(options)
        broker_url = merged.get("broker_url")
        if isinstance(broker_url, str) and broker_url:
            _endpoints, broker_query = parse_amqp_url(broker_url)
            for key, value in broker_query.items():
                if key in _CONNECTION_FIELDS:
                    merged.setdefault(key, value)
        opts = build_options(RPCResultBackendOptions, None, merged, owner="rpc:// backend")
        return cls(opts, url=url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} 'rpc://' via {redact_url(self.options.broker_url or '')!r}>"

    @property
    def link(self) -> AMQPLink:
        """The connection this backend owns (for tests and diagnostics)."""
        return self._link

    def _deadline(self) -> float:
        return time.monotonic() + self.options.operation_timeout

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    # ------------------------------------------------------------------ link hooks (I/O)
    def _on_lost(self) -> None:
        with self._cond:
            self._reader_gen = 0
            self._cond.notify_all()

    def _on_channel_reset(self, name: str, _epoch: int) -> None:
        if name == "con":
            self._on_lost()

    def _on_cancelled(self, _tag: str) -> None:
        self._on_lost()  # the reply queue was deleted: declare and consume again

    # ------------------------------------------------------------------ the reply queue
    def _queue_arguments(self) -> dict[str, Any]:
        ttl = self.default_ttl
        return {"x-expires": max(1, round(ttl * 1000))} if ttl else {}

    def _declare_steps(self) -> Op[None]:
        yield rpc(
            "adm",
            "queue_declare",
            self.reply_to,
            durable=True,
            auto_delete=True,
            arguments=self._queue_arguments(),
        )

    def declare_reply_queue(self) -> None:
        """Declare this client's reply queue (as Celery's ``on_task_call`` does) so results
        sent before the first read are kept. Idempotent; cached per connection. Call it
        before publishing the first task whose result should come here."""
        self._check_open()
        deadline = self._deadline()
        generation = self._link.await_open(deadline)
        with self._cond:
            if self._declared_gen == generation:
                return

        def op() -> Op[None]:
            yield from self._declare_steps()
            with self._cond:
                self._declared_gen = self._link.generation

        self._link.run_op_retrying(op, deadline)

    def _ensure_reader(self, deadline: float) -> None:
        generation = self._link.await_open(deadline)
        with self._cond:
            if self._reader_gen == generation:
                return

        def op() -> Op[None]:
            current = self._link.generation
            yield from self._declare_steps()
            yield rpc(
                "con",
                "basic_consume",
                self.reply_to,
                on_message_callback=self._on_reply,
                auto_ack=True,
            )
            with self._cond:
                self._declared_gen = current
                if self._link.generation == current and self._link.channel_open("con"):
                    self._reader_gen = current
                self._cond.notify_all()

        self._link.run_op_retrying(op, deadline)

    def _on_reply(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        """I/O thread: one message on the reply queue."""
        correlation = properties.correlation_id
        if isinstance(correlation, str) and correlation.startswith(BARRIER_PREFIX):
            with self._cond:
                event = self._barriers.pop(correlation, None)
            if event is not None:
                event.set()
            return
        try:
            record = decode_meta(
                bytes(body),
                properties.content_type or self.options.serializer,
                accept=self._accept,
                task_id=correlation if isinstance(correlation, str) and correlation else None,
                max_size=DEFAULT_MAX_SIZE,
                accept_compression=self._accept_compression,
            )
        except (SerializationError, ConfigurationError) as exc:
            log.warning("ignoring an unreadable message on reply queue %s: %s", self.reply_to, exc)
            return
        key = correlation if isinstance(correlation, str) and correlation else record.task_id
        expires = self._expiry(properties.expiration)
        with self._cond:
            current = self._records.get(key)
            kept = current is not None and not _expired(current, time.monotonic())
            if kept and current is not None and current.record.state == State.SUCCESS:
                return  # a redelivered duplicate never replaces a stored SUCCESS
            self._records[key] = _Cached(record, expires)
            self._records.move_to_end(key)
            while len(self._records) > self.options.max_cached:
                self._records.popitem(last=False)
            self._cond.notify_all()

    def _expiry(self, expiration: Any) -> float | None:
        now = time.monotonic()
        if expiration:
            try:
                return now + float(expiration) / 1000.0
            except (TypeError, ValueError):
                pass
        return None if not self.default_ttl else now + self.default_ttl

    # ------------------------------------------------------------------ store
    def _route(self, record: ResultRecord) -> tuple[Any, str, ResultRecord]:
        extended = record.extended
        if "reply_to" not in extended and "correlation_id" not in extended:
            return _MISSING, record.task_id, record
        rest = dict(extended)
        reply_to = rest.pop("reply_to", _MISSING)
        correlation = rest.pop("correlation_id", None) or record.task_id
        correlation = self._check_id(correlation, "correlation id")
        return reply_to, correlation, dataclasses.replace(record, extended=rest)

    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Publish ``record`` to its reply queue and wait for RabbitMQ's confirm.

        The destination is ``record.extended["reply_to"]`` (nothing is sent when it is
        empty, as Celery does), or this client's own reply queue when the key is absent.
        ``ttl`` becomes the message's ``expiration``.

        Raises:
            ConfigurationError: a refused task id (see ``validate_task_id``).
            EncodeError: the result cannot be serialized, or its body is over
                ``max_message_size`` (nothing is sent: not transient).
            OperationalError: RabbitMQ unreachable or no confirm in time.
            ConnectionLost: the backend is closed.
        """
        self._check_open()
        record = self._check_record(record)
        destination, correlation, clean = self._route(record)
        if destination is not _MISSING and not destination:
            return
        effective = self._ttl(ttl)
        body = encode_meta(clean, self._serializer.name)
        check_message_size(body, self.options.max_message_size, f"the result of {record.task_id}")
        properties = Properties(
            content_type=self._serializer.content_type,
            content_encoding=self._serializer.content_encoding,
            delivery_mode=2 if self.options.persistent else 1,
            priority=0,
            correlation_id=correlation,
            expiration=str(max(1, round(effective * 1000))) if effective else None,
        )
        if destination is _MISSING:
            self.declare_reply_queue()
            destination = self.reply_to
        self._link.publish([("", str(destination), body, properties)], self._deadline())

    # ------------------------------------------------------------------ read
    def _sync(self, deadline: float) -> None:
        """Return once every result confirmed before this call is in memory."""
        while True:
            self._ensure_reader(deadline)
            marker = f"{BARRIER_PREFIX}{uuid.uuid4().hex}"
            event = threading.Event()
            with self._cond:
                self._barriers[marker] = event
            try:
                properties = Properties(
                    content_type=_BARRIER_CONTENT_TYPE, delivery_mode=1, correlation_id=marker
                )
                self._link.publish([("", self.reply_to, b"", properties)], deadline)
                while not event.wait(0.05):
                    with self._cond:
                        reader_gone = self._reader_gen == 0
                    if reader_gone or self._closed:
                        break  # the connection dropped: the marker may be lost; again
                    if time.monotonic() >= deadline:
                        raise OperationTimeout(
                            f"reply queue {self.reply_to!r} was not read within "
                            f"{self.options.operation_timeout:g}s"
                        )
                else:
                    return
            finally:
                with self._cond:
                    self._barriers.pop(marker, None)
            self._check_open()
            if time.monotonic() >= deadline:
                raise ConnectionLost(f"lost the connection while reading {self.reply_to!r}")

    def _lookup(self, task_id: str) -> ResultRecord | None:
        cached = self._records.get(task_id)
        if cached is None:
            return None
        if _expired(cached, time.monotonic()):
            del self._records[task_id]
            return None
        return cached.record

    def fetch(self, task_id: str) -> ResultRecord | None:
        """The latest state received for ``task_id`` (after draining the reply queue)."""
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        self._sync(self._deadline())
        with self._cond:
            return self._lookup(task_id)

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Like :meth:`fetch` for several ids, with one drain."""
        self._check_open()
        ids = self._check_ids(task_ids)
        self._sync(self._deadline())
        found: dict[str, ResultRecord] = {}
        with self._cond:
            for task_id in ids:
                record = self._lookup(task_id)
                if record is not None:
                    found[task_id] = record
        return found

    def wait(self, task_id: str, timeout: float) -> ResultRecord | None:
        """Block until a ready state for ``task_id`` arrives or ``timeout`` passes.

        Returns:
            The ready record, or the latest non-ready one (or None) on timeout.
        """
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout != timeout:
            raise ConfigurationError(f"timeout must be a number of seconds, got {timeout!r}")
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            with self._cond:
                reading = self._reader_gen != 0 and self._reader_gen == self._link.generation
            if not reading:
                try:
                    self._ensure_reader(max(deadline, time.monotonic() + 0.05))
                except ConnectionLost:
                    if self._closed or not self._link.ever_connected:
                        raise
                    # Reconnecting: keep waiting; a reconnect restarts the reader.
            with self._cond:
                while True:
                    record = self._lookup(task_id)
                    remaining = deadline - time.monotonic()
                    if (record is not None and record.ready) or remaining <= 0:
                        return record
                    if self._closed:
                        raise ConnectionLost(f"{self!r} is closed")
                    if self._reader_gen == 0:
                        break  # the connection dropped: restart the reader
                    self._cond.wait(min(remaining, 1.0))
            if time.monotonic() >= deadline:
                with self._cond:
                    return self._lookup(task_id)
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def forget(self, task_id: str) -> None:
        """Drop what was received for ``task_id`` (after draining the reply queue)."""
        self._check_open()
        task_id = self._check_id(task_id, "task id")
        self._sync(self._deadline())
        with self._cond:
            self._records.pop(task_id, None)

    def close(self) -> None:
        """Close the connection (RabbitMQ then deletes the auto-delete reply queue once
        it was consumed). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        try:
            self._link.close()
        except ConveyorError:  # pragma: no cover - closing is best effort
            log.debug("closing %r failed", self, exc_info=True)


def _expired(cached: _Cached, now: float) -> bool:
    return cached.expires is not None and now >= cached.expires
