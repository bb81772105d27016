"""The publishing half of the AMQP I/O link: publisher confirms on the ``pub`` channel.

:class:`Publisher` is a base of :class:`~conveyor._drivers.amqp.link.AMQPLink` (the link
owns the state it uses); split out only to keep each module readable. Private plumbing.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from conveyor.core.errors import ConveyorError, EncodeError, OperationTimeout

from .errors import LinkDown, Nacked, said, translate_error
from .fields import Properties
from .options import AMQPConnectionOptions

__all__ = ["PubEntry", "Publisher"]

# A content header frame: 7 bytes of frame header, class id, weight, body size, frame end.
_HEADER_OVERHEAD = 7 + 2 + 2 + 8 + 1

PubEntry = tuple[str, str, bytes, Any]
"""(exchange, routing key, body, ``pika.BasicProperties``)."""


class _PubBatch:
    """Messages published together; done when every one is confirmed or one failed."""

    __slots__ = ("abandoned", "confirmed", "done", "entries", "error", "left")

    def __init__(self, entries: list[PubEntry]) -> None:
        self.entries = entries
        self.confirmed = [False] * len(entries)
        self.left = len(entries)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.abandoned = False

    def ack(self, index: int) -> None:
        if not self.confirmed[index]:
            self.confirmed[index] = True
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None and self.left:
            self.error = error
            self.done.set()


class Publisher:
    """Publisher confirms: every publish waits for RabbitMQ's confirm; concurrent publishers
    share round trips; after a reconnect the unconfirmed messages are published again."""

    if TYPE_CHECKING:
        options: AMQPConnectionOptions
        where: str
        _conn: Any
        _blocked: bool
        _pub_seq: int
        _unconfirmed: OrderedDict[int, tuple[_PubBatch, int]]
        _pub_parked: list[_PubBatch]
        _pub_lock: threading.Lock
        _pub_queue: deque[_PubBatch]
        _pub_wake: bool

        @property
        def is_open(self) -> bool: ...

        def await_open(self, deadline: float, *, fail_fast: bool = True) -> int: ...
        def call_soon(self, fn: Callable[[], None]) -> None: ...
        def channel(self, name: str) -> Any: ...
        def _down_error(self) -> ConveyorError: ...

    def publish(self, entries: Sequence[PubEntry], deadline: float) -> None:
        """Publish ``entries`` and return once RabbitMQ confirmed every one.

        If the connection drops first, the unconfirmed ones are published again on the next
        connection (so a message may arrive twice, never zero times) until ``deadline``.

        Raises:
            ConnectionLost: not reconnected by ``deadline`` (or never connected).
            OperationTimeout: confirms did not arrive by ``deadline``.
            OperationalError: RabbitMQ nacked a message.
            EncodeError: a header value AMQP cannot carry (nothing after it was sent).
        """
        todo = list(entries)
        total = len(todo)
        while todo:
            self.await_open(deadline)
            batch = _PubBatch(todo)
            self._submit(batch)
            remaining = deadline - time.monotonic()
            if not batch.done.wait(max(0.0, remaining)):
                batch.abandoned = True
                blocked = " (RabbitMQ is blocking publishers: resource alarm)"
                raise OperationTimeout(
                    f"publishing to {self.where}: {total - batch.left} of {total} messages "
                    f"confirmed within {self.options.operation_timeout:g}s"
                    f"{blocked if self._blocked else ''}; the others may or may not have "
                    "been accepted"
                )
            error = batch.error
            if error is None:
                return
            if isinstance(error, LinkDown):
                todo = [e for e, ok in zip(batch.entries, batch.confirmed, strict=True) if not ok]
                if time.monotonic() >= deadline:
                    raise error.error
                continue
            raise error

    def _submit(self, batch: _PubBatch) -> None:
        # Concurrent publishers queue their batches and wake the I/O thread once per burst
        # (one pipe write), not once per message.
        with self._pub_lock:
            self._pub_queue.append(batch)
            if self._pub_wake:
                return
            self._pub_wake = True
        self.call_soon(self._drain_batches)

    def _fail_unconfirmed(self, error: BaseException) -> None:
        pending, self._unconfirmed = self._unconfirmed, OrderedDict()
        for batch, _index in pending.values():
            batch.fail(error)

    # ------------------------------------------------------------------ I/O thread: publish
    def _drain_batches(self) -> None:
        while True:
            with self._pub_lock:
                if not self._pub_queue:
                    self._pub_wake = False
                    return
                batch = self._pub_queue.popleft()
            self._io_publish(batch)

    def _io_publish(self, batch: _PubBatch) -> None:
        if batch.abandoned or batch.done.is_set():
            return
        if not self.is_open:
            batch.fail(LinkDown(self._down_error()))
            return
        channel = self.channel("pub")
        if channel is None:
            self._pub_parked.append(batch)  # the publish channel is reopening
            return
        # The header frame must fit in one frame: RabbitMQ closes the CONNECTION over a
        # bigger one (every held delivery lost, the publish retried forever as transient).
        room = int(getattr(self._conn.params, "frame_max", 0) or 131_072) - _HEADER_OVERHEAD
        for index, (exchange, key, body, properties) in enumerate(batch.entries):
            if batch.confirmed[index]:
                continue
            try:
                if isinstance(properties, Properties):
                    size = sum(map(len, properties.encode()))
                    if size > room:
                        raise ValueError(
                            f"its properties take {size} bytes, more than RabbitMQ's "
                            f"frame_max allows ({room}): make its headers smaller"
                        )
                channel.basic_publish(exchange, key, body, properties)
            except (
                pika.exceptions.UnsupportedAMQPFieldException,
                pika.exceptions.ShortStringTooLong,
                TypeError,
                ValueError,
                OverflowError,
                RecursionError,
                struct.error,
            ) as exc:
                batch.fail(EncodeError(f"message cannot be sent over AMQP: {said(exc)}"))
                return
            except pika.exceptions.AMQPError as exc:
                batch.fail(LinkDown(translate_error(exc, what="publish")))
                return
            self._pub_seq += 1
            self._unconfirmed[self._pub_seq] = (batch, index)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        acked = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            done = []
            while self._unconfirmed:
                first = next(iter(self._unconfirmed))
                if first > tag:
                    break
                done.append(self._unconfirmed.popitem(last=False)[1])
        else:
            entry = self._unconfirmed.pop(tag, None)
            done = [entry] if entry is not None else []
        for batch, index in done:
            if acked:
                batch.ack(index)
            else:
                batch.fail(
                    Nacked("RabbitMQ refused a published message (basic.nack): it was not accepted")
                )


# ============================================================================== the broker

_BUFFERED, _HELD, _SETTLING, _SETTLED, _LOST = range(5)
