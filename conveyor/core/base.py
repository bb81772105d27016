"""The one helper base for implementations: shared checks, derived methods, safe ``repr``.

Subclassing is optional (the contract is the protocols in :mod:`conveyor.core.protocols`),
but the bases give, for free:

* capability enforcement in one place (:meth:`BrokerBase._check_publish`, ``_require``),
* ``publish_many`` as a loop and ``fetch_many`` as a loop, for stores with no batch verb,
* optional-capability methods that raise :class:`UnsupportedFeature` until overridden,
* context-manager support and a ``repr`` that shows the masked URL,
* the id rules of result backends (:func:`check_id`, :meth:`ResultBackendBase.validate_task_id`).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar

from conveyor.core.capabilities import Capability
from conveyor.core.compression import compress, normalize_accept_compression
from conveyor.core.errors import ConfigurationError, UnsupportedFeature
from conveyor.core.protocols import describe
from conveyor.core.serializers import SerializerRegistry, default_serializers
from conveyor.core.types import Delivery, Envelope, GroupRecord, ResultRecord, State
from conveyor.core.urls import mask_url

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "DEFAULT_RESULT_TTL",
    "MAX_ID_BYTES",
    "BrokerBase",
    "HeldLeases",
    "ResultBackendBase",
    "check_default_ttl",
    "check_id",
    "validate_queue_name",
]

#: ``dead_letter_queue(q)`` is ``q + DEAD_LETTER_SUFFIX`` on every built-in broker.
DEAD_LETTER_SUFFIX = ".dead"
#: Celery's ``result_expires`` default: one day.
DEFAULT_RESULT_TTL = 86400.0
_MAX_QUEUE_NAME = 200
#: How many ``.dead`` suffixes a name may carry past the length limit.
_DEAD_LETTER_LEVELS = 2
#: The longest task id, group id or counter key (in UTF-8 bytes) a result backend accepts by
#: default. Ids are never trusted for size; backends whose store holds less refuse more.
MAX_ID_BYTES = 1024


def _shown(value: object) -> str:
    """A short, safe ``repr`` of an id for error messages (never a 10,000-character id)."""
    short = reprlib.Repr()  # built per error: errors are rare, module state is not wanted
    short.maxstring = short.maxother = 60
    short.maxlevel = 2
    try:
        return short.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        return f"<{type(value).__name__}>"


def check_id(value: object, what: str = "task id", *, max_bytes: int = MAX_ID_BYTES) -> str:
    """Return ``value`` if it is usable as an id by a result backend, else raise.

    The rules every built-in result backend applies to task ids, group ids and counter keys
    (each backend may refuse more, see its ``validate_task_id``):

    * a ``str`` (ids are data, never queries: a ``dict`` such as ``{"$ne": None}`` would be
      an operator to MongoDB, an ``int`` compares as a number in MySQL), not empty;
    * no NUL character (PostgreSQL text and C-string keys cannot hold it);
    * encodable as UTF-8, i.e. no lone surrogate (no store, driver or wire format can carry
      one; a Celery client can send one);
    * at most ``max_bytes`` bytes as UTF-8.

    Returns:
        ``value`` itself, or a plain ``str`` copy of a ``str`` subclass (numpy's ``str_``...):
        callers use the returned value.

    Raises:
        ConfigurationError: saying which rule ``value`` breaks. It is the caller's mistake
            (or the sender's): retrying cannot help, so it is never an ``OperationalError``.
    """
    if type(value) is not str:
        if not isinstance(value, str):
            raise ConfigurationError(
                f"{what} must be a str, got {type(value).__name__} {_shown(value)} "
                "(ids are data, never queries)"
            )
        value = str.__str__(value)  # a plain copy: a subclass's methods could say anything
    if not value:
        raise ConfigurationError(f"{what} must not be empty")
    if "\x00" in value:
        raise ConfigurationError(
            f"{what} {_shown(value)} contains a NUL character, which result stores cannot hold"
        )
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ConfigurationError(
                f"{what} {_shown(value)} is not valid Unicode text (a lone surrogate at index "
                f"{exc.start}): it cannot be encoded as UTF-8, so no store can hold it"
            ) from None
    if size > max_bytes:
        raise ConfigurationError(
            f"{what} {_shown(value)} is {size} bytes long as UTF-8; this result backend "
            f"accepts at most {max_bytes}"
        )
    return value


def check_default_ttl(ttl: float | None) -> None:
    """Refuse a result backend's ``default_ttl`` that is not ``None`` or a number of
    seconds >= 0 (``0`` keeps records until forgotten). For the options' ``__post_init__``.

    Raises:
        ConfigurationError: negative, NaN or not a number.
    """
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl >= 0
    ):
        raise ConfigurationError(f"default_ttl must be >= 0 seconds or None: {ttl!r}")


def validate_queue_name(name: str) -> str:
    """Return ``name`` if it is a usable queue name, else raise ``ConfigurationError``.

    At most 200 characters, not counting up to two trailing :data:`DEAD_LETTER_SUFFIX` (so
    the dead-letter queue of any usable name is usable), no control characters."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"queue name must be a non-empty string, got {name!r}")
    base = name  # the dead-letter queue of a dead-letter queue of a usable name is usable
    for _ in range(_DEAD_LETTER_LEVELS):
        if base.endswith(DEAD_LETTER_SUFFIX) and len(base) > len(DEAD_LETTER_SUFFIX):
            base = base[: -len(DEAD_LETTER_SUFFIX)]
    if len(base) > _MAX_QUEUE_NAME:
        raise ConfigurationError(f"queue name longer than {_MAX_QUEUE_NAME} characters")
    if any(ord(c) < 32 for c in name):
        raise ConfigurationError(f"queue name {name!r} contains control characters")
    return name


class HeldLeases:
    """One broker instance's bookkeeping of its leases, thread-safe: which messages it holds
    (message key -> lease token, given back by ``close``) and which receipts it settled
    lately, so that a second ``ack``/``reject`` of the same delivery is a no-op rather than
    a "lease lost" error. The newest ``memory`` settled receipts are remembered.
    """

    def __init__(self, memory: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._held: dict[Hashable, str] = {}
        self._settled: OrderedDict[tuple[Hashable, str], None] = OrderedDict()
        self._memory = memory

    def hold(self, items: Iterable[tuple[Hashable, str]]) -> None:
        """Record ``(key, token)`` pairs just claimed."""
        with self._lock:
            self._held.update(items)

    def was_settled(self, key: Hashable, token: str) -> bool:
        with self._lock:
            return (key, token) in self._settled

    def settle(self, key: Hashable, token: str) -> None:
        """Forget the lease (if still this token's) and remember the receipt as settled."""
        with self._lock:
            if self._held.get(key) == token:
                del self._held[key]
            self._settled[(key, token)] = None
            while len(self._settled) > self._memory:
                self._settled.popitem(last=False)

    def take_all(self) -> dict[Any, str]:
        """Every held lease, forgotten here (``close`` gives them back)."""
        with self._lock:
            held, self._held = self._held, {}
        return held


class _Closable:
    url: str = ""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_url(self.url)!r}>"

    def _require(self, capability: Capability, detail: str = "") -> None:
        if capability not in self.capabilities:  # type: ignore[attr-defined]
            raise UnsupportedFeature(describe(self), capability.value, detail)


class BrokerBase(_Closable):
    """Helper base for brokers. Subclasses implement the required primitives."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset()

    def _check_publish(self, envelope: Envelope, delay: float | None) -> None:
        """Refuse what no store can hold, then what the instance does not declare. Call at
        the top of ``publish`` (and for each envelope of ``publish_many``).

        Raises:
            ConfigurationError: ``envelope.id`` is not a ``str`` (ids are data, never
                queries); ``delay`` is not a finite number of seconds >= 0 (infinite, NaN,
                negative, a bool or not a number); priority outside 0-9. Retrying cannot
                help, so never an ``OperationalError``.
            UnsupportedFeature: a delay or priority the broker does not declare.
        """
        if not isinstance(envelope.id, str):
            raise ConfigurationError(
                f"an envelope id must be a str, got {type(envelope.id).__name__} "
                f"{_shown(envelope.id)} (ids are data, never queries)"
            )
        if delay is not None and (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not 0 <= delay < math.inf  # NaN fails this too
        ):
            raise ConfigurationError(
                f"delay must be a finite, non-negative number of seconds, got {_shown(delay)}"
            )
        if delay is not None and delay > 0 and Capability.DELAYED_DELIVERY not in self.capabilities:
            raise UnsupportedFeature(describe(self), "delayed_delivery", f"delay={delay!r}")
        if envelope.priority and Capability.PRIORITY not in self.capabilities:
            raise UnsupportedFeature(describe(self), "priority", f"priority={envelope.priority}")
        if not 0 <= envelope.priority <= 9:
            raise ConfigurationError(f"priority must be 0-9, got {envelope.priority}")

    @staticmethod
    def _queue_list(queues: str | Sequence[str]) -> list[str]:
        """The queue names of a ``receive`` call, validated, each once, in the given order.

        Raises:
            ConfigurationError: no queue, or a name :func:`validate_queue_name` refuses.
        """
        names = [queues] if isinstance(queues, str) else list(dict.fromkeys(queues))
        if not names:
            raise ConfigurationError("receive() needs at least one queue")
        for name in names:
            validate_queue_name(name)
        return names

    @classmethod
    def _check_receive(
        cls, queues: str | Sequence[str], max_messages: object, timeout: object
    ) -> list[str]:
        """Check the arguments of ``receive`` as every broker must, and return the queue
        names (:meth:`_queue_list`). Call at the top of ``receive``.

        Raises:
            ConfigurationError: no queue or a bad name; ``max_messages`` not an int >= 1 (a
                bool is not a count); ``timeout`` not a number of seconds >= 0 (NaN, None, a
                bool or not a number).
        """
        names = cls._queue_list(queues)
        if isinstance(max_messages, bool) or not isinstance(max_messages, int):
            raise ConfigurationError(f"max_messages must be an int, got {_shown(max_messages)}")
        if max_messages < 1:
            raise ConfigurationError(f"max_messages must be >= 1, got {max_messages}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not timeout >= 0  # NaN fails this too
        ):
            raise ConfigurationError(f"timeout must be >= 0 seconds, got {_shown(timeout)}")
        return names

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        raise NotImplementedError  # pragma: no cover

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Derived: one ``publish`` per envelope. Override where the store batches."""
        count = 0
        for envelope in envelopes:
            self.publish(envelope, queue=queue, delay=delay)
            count += 1
        return count

    # ---- optional capabilities: refuse until overridden
    def extend(self, delivery: Delivery, seconds: float) -> None:
        self._require(Capability.LEASE_EXTENSION)

    def size(self, queue: str) -> int:
        self._require(Capability.QUEUE_SIZE)
        return 0  # pragma: no cover - _require raised

    def dead_letter_queue(self, queue: str) -> str:
        """``queue + ".dead"`` (:data:`DEAD_LETTER_SUFFIX`): an ordinary queue of the same
        store, where ``reject(requeue=False)`` on ``queue`` moves messages; receive, ack,
        purge and size work on it. Only for a broker that declares ``dead_letter``."""
        self._require(Capability.DEAD_LETTER)
        return validate_queue_name(queue) + DEAD_LETTER_SUFFIX


class ResultBackendBase(_Closable):
    """Helper base for result backends.

    Ids: every method checks each task id, group id, group member and counter key it is
    given with :meth:`_check_id` (:func:`check_id`'s rules, refined per backend) before
    anything reaches the store, and :meth:`validate_task_id` lets an application check an
    id before publishing a task.

    Attributes:
        default_ttl: seconds a record lives when ``store`` gets ``ttl=None``; ``None`` or 0
            keeps records until forgotten (only by explicit configuration).
        max_id_bytes: the longest id accepted, in UTF-8 bytes.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    default_ttl: float | None = DEFAULT_RESULT_TTL
    max_id_bytes: ClassVar[int] = MAX_ID_BYTES

    def _set_up_results(self, options: Any, serializers: SerializerRegistry | None) -> None:
        """The result codec every store sets up the same way, from its options object:

        * ``default_ttl``: the options' (``0`` or ``None``: records are kept until forgotten);
        * ``_serializers``: the registry given, else :data:`default_serializers`;
        * ``_serializer``: the one that writes (``options.serializer``; unknown: refused now);
        * ``_accept``: what reads decode (``options.accept``, empty: the serializer alone);
        * ``_accept_compression``: the compression methods a Celery 5.7 compressed payload
          may use when read (``options.accept_compression`` where the options have it,
          else none); ``options.compression``, where present, is checked now.

        Raises:
            ConfigurationError, MissingDependency: an unknown serializer or compression.
        """
        self.default_ttl = options.default_ttl if options.default_ttl else None
        self._serializers = serializers or default_serializers
        self._serializer = self._serializers.get(options.serializer)
        self._accept = self._serializers.normalize_accept(options.accept or (options.serializer,))
        compression = getattr(options, "compression", None)
        if compression:
            compress(b"", compression)  # unknown or missing compressor: fail now
        self._accept_compression = normalize_accept_compression(
            getattr(options, "accept_compression", None)
        )

    def validate_task_id(self, task_id: str) -> None:
        """Raise ``ConfigurationError`` unless this backend can store ``task_id`` and read
        it back exactly. No I/O; cheap enough to call before every publish.

        The base rules are :func:`check_id`'s (a non-empty ``str``, no NUL, valid UTF-8, at
        most :attr:`max_id_bytes` bytes); backends refine them (e.g. SQL: Celery's 155
        character column). ``store``, ``fetch``, ``forget`` and every other method apply the
        same check, so an id refused here is refused there too, never sent to the store.
        Group ids and counter keys follow the same rules.

        Raises:
            ConfigurationError: saying why ``task_id`` cannot be used.
        """
        self._check_id(task_id, "task id")

    def _check_id(self, value: object, what: str) -> str:
        """Return ``value`` if this backend can use it as ``what`` (a task id, group id,
        group member or counter key), else raise ``ConfigurationError``. Override to refine
        (call ``super()`` first)."""
        return check_id(value, what, max_bytes=self.max_id_bytes)

    def _check_record(self, record: ResultRecord) -> ResultRecord:
        """``record`` with its task id checked (as a plain ``str``)."""
        task_id = self._check_id(record.task_id, "task id")
        if task_id is record.task_id:
            return record
        return dataclasses.replace(record, task_id=task_id)

    def _check_group(self, record: GroupRecord) -> GroupRecord:
        """``record`` with its group id and members checked (plain ``str``, a tuple)."""
        group_id = self._check_id(record.group_id, "group id")
        members = tuple(self._check_ids(record.task_ids, "group member"))
        if group_id is record.group_id and members == record.task_ids:
            return record
        return dataclasses.replace(record, group_id=group_id, task_ids=members)

    def _check_ids(self, values: object, what: str = "task id") -> list[str]:
        """Every id of a sequence of ids, checked; a lone ``str`` (or bytes, or a mapping)
        is refused rather than iterated."""
        if isinstance(values, str | bytes | bytearray | Mapping) or not isinstance(
            values, Iterable
        ):
            raise ConfigurationError(
                f"expected a sequence of {what}s, got {type(values).__name__} {_shown(values)}"
            )
        return [self._check_id(value, what) for value in values]

    def _ttl(self, ttl: float | None) -> float | None:
        """The effective expiry in seconds for a store call, or None for "never"."""
        effective = self.default_ttl if ttl is None else ttl
        if effective is not None and (
            isinstance(effective, bool)
            or not isinstance(effective, int | float)
            or effective < 0
            or math.isnan(effective)
        ):
            raise ConfigurationError(f"ttl must be a non-negative number of seconds: {ttl!r}")
        if effective is None or effective == 0:
            return None  # 0 means "keep until forgotten", only when asked for explicitly
        return float(effective)

    @staticmethod
    def _may_replace(existing_state: str | State | None) -> bool:
        """A stored SUCCESS is never overwritten (Celery's rule against duplicates)."""
        return existing_state != State.SUCCESS.value

    def fetch(self, task_id: str) -> ResultRecord | None:
        raise NotImplementedError  # pragma: no cover

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Derived: one ``fetch`` per id. Override where the store batches."""
        found: dict[str, ResultRecord] = {}
        for task_id in self._check_ids(task_ids):
            record = self.fetch(task_id)
            if record is not None:
                found[task_id] = record
        return found

    # ---- optional capabilities: refuse until overridden
    def wait(self, task_id: str, timeout: float) -> ResultRecord | None:
        self._require(Capability.WAIT, "use conveyor.core.wait_for() to poll")
        return None  # pragma: no cover

    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        self._require(Capability.COUNTERS)
        return 0  # pragma: no cover

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        self._require(Capability.COUNTERS)
        return 0  # pragma: no cover

    def forget_key(self, key: str) -> None:
        self._require(Capability.COUNTERS)

    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        self._require(Capability.GROUPS)

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        self._require(Capability.GROUPS)
        return None  # pragma: no cover

    def forget_group(self, group_id: str) -> None:
        self._require(Capability.GROUPS)

    def purge_expired(self, *, batch_size: int = 1000) -> int:
        self._require(Capability.EXPIRY_SWEEP)
        return 0  # pragma: no cover


def wait_for(
    backend: Any,
    task_id: str,
    timeout: float,
    *,
    interval: float = 0.005,
    max_interval: float = 1.0,
) -> ResultRecord | None:
    """Wait until ``task_id`` is ready or ``timeout`` passes; return the last record seen.

    Uses the backend's push ``wait`` when it declares ``wait``, else polls ``fetch`` with
    backoff from ``interval`` growing by half each time up to ``max_interval`` seconds.
    Starting at 5 ms and growing by 1.5 (not 50 ms, doubling) notices a quick task within
    a few ms at the price of a few more primary-key reads in its first 100 ms (8 instead of
    2); a long task still costs one read per ``max_interval``.
    """
    if Capability.WAIT in getattr(backend, "capabilities", frozenset()):
        record: ResultRecord | None = backend.wait(task_id, timeout)
        return record
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        record = backend.fetch(task_id)
        if record is not None and record.ready:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return record
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, max_interval)
