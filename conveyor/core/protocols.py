"""The normative contract: what every broker and result backend must do.

``docs/protocols.md`` restates this for readers; this module is the source of truth and the
conformance suite (:mod:`conveyor.testing`) proves it.

General rules for every method below:

* Durations are seconds as ``float``.
* Driver exceptions never escape: transient failures raise
  :class:`~conveyor.core.errors.OperationalError` subclasses (retry with backoff), mistakes raise
  :class:`~conveyor.core.errors.ConfigurationError`, undeclared features raise
  :class:`~conveyor.core.errors.UnsupportedFeature`.
* Every method may block on network I/O for at most the implementation's configured operation
  timeout, except ``receive`` and ``wait``, which block for at most their ``timeout`` argument
  plus that operation timeout.
* Thread-safety is stated per implementation in its module docstring. Unless it says
  otherwise, one instance may be shared by the threads of one process; it is never shared
  across ``fork()`` (build a new one in the child).
* Ids are data, never queries. A result backend checks every task id, group id, group member
  and counter key it is given (on reads and deletes too) before anything reaches the store: a
  value that is not a ``str`` (``{"$ne": None}``, ``5``, ``b"x"``, ``None``) or that the store
  cannot hold exactly raises :class:`~conveyor.core.errors.ConfigurationError` saying why
  (see :meth:`ResultBackend.validate_task_id`), never an ``OperationalError``, so a worker
  never retries it.
* A result that the result serializer cannot encode raises
  :class:`~conveyor.core.errors.EncodeError` from ``store``; a stored value that cannot be
  decoded raises :class:`~conveyor.core.errors.DecodeError` from ``fetch``. Neither is
  transient.
* Every built-in broker that declares ``at_least_once`` accepts the option ``lease_seconds``
  (float, default 60.0): how long a delivery stays held without ``extend()`` before it is
  redelivered. The runtime extends leases from a heartbeat thread while a task runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from conveyor.core.capabilities import Capability
from conveyor.core.types import Delivery, Envelope, GroupRecord, ResultRecord

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Broker",
    "Counters",
    "DeadLetters",
    "ExpirySweep",
    "Groups",
    "LeaseExtension",
    "QueueSize",
    "ResultBackend",
    "Wait",
]


@runtime_checkable
class Broker(Protocol):
    """Moves envelopes from producers to consumers, at least once, under leases.

    Delivery semantics:

    * ``publish`` returns only when the broker has accepted the message durably (as durable
      as the store is): no silent loss after return.
    * A received message is *held* by its consumer under a lease until ``ack`` (gone for good)
      or ``reject``. Other consumers do not see a held message.
    * If the holder dies, closes without settling, or lets the lease expire (no ``extend``),
      the message becomes ready again and its next delivery has ``redelivered=True``.
    * Within one queue and one priority, messages are delivered in publish order (FIFO),
      except that redelivered messages may be delivered before newer ones.
    * A message published with ``delay`` is never delivered before that many seconds have
      passed, and is held by the broker, never by a consumer, until then.
    """

    capabilities: ClassVar[frozenset[Capability]]

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Build an instance from ``url``; ``options`` override the URL's query parameters.
        :func:`~conveyor.core.registry.broker_from_url` calls it for the registered scheme.

        Raises:
            InvalidURL, ConfigurationError, MissingDependency: the URL or an option is wrong,
                or the driver is not installed.
        """
        ...

    def declare_queue(self, name: str) -> None:
        """Create queue ``name`` if it does not exist. Idempotent.

        Publishing or receiving on an undeclared queue also works on every built-in broker;
        declaring up front lets a broker set up what it needs once.
        """
        ...

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Append ``envelope`` to ``queue``.

        Args:
            envelope: the message. ``priority`` > 0 needs the ``priority`` capability.
            queue: target queue name.
            delay: seconds to hold the message before it becomes deliverable; ``None`` or
                ``0`` means now. Needs ``delayed_delivery``.

        Raises:
            UnsupportedFeature: delay or priority without the capability.
            OperationalError: the broker could not be reached; the message was not accepted.
        """
        ...

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Publish several envelopes to one queue, in as few round trips as the store allows.

        Returns:
            How many were published. On error, none or a prefix may have been accepted; the
            exception says so where the store can tell.
        """
        ...

    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Take up to ``max_messages`` ready messages from ``queues``, holding each.

        Blocks until at least one message is ready or ``timeout`` seconds pass; returns an
        empty list on timeout. With several queues, a ready message of higher priority is
        preferred, then queue order (implementations may rotate queues for fairness).
        ``timeout=0`` polls once without blocking.
        """
        ...

    def ack(self, delivery: Delivery) -> None:
        """Settle ``delivery``: the message is gone for good. Idempotent.

        Raises:
            InvalidReceipt: the lease was lost (expired and the message redelivered
                elsewhere) where the broker can tell; the message was not lost, it will be (or
                was) processed again.
        """
        ...

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Give ``delivery`` back.

        ``requeue=True`` makes it ready again now (its next delivery is ``redelivered``).
        ``requeue=False`` drops it, or moves it to the dead-letter queue when the broker has
        ``dead_letter``. Every built-in broker records ``reason`` there: the dead letter
        comes back from that queue with header ``x-conveyor-dead-letter-reason`` (the reason,
        made printable and cut to 1000 characters) and ``x-conveyor-dead-letter-queue`` (the
        queue it was rejected from). Idempotent.
        """
        ...

    def purge(self, queue: str) -> int:
        """Delete every ready and delayed message of ``queue``; return how many.

        Messages currently held by consumers are not touched.
        """
        ...

    def close(self) -> None:
        """Release held messages (they become ready, ``redelivered``) and connections.

        Idempotent. After close, other methods raise ``ConnectionLost``.
        """
        ...


