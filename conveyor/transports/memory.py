"""In-process broker: queues in a :class:`MemoryStore`, for tests, demos and single-process apps.

Capabilities:
    ``at_least_once``, ``delayed_delivery``, ``priority``, ``dead_letter``,
    ``lease_extension``, ``queue_size``. Not ``durable`` (everything is lost with the
    process) and not ``cross_process`` (only brokers sharing one :class:`MemoryStore` object
    in one process see the same queues).

URL:
    ``memory://`` (Celery's spelling; ``memory://localhost/`` and credentials are accepted and
    ignored). Every :meth:`MemoryBroker.from_url` call gets its **own private store**: there is
    no module-level state. To let several brokers (producers, consumers, threads) share queues,
    build them on one store: ``store = MemoryStore(); a = store.broker(); b = store.broker()``,
    ``a.sibling()``, or ``MemoryBroker.from_url("memory://", store=store)``.

Options (keyword > URL query > default, see :class:`MemoryBrokerOptions`):
    ``lease_seconds`` (float, default 60.0): how long a received message stays held without
    ``extend()`` before it is redelivered to another consumer.

Thread-safety:
    A store has one lock and one condition variable; every operation of every broker on the
    store runs under that lock, so brokers and stores may be shared freely between the threads
    of one process. ``receive`` waits on the condition (woken by publishes, requeues, released
    leases, and by the next due delayed message or expiring lease), never by busy polling.
    Envelopes are passed by reference, not copied: do not mutate an envelope's ``headers``
    after publishing it or after receiving it.

Semantics worth knowing:
    * Dead letters: ``reject(requeue=False)`` on queue ``q`` moves the message to the ordinary
      queue ``dead_letter_queue(q) == q + ".dead"`` with the same id and body; the reason is in
      the header ``x-conveyor-dead-letter-reason`` (printable text of at most 1000 characters,
      whatever was given) and the source queue in ``x-conveyor-dead-letter-queue``. Rejecting
      from a dead-letter queue dead-letters again (``q.dead.dead``); no queue is special.
    * Envelopes are kept as objects, so there is nothing to decode and no malformed message:
      a wrong priority or delay is refused by ``publish``. Delays are kept to the millisecond
      up to about 142,000 years; a longer or infinite delay raises ``ConfigurationError``.
    * Redelivered messages (requeued, released by ``close()``, or whose lease expired) go to the
      front of their priority, ahead of newer messages.
    * A lease that has run out is lost only once the store notices (the next ``receive``,
      ``size`` or ``purge`` touching the queue); until then a late ``ack`` or ``extend`` from
      the holder still succeeds, which avoids a needless duplicate. Once lost, ``ack``,
      ``reject`` and ``extend`` raise :class:`InvalidReceipt`.
    * :meth:`MemoryStore.close` simulates the broker server going away: every broker on the
      store then raises :class:`ConnectionLost`, which lets runtime and fault tests exercise
      outage handling without a server.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any, ClassVar

from conveyor.core.base import BrokerBase, validate_queue_name
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    InvalidReceipt,
    InvalidURL,
)
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope
from conveyor.core.urls import parse_url
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    EXACT_MS_MAX_DELAY,
    MAX_ORIGINAL_CHARS,
    ORIGINAL_HEADER,
    check_delay,
    clean_reason,
    clean_text,
)

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEAD_LETTER_SOURCE_HEADER",
    "DEAD_LETTER_SUFFIX",
    "MemoryBroker",
    "MemoryBrokerOptions",
    "MemoryStore",
]

_PRIORITIES = 10
# Receipt states. A receipt is settled once (ack or reject); settling it again is a no-op.
# LOST means the store took the message back (lease expired, or the holder closed).
_HELD, _ACKED, _REJECTED, _LOST = range(4)
# threading refuses waits longer than TIMEOUT_MAX; the receive loop re-waits as needed.
_MAX_WAIT = min(threading.TIMEOUT_MAX, 3600.0)


@dataclass(frozen=True)
class MemoryBrokerOptions:
    """Options of :class:`MemoryBroker`.

    Attributes:
        lease_seconds: seconds a received message stays held without ``extend()`` before it
            is redelivered. Must be > 0.
    """

    lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not (self.lease_seconds > 0 and math.isfinite(self.lease_seconds)):
            raise ConfigurationError(
                f"lease_seconds must be a positive number of seconds, got {self.lease_seconds!r}"
            )


class _Message:
    """One message in a queue; survives redeliveries (``deliveries`` counts them)."""

    __slots__ = ("deliveries", "envelope")

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.deliveries = 0


def _headers_of(envelope: Envelope) -> dict[str, Any]:
    """The headers to keep on a dead letter: a copy of the map, or, when the publisher put
    something else there, that thing's text under :data:`ORIGINAL_HEADER` (dead-lettering
    never fails on it)."""
    headers: Any = envelope.headers
    if isinstance(headers, Mapping):
        return dict(headers)
    return {ORIGINAL_HEADER: clean_text(headers, MAX_ORIGINAL_CHARS)}


class _Queue:
    """All state of one queue. Only touched under the store lock."""

    __slots__ = ("delayed", "held", "leases", "mask", "name", "ready", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        # One FIFO per priority: delivery takes from the highest non-empty one.
        self.ready: list[deque[_Message]] = [deque() for _ in range(_PRIORITIES)]
        # Bit p set whenever ready[p] gains a message (cleared lazily once found empty), so
        # taking finds the highest non-empty priority without scanning ten deques.
        self.mask = 0
        # (due, seq, message): promoted to ``ready`` when due; never handed out before.
        self.delayed: list[tuple[float, int, _Message]] = []
        # (deadline, token) min-heap with lazy deletion: an entry is acted on only if the
        # token is still held and its current deadline (``extend`` may have moved it) passed.
        self.leases: list[tuple[float, int]] = []
        self.held: dict[int, _Receipt] = {}
        # Receivers blocked on this queue; publishes notify only when someone waits.
        self.waiting = 0

    def ready_count(self) -> int:
        return sum(map(len, self.ready))


class _Receipt:
    """The opaque ``Delivery.receipt`` of the memory broker: one delivery of one message."""

    __slots__ = ("deadline", "message", "owner", "queue", "state", "store", "token")

    def __init__(
        self,
        store: MemoryStore,
        queue: _Queue,
        message: _Message,
        token: int,
        deadline: float,
        owner: dict[int, _Receipt],
    ) -> None:
        self.store = store
        self.queue = queue
        self.message = message
        self.token = token
        self.deadline = deadline
        self.owner = owner  # the holding broker's held map, so close() can release it
        self.state = _HELD


class MemoryStore:
    """The queues that memory brokers share. Thread-safe; see the module docstring.

    A store is cheap; make one per test or per application. It holds no threads and needs no
    cleanup apart from dropping the last reference.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._closed = False

    def broker(self, **options: Any) -> MemoryBroker:
        """A new open broker on this store; ``options`` as for :class:`MemoryBrokerOptions`.

        Raises:
            ConfigurationError: unknown option (with a did-you-mean) or a bad value.
        """
        return MemoryBroker(self, build_options(MemoryBrokerOptions, None, options, owner=_OWNER))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Simulate the server going away: every broker on this store raises
        :class:`ConnectionLost` from now on, and blocked receivers wake up and raise it.
        Idempotent. Messages are kept but unreachable."""
        with self._lock:
            self._closed = True
            self._cond.notify_all()

    # ---- internals; every method below expects the lock to be held
    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            # Validate only unknown names: known ones passed already (hot path stays cheap).
            queue = self._queues[validate_queue_name(name)] = _Queue(name)
        return queue

    def _maintain(self, queue: _Queue, now: float) -> float:
        """Promote due delayed messages and take back expired leases of ``queue``.

        Returns the monotonic time of the queue's next such event, or ``math.inf``.
        """
        delayed = queue.delayed
        if delayed and delayed[0][0] <= now:
            ready = queue.ready
            while delayed and delayed[0][0] <= now:
                message = heapq.heappop(delayed)[2]
                priority = message.envelope.priority
                ready[priority].append(message)
                queue.mask |= 1 << priority
        leases = queue.leases
        if leases and leases[0][0] <= now:
            expired: list[_Receipt] = []
            held = queue.held
            while leases and leases[0][0] <= now:
                receipt = held.get(heapq.heappop(leases)[1])
                if receipt is not None and receipt.deadline <= now:
                    expired.append(receipt)
            self._release(expired)
        next_event = math.inf
        if delayed:
            next_event = delayed[0][0]
        if leases and leases[0][0] < next_event:
            next_event = leases[0][0]
        return next_event

    def _release(self, receipts: list[_Receipt]) -> None:
        """Make held messages ready again, at the front, keeping their relative order."""
        for receipt in reversed(receipts):
            queue = receipt.queue
            del queue.held[receipt.token]
            receipt.owner.pop(receipt.token, None)
            receipt.state = _LOST
            message = receipt.message
            priority = message.envelope.priority
            queue.ready[priority].appendleft(message)
            queue.mask |= 1 << priority
        if receipts:
            self._cond.notify_all()

    def _settle(self, receipt: _Receipt, state: int) -> None:
        del receipt.queue.held[receipt.token]
        receipt.owner.pop(receipt.token, None)
        receipt.state = state

    def _take(
        self,
        queues: list[_Queue],
        limit: int,
        now: float,
        lease: float,
        owner: dict[int, _Receipt],
    ) -> list[Delivery]:
        """Hold up to ``limit`` ready messages: highest priority first, then queue order."""
        out: list[Delivery] = []
        while len(out) < limit:
            best: deque[_Message] | None = None
            best_queue: _Queue | None = None
            best_priority = -1
            for queue in queues:
                mask = queue.mask
                priority = -1
                while mask:
                    priority = mask.bit_length() - 1
                    if queue.ready[priority]:
                        break
                    mask ^= 1 << priority
                queue.mask = mask
                if mask and priority > best_priority:
                    best, best_queue, best_priority = queue.ready[priority], queue, priority
            if best is None or best_queue is None:
                break
            # Nothing can overtake this FIFO while we hold the lock: drain it in one go.
            deadline = now + lease
            held = best_queue.held
            leases = best_queue.leases
            name = best_queue.name
            for _ in range(min(len(best), limit - len(out))):
                message = best.popleft()
                message.deliveries += 1
                token = next(self._seq)
                receipt = _Receipt(self, best_queue, message, token, deadline, owner)
                held[token] = owner[token] = receipt
                heapq.heappush(leases, (deadline, token))
                count = message.deliveries
                out.append(Delivery(message.envelope, name, receipt, count > 1, count))
            if len(leases) > 2 * len(held) + 64:
                # Settled deliveries leave stale entries behind (lazy deletion); rebuild the
                # heap from what is really held before they pile up. Amortised O(1).
                best_queue.leases = [(r.deadline, t) for t, r in held.items()]
                heapq.heapify(best_queue.leases)
        return out


_OWNER = "memory broker"
_DELAY_WHY = "due times are float seconds kept to the millisecond"


class MemoryBroker(BrokerBase):
    """A broker on a :class:`MemoryStore`. Thread-safe; see the module docstring.

    Args:
        store: the queues to use; a new private store when omitted.
        options: typed options; defaults when omitted.
        url: the URL shown by ``repr`` (password masked).
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.AT_LEAST_ONCE,
            Capability.DELAYED_DELIVERY,
            Capability.PRIORITY,
            Capability.DEAD_LETTER,
            Capability.LEASE_EXTENSION,
            Capability.QUEUE_SIZE,
        }
    )

    def __init__(
        self,
        store: MemoryStore | None = None,
        options: MemoryBrokerOptions | None = None,
        *,
        url: str = "memory://",
    ) -> None:
        self.store = store if store is not None else MemoryStore()
        self.options = options if options is not None else MemoryBrokerOptions()
        self.url = url
        self._lease = self.options.lease_seconds
        self._held: dict[int, _Receipt] = {}
        self._closed = False

    @classmethod
    def from_url(
        cls, url: str, *, store: MemoryStore | None = None, **options: Any
    ) -> MemoryBroker:
        """Build a broker from ``memory://[?lease_seconds=...]``.

        Args:
            url: a ``memory://`` URL; host, path and credentials are ignored.
            store: share queues with other brokers on this store; a new private store when
                omitted (``memory://`` never means a process-wide singleton).
            **options: override the URL's query; see :class:`MemoryBrokerOptions`.

        Raises:
            InvalidURL: not a ``memory://`` URL.
            ConfigurationError: unknown option (with a did-you-mean) or a bad value.
        """
        parsed = parse_url(url)
        if parsed.scheme != "memory":
            raise InvalidURL(f"{parsed.masked()!r} is not a memory:// URL")
        opts = build_options(MemoryBrokerOptions, parsed.query, options, owner=_OWNER)
        return cls(store, opts, url=url)

    def sibling(self, **options: Any) -> MemoryBroker:
        """A new open broker on the same store (a second consumer of the same queues).

        ``options`` override this broker's options.
        """
        merged = {**dataclasses.asdict(self.options), **options}
        return MemoryBroker(
            self.store, build_options(MemoryBrokerOptions, None, merged, owner=_OWNER), url=self.url
        )

    # ---- required primitives
    def declare_queue(self, name: str) -> None:
        """Create queue ``name`` if missing. Idempotent, non-blocking.

        Raises:
            ConfigurationError: invalid name. ConnectionLost: closed.
        """
        store = self.store
        with store._lock:
            self._check_open()
            store._queue(name)

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Append ``envelope`` to ``queue`` (after ``delay`` seconds). Non-blocking.

        Raises:
            ConfigurationError: priority outside 0-9, negative delay, invalid queue name.
            ConnectionLost: this broker or its store is closed.
        """
        self._check_publish(envelope, delay)
        if delay:
            check_delay(delay, EXACT_MS_MAX_DELAY, "the memory broker", _DELAY_WHY)
        store = self.store
        with store._lock:
            self._check_open()
            q = store._queue(queue)
            message = _Message(envelope)
            if delay:
                heapq.heappush(q.delayed, (monotonic() + delay, next(store._seq), message))
            else:
                q.ready[envelope.priority].append(message)
                q.mask |= 1 << envelope.priority
            if q.waiting:
                store._cond.notify_all()

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Publish all of ``envelopes`` in order under one lock acquisition. All or nothing:
        every envelope is checked before any is enqueued.

        Returns:
            How many were published.
        """
        batch = list(envelopes)
        for envelope in batch:
            self._check_publish(envelope, delay)
        if delay:
            check_delay(delay, EXACT_MS_MAX_DELAY, "the memory broker", _DELAY_WHY)
        store = self.store
        with store._lock:
            self._check_open()
            q = store._queue(queue)
            if delay:
                due = monotonic() + delay
                delayed = q.delayed
                seq = store._seq
                for envelope in batch:
                    heapq.heappush(delayed, (due, next(seq), _Message(envelope)))
            else:
                ready = q.ready
                mask = 0
                for envelope in batch:
                    ready[envelope.priority].append(_Message(envelope))
                    mask |= 1 << envelope.priority
                q.mask |= mask
            if batch and q.waiting:
                store._cond.notify_all()
        return len(batch)

    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Hold up to ``max_messages`` ready messages from ``queues``.

        Blocks (on the store's condition) until at least one is ready or ``timeout`` seconds
        pass; ``timeout=0`` polls. Higher priority first, then queue order.

        Raises:
            ConfigurationError: no queues, invalid name, ``max_messages`` < 1, negative timeout.
            ConnectionLost: closed (also when closed while waiting).
        """
        names = self._check_receive(queues, max_messages, timeout)
        store = self.store
        maintain = store._maintain
        with store._lock:
            self._check_open()
            qs = [store._queue(name) for name in names]
            now = monotonic()
            deadline = now + timeout
            while True:
                next_event = math.inf
                for q in qs:
                    event = maintain(q, now)
                    if event < next_event:
                        next_event = event
                out = store._take(qs, max_messages, now, self._lease, self._held)
                if out or now >= deadline:
                    return out
                for q in qs:
                    q.waiting += 1
                try:
                    store._cond.wait(min(deadline, next_event, now + _MAX_WAIT) - now)
                finally:
                    for q in qs:
                        q.waiting -= 1
                self._check_open()
                now = monotonic()

    def ack(self, delivery: Delivery) -> None:
        """The message is gone for good. Idempotent (settling twice is a no-op).

        Raises:
            InvalidReceipt: the lease was lost (expired and taken back, or the holder closed);
                the message was not lost, it is (or was) delivered again.
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        with self.store._lock:
            self._check_open()
            if receipt.state == _HELD:
                self.store._settle(receipt, _ACKED)
            elif receipt.state == _LOST:
                raise InvalidReceipt(f"lease on message {delivery.envelope.id!r} was lost")

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Give the message back: ready again (``requeue``), else to the dead-letter queue.

        Idempotent (settling twice is a no-op).

        Raises:
            InvalidReceipt: the lease was lost; see :meth:`ack`.
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        store = self.store
        with store._lock:
            self._check_open()
            if receipt.state == _LOST:
                raise InvalidReceipt(f"lease on message {delivery.envelope.id!r} was lost")
            if receipt.state != _HELD:
                return
            message = receipt.message
            if not requeue:  # built before settling: nothing below may fail half-way
                envelope = message.envelope
                headers = {
                    **_headers_of(envelope),
                    DEAD_LETTER_REASON_HEADER: clean_reason(reason),
                    DEAD_LETTER_SOURCE_HEADER: receipt.queue.name,
                }
                dead = _Message(dataclasses.replace(envelope, headers=headers))
            store._settle(receipt, _REJECTED)
            if requeue:
                target = receipt.queue
                target.ready[message.envelope.priority].appendleft(message)
                target.mask |= 1 << message.envelope.priority
            else:
                # The dead-letter queue of a 200-character name is longer than a user name
                # may be; it is created internally, so skip validation rather than refuse.
                name = receipt.queue.name + DEAD_LETTER_SUFFIX
                target = store._queues.get(name) or store._queues.setdefault(name, _Queue(name))
                target.ready[envelope.priority].append(dead)
                target.mask |= 1 << envelope.priority
            if target.waiting:
                store._cond.notify_all()

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; return how many. Held messages
        are untouched (an expired lease counts as ready). Non-blocking.

        Raises:
            ConfigurationError: invalid name. ConnectionLost: closed.
        """
        store = self.store
        with store._lock:
            self._check_open()
            q = store._queues.get(queue)
            if q is None:
                validate_queue_name(queue)
                return 0
            store._maintain(q, monotonic())
            count = q.ready_count() + len(q.delayed)
            for fifo in q.ready:
                fifo.clear()
            q.mask = 0
            q.delayed.clear()
            return count

    def close(self) -> None:
        """Release this broker's held messages (ready again at the front, ``redelivered``).

        Idempotent; afterwards every other method raises :class:`ConnectionLost`. Wakes this
        broker's blocked ``receive`` calls, which then raise ``ConnectionLost``.
        """
        store = self.store
        with store._lock:
            if self._closed:
                return
            self._closed = True
            store._release(list(self._held.values()))
            store._cond.notify_all()

    # ---- optional capabilities
    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Keep ``delivery`` held until ``seconds`` from now. Non-blocking.

        Raises:
            InvalidReceipt: no longer held (settled, or lease lost).
            ConfigurationError: ``seconds`` negative or not finite.
            ConnectionLost: this broker is closed.
        """
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ConfigurationError(f"seconds must be a finite number >= 0, got {seconds!r}")
        receipt = self._receipt(delivery)
        with self.store._lock:
            self._check_open()
            if receipt.state != _HELD:
                raise InvalidReceipt(f"message {delivery.envelope.id!r} is no longer held")
            receipt.deadline = deadline = monotonic() + seconds
            heapq.heappush(receipt.queue.leases, (deadline, receipt.token))

    def size(self, queue: str) -> int:
        """Count the ready messages of ``queue`` (not held, not delayed). Non-blocking.

        Raises:
            ConfigurationError: invalid name. ConnectionLost: closed.
        """
        store = self.store
        with store._lock:
            self._check_open()
            q = store._queues.get(queue)
            if q is None:
                validate_queue_name(queue)
                return 0
            store._maintain(q, monotonic())
            return q.ready_count()

    # ---- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")
        if self.store._closed:
            raise ConnectionLost(f"the memory store of {self!r} is closed")

    def _receipt(self, delivery: Delivery) -> _Receipt:
        receipt = delivery.receipt
        if type(receipt) is not _Receipt or receipt.store is not self.store:
            self._check_open()
            raise InvalidReceipt(
                f"delivery of {delivery.envelope.id!r} was not received from this memory store"
            )
        return receipt
