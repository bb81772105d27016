"""Broker suite, delayed delivery: a delayed message stays in the broker, hidden, until due."""

from __future__ import annotations

from time import monotonic
from typing import Any

from conveyor.testing.broker.base import DELAYED, QUEUE_SIZE, BrokerSuite, _collect, _env, _ids
from conveyor.testing.support import eventually, requires


class DelayChecks(BrokerSuite):
    """Never early, never prefetched, purged and uncounted while waiting."""

    @requires(DELAYED)
    def test_delayed_message_is_hidden_until_due_then_delivered(
        self, broker: Any, queue: str
    ) -> None:
        delay = 0.5
        sent = _env()
        start = monotonic()
        broker.publish(sent, queue=queue, delay=delay)
        # Only lower bounds on time are asserted: on a loaded machine the publish itself may
        # take longer than the delay, and then the message is rightly ready at once.
        early = broker.receive(queue, timeout=0)
        assert not early or monotonic() - start >= delay, "delivered before it was due"
        if QUEUE_SIZE in broker.capabilities:
            counted = broker.size(queue)
            assert counted == len(early) == 0 or monotonic() - start >= delay
        [got] = early or eventually(lambda: broker.receive(queue, timeout=0.1), 10 + delay)
        assert monotonic() - start >= delay
        assert got.envelope == sent
        assert got.redelivered is False
        broker.ack(got)

    @requires(DELAYED)
    def test_blocking_receive_never_returns_a_delayed_message_early(
        self, broker: Any, queue: str
    ) -> None:
        delay = 0.5
        sent = _env()
        start = monotonic()
        broker.publish(sent, queue=queue, delay=delay)
        got = broker.receive(queue, timeout=delay + 5 + self.timing_slack)
        assert monotonic() - start >= delay
        assert _ids(got) == [sent.id]

    @requires(DELAYED)
    def test_purge_removes_delayed_messages_too(self, broker: Any, queue: str) -> None:
        delay = 0.5
        broker.publish_many([_env() for _ in range(3)], queue=queue, delay=delay)
        broker.publish_many([_env() for _ in range(2)], queue=queue)
        assert broker.purge(queue) == 5
        self._assert_empty(broker, queue, timeout=delay + 0.5)

    @requires(DELAYED, QUEUE_SIZE)
    def test_delayed_messages_are_not_counted_by_size(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env() for _ in range(4)], queue=queue, delay=60.0)
        broker.publish(_env(), queue=queue)
        eventually(lambda: broker.size(queue) == 1, 10)
        assert broker.purge(queue) == 5

    @requires(DELAYED)
    def test_thousand_delayed_messages_stay_in_the_broker_until_due(
        self, broker: Any, queue: str
    ) -> None:
        # Pain point 3.2: a consumer never prefetches a not-yet-due message, however many are
        # waiting; what it gets is bounded by max_messages and only ever due messages.
        far = [_env() for _ in range(1000)]
        assert broker.publish_many(far, queue=queue, delay=300.0) == 1000
        now = _env(b"now")
        broker.publish(now, queue=queue)
        got = broker.receive(queue, max_messages=50, timeout=5.0)
        assert _ids(got) == [now.id]
        broker.ack(got[0])
        self._assert_empty(broker, queue, timeout=0.2)
        if QUEUE_SIZE in broker.capabilities:
            assert broker.size(queue) == 0
        soon = [_env() for _ in range(20)]
        delay = 0.5
        start = monotonic()
        broker.publish_many(soon, queue=queue, delay=delay)
        first = eventually(lambda: broker.receive(queue, max_messages=10, timeout=0.25), 10)
        assert monotonic() - start >= delay
        assert 1 <= len(first) <= 10
        rest = _collect(broker, queue, len(soon) - len(first), ack=True)
        assert sorted(_ids(first + rest)) == sorted(e.id for e in soon)
        for delivery in first:
            broker.ack(delivery)
        self._assert_empty(broker, queue)
        assert broker.purge(queue) == 1000

    @requires(DELAYED)
    def test_receive_never_returns_messages_that_are_not_yet_due(
        self, broker: Any, queue: str
    ) -> None:
        earliest: dict[str, float] = {}
        for i in range(20):
            envelope = _env()
            delay = 0.05 * (i % 10) + 0.05
            earliest[envelope.id] = monotonic() + delay
            broker.publish(envelope, queue=queue, delay=delay)
        seen: set[str] = set()
        deadline = monotonic() + 10
        while len(seen) < len(earliest) and monotonic() < deadline:
            batch = broker.receive(queue, max_messages=5, timeout=0.2)
            received_at = monotonic()
            for delivery in batch:
                assert received_at >= earliest[delivery.envelope.id], "delivered before due"
                seen.add(delivery.envelope.id)
                broker.ack(delivery)
        assert seen == set(earliest)