@runtime_checkable
class LeaseExtension(Protocol):
    """Capability ``lease_extension``."""

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Renew the lease on a held delivery so it stays held ``seconds`` from now.

        Raises:
            InvalidReceipt: the delivery is no longer held by this consumer.
        """
        ...


@runtime_checkable
class QueueSize(Protocol):
    """Capability ``queue_size``."""

    def size(self, queue: str) -> int:
        """Count the ready messages of ``queue`` (not held, not delayed, not dead)."""
        ...


@runtime_checkable
class DeadLetters(Protocol):
    """Capability ``dead_letter``."""

    def dead_letter_queue(self, queue: str) -> str:
        """Name of the queue that ``reject(requeue=False)`` on ``queue`` moves messages to
        (``queue + ".dead"`` on every built-in broker).

        It is an ordinary queue: receive, ack, purge and size work on it. Its messages carry
        the headers ``x-conveyor-dead-letter-reason`` and ``x-conveyor-dead-letter-queue``
        (see :meth:`Broker.reject`). A message the broker could not decode into a
        :class:`~conveyor.core.types.Delivery` at all (an envelope that is not JSON, headers
        that are not a map, ...) is never handed out by ``receive``: the broker dead-letters
        a stand-in for it at once, a well-formed message of content type
        ``application/x-conveyor-undecodable`` (so no worker runs it) whose reason starts
        with ``"undecodable message: "``, whose body is the original body and whose header
        ``x-conveyor-original`` holds the original metadata (properties, headers, row or
        document fields) as bounded text. On Redis, where the whole message is one text,
        the body is that original text and there is no ``x-conveyor-original``. The worker
        dead-letters the messages it refuses (too large, unsigned or badly signed,
        undecodable, a disallowed content type) the same way, and writes no result under
        the id they claim.
        """
        ...


@runtime_checkable
class ResultBackend(Protocol):
    """Keeps the state and outcome of tasks, with an expiry, readable by id.

    Semantics:

    * ``store`` replaces the previous record of the same id, except that a stored SUCCESS is
      never replaced (a redelivered duplicate must not overwrite a finished result).
    * Every record expires: ``ttl`` seconds after it was stored (``None``: the backend's
      configured default, one day unless configured). Expired records are never returned.
    * ``fetch`` of an unknown or expired id returns ``None`` (the runtime reports PENDING).
    """

    capabilities: ClassVar[frozenset[Capability]]

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Build an instance from ``url``; ``options`` override the URL's query parameters.
        :func:`~conveyor.core.registry.result_backend_from_url` calls it for the registered
        scheme.

        Raises:
            InvalidURL, ConfigurationError, MissingDependency: the URL or an option is wrong,
                or the driver is not installed.
        """
        ...

    def store(self, record: ResultRecord, *, ttl: float | None = None) -> None:
        """Save ``record`` under ``record.task_id``. See the class docstring.

        Raises:
            ConfigurationError: ``record.task_id`` is refused (see :meth:`validate_task_id`).
            EncodeError: the result (or another field) cannot be encoded for this store.
            OperationalError: the store could not be reached; nothing or the whole record
                was written.
        """
        ...

    def validate_task_id(self, task_id: str) -> None:
        """Raise ``ConfigurationError`` unless ``task_id`` can be stored and read back
        exactly by this backend. No I/O: an application calls it before publishing a task,
        so an id the result store would refuse fails at ``delay()``, not in the worker.

        Every built-in backend refuses a non-``str``, an empty string, a NUL character, a
        lone surrogate (not encodable as UTF-8) and more than 1024 UTF-8 bytes; some refuse
        more (SQL: more than 155 characters, Celery's ``task_id`` column; MariaDB/MySQL: a
        trailing space; ``rpc://``: more than 255 bytes, an AMQP correlation id). Group ids
        and counter keys follow the same rules. ``store``, ``fetch``, ``forget`` and the
        other methods apply the same check. :class:`~conveyor.core.base.ResultBackendBase`
        implements it.
        """
        ...

    def fetch(self, task_id: str) -> ResultRecord | None:
        """Return the record for ``task_id`` or ``None``. Non-blocking apart from I/O."""
        ...

    def fetch_many(self, task_ids: Sequence[str]) -> Mapping[str, ResultRecord]:
        """Return the records found for ``task_ids`` (missing ids are absent), in one round
        trip where the store allows."""
        ...

    def forget(self, task_id: str) -> None:
        """Delete the record for ``task_id``. Idempotent."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent. After close, other methods raise
        ``ConnectionLost``."""
        ...


