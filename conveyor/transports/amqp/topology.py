"""AMQP broker, part 1: declarations, routing, dead-letter and delay topology.

The queue, exchange and binding declarations equal Celery's defaults; delays pass through
TTL queues per target queue and level; dead letters are published copies to ``<q>.dead``.
The semantics are in :mod:`conveyor.transports.amqp` (the package docstring) and
``docs/stores/amqp.md``. :class:`AMQPTopology` is the lowest layer of
:class:`~conveyor.transports.amqp.broker.AMQPBroker` (which sets the state it declares).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from conveyor._drivers.amqp.errors import said
from conveyor._drivers.amqp.fields import Properties
from conveyor._drivers.amqp.link import AMQPLink, Op, fire, rpc
from conveyor._drivers.amqp.options import AMQPConnectionOptions, check_positive
from conveyor.core.base import BrokerBase, validate_queue_name
from conveyor.core.errors import ConfigurationError, ConnectionLost, ConveyorError, OperationalError
from conveyor.core.types import Delivery, Envelope
from conveyor.transports._common import (
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SOURCE_HEADER,
    DEAD_LETTER_SUFFIX,
    MAX_ORIGINAL_CHARS,
    ORIGINAL_HEADER,
    check_delay,
    clean_text,
)

__all__ = [
    "DELAY_EXCHANGE_PREFIX",
    "DELAY_LEVELS",
    "DELAY_RESOLUTION",
    "MAX_DELAY",
    "AMQPBrokerOptions",
    "AMQPTopology",
    "delay_queue_name",
]

log = logging.getLogger("conveyor.transports.amqp")

#: Delays are counted in steps of this many seconds (rounded up).
DELAY_RESOLUTION = 0.1
#: Number of TTL levels: level L holds a message for ``DELAY_RESOLUTION * 2**L`` seconds.
DELAY_LEVELS = 32
#: The longest delay ``publish`` accepts, in seconds (about 13.6 years).
MAX_DELAY = DELAY_RESOLUTION * (2**DELAY_LEVELS - 1)
#: Topic exchanges ``conveyor.delay.<L>`` and ``conveyor.delay.deliver``.
DELAY_EXCHANGE_PREFIX = "conveyor.delay."

_DELAY_WHY = "a delay passes through 32 TTL queues of 0.1 s x 2**level"
_DELIVER_EXCHANGE = DELAY_EXCHANGE_PREFIX + "deliver"
_DELAY_QUEUE_INFIX = ".conveyor.delay."
_MAX_NAME_BYTES = 255
MAX_PREFETCH = 65535
# Headers RabbitMQ adds that are not part of the envelope.
_DEATH_SUMMARY_KEYS = (
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)


@dataclass(frozen=True)
class AMQPBrokerOptions(AMQPConnectionOptions):
    """Options of :class:`AMQPBroker` (seconds as float). Connection fields: see the base.

    Attributes:
        lease_seconds: a delivery not acked, rejected or extended within this many seconds is
            given back to RabbitMQ (requeued, ``redelivered``).
        prefetch_count: ``basic.qos`` of each consumer; None: the ``max_messages`` of the
            ``receive`` call that starts the consumer (the worker's first call asks for its
            whole in-flight limit).
        max_priority: declare queues with ``x-max-priority`` (1-255) and accept priorities;
            :meth:`AMQPBroker.from_url` then returns an :class:`AMQPPriorityBroker`.
        queue_type: ``classic`` (Celery's default) or ``quorum`` (``x-queue-type``).
        dead_letter: ``publish`` (copy to ``<q>.dead`` then ack; no queue argument) or
            ``dlx`` (also the queue arguments ``x-dead-letter-exchange``/``-routing-key``,
            for what RabbitMQ dead-letters itself; ``reject`` still publishes the copy).
        delivery_limit: quorum queues only: ``x-delivery-limit`` (RabbitMQ drops, or with
            ``dlx`` dead-letters, a message returned more often).
        consumer_timeout: the server's ``consumer_timeout`` in seconds, only used to warn
            when a delivery is held close to it (None: never warn).
    """

    lease_seconds: float = 60.0
    prefetch_count: int | None = None
    max_priority: int | None = None
    queue_type: str = "classic"
    dead_letter: str = "publish"
    delivery_limit: int | None = None
    consumer_timeout: float | None = 1800.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("lease_seconds", self.lease_seconds)
        if self.prefetch_count is not None and not 1 <= self.prefetch_count <= MAX_PREFETCH:
            raise ConfigurationError(f"prefetch_count must be 1-{MAX_PREFETCH}")
        if self.max_priority is not None and not 1 <= self.max_priority <= 255:
            raise ConfigurationError(f"max_priority must be 1-255, got {self.max_priority}")
        if self.queue_type not in ("classic", "quorum"):
            raise ConfigurationError(f"queue_type must be classic or quorum: {self.queue_type!r}")
        if self.queue_type == "quorum" and self.max_priority is not None:
            raise ConfigurationError("RabbitMQ quorum queues do not support x-max-priority")
        if self.dead_letter not in ("publish", "dlx"):
            raise ConfigurationError(f"dead_letter must be publish or dlx: {self.dead_letter!r}")
        if self.delivery_limit is not None:
            if self.queue_type != "quorum":
                raise ConfigurationError("delivery_limit needs queue_type='quorum'")
            if self.delivery_limit < 1:
                raise ConfigurationError("delivery_limit must be >= 1")
        if self.consumer_timeout is not None:
            check_positive("consumer_timeout", self.consumer_timeout)


def _strip_delay_deaths(headers: dict[str, Any]) -> None:
    """Remove the dead-lettering records the delay hops added (they are not the sender's)."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return
    kept = [
        d
        for d in deaths
        if not (
            isinstance(d, dict)
            and str(d.get("exchange", "")).startswith(DELAY_EXCHANGE_PREFIX)
            and d.get("reason") == "expired"
        )
    ]
    if len(kept) == len(deaths):
        return
    if kept:
        headers["x-death"] = kept
        for key in _DEATH_SUMMARY_KEYS:
            if str(headers.get(key, "")).startswith(DELAY_EXCHANGE_PREFIX):
                headers.pop(key, None)
    else:
        headers.pop("x-death", None)
        for key in _DEATH_SUMMARY_KEYS:
            headers.pop(key, None)


def _target_token(queue: str) -> str:
    """One topic word naming ``queue`` in delay routing keys (queue names may hold dots)."""
    return hashlib.sha256(queue.encode("utf-8")).hexdigest()[:24]


def delay_queue_name(queue: str, level: int) -> str:
    """The TTL queue holding ``queue``'s delayed messages at ``level``."""
    name = f"{queue}{_DELAY_QUEUE_INFIX}{level}"
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = f"conveyor.delay.{_target_token(queue)}.{level}"
    return name


def _delay_exchange(level: int) -> str:
    return _DELIVER_EXCHANGE if level < 0 else f"{DELAY_EXCHANGE_PREFIX}{level}"


def _delay_units(delay: float) -> int:
    units = math.ceil(delay / DELAY_RESOLUTION - 1e-9)
    if units >= 2**DELAY_LEVELS:
        raise ConfigurationError(
            f"delay {delay:g}s is longer than the longest supported delay ({MAX_DELAY:.0f}s)"
        )
    return max(units, 1)


def _routing_key(units: int, token: str) -> str:
    bits = format(units, f"0{DELAY_LEVELS}b")
    return ".".join(bits) + "." + token


def _pattern(level: int, bit: str, tail: str) -> str:
    """Topic pattern matching ``bit`` at ``level`` (any bits above), then ``tail``."""
    return "*." * (DELAY_LEVELS - 1 - level) + bit + "." + tail


def check_name(name: str) -> None:
    validate_queue_name(name)
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES - len(DEAD_LETTER_SUFFIX):
        raise ConfigurationError(
            f"queue name {name[:40]!r}... is longer than RabbitMQ allows "
            f"({_MAX_NAME_BYTES} bytes, with room for {DEAD_LETTER_SUFFIX!r})"
        )
    if name.startswith("amq."):
        raise ConfigurationError(f"queue names starting with 'amq.' are reserved: {name!r}")


class AMQPTopology(BrokerBase):
    """Declarations (cached per connection), delay levels, the publish route and the
    dead-letter copies of :class:`~conveyor.transports.amqp.broker.AMQPBroker`."""

    options: AMQPBrokerOptions
    _link: AMQPLink
    _cond: threading.Condition
    _closed: bool
    _declared_gen: int
    _declared: set[str]
    _delay_ready: set[tuple[str, int]]
    _delay_base_ready: bool
    _known: set[str]

    def _deadline(self) -> float:
        return time.monotonic() + self.options.operation_timeout

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self!r} is closed")

    # ------------------------------------------------------------------ queues
    def declare_queue(self, name: str) -> None:
        """Declare exchange ``name`` (direct, durable), queue ``name`` (durable, Celery's
        arguments) and the binding, as Celery does. Idempotent; cached per connection.

        Raises:
            ConfigurationError: bad name, or RabbitMQ has the queue with other arguments
                (406 PRECONDITION_FAILED: compare with the Celery side's settings).
            ConnectionLost: RabbitMQ cannot be reached; the broker is closed.
        """
        self._check_open()
        check_name(name)
        self._ensure_queues([name], self._deadline())

    def _queue_arguments(self, name: str) -> dict[str, Any]:
        opts = self.options
        args: dict[str, Any] = {}
        if opts.max_priority is not None:
            args["x-max-priority"] = opts.max_priority
        if opts.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if opts.delivery_limit is not None:
                args["x-delivery-limit"] = opts.delivery_limit
        if self._uses_dlx(name):
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = self.dead_letter_queue(name)
        return args

    def _uses_dlx(self, name: str) -> bool:
        # Dead-letter queues are terminal for RabbitMQ's DLX (no q.dead.dead chain of
        # declarations); rejecting from one falls back to the publish method.
        return self.options.dead_letter == "dlx" and not name.endswith(DEAD_LETTER_SUFFIX)

    def _fresh_cache(self) -> None:
        """Forget what was declared on an earlier connection (caller holds _cond)."""
        generation = self._link.generation
        if generation != self._declared_gen:
            self._declared_gen = generation
            self._declared.clear()
            self._delay_ready.clear()
            self._delay_base_ready = False

    def _ensure_queues(self, names: Sequence[str], deadline: float) -> None:
        self._link.await_open(deadline)
        with self._cond:
            self._fresh_cache()
            missing = [n for n in dict.fromkeys(names) if n not in self._declared]
        if missing:
            self._link.run_op_retrying(lambda: self._op_declare(missing), deadline)

    def _op_declare(self, names: Sequence[str]) -> Op[None]:
        generation = self._link.generation
        for name in names:
            if self._uses_dlx(name):
                yield from self._declare_steps(self.dead_letter_queue(name))
            yield from self._declare_steps(name)
        with self._cond:
            if self._declared_gen == generation:
                for name in names:
                    self._declared.add(name)
                    if self._uses_dlx(name):
                        self._declared.add(self.dead_letter_queue(name))

    def _declare_steps(self, name: str) -> Op[None]:
        args = self._queue_arguments(name)
        yield rpc("adm", "exchange_declare", name, "direct", durable=True)
        yield rpc("adm", "queue_declare", name, durable=True, arguments=args)
        yield rpc("adm", "queue_bind", name, name, routing_key=name)
        with self._cond:
            self._known.add(name)

    # ------------------------------------------------------------------ delayed topology
    def _ensure_delay(self, queue: str, levels: Sequence[int], deadline: float) -> None:
        self._link.await_open(deadline)
        with self._cond:
            self._fresh_cache()
            base = self._delay_base_ready
            missing = [lv for lv in levels if (queue, lv) not in self._delay_ready]
        if base and not missing:
            return
        self._link.run_op_retrying(lambda: self._op_delay(queue, missing, not base), deadline)

    def _op_delay(self, queue: str, levels: Sequence[int], base: bool) -> Op[None]:
        generation = self._link.generation
        if base:
            for level in range(-1, DELAY_LEVELS):
                exchange = _delay_exchange(level)
                yield fire("adm", "exchange_declare", exchange, "topic", durable=True)
            for level in range(DELAY_LEVELS):
                # A zero bit at this level passes the message on to the next level down.
                source, destination = _delay_exchange(level), _delay_exchange(level - 1)
                key = _pattern(level, "0", "#")
                yield fire("adm", "exchange_bind", destination, source, routing_key=key)
        token = _target_token(queue)
        if levels:
            # The last hop: from the deliver exchange into the target queue.
            yield fire("adm", "queue_bind", queue, _DELIVER_EXCHANGE, routing_key="#." + token)
        for level in levels:
            name = delay_queue_name(queue, level)
            args: dict[str, Any] = {
                "x-message-ttl": round(DELAY_RESOLUTION * 1000) * 2**level,
                "x-dead-letter-exchange": _delay_exchange(level - 1),
            }
            if self.options.queue_type == "quorum":
                args["x-queue-type"] = "quorum"
            key = _pattern(level, "1", "*." * level + token)
            yield fire("adm", "queue_declare", name, durable=True, arguments=args)
            yield fire("adm", "queue_bind", name, _delay_exchange(level), routing_key=key)
            with self._cond:
                self._known.add(name)
        # One awaited step: every pipelined one before it succeeded if this one returns.
        yield rpc("adm", "exchange_declare", _DELIVER_EXCHANGE, passive=True)
        with self._cond:
            if self._declared_gen == generation:
                self._delay_base_ready = True
                self._delay_ready.update((queue, lv) for lv in levels)

    # ------------------------------------------------------------------ publish
    def _properties(self, envelope: Envelope, headers: Mapping[str, Any] | None = None) -> Any:
        hdrs = dict(envelope.headers if headers is None else headers)
        # Celery sends no message_id: the task id travels in the `id` header and
        # correlation_id. Only envelopes whose id is neither carry it as message_id.
        message_id = None if hdrs.get("id") == envelope.id else envelope.id
        return Properties(
            content_type=envelope.content_type,
            content_encoding=envelope.content_encoding,
            headers=hdrs,
            delivery_mode=2,
            priority=envelope.priority,
            correlation_id=envelope.correlation_id,
            reply_to=envelope.reply_to,
            message_id=message_id,
        )

    def _route(self, queue: str, delay: float | None, deadline: float) -> tuple[str, str]:
        """Declare what a publish to ``queue`` needs; return (exchange, routing key)."""
        if not delay or delay <= 0:
            self._ensure_queues([queue], deadline)
            return "", queue
        check_delay(delay, MAX_DELAY, "the AMQP broker", _DELAY_WHY)
        units = _delay_units(delay)
        levels = [lv for lv in range(DELAY_LEVELS) if units >> lv & 1]
        self._ensure_queues([queue], deadline)
        self._ensure_delay(queue, levels, deadline)
        return _delay_exchange(max(levels)), _routing_key(units, _target_token(queue))

    def _publish_dead(self, delivery: Delivery, reason: str) -> None:
        """Publish the dead-letter copy. Only a transient failure raises: a copy RabbitMQ
        cannot take (headers past ``frame_max``, a dead-letter queue name too long) is
        replaced by a stand-in without the original headers, and failing that dropped."""
        envelope = delivery.envelope
        dead = self.dead_letter_queue(delivery.queue)
        headers = dict(envelope.headers)
        headers[DEAD_LETTER_REASON_HEADER] = reason
        headers[DEAD_LETTER_SOURCE_HEADER] = delivery.queue
        try:
            self._publish_copy(dataclasses.replace(envelope, headers=headers), dead)
            return
        except OperationalError:
            raise
        except ConveyorError as exc:
            log.error(
                "dead letter of %s refused (%s): keeping its body only", envelope.id, said(exc)
            )
        original = clean_text(repr(dict(envelope.headers)), MAX_ORIGINAL_CHARS)
        headers = {
            DEAD_LETTER_REASON_HEADER: reason,
            DEAD_LETTER_SOURCE_HEADER: delivery.queue,
            ORIGINAL_HEADER: original,
        }
        try:
            self._publish_copy(dataclasses.replace(envelope, headers=headers), dead)
        except OperationalError:
            raise
        except ConveyorError as exc:
            log.error("cannot dead-letter %s (%s): it is dropped", envelope.id, said(exc))

    def _publish_copy(self, envelope: Envelope, queue: str) -> None:
        check_name(queue.removesuffix(DEAD_LETTER_SUFFIX))
        if len(queue.encode("utf-8")) > _MAX_NAME_BYTES:
            raise ConfigurationError(f"queue name {queue[:40]!r}... is longer than 255 bytes")
        deadline = self._deadline()
        self._ensure_queues([queue], deadline)
        self._link.publish([("", queue, envelope.body, self._properties(envelope))], deadline)

    # ------------------------------------------------------------------ housekeeping
    def known_queues(self) -> set[str]:
        """Queues this broker declared (delay levels and dead-letter queues included)."""
        with self._cond:
            return set(self._known)

    def delete_queue(self, queue: str, *, dead_letters: bool = True) -> None:
        """Delete ``queue``, its exchange, its delay levels and (``dead_letters``) its
        dead-letter queue. For tests and operations; idempotent."""
        self._check_open()
        check_name(queue)
        names = [queue]
        if dead_letters:
            names.append(self.dead_letter_queue(queue))
        deadline = self._deadline()
        self._link.run_op_retrying(lambda: self._op_delete(names), deadline)
        with self._cond:
            self._declared.difference_update(names)
            self._delay_ready = {(q, lv) for q, lv in self._delay_ready if q not in names}
            self._known.difference_update(names)

    def _op_delete(self, names: Sequence[str]) -> Op[None]:
        # Deleting a missing queue or exchange is not an error in RabbitMQ: pipeline them.
        for name in names:
            for level in range(DELAY_LEVELS):
                yield fire("adm", "queue_delete", delay_queue_name(name, level))
            yield fire("adm", "queue_delete", name)
            yield fire("adm", "exchange_delete", name)
        yield rpc("adm", "exchange_declare", _DELIVER_EXCHANGE, "topic", durable=True)
