"""AMQP broker, part 2: consumers, leases, settling and delivery counting.

Deliveries arrive on the I/O thread (:meth:`AMQPConsumers._on_message`) into per-queue
buffers; ``receive`` takes them under a client-side lease, screens out those it must handle
itself (undecodable messages, classic-queue redeliveries whose count travels in a copy), and
``ack``/``reject``/``extend`` settle or prolong them. The semantics are in
:mod:`conveyor.transports.amqp` (the package docstring) and ``docs/stores/amqp.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from conveyor._drivers.amqp.errors import LinkDown, Nacked, said
from conveyor._drivers.amqp.fields import COPIED_PROPERTIES, Properties, bytes_fields, plain
from conveyor._drivers.amqp.link import Op, Rpc, rpc
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ConveyorError,
    DecodeError,
    InvalidReceipt,
    OperationalError,
    OperationTimeout,
)
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    MAX_ORIGINAL_CHARS,
    ORIGINAL_HEADER,
    UNDECODABLE_CONTENT_TYPE,
    clean_reason,
    clean_text,
    undecodable_reason,
)

from .topology import AMQPTopology, _strip_delay_deaths

__all__ = ["DELIVERIES_HEADER", "AMQPConsumers"]

log = logging.getLogger("conveyor.transports.amqp")

#: Classic queues: how many deliveries of the message came before this copy was published
#: (see "Delivery counts" in the package docstring). Removed from the envelope on receipt.
DELIVERIES_HEADER = "x-conveyor-deliveries"

_MAX_COUNT = 2**31 - 2  # x-conveyor-deliveries stays a 32-bit AMQP integer

_BUFFERED, _HELD, _SETTLING, _SETTLED, _LOST = range(5)


class _Consumer:
    __slots__ = ("active", "outstanding", "prefetch", "queue", "tag")

    def __init__(self, queue: str, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.tag = ""
        self.active = False
        self.outstanding = 0  # delivered to this consumer and not settled

    @property
    def credit(self) -> int:
        return self.prefetch - self.outstanding if self.active else 0


class _Receipt:
    """Broker-private handle of one delivery (``Delivery.receipt``)."""

    __slots__ = (
        "broker",
        "consumer",
        "deadline",
        "epoch",
        "queue",
        "received",
        "special",
        "state",
        "tag",
    )

    def __init__(self, broker: AMQPConsumers, consumer: _Consumer, epoch: int, tag: int) -> None:
        self.broker = broker
        self.consumer = consumer
        self.epoch = epoch
        self.tag = tag
        self.queue = consumer.queue
        self.state = _BUFFERED
        self.deadline = 0.0
        self.received = 0.0
        self.special: _Special | None = None  # set on the rare deliveries receive() handles

    def __repr__(self) -> str:
        return f"<AMQP receipt tag={self.tag} epoch={self.epoch} queue={self.queue!r}>"


class _Special:
    """Why receive() must handle a buffered delivery itself instead of handing it out.

    ``reason`` set: the message cannot be decoded (dead-letter a stand-in). Otherwise a
    redelivery on a classic queue whose count must be carried by a copy (``prior``: the
    deliveries its headers recorded before this one's).
    """

    __slots__ = ("body", "prior", "properties", "reason")

    def __init__(self, properties: Any, body: bytes, reason: str = "", prior: int = 0) -> None:
        self.properties = properties
        self.body = body
        self.reason = reason
        self.prior = prior


def _stand_in_envelope(properties: Any, body: bytes) -> Envelope:
    """What an undecodable delivery looks like until receive() dead-letters it (never
    handed out: only its priority and id are used, for ordering and logs)."""
    message_id = getattr(properties, "message_id", None)
    ident = message_id if type(message_id) is str else hashlib.sha256(body).hexdigest()[:32]
    return Envelope(id=ident, body=body, content_type=UNDECODABLE_CONTENT_TYPE)


def _describe(properties: Any) -> str:
    """The properties of an undecodable message as text, for the stand-in's
    :data:`ORIGINAL_HEADER` (bounded: the stand-in must fit in RabbitMQ's frame_max)."""
    fields = {}
    for name in (
        "content_type", "content_encoding", "headers", "delivery_mode", "priority",
        "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
        "user_id", "app_id", "cluster_id",
    ):  # fmt: skip
        value = getattr(properties, name, None)
        if value is not None:
            fields[name] = value
    return clean_text(repr(fields), MAX_ORIGINAL_CHARS)


class AMQPConsumers(AMQPTopology):
    """Consumers, buffers, leases and settling of
    :class:`~conveyor.transports.amqp.broker.AMQPBroker`."""

    _seq: itertools.count[int]
    _buffers: dict[str, list[tuple[int, int, Delivery]]]
    _consumers: dict[str, _Consumer]
    _held: set[_Receipt]
    _warned_timeout: set[int]

    # ------------------------------------------------------------------ link hooks (I/O)
    def _on_ready(self, generation: int) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_lost(self) -> None:
        self._drop_deliveries(None)

    def _on_channel_reset(self, name: str, old_epoch: int) -> None:
        if name == "con":
            self._drop_deliveries(old_epoch)

    def _drop_deliveries(self, epoch: int | None) -> None:
        """The consume channel (or the connection) is gone: RabbitMQ requeued everything it
        delivered there, so every receipt of it is lost and buffers are void."""
        with self._cond:
            for receipts in self._buffers.values():
                for _p, _s, delivery in receipts:
                    delivery.receipt.state = _LOST
            self._buffers.clear()
            for receipt in self._held:
                receipt.state = _LOST
            self._held.clear()
            self._consumers.clear()
            self._cond.notify_all()

    def _on_consumer_cancelled(self, tag: str) -> None:
        with self._cond:
            for consumer in self._consumers.values():
                if consumer.tag == tag:
                    consumer.active = False

    # ------------------------------------------------------------------ special deliveries
    def _screen(self, got: list[Delivery]) -> list[Delivery]:
        """Handle the taken deliveries that must not be handed out (``_Special``); return the
        others. Costs one pass over the batch when there are none."""
        if not got or all(d.receipt.special is None for d in got):
            return got
        kept = []
        for delivery in got:
            special: _Special | None = delivery.receipt.special
            if special is None:
                kept.append(delivery)
            else:
                try:
                    if special.reason:
                        self._dead_letter_undecodable(delivery, special)
                    elif self._recount(delivery, special):
                        kept.append(delivery)  # uncounted this once (see _recount)
                except Exception:  # never out of receive(): RabbitMQ has it back at worst
                    log.exception("handling a delivery of %r failed", delivery.queue)
                    self._settle_quietly(delivery, "requeue")
        return kept

    def _recount(self, delivery: Delivery, special: _Special) -> bool:
        """A redelivery from a classic queue (no ``x-delivery-count``): publish a copy whose
        :data:`DELIVERIES_HEADER` counts this delivery's predecessor, wait for its confirm,
        then ack the original. The count thus lives in RabbitMQ and survives any consumer's
        death; a crash between confirm and ack leaves a duplicate, never a loss."""
        props = special.properties
        headers = dict(props.headers or {})
        headers[DELIVERIES_HEADER] = special.prior + 1
        copy = Properties(
            headers=headers,
            **{name: getattr(props, name) for name in COPIED_PROPERTIES},
        )
        entry = ("", delivery.queue, special.body, copy)
        try:
            self._link.publish([entry], self._deadline())
        except Nacked as exc:
            # The queue takes no publish now (full, reject-publish): requeueing would spin on
            # it. Hand it out uncounted this once.
            log.warning("cannot count a redelivery of %r now: %s", delivery.queue, said(exc))
            delivery.receipt.special = None
            return True
        except OperationalError as exc:
            log.warning("could not re-publish a redelivery of %r to count it (given back "
                        "to RabbitMQ): %s", delivery.queue, said(exc))  # fmt: skip
            self._settle_quietly(delivery, "requeue")
        except ConveyorError as exc:
            # Its headers cannot take the count (frame_max): handed out, it could loop without
            # limit, so it goes to the dead letters (a copy without its headers, if need be).
            reason = clean_reason(f"its deliveries cannot be counted: {exc}")
            log.error("dead-lettering a message of %r: %s", delivery.queue, reason)
            with contextlib.suppress(InvalidReceipt, ConnectionLost, OperationalError):
                self.reject(delivery, requeue=False, reason=reason)
        else:
            self._ack_processed(delivery)
        return False

    def _dead_letter_undecodable(self, delivery: Delivery, special: _Special) -> None:
        """Publish the well-formed stand-in of an undecodable message to ``<queue>.dead``
        (its body, the reason, its properties as text), then ack it. Never raises."""
        queue = delivery.queue
        log.error("dead-lettering a message of %r: %s", queue, special.reason)
        headers = {
            DEAD_LETTER_REASON_HEADER: special.reason,
            DEAD_LETTER_SOURCE_HEADER: queue,
            ORIGINAL_HEADER: _describe(special.properties),
        }
        stand_in = Envelope(
            id=delivery.envelope.id,
            body=special.body,
            content_type=UNDECODABLE_CONTENT_TYPE,
            content_encoding="binary",
            headers=headers,
        )
        try:
            self._publish_copy(stand_in, self.dead_letter_queue(queue))
        except OperationalError as exc:
            log.warning("could not dead-letter it now (given back to RabbitMQ): %s", said(exc))
            self._settle_quietly(delivery, "requeue")
            return
        except ConveyorError as exc:  # a dead-letter queue name RabbitMQ cannot take
            log.error("could not dead-letter it: %s; it is dropped", said(exc))
        self._settle_quietly(delivery, "ack")

    def _ack_processed(self, delivery: Delivery) -> None:
        """Ack the original of a counted copy and wait until RabbitMQ has PROCESSED the ack
        (a synchronous method on the same channel is answered after it), before anything
        else is handed out: the copy may be the next delivery, and a task that kills its
        process must not find the original still unacked (a duplicate per crash). Never
        raises: if the channel closed, RabbitMQ delivers the original again (a duplicate)."""
        receipt: _Receipt = delivery.receipt
        with self._cond:
            if not self._begin_settle(receipt, delivery):
                return
        try:
            self._send_settle(receipt, delivery, "ack")
            prefetch = max(1, receipt.consumer.prefetch)
            op = self._op_barrier(prefetch)
            self._link.run_op(op, self._deadline())
        except (ConveyorError, LinkDown) as exc:
            log.info("ack of a counted redelivery not confirmed: %s", said(exc))

    @staticmethod
    def _op_barrier(prefetch: int) -> Op[None]:
        # basic.qos with the consumer's own prefetch changes nothing (it applies to consumers
        # started later) and is answered in order with the channel's other frames.
        yield rpc("con", "basic_qos", prefetch_count=prefetch)

    def _settle_quietly(self, delivery: Delivery, action: str) -> None:
        """ack or requeue a delivery receive() handled itself; a lost lease (the channel
        closed meanwhile: RabbitMQ has it back already) is no error here."""
        with contextlib.suppress(InvalidReceipt, OperationalError):
            if action == "ack":
                self.ack(delivery)
            else:
                self.reject(delivery, requeue=True)

    def _needs_consumers(self, names: Sequence[str]) -> bool:
        with self._cond:
            self._fresh_cache()
            for name in names:
                consumer = self._consumers.get(name)
                if name not in self._declared or consumer is None or not consumer.active:
                    return True
                if consumer.credit <= 0 and not self._buffers.get(name):
                    return True
        return False

    def _op_consume(self, names: Sequence[str], prefetch: int) -> Op[None]:
        link = self._link
        for name in names:
            with self._cond:
                consumer = self._consumers.get(name)
                has_room = consumer.credit > 0 if consumer is not None else False
                if has_room or (
                    consumer is not None and consumer.active and self._buffers.get(name)
                ):
                    continue
            if consumer is not None and consumer.active:
                # Full: nothing can be in flight to it, so cancelling loses nothing. Its
                # held deliveries stay valid (delivery tags belong to the channel).
                consumer.active = False
                old_tag = consumer.tag
                yield rpc("con", "basic_cancel", old_tag)
            fresh = _Consumer(name, prefetch)
            epoch = link.epoch("con")
            yield rpc("con", "basic_qos", prefetch_count=prefetch)

            def start(
                ch: Any, cb: Callable[[Any], None], c: _Consumer = fresh, e: int = epoch
            ) -> None:
                def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
                    self._on_message(c, e, method, props, body)

                c.tag = ch.basic_consume(c.queue, on_message_callback=on_message, callback=cb)

            yield Rpc("con", start)
            with self._cond:
                if link.epoch("con") == epoch and link.channel_open("con"):
                    fresh.active = True
                    self._consumers[name] = fresh
                    self._cond.notify_all()

    def _on_message(
        self, consumer: _Consumer, epoch: int, method: Any, properties: Any, body: bytes
    ) -> None:
        """I/O thread: one delivery arrived; buffer it. Never raises (an exception here would
        drop the connection, and RabbitMQ would redeliver the same message forever)."""
        if epoch != self._link.epoch("con"):
            return  # a late frame of a closed channel (cannot be acked anyway)
        receipt = _Receipt(self, consumer, epoch, method.delivery_tag)
        redelivered = bool(method.redelivered)
        try:
            envelope, count, prior = self._envelope(properties, body)
            if redelivered and self.options.queue_type != "quorum":
                # A classic queue does not count deliveries: receive() carries the count in
                # a copy (see _recount). Never on the first delivery of a message.
                receipt.special = _Special(properties, bytes(body), prior=prior)
                count = None
            redelivered = redelivered or prior > 0
        except Exception as exc:  # any shape of bad message: dead-letter it in receive()
            receipt.special = _Special(properties, bytes(body), reason=undecodable_reason(exc))
            envelope, count = _stand_in_envelope(properties, bytes(body)), None
        delivery = Delivery(
            envelope=envelope,
            queue=consumer.queue,
            receipt=receipt,
            redelivered=redelivered,
            delivery_count=count,
        )
        with self._cond:
            consumer.outstanding += 1
            heapq.heappush(
                self._buffers.setdefault(consumer.queue, []),
                (-envelope.priority, next(self._seq), delivery),
            )
            self._cond.notify_all()

    def _envelope(self, properties: Any, body: bytes) -> tuple[Envelope, int | None, int]:
        """``(envelope, delivery_count, prior)``: ``prior`` is the count conveyor's own header
        carries (classic queues); ``delivery_count`` is None for a classic redelivery.

        Raises:
            DecodeError: (or any exception) the properties are not a message conveyor can
                hand out.
        """
        raw_headers = properties.headers
        if raw_headers is not None and type(raw_headers) is not dict:
            raise DecodeError("AMQP headers are not a field table")
        headers = plain(raw_headers) if raw_headers else {}
        returned = headers.pop("x-delivery-count", None)
        recorded = headers.pop(DELIVERIES_HEADER, None)
        _strip_delay_deaths(headers)
        prior = 0
        count: int | None
        if self.options.queue_type == "quorum":
            count = int(returned) + 1 if isinstance(returned, int) else 1
        else:
            if type(recorded) is int and recorded > 0:
                prior = min(recorded, _MAX_COUNT)  # so prior + 1 always fits its header
            count = prior + 1
        message_id = properties.message_id
        correlation_id = properties.correlation_id
        reply_to = properties.reply_to
        content_type = properties.content_type
        encoding = properties.content_encoding
        # pika gives a short string it cannot decode as UTF-8 as bytes (else str or None).
        if (
            type(message_id) is bytes
            or type(correlation_id) is bytes
            or type(reply_to) is bytes
            or type(content_type) is bytes
            or type(encoding) is bytes
        ):
            raise DecodeError(
                f"AMQP properties that are not UTF-8 text: {bytes_fields(properties)}"
            )
        header_id = headers.get("id")
        envelope_id = (
            message_id
            or (header_id if isinstance(header_id, str) and header_id else None)
            or correlation_id
            or hashlib.sha256(bytes(body)).hexdigest()[:32]
        )
        envelope = Envelope(
            id=envelope_id,
            body=bytes(body),
            content_type=content_type or "",
            content_encoding=encoding or "",
            headers=headers,
            priority=min(int(properties.priority or 0), 9),  # AMQP allows 0-255; conveyor 0-9
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        return envelope, count, prior

    def _take(self, names: Sequence[str], limit: int) -> list[Delivery]:
        with self._cond:
            return self._take_locked(names, limit)

    def _take_locked(self, names: Sequence[str], limit: int) -> list[Delivery]:
        got: list[Delivery] = []
        now = time.monotonic()
        lease = self.options.lease_seconds
        while len(got) < limit:
            best: tuple[int, int, int] | None = None
            best_name = ""
            for index, name in enumerate(names):
                buffer = self._buffers.get(name)
                if buffer:
                    priority, seq, _d = buffer[0]
                    key = (priority, index, seq)
                    if best is None or key < best:
                        best, best_name = key, name
            if best is None:
                break
            _p, _s, delivery = heapq.heappop(self._buffers[best_name])
            receipt: _Receipt = delivery.receipt
            if receipt.state != _BUFFERED:
                continue
            receipt.state = _HELD
            receipt.received = now
            receipt.deadline = now + lease
            self._held.add(receipt)
            got.append(delivery)
        return got

    # ------------------------------------------------------------------ settle
    def _receipt(self, delivery: Delivery) -> _Receipt:
        self._check_open()
        receipt = delivery.receipt
        if not isinstance(receipt, _Receipt) or receipt.broker is not self:
            raise InvalidReceipt(f"delivery {delivery.envelope.id!r} was not received by {self!r}")
        return receipt

    def _begin_settle(self, receipt: _Receipt, delivery: Delivery) -> bool:
        """Move a held receipt to SETTLING (caller holds _cond). False: already settled."""
        if receipt.state in (_SETTLED, _SETTLING):
            return False
        if receipt.state != _HELD:
            raise InvalidReceipt(
                f"delivery {delivery.envelope.id!r} is no longer held (its lease ran out or "
                "the connection was lost); RabbitMQ delivers it again"
            )
        receipt.state = _SETTLING
        self._held.discard(receipt)
        return True

    def _send_settle(self, receipt: _Receipt, delivery: Delivery, action: str) -> None:
        """Send ack or requeue-reject for a SETTLING receipt (I/O thread)."""

        def io() -> bool:
            channel = self._link.channel("con")
            if channel is None or receipt.epoch != self._link.epoch("con"):
                return False
            if action == "ack":
                channel.basic_ack(receipt.tag)
            else:
                channel.basic_reject(receipt.tag, requeue=action == "requeue")
            return True

        try:
            sent = self._link.run(io, self._deadline())
        except OperationTimeout:
            sent = False
        with self._cond:
            if receipt.state == _SETTLING:
                receipt.state = _SETTLED if sent else _LOST
                if sent:
                    receipt.consumer.outstanding -= 1
        if not sent:
            self._check_open()
            raise InvalidReceipt(
                f"delivery {delivery.envelope.id!r} cannot be settled: the consume channel "
                "closed since it was received, so RabbitMQ delivers it again"
            )

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge: the message is gone for good. Idempotent.

        Raises:
            InvalidReceipt: the lease ran out or the connection was lost since the delivery
                (RabbitMQ delivers the message again); a delivery of another broker.
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        link = self._link
        with self._cond:
            if not self._begin_settle(receipt, delivery):
                return
            # basic.ack has no reply, so waiting for the I/O thread to write the frame adds
            # a thread hand-off (~250 µs here) and no guarantee: a frame written just before
            # the connection drops is lost the same way. When the channel that delivered
            # the message is still the open one, hand the frame over and return; if it
            # closes first, _ack_io drops the ack and RabbitMQ delivers the message again
            # (as after any connection loss). Otherwise settle synchronously, which reports
            # the lost delivery.
            if link.is_open and link.channel_open("con") and receipt.epoch == link.epoch("con"):
                receipt.state = _SETTLED
                receipt.consumer.outstanding -= 1
                handed_over = True
            else:
                handed_over = False
        if handed_over:
            link.call_soon(lambda: self._ack_io(receipt))
            return
        self._send_settle(receipt, delivery, "ack")

    def _ack_io(self, receipt: _Receipt) -> None:
        """I/O thread: write the ack of a receipt ``ack`` handed over."""
        channel = self._link.channel("con")
        if channel is None or receipt.epoch != self._link.epoch("con"):
            log.info(
                "ack of delivery tag %d dropped: its channel closed first (RabbitMQ delivers "
                "the message again)",
                receipt.tag,
            )
            return
        try:
            channel.basic_ack(receipt.tag)
        except Exception as exc:  # closing under us: the same as dropped
            log.info("ack of delivery tag %d dropped: %s", receipt.tag, said(exc))

    def reject(self, delivery: Delivery, *, requeue: bool = False, reason: str = "") -> None:
        """Give a delivery back (``requeue=True``) or dead-letter it. Idempotent.

        Dead-lettering publishes a copy to ``<queue>.dead`` with the ``reason`` and source
        queue in headers, waits for its confirm, then acks; with ``dead_letter="dlx"`` too
        (RabbitMQ's own move could not record the reason; see the package docstring).

        Raises:
            InvalidReceipt: as for :meth:`ack`.
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        with self._cond:
            if not self._begin_settle(receipt, delivery):
                return
        if requeue:
            self._send_settle(receipt, delivery, "requeue")
            return
        try:
            self._publish_dead(delivery, clean_reason(reason))
        except BaseException:
            with self._cond:  # not dead-lettered: the delivery is still ours to settle
                if receipt.state == _SETTLING:
                    receipt.state = _HELD
                    self._held.add(receipt)
            raise
        self._send_settle(receipt, delivery, "ack")

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Keep holding ``delivery`` for ``seconds`` from now (the client-side lease).

        RabbitMQ itself holds it as long as the consume channel lives, up to the server's
        ``consumer_timeout``; a warning is logged when a delivery gets close to it.

        Raises:
            InvalidReceipt: settled, or the lease was lost (expired, connection lost).
            ConnectionLost: this broker is closed.
        """
        receipt = self._receipt(delivery)
        if not (isinstance(seconds, (int, float)) and seconds >= 0):
            raise ConfigurationError(f"seconds must be >= 0, got {seconds!r}")
        now = time.monotonic()
        with self._cond:
            if receipt.state != _HELD:
                raise InvalidReceipt(
                    f"delivery {delivery.envelope.id!r} is not held (settled, or its lease "
                    "ran out or the connection was lost)"
                )
            receipt.deadline = now + float(seconds)
            limit = self.options.consumer_timeout
            held_for = now - receipt.received + float(seconds)
            warn = limit is not None and held_for > 0.9 * limit
            warn = warn and id(receipt) not in self._warned_timeout
            if warn:
                self._warned_timeout.add(id(receipt))
        if warn:
            log.warning(
                "delivery %s has been held %.0fs, close to RabbitMQ's consumer_timeout "
                "(%.0fs): the server will close the channel and redeliver it; raise "
                "consumer_timeout in rabbitmq.conf for tasks this long",
                delivery.envelope.id,
                now - receipt.received,
                limit,
            )

    def _expire_leases(self) -> None:
        """I/O thread tick: give back deliveries whose lease ran out."""
        now = time.monotonic()
        with self._cond:
            expired = [r for r in self._held if r.deadline <= now]
            for receipt in expired:
                self._held.discard(receipt)
                receipt.state = _LOST
                receipt.consumer.outstanding -= 1
            paused = []
            for queue in {r.queue for r in expired}:
                consumer = self._consumers.get(queue)
                if consumer is not None and consumer.active:
                    consumer.active = False  # so another consumer gets the message
                    paused.append(consumer.tag)
        if not expired:
            return
        channel = self._link.channel("con")
        epoch = self._link.epoch("con")
        if channel is not None:
            # Cancel first (same channel, so RabbitMQ applies it first): otherwise the
            # requeued message may go straight back to this consumer.
            for tag in paused:
                channel.basic_cancel(tag)
        for receipt in expired:
            log.warning(
                "lease of a delivery from %r ran out after %.1fs without ack or extend: "
                "giving it back to RabbitMQ",
                receipt.queue,
                now - receipt.received,
            )
            if channel is not None and receipt.epoch == epoch:
                channel.basic_reject(receipt.tag, requeue=True)