@runtime_checkable
class Wait(Protocol):
    """Capability ``wait``: push notification when a result is stored."""

    def wait(self, task_id: str, timeout: float) -> ResultRecord | None:
        """Block until ``task_id`` has a ready record or ``timeout`` seconds pass.

        Woken by the store (push), not by polling: it returns within 250 ms of a ``store``
        by any client (the conformance suite's bound, on the median of 21 waits; a poll loop
        with a period over 0.5 s cannot meet it). Implementations may re-read the record
        periodically as a safety net besides listening (Redis: ``wait_recheck_interval``).

        Returns the ready record, or the latest non-ready record (or ``None``) on timeout.
        """
        ...


@runtime_checkable
class Counters(Protocol):
    """Capability ``counters``: atomic cross-process counting for chord joins."""

    def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to counter ``key`` (missing counts as 0); return it.

        Prefer :meth:`add_member` for joins: a redelivered task increments twice.
        """
        ...

    def add_member(self, key: str, member: str, *, ttl: float | None = None) -> int:
        """Atomically add ``member`` to set ``key``; return the set's size afterwards.

        Adding a member twice counts it once, so at-least-once redelivery cannot make a join
        fire early. Both forms refresh ``ttl``.
        """
        ...

    def forget_key(self, key: str) -> None:
        """Delete counter or set ``key``. Idempotent."""
        ...


@runtime_checkable
class Groups(Protocol):
    """Capability ``groups``: group (Celery "taskset") membership records."""

    def store_group(self, record: GroupRecord, *, ttl: float | None = None) -> None:
        """Save the membership of ``record.group_id``."""
        ...

    def fetch_group(self, group_id: str) -> GroupRecord | None:
        """Return the group or ``None`` if unknown or expired."""
        ...

    def forget_group(self, group_id: str) -> None:
        """Delete the group record (not its members' results). Idempotent."""
        ...


@runtime_checkable
class ExpirySweep(Protocol):
    """Capability ``expiry_sweep``: stores without native expiry delete in batches."""

    def purge_expired(self, *, batch_size: int = 1000) -> int:
        """Delete expired records in batches of at most ``batch_size`` (short locks);
        return how many were deleted."""
        ...


def describe(obj: Any) -> str:
    """Name of an implementation for messages: ``module.Class``."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
