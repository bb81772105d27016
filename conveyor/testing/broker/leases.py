"""Broker suite, leases: ``ack``, redelivery of what a consumer held when it closed or
vanished, expired leases, ``close`` releasing held messages, and ``extend``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from conveyor.core.errors import InvalidReceipt
from conveyor.testing.broker.base import (
    AT_LEAST_ONCE,
    LEASE_EXTENSION,
    QUEUE_SIZE,
    BrokerFactory,
    BrokerSuite,
    _collect,
    _env,
    _ids,
)
from conveyor.testing.support import eventually, requires


class LeaseChecks(BrokerSuite):
    """A held message is invisible to others until acked, released or its lease runs out."""

    @requires(AT_LEAST_ONCE)
    def test_acked_message_is_not_redelivered_after_its_lease_would_have_expired(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker(lease_seconds=self.short_lease)
        broker.publish(_env(), queue=queue)
        [got] = _collect(consumer, queue, 1)
        consumer.ack(got)
        self._assert_empty(new_broker(), queue, timeout=self.short_lease + 0.5)
        self._assert_empty(consumer, queue)

    def test_acking_twice_is_a_no_op(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.ack(got)
        broker.ack(got)
        self._assert_empty(broker, queue)

    @requires(AT_LEAST_ONCE)
    def test_ack_after_the_lease_was_lost_raises_invalid_receipt_and_loses_nothing(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        slow = new_broker(lease_seconds=self.short_lease)
        other = new_broker()
        sent = _env()
        broker.publish(sent, queue=queue)
        [first] = _collect(slow, queue, 1)
        [second] = eventually(
            lambda: other.receive(queue, timeout=0.25), 10 + self.short_lease, message="redelivery"
        )
        assert second.envelope.id == sent.id
        assert second.redelivered is True
        if self.detects_lost_leases:
            with pytest.raises(InvalidReceipt):
                slow.ack(first)
        else:
            with contextlib.suppress(InvalidReceipt):
                slow.ack(first)
        other.ack(second)
        self._assert_empty(other, queue)

    @requires(AT_LEAST_ONCE)
    def test_unacked_message_is_redelivered_after_consumer_closes(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker()
        sent = _env(b"\x00payload\xff")
        broker.publish(sent, queue=queue)
        [first] = _collect(consumer, queue, 1)
        assert first.redelivered is False
        consumer.close()
        successor = new_broker()
        [again] = _collect(successor, queue, 1)
        assert again.redelivered is True
        assert again.envelope.id == sent.id
        assert again.envelope.body == sent.body
        assert again.delivery_count in (None, 2)
        successor.ack(again)

    @requires(AT_LEAST_ONCE)
    def test_unacked_message_is_redelivered_after_consumer_dies_without_closing(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        # "Dies": the consumer is simply never used again; only its lease running out can
        # bring the message back (pain point 3.3: at-least-once after consumer death).
        doomed = new_broker(lease_seconds=self.short_lease)
        sent = _env(b"survives")
        broker.publish(sent, queue=queue)
        [_] = _collect(doomed, queue, 1)
        survivor = new_broker()
        self._assert_empty(survivor, queue)
        [again] = eventually(
            lambda: survivor.receive(queue, timeout=0.25),
            10 + self.short_lease,
            message="redelivery after consumer death",
        )
        assert again.redelivered is True
        assert (again.envelope.id, again.envelope.body) == (sent.id, sent.body)
        survivor.ack(again)

    def test_held_message_is_invisible_to_other_consumers(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        holder = new_broker()
        broker.publish(_env(), queue=queue)
        [held] = _collect(holder, queue, 1)
        self._assert_empty(new_broker(), queue, timeout=0.3)
        if QUEUE_SIZE in broker.capabilities:
            assert broker.size(queue) == 0
        holder.ack(held)

    @requires(AT_LEAST_ONCE)
    def test_expired_lease_redelivers_with_delivery_count_incremented(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker(lease_seconds=self.short_lease)
        sent = _env()
        broker.publish(sent, queue=queue)
        [first] = _collect(consumer, queue, 1)
        [second] = eventually(lambda: consumer.receive(queue, timeout=0.25), 10 + self.short_lease)
        assert second.envelope.id == sent.id
        assert (first.redelivered, second.redelivered) == (False, True)
        if first.delivery_count is not None:
            assert (first.delivery_count, second.delivery_count) == (1, 2)
        consumer.ack(second)

    @requires(AT_LEAST_ONCE)
    def test_close_is_idempotent_and_releases_held_messages(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = new_broker()
        sent = [_env() for _ in range(3)]
        broker.publish_many(sent, queue=queue)
        _collect(consumer, queue, 3)
        consumer.close()
        consumer.close()
        again = _collect(new_broker(), queue, 3, ack=True)
        assert sorted(_ids(again)) == sorted(e.id for e in sent)
        assert all(d.redelivered for d in again)

    @requires(LEASE_EXTENSION, AT_LEAST_ONCE)
    def test_extending_the_lease_keeps_a_long_task_from_redelivery(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        # Pain point 3.1: no duplicate while the holder is alive and renewing its lease.
        lease = self.short_lease
        worker = new_broker(lease_seconds=lease)
        watcher = new_broker()
        broker.publish(_env(), queue=queue)
        [held] = _collect(worker, queue, 1)
        for _ in range(4):  # 4 x half a lease: well past the original lease
            worker.extend(held, lease)
            self._assert_empty(watcher, queue, timeout=lease / 2)
        worker.ack(held)
        self._assert_empty(watcher, queue)

    @requires(LEASE_EXTENSION, AT_LEAST_ONCE)
    def test_extend_after_the_lease_was_lost_raises_invalid_receipt(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        slow = new_broker(lease_seconds=self.short_lease)
        other = new_broker()
        broker.publish(_env(), queue=queue)
        [first] = _collect(slow, queue, 1)
        [second] = eventually(lambda: other.receive(queue, timeout=0.25), 10 + self.short_lease)
        if self.detects_lost_leases:
            with pytest.raises(InvalidReceipt):
                slow.extend(first, self.short_lease)
        other.ack(second)

    @requires(LEASE_EXTENSION)
    def test_extend_after_ack_raises_invalid_receipt(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.ack(got)
        with pytest.raises(InvalidReceipt):
            broker.extend(got, 10.0)
