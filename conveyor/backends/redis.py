"""Redis result backend in Celery's key layout (``redis://``, ``rediss://``, ``sentinel://``).

Capabilities:
    ``native_ttl`` (every record, group and counter has a Redis expiry; ``ttl=None`` means
    ``default_ttl``, one day), ``wait`` (pub/sub on the record's key, the channel Celery
    clients wait on), ``counters`` (``incr`` and the idempotent ``add_member``, each one
    atomic transaction with its expiry), ``groups`` (Celery's ``celery-taskset-meta-<id>``),
    ``multi_reader``, ``durable`` (as durable as the server's persistence settings),
    ``cross_process``.

URL:
    As the Redis broker (:mod:`conveyor.transports.redis`): ``redis://[[user]:password@]host
    [:port][/db]``, ``rediss://...?ssl_cert_reqs=...``, ``redis+socket:///path?virtual_host=N``,
    ``sentinel://h1:26379;sentinel://h2:26379/db`` with ``master_name``. Query keys are the
    options below (Celery passes unknown ones to redis-py; conveyor names the typo instead).

Options (keyword > URL query > default; :class:`RedisResultBackendOptions`):
    ``default_ttl`` (86400.0: Celery's ``result_expires``; None/0 keeps records until
    forgotten, only when asked for), ``serializer`` (``json``: ``result_serializer``),
    ``accept`` (serializers ``fetch`` decodes; default: the serializer alone),
    ``compression`` (None: Celery 5.7's ``result_compression``; Celery <= 5.6 cannot read
    such values), ``accept_compression`` (methods a compressed payload may use when read;
    default: every built-in one; decompression stops at 64 MiB), ``global_keyprefix``
    (Celery's ``result_backend_transport_options`` prefix: an ``_`` is added unless it ends
    in ``:``, ``_``, ``-`` or ``.``),
    ``wait_recheck_interval`` (1.0: while waiting, the record is also re-read this often, so
    a notification lost to a reconnect or a writer that does not publish costs at most this
    long), and the connection settings of the broker (``socket_timeout``, ``max_retries``,
    ``master_name``, ``ssl_*``, ...).

Thread-safety:
    One instance may be shared by the threads of one process: commands use redis-py's
    thread-safe pool; each ``wait`` call uses its own pub/sub connection from that pool for
    its duration. Never share an instance across ``fork()``.

Celery compatibility (``docs/celery-compat.md#redis-result-keys``):

* Records: ``celery-task-meta-<task id>`` holds the meta document (``status``, ``result``,
  ``traceback``, ``children``, ``date_done``, ``group_id``/``parent_id`` when set, extended
  fields, ``task_id``) encoded with the result serializer, written with ``SET ... PX`` and,
  in the same atomic step, ``PUBLISH``\\ed on the channel named like the key: what a Celery
  client's ``AsyncResult.get()`` waits for.
* A stored SUCCESS is never overwritten, atomically: a Lua script reads the stored status
  and writes only if it is not SUCCESS (JSON values; ``store_result.lua`` in
  :mod:`conveyor._drivers.redis`'s ``lua/``); values the script cannot read
  (compressed, msgpack, ...) are checked in Python under ``WATCH`` instead. Celery checks
  with a separate GET, which two racing writers can both pass.
* Groups: ``celery-taskset-meta-<group id>`` holds ``{"result": [[gid, null], [[[task_id,
  null], null], ...]], "date_done": ...}`` (Celery's saved ``GroupResult`` plus the time,
  which Celery ignores).
* Counters and sets are ours: ``<prefix><key>`` as given to ``incr``/``add_member``.
* Celery 5.7's compressed payloads (``\\x00celery-compressed\\x00<mime>\\x00<bytes>``) are
  read whatever ``compression`` says, as Celery does.

Ids:
    The rules of :meth:`~conveyor.core.base.ResultBackendBase.validate_task_id` (a non-empty
    ``str``, no NUL, valid UTF-8, at most 1024 bytes) for task ids, group ids, group members
    and counter keys on every method; anything else is stored and read back exactly (Redis
    keys are binary-safe: spaces, control characters and any Unicode are fine).

Errors:
    Connection failures, timeouts and the transient error replies (``LOADING``, ``BUSY``,
    ``OOM``, a failover...) are :class:`~conveyor.core.errors.OperationalError`
    (:func:`conveyor._drivers.redis.translating`). Replies that no retry can change are not:
    a key holding another type (``WRONGTYPE``), a counter out of range or any other ``ERR``
    reply raises ``ConfigurationError`` on writes and ``DecodeError`` on reads; redis-py
    refusing an argument (``DataError``) raises ``ConfigurationError``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from time import monotonic
from typing import Any, ClassVar, TypeVar

import redis
import redis.exceptions as rexc

from conveyor._drivers.redis import (
    HeldConnections,
    RedisConnectionOptions,
    Script,
    connect,
    lua_source,
    parse_redis_url,
    translating,
)
from conveyor.core.base import DEFAULT_RESULT_TTL, ResultBackendBase, check_default_ttl
from conveyor.core.capabilities import Capability
from conveyor.core.celery import (
    COMPRESSED_RESULT_MARKER,
    celery_key_prefix,
    decode_meta,
    decode_payload,
    encode_meta,
    group_from_meta,
    group_meta,
)
from conveyor.core.compression import (
    BUILTIN_METHODS,
    DEFAULT_MAX_SIZE,
    compress,
)
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    SerializationError,
)
from conveyor.core.options import build_options
from conveyor.core.serializers import SerializerRegistry
from conveyor.core.types import GroupRecord, ResultRecord, State

__all__ = ["RedisResultBackend", "RedisResultBackendOptions"]

TASK_KEY = "celery-task-meta-"
GROUP_KEY = "celery-taskset-meta-"
_FETCH_CHUNK = 1000
_UTC = timezone.utc

T = TypeVar("T")


@dataclass(frozen=True)
class RedisResultBackendOptions(RedisConnectionOptions):
    """Options of :class:`RedisResultBackend` (seconds as float); connection settings
    inherited from :class:`~conveyor._drivers.redis.RedisConnectionOptions`.

    Attributes:
        default_ttl: lifetime of a record, group or counter stored with ``ttl=None``.
        serializer: result serializer (Celery's ``result_serializer``).
        accept: serializers ``fetch`` decodes; empty means ``(serializer,)``.
        compression: Celery 5.7 ``result_compression`` for what this backend writes.
        accept_compression: compression methods a compressed payload may use when read
            (the app's ``accept_compression``); None or empty: none.
        global_keyprefix: Celery's result key prefix (see :func:`celery_key_prefix`).
        wait_recheck_interval: how often a ``wait`` re-reads the record besides listening.
    """

    default_ttl: float | None = DEFAULT_RESULT_TTL
    serializer: str = "json"
    accept: tuple[str, ...] = ()
    compression: str | None = None
    accept_compression: tuple[str, ...] | None = BUILTIN_METHODS
    global_keyprefix: str = ""
    wait_recheck_interval: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_default_ttl(self.default_ttl)
        if not self.wait_recheck_interval > 0:
            raise ConfigurationError("wait_recheck_interval must be > 0 seconds")


class _Waiter:
    """One connection used by one thread to wait for results (see ``wait``).

    Between waits the connection is in normal (unsubscribed) mode except for the reply to the
    last ``UNSUBSCRIBE``, which ``start`` reads first; a message published after that
    unsubscribe can no longer arrive.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.conn: Any = None
        self.pending_unsubscribe = False

    def start(self, key: str) -> bytes | None:
        """``MULTI; GET; SUBSCRIBE; EXEC`` in one write: the stored value (or None)."""
        if self.conn is None:
            self.conn = self.pool.get_connection()
        conn = self.conn
        try:
            while self.pending_unsubscribe:  # the previous wait's goodbye (and late messages)
                reply = conn.read_response()
                if isinstance(reply, list) and reply and reply[0] == b"unsubscribe":
                    self.pending_unsubscribe = False
        except (rexc.ConnectionError, OSError, AttributeError):
            # Closed meanwhile (AttributeError: redis-py's parser of a closed connection):
            # the next command reconnects, and a new connection has no subscription.
            conn.disconnect()
            self.pending_unsubscribe = False
        # A Sentinel master may have moved (conveyor/_drivers/redis/held.py: Reconnecting).
        conn.connect()
        conn.send_packed_command(
            conn.pack_commands([("MULTI",), ("GET", key), ("SUBSCRIBE", key), ("EXEC",)])
        )
        for _ in range(3):  # +OK, +QUEUED, +QUEUED
            conn.read_response()
        value, _subscribed = conn.read_response()
        if isinstance(value, Exception):
            raise value
        return None if value is None else bytes(value)

    def message(self, channel: bytes, seconds: float) -> bytes | None:
        """The payload of the next message on ``channel`` within ``seconds``, else None."""
        conn = self.conn
        if not conn.can_read(timeout=max(0.0, seconds)):
            return None
        reply = conn.read_response()
        if isinstance(reply, list) and len(reply) == 3 and reply[:2] == [b"message", channel]:
            return bytes(reply[2])
        return None  # a late message of an earlier wait, or a ping reply

    def leave(self, key: str) -> None:
        # No health-check PING here: in subscribed mode its reply is not the PONG it expects.
        self.conn.send_command("UNSUBSCRIBE", key, check_health=False)
        self.pending_unsubscribe = True

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
            with contextlib.suppress(Exception):
                self.pool.release(conn)


class RedisResultBackend(ResultBackendBase):
    """Result backend on Redis in Celery's layout; see the module docstring.

    Args:
        client: a ready redis-py client (``decode_responses=False``); closed by ``close``
            only when the backend built it (``from_url``).
        options: :class:`RedisResultBackendOptions`; defaults when None.
        serializers: serializer registry (default: the process-wide one).
        url: the URL shown (masked) in ``repr`` and errors.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.NATIVE_TTL,
            Capability.WAIT,
            Capability.COUNTERS,
            Capability.GROUPS,
            Capability.MULTI_READER,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
            Capability.COMPRESSED_RESULTS,
        }
    )

    def __init__(
        self,
        client: redis.Redis,
        options: RedisResultBackendOptions | None = None,
        *,
        serializers: SerializerRegistry | None = None,
        url: str = "redis://",
        _owns_client: bool = False,
    ) -> None:
        self.options = opts = options or RedisResultBackendOptions()
        self.url = url
        self._set_up_results(opts, serializers)
        self._client = client
        self._owns_client = _owns_client
        self._prefix = celery_key_prefix(opts.global_keyprefix)
        self._store_script = Script(client, lua_source("store_result"))
        # store, fetch and fetch_many: raw commands on a connection per thread.
        self._cmd = HeldConnections(client)
        self._closed = False
        # One wait connection per waiting thread, kept between waits (a PubSub per wait
        # cost a TCP connect and handshake on every AsyncResult.get(): PubSub.close() drops
        # its connection), see _Waiter.
        self._local = threading.local()
        self._waiters: list[_Waiter] = []
        self._waiters_lock = threading.RLock()  # re-entrant: see _thread_ended

    @classmethod
    def from_url(
        cls, url: str, *, serializers: SerializerRegistry | None = None, **options: Any
    ) -> RedisResultBackend:
        """Build a backend (and its own client, closed by ``close``) from ``url``.

        Does not connect: the first operation does.

        Raises:
            InvalidURL, ConfigurationError: as for the Redis broker.
        """
        target, query = parse_redis_url(url)
        opts = build_options(RedisResultBackendOptions, query, options, owner="redis backend")
        client = connect(target, opts, url)
        return cls(client, opts, serializers=serializers, url=url, _owns_client=True)

    @property
    def client(self) -> redis.Redis:
        return self._client

    # ------------------------------------------------------------------ plumbing
    def _run(self, what: str, fn: Callable[..., T], *args: Any, reading: bool = False) -> T:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")
        with translating(what, self.url, reading=reading):
            return fn(*args)

    def task_key(self, task_id: str) -> str:
        """The key (and pub/sub channel) of ``task_id``'s record."""
        return f"{self._prefix}{TASK_KEY}{task_id}"

    def group_key(self, group_id: str) -> str:
        """The key of ``group_id``'s saved group."""
        return f"{self._prefix}{GROUP_KEY}{group_id}"

    def _px(self, ttl: float | None) -> int:
        seconds = self._ttl(ttl)
        if seconds is None or math.isinf(seconds):
            return 0
        return max(1, math.ceil(seconds * 1000))

    def _encode(self, record: ResultRecord) -> bytes:
        return encode_meta(
            record,
            self._serializer.name,
            self._serializers,
            compression=self.options.compression,
        )

    def _decode(self, raw: bytes, task_id: str) -> ResultRecord:
        return decode_meta(
            raw,
            self._serializer.name,
            accept=self._accept,
            serializers=self._serializers,
            task_id=task_id,
            max_size=DEFAULT_MAX_SIZE,
            accept_compression=self._accept_compression,
        )

    def _decode_value(self, raw: bytes) -> Any:
        # Bounded and checked like a record: a compression type the payload names but this
        # reader does not know is the payload's fault (DecodeError), not a configuration one.
        return decode_payload(
            raw,
            self._serializer.name,
            accept=self._accept,
            serializers=self._serializers,
            max_size=DEFAULT_MAX_SIZE,
            accept_compression=self._accept_compression,
        )

    # ------------------------------------------------------------------ records
    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Write and publish ``record`` unless a SUCCESS is stored. One round trip (three
        when the stored value is not JSON: checked under ``WATCH``). Thread-safe.

        Raises:
            ConfigurationError: a refused task id (see ``validate_task_id``).
            EncodeError: the result cannot be serialized.
            OperationalError: the server failed (a retried write may have been applied).
        """
        record = self._check_record(record)
        key = self.task_key(record.task_id)
        value = self._encode(record)
        px = self._px(ttl)
        written = self._run(
            "store result", self._cmd.run_script, self._store_script, (key,), (value, px)
        )
        if int(written) == -1:
            self._run("store result", lambda: self._store_checked(key, record.task_id, value, px))

    def _store_checked(self, key: str, task_id: str, value: bytes, px: int) -> None:
        def work(pipe: Any) -> None:
            current = pipe.get(key)
            if current is not None and self._is_success(current, task_id):
                return
            pipe.multi()
            if px:
                pipe.set(key, value, px=px)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)

        self._client.transaction(work, key)

    def _is_success(self, raw: bytes, task_id: str) -> bool:
        try:
            return self._decode(raw, task_id).state is State.SUCCESS
        except (SerializationError, ConfigurationError):
            return False  # unreadable here (or not accepted): Celery would overwrite it too

    def fetch(self, task_id: str) -> ResultRecord | None:
        """``GET`` and decode the record; None when missing or expired.

        Raises:
            DecodeError: the stored value is not a readable result meta.
        """
        key = self.task_key(self._check_id(task_id, "task id"))
        raw = self._run("fetch result", self._get, key, reading=True)
        return None if raw is None else self._decode(raw, task_id)

    def _get(self, key: str) -> bytes | None:
        raw: Any = self._cmd.call("GET", key)
        return None if raw is None else bytes(raw)

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        values: Any = self._cmd.call("MGET", *keys)
        return list(values)

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """``MGET`` in chunks of 1000 ids (one round trip each)."""
        ids = self._check_ids(task_ids)
        found: dict[str, ResultRecord] = {}
        for start in range(0, len(ids), _FETCH_CHUNK):
            chunk = ids[start : start + _FETCH_CHUNK]
            keys = [self.task_key(t) for t in chunk]
            values = self._run("fetch results", self._mget, keys, reading=True)
            for task_id, raw in zip(chunk, values, strict=True):
                if raw is not None:
                    found[task_id] = self._decode(raw, task_id)
        return found

    def forget(self, task_id: str) -> None:
        """``DEL`` the record. Idempotent."""
        key = self.task_key(self._check_id(task_id, "task id"))
        self._run("forget result", self._client.delete, key)

    # ------------------------------------------------------------------ wait
    def wait(self, task_id: str, timeout: float) -> ResultRecord | None:
        """Block until ``task_id`` has a ready record or ``timeout`` seconds pass.

        One round trip starts the wait: ``MULTI; GET key; SUBSCRIBE key; EXEC`` on this
        thread's wait connection. The transaction runs the read and the subscription with no
        other command in between, so a store racing with the call is never missed (it is
        either read or published to us), without waiting for a subscribe confirmation before
        reading. Then it listens, re-reading every ``wait_recheck_interval`` seconds as a
        safety net. The connection is kept for the thread's next wait (it leaves with an
        UNSUBSCRIBE whose confirmation the next wait reads); after any error it is dropped.

        Returns:
            The ready record, or on timeout the latest non-ready record (or None).

        Raises:
            OperationalError: the server could not be reached.
        """
        key = self.task_key(self._check_id(task_id, "task id"))
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout != timeout:
            raise ConfigurationError(f"timeout must be a number of seconds, got {timeout!r}")
        deadline = monotonic() + max(0.0, timeout)
        channel = key.encode("utf-8")
        recheck = self.options.wait_recheck_interval
        waiter = self._waiter()
        clean = False
        try:
            raw = self._run("wait for result", waiter.start, key, reading=True)
            record = None if raw is None else self._decode_waited(raw, task_id)
            next_check = monotonic() + recheck
            while record is None or not record.ready:
                now = monotonic()
                if now >= deadline:
                    break
                if now >= next_check:
                    record = self.fetch(task_id) or record
                    next_check = now + recheck
                    continue
                data = self._run(
                    "wait for result", waiter.message, channel, min(deadline, next_check) - now
                )
                if data is not None:
                    record = self._decode_waited(data, task_id)
            self._run("wait for result", waiter.leave, key)
            clean = True
            return record
        finally:
            if not clean:  # an error mid-wait: never reuse a connection in an unknown state
                self._drop_waiter(waiter)

    def _decode_waited(self, raw: bytes, task_id: str) -> ResultRecord | None:
        try:
            return self._decode(raw, task_id)
        except DecodeError:
            return self.fetch(task_id)  # raises the DecodeError again if it really is bad

    def _waiter(self) -> _Waiter:
        """This thread's wait connection (made on first use, reused by later waits)."""
        waiter: _Waiter | None = getattr(self._local, "waiter", None)
        if waiter is None:
            if self._closed:
                raise ConnectionLost(f"{self!r} is closed")
            waiter = _Waiter(self._client.connection_pool)
            self._local.waiter = waiter
            with self._waiters_lock:
                self._waiters.append(waiter)
            # A thread that ends closes its wait connection (a thread per request calling
            # AsyncResult.get() must not leave one subscribed connection per request).
            weakref.finalize(threading.current_thread(), self._thread_ended, waiter)
        return waiter

    def _thread_ended(self, waiter: _Waiter) -> None:
        with self._waiters_lock:
            if waiter not in self._waiters:
                return  # dropped or closed already
            self._waiters.remove(waiter)
        waiter.close()

    def _drop_waiter(self, waiter: _Waiter) -> None:
        self._local.waiter = None
        with self._waiters_lock, contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        waiter.close()

    # ------------------------------------------------------------------ counters
    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """``INCRBY`` and refresh the expiry in one transaction; return the new value.

        Raises:
            ConfigurationError: a refused key, ``amount`` not an int, the key holding a set
                or a result out of Redis's 64-bit range.
        """
        name = self._prefix + self._check_id(key, "counter key")
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigurationError(f"amount must be an int, got {amount!r}")
        px = self._px(ttl)

        def work() -> int:
            pipe = self._client.pipeline(transaction=True)
            pipe.incrby(name, amount)
            if px:
                pipe.pexpire(name, px)
            return int(pipe.execute()[0])

        return self._run("incr", work)

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        """``SADD`` + expiry + ``SCARD`` in one transaction; return the set's size.

        Raises:
            ConfigurationError: a refused key or member, the key holding a counter.
        """
        name = self._prefix + self._check_id(key, "counter key")
        member = self._check_id(member, "member")
        px = self._px(ttl)

        def work() -> int:
            pipe = self._client.pipeline(transaction=True)
            pipe.sadd(name, member)
            if px:
                pipe.pexpire(name, px)
            pipe.scard(name)
            return int(pipe.execute()[-1])

        return self._run("add member", work)

    def forget_key(self, key: str) -> None:
        """``DEL`` the counter or set. Idempotent."""
        name = self._prefix + self._check_id(key, "counter key")
        self._run("forget key", self._client.delete, name)

    # ------------------------------------------------------------------ groups
    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        """Write Celery's saved-group document (and publish it, as Celery does)."""
        record = self._check_group(record)
        key = self.group_key(record.group_id)
        meta = group_meta(record.group_id, record.task_ids)
        done = record.date_done or datetime.now(_UTC)
        done = done.replace(tzinfo=_UTC) if done.tzinfo is None else done.astimezone(_UTC)
        meta["date_done"] = done.isoformat()
        body, _, _ = self._serializers.encode(meta, self._serializer.name)
        if self.options.compression:
            packed, mime = compress(body, self.options.compression)
            body = b"".join((COMPRESSED_RESULT_MARKER, mime.encode("ascii"), b"\x00", packed))
        px = self._px(ttl)

        def work() -> None:
            pipe = self._client.pipeline(transaction=True)
            if px:
                pipe.set(key, body, px=px)
            else:
                pipe.set(key, body)
            pipe.publish(key, body)
            pipe.execute()

        self._run("store group", work)

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        """The saved group, or None when missing or expired."""
        key = self.group_key(self._check_id(group_id, "group id"))
        raw = self._run("fetch group", self._get, key, reading=True)
        if raw is None:
            return None
        return group_from_meta(self._decode_value(raw), group_id)

    def forget_group(self, group_id: str) -> None:
        """``DEL`` the saved group (not its members' records). Idempotent."""
        key = self.group_key(self._check_id(group_id, "group id"))
        self._run("forget group", self._client.delete, key)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Disconnect (when the backend built the client). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.close()
        self._cmd.close()
        if self._owns_client:
            with contextlib.suppress(rexc.RedisError, OSError):
                self._client.close()
            with contextlib.suppress(rexc.RedisError, OSError):
                self._client.connection_pool.disconnect()
