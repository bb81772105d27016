"""AMQP broker, part 3: :class:`AMQPBroker` itself (construction, publish, receive, purge,
size, close) and :class:`AMQPPriorityBroker`.

The semantics are in :mod:`conveyor.transports.amqp` (the package docstring) and
``docs/stores/amqp.md``; the layers below are :mod:`~conveyor.transports.amqp.topology` and
:mod:`~conveyor.transports.amqp.consumers`, the connection is
:class:`~conveyor._drivers.amqp.link.AMQPLink`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from conveyor._drivers.amqp.errors import LinkDown
from conveyor._drivers.amqp.link import AMQPLink, Op, rpc
from conveyor._drivers.amqp.options import (
    AMQPEndpoint,
    check_message_size,
    parse_amqp_url,
    redact_url,
)
from conveyor.core.capabilities import Capability
from conveyor.core.errors import ConfigurationError, ConnectionLost, QueueNotFound
from conveyor.core.options import build_options
from conveyor.core.types import Delivery, Envelope

from .consumers import _BUFFERED, _LOST, _SETTLED, AMQPConsumers, _Consumer, _Receipt
from .topology import (
    DELAY_LEVELS,
    MAX_PREFETCH,
    AMQPBrokerOptions,
    check_name,
    delay_queue_name,
)

__all__ = ["AMQPBroker", "AMQPPriorityBroker"]


class AMQPBroker(AMQPConsumers):
    """RabbitMQ broker on pika; see :mod:`conveyor.transports.amqp` for semantics.

    Args:
        endpoints: hosts in failover order (:func:`parse_amqp_url`).
        options: :class:`AMQPBrokerOptions`; defaults when None. ``max_priority`` needs
            :class:`AMQPPriorityBroker` (which :meth:`from_url` picks for you).
        url: the URL, for ``repr`` (password masked).
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.AT_LEAST_ONCE,
            Capability.LEASE_EXTENSION,
            Capability.DELAYED_DELIVERY,
            Capability.DEAD_LETTER,
            Capability.QUEUE_SIZE,
            Capability.DURABLE,
            Capability.CROSS_PROCESS,
        }
    )

    def __init__(
        self,
        endpoints: Sequence[AMQPEndpoint],
        options: AMQPBrokerOptions | None = None,
        *,
        url: str = "",
    ) -> None:
        self.options = options or AMQPBrokerOptions()
        wants_priority = Capability.PRIORITY in self.capabilities
        if wants_priority != (self.options.max_priority is not None):
            raise ConfigurationError(
                "max_priority needs AMQPPriorityBroker (AMQPBroker.from_url picks it)"
                if not wants_priority
                else "AMQPPriorityBroker needs the max_priority option"
            )
        self.url = url or ";".join(str(e) for e in endpoints)
        tick = min(1.0, max(0.05, self.options.lease_seconds / 10))
        self._link = AMQPLink(
            endpoints, self.options, name="conveyor-amqp-broker", url=self.url, tick_interval=tick
        )
        self._link.on_ready = self._on_ready
        self._link.on_lost = self._on_lost
        self._link.on_channel_reset = self._on_channel_reset
        self._link.on_consumer_cancelled = self._on_consumer_cancelled
        self._link.on_tick = self._expire_leases
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._seq = itertools.count()
        # Guarded by _cond (shared with the I/O thread).
        self._buffers: dict[str, list[tuple[int, int, Delivery]]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._held: set[_Receipt] = set()
        self._declared_gen = 0
        self._declared: set[str] = set()
        self._delay_ready: set[tuple[str, int]] = set()
        self._delay_base_ready = False
        self._known: set[str] = set()
        self._warned_timeout: set[int] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_url(cls, url: str, **options: Any) -> AMQPBroker:
        """Build a broker from an AMQP URL; options override the URL's query.

        Does not connect: the first operation does (and fails fast if RabbitMQ cannot be
        reached). Returns an :class:`AMQPPriorityBroker` when ``max_priority`` is set.

        Raises:
            InvalidURL: not an AMQP URL.
            ConfigurationError: unknown option or bad value.
        """
        endpoints, query = parse_amqp_url(url)
        opts = build_options(AMQPBrokerOptions, query, options, owner="amqp broker")
        chosen: type[AMQPBroker] = AMQPPriorityBroker if opts.max_priority else AMQPBroker
        if cls is AMQPPriorityBroker and chosen is not AMQPPriorityBroker:
            raise ConfigurationError("AMQPPriorityBroker needs the max_priority option")
        return chosen(endpoints, opts, url=url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)!r}>"

    @property
    def link(self) -> AMQPLink:
        """The connection this broker owns (for tests and diagnostics)."""
        return self._link

    def publish(self, envelope: Envelope, *, queue: str, delay: float | None = None) -> None:
        """Publish and wait for RabbitMQ's confirm (declaring the queue on first use).

        Blocks for one round trip (shared with concurrent publishers). A delayed message is
        routed into the delay levels and stays in RabbitMQ until due.

        Raises:
            UnsupportedFeature: priority > 0 on :class:`AMQPBroker` (use ``max_priority``).
            ConfigurationError: bad queue, priority or delay; inequivalent queue in RabbitMQ.
            EncodeError: a header value AMQP field tables cannot carry, or a body over
                ``max_message_size`` (nothing of the batch is sent).
            OperationalError: not confirmed within ``operation_timeout``.
            ConnectionLost: the broker is closed or RabbitMQ unreachable.
        """
        self.publish_many([envelope], queue=queue, delay=delay)

    def publish_many(
        self, envelopes: Iterable[Envelope], *, queue: str, delay: float | None = None
    ) -> int:
        """Publish every envelope, then wait once for all confirms.

        Returns:
            How many were published (all of them; on error, a prefix or none may be in).
        """
        self._check_open()
        check_name(queue)
        batch = list(envelopes)
        limit = self.options.max_message_size
        for envelope in batch:
            self._check_publish(envelope, delay)
            check_message_size(envelope.body, limit, f"message {envelope.id}")
        if not batch:
            return 0
        deadline = self._deadline()
        exchange, key = self._route(queue, delay, deadline)
        entries = [(exchange, key, e.body, self._properties(e)) for e in batch]
        self._link.publish(entries, deadline)
        return len(batch)

    # ------------------------------------------------------------------ receive
    def receive(
        self, queues: str | Sequence[str], *, max_messages: int = 1, timeout: float = 1.0
    ) -> list[Delivery]:
        """Hand out up to ``max_messages`` deliveries, each held under a lease.

        Starts (or resumes) a consumer per queue, then waits up to ``timeout`` seconds for
        the first delivery. Order: higher priority first, then the order of ``queues``, then
        arrival. While the connection is down it waits for the reconnect within ``timeout``
        and returns ``[]``; it raises once the outage outlasts ``operation_timeout``.

        Raises:
            ConfigurationError: no queue, a bad name, ``max_messages`` < 1, ``timeout`` < 0.
            ConnectionLost: the broker is closed, never connected, or a long outage.
        """
        self._check_open()
        names = self._check_receive(queues, max_messages, timeout)
        start = time.monotonic()
        deadline = start + timeout
        got = self._screen(self._take(names, max_messages))
        if got:
            return got
        op_timeout = self.options.operation_timeout
        try:
            # A first connection may take its time; a reconnect is waited for only as long
            # as this call may block.
            self._link.await_open(deadline if self._link.ever_connected else start + op_timeout)
            if self._needs_consumers(names):
                op_deadline = time.monotonic() + op_timeout
                self._ensure_queues(names, op_deadline)
                prefetch = min(self.options.prefetch_count or max_messages, MAX_PREFETCH)
                self._link.run_op(self._op_consume(names, prefetch), op_deadline)
        except LinkDown:
            return []  # dropped meanwhile: the next call waits for the reconnect
        except ConnectionLost:
            link = self._link
            if self._closed or not link.ever_connected or link.down_for() > op_timeout:
                raise
            return []
        while True:
            with self._cond:
                while True:
                    got = self._take_locked(names, max_messages)
                    remaining = deadline - time.monotonic()
                    if got or remaining <= 0 or self._closed:
                        break
                    self._cond.wait(remaining)
            got = self._screen(got)
            if got or deadline <= time.monotonic() or self._closed:
                break
        if not got:
            self._check_open()
        return got

    # ------------------------------------------------------------------ purge, size
    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; return how many.

        Deliveries this broker buffered but did not hand out count as ready and are
        removed too; held deliveries are not touched. Blocks for a few dozen round trips
        (it looks for every delay level).

        Raises:
            ConnectionLost: the broker is closed or RabbitMQ unreachable.
        """
        self._check_open()
        check_name(queue)
        deadline = self._deadline()
        return self._link.run_op_retrying(lambda: self._op_purge(queue), deadline)

    def _op_purge(self, queue: str) -> Op[int]:
        link = self._link
        with self._cond:
            consumer = self._consumers.get(queue)
            pause = consumer is not None and consumer.active and consumer.credit > 0
            if pause and consumer is not None:
                consumer.active = False
        if pause and consumer is not None:
            # Deliveries in flight to a consumer with credit would escape the purge; after
            # cancel-ok none can arrive (pika returns the in-between ones to the queue).
            yield rpc("con", "basic_cancel", consumer.tag)
        count = 0
        # Downstream order (highest level first, the queue last): a message moving between
        # levels meanwhile is caught further down.
        for level in reversed(range(DELAY_LEVELS)):
            count += yield from self._purge_one(delay_queue_name(queue, level), passive=True)
        count += yield from self._purge_one(queue, passive=False)
        with self._cond:
            buffered = self._buffers.pop(queue, [])
            drop = []
            for _p, _s, delivery in buffered:
                receipt: _Receipt = delivery.receipt
                if receipt.state == _BUFFERED:
                    receipt.state = _SETTLED
                    receipt.consumer.outstanding -= 1
                    drop.append(receipt)
        channel = link.channel("con")
        epoch = link.epoch("con")
        for receipt in drop:
            if channel is not None and receipt.epoch == epoch:
                channel.basic_ack(receipt.tag)
                count += 1
        return count

    def _purge_one(self, name: str, *, passive: bool) -> Op[int]:
        try:
            if passive:
                yield rpc("adm", "queue_declare", name, passive=True)
            frame = yield rpc("adm", "queue_purge", name)
        except QueueNotFound:
            return 0
        return int(frame.method.message_count)

    def size(self, queue: str) -> int:
        """Ready messages of ``queue``: RabbitMQ's count plus this broker's undelivered
        buffer (delayed and held messages are not counted). 0 for a missing queue."""
        self._check_open()
        check_name(queue)
        deadline = self._deadline()
        total = previous = -1
        for _attempt in range(30):
            ready = self._link.run_op_retrying(lambda: self._op_size(queue), deadline)
            with self._cond:
                buffered = len(self._buffers.get(queue, ()))
                consumer = self._consumers.get(queue)
                credit = consumer.credit if consumer is not None else 0
            total = ready + buffered
            # With credit left, RabbitMQ may be sending us one of `ready` right now (counted
            # by neither side); quorum queues also report a count a few ms stale after a
            # delivery. Answer once two samples agree and nothing can be in flight.
            settled = not (ready and credit > 0)
            if settled and total == previous:
                break
            previous = total if settled else -1
            time.sleep(0.01)
        return total

    def _op_size(self, queue: str) -> Op[int]:
        try:
            frame = yield rpc("adm", "queue_declare", queue, passive=True)
        except QueueNotFound:
            return 0
        return int(frame.method.message_count)

    def close(self) -> None:
        """Close the connection: RabbitMQ requeues every held and buffered delivery
        (``redelivered``). Idempotent. Later calls raise :class:`ConnectionLost`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._link.close()
        with self._cond:
            for receipt in self._held:
                receipt.state = _LOST
            self._held.clear()
            self._buffers.clear()
            self._consumers.clear()


class AMQPPriorityBroker(AMQPBroker):
    """:class:`AMQPBroker` on queues declared with ``x-max-priority`` (the ``max_priority``
    option): declares ``priority`` (higher first, FIFO within one priority)."""

    capabilities: ClassVar[frozenset[Capability]] = AMQPBroker.capabilities | {Capability.PRIORITY}
