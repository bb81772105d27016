"""Broker suite, dead letters: ``reject`` with and without requeue, and what a dead letter
keeps (id, body, headers, the reason and the queue it came from).
"""

from __future__ import annotations

from typing import Any

from conveyor.testing.broker.base import (
    DEAD_LETTER,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    BrokerFactory,
    BrokerSuite,
    _collect,
    _env,
)
from conveyor.testing.support import requires


class DeadLetterChecks(BrokerSuite):
    """A rejected message is requeued, or dropped from its queue (and, where declared,
    dead-lettered)."""

    def test_rejected_message_with_requeue_is_ready_again_as_redelivered(
        self, broker: Any, queue: str
    ) -> None:
        sent = _env()
        broker.publish(sent, queue=queue)
        [first] = _collect(broker, queue, 1)
        broker.reject(first, requeue=True)
        [again] = _collect(broker, queue, 1)
        assert again.envelope.id == sent.id
        assert again.redelivered is True
        broker.ack(again)

    def test_rejected_message_without_requeue_is_not_delivered_again_on_its_queue(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        consumer = self._lease_broker(new_broker, broker)
        broker.publish(_env(), queue=queue)
        [got] = _collect(consumer, queue, 1)
        consumer.reject(got, requeue=False, reason="bad payload")
        self._assert_empty(new_broker(), queue, timeout=self.short_lease + 0.5)

    @requires(DEAD_LETTER)
    def test_rejected_message_lands_in_the_dead_letter_queue_with_same_id_and_body(
        self, broker: Any, queue: str
    ) -> None:
        sent = _env(b"poison", headers={"task": "tasks.explode"})
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.reject(got, requeue=False, reason="ValueError: boom")
        dead_queue = broker.dead_letter_queue(queue)
        assert isinstance(dead_queue, str)
        assert dead_queue != queue
        [dead] = _collect(broker, dead_queue, 1)
        assert (dead.envelope.id, dead.envelope.body) == (sent.id, sent.body)
        assert dead.envelope.headers["task"] == "tasks.explode"
        assert dead.queue == dead_queue
        broker.ack(dead)
        self._assert_empty(broker, queue)
        self._assert_empty(broker, dead_queue)

    @requires(DEAD_LETTER)
    def test_the_dead_letter_records_the_reject_reason_and_the_queue_it_came_from(
        self, broker: Any, queue: str
    ) -> None:
        # Read back through the Broker protocol alone: two headers on the dead letter (see
        # the module doc), next to the headers the message already had.
        reason = (
            'Traceback (most recent call last):\n  File "tasks.py", line 7, in explode\n'
            "ValueError: bad payload: ünïcødé ✓ 'quoted' \"double\"; tab\tend"
        )
        sent = _env(b"poison", headers={"task": "tasks.explode", "retries": 2})
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        broker.reject(got, requeue=False, reason=reason)
        dead_queue = broker.dead_letter_queue(queue)
        [dead] = _collect(broker, dead_queue, 1)
        headers = dict(dead.envelope.headers)
        recorded = headers.get(DEAD_LETTER_REASON_HEADER)
        assert isinstance(recorded, str), f"no reason recorded: {headers!r}"
        # Exactly, or with its tabs and line breaks as spaces (see the module doc).
        assert recorded.split() == reason.split(), (
            f"dead-letter reason recorded as {recorded!r}, expected {reason!r} (exactly, or "
            "with its tabs and line breaks as spaces)"
        )
        assert headers.get(DEAD_LETTER_QUEUE_HEADER) == queue
        assert (headers["task"], headers["retries"]) == ("tasks.explode", 2)
        assert dead.envelope.id == sent.id
        broker.ack(dead)

    def test_rejecting_twice_is_a_no_op(self, broker: Any, queue: str) -> None:
        dropped, requeued = _env(b"dropped"), _env(b"requeued")
        broker.publish_many([dropped, requeued], queue=queue)
        first, second = sorted(_collect(broker, queue, 2), key=lambda d: d.envelope.body)
        broker.reject(first, requeue=False)
        broker.reject(first, requeue=False)
        broker.reject(second, requeue=True)
        broker.reject(second, requeue=True)
        [again] = _collect(broker, queue, 1)
        assert again.envelope.id == requeued.id
        broker.ack(again)
        self._assert_empty(broker, queue, timeout=0.3)
