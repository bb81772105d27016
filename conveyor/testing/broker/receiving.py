"""Broker suite, receiving: ``receive``'s timeouts and batch sizes, delivery order (FIFO and
priority), ``purge`` and ``size``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

import pytest

from conveyor.core.errors import ConfigurationError
from conveyor.testing.broker.base import (
    PRIORITY,
    QUEUE_SIZE,
    BrokerFactory,
    BrokerSuite,
    _collect,
    _env,
    _ids,
)
from conveyor.testing.support import eventually, requires, unique_name


class ReceiveChecks(BrokerSuite):
    """``receive`` waits as long as asked and no longer, in order; ``purge`` and ``size``
    count right."""

    def test_empty_receive_returns_an_empty_list_after_its_timeout(
        self, broker: Any, queue: str
    ) -> None:
        timeout = 0.5
        start = monotonic()
        assert broker.receive(queue, max_messages=5, timeout=timeout) == []
        elapsed = monotonic() - start
        assert timeout * 0.9 <= elapsed <= timeout + self.timing_slack, elapsed

    def test_receive_with_zero_timeout_polls_without_blocking(
        self, broker: Any, queue: str
    ) -> None:
        start = monotonic()
        assert broker.receive(queue, timeout=0) == []
        assert monotonic() - start < self.timing_slack
        sent = _env()
        broker.publish(sent, queue=queue)
        got = eventually(lambda: broker.receive(queue, timeout=0), 10, message="poll")
        assert _ids(got) == [sent.id]

    def test_receive_returns_at_most_max_messages(self, broker: Any, queue: str) -> None:
        sent = [_env() for _ in range(5)]
        broker.publish_many(sent, queue=queue)
        first = eventually(lambda: broker.receive(queue, max_messages=3, timeout=0.5), 10)
        assert 1 <= len(first) <= 3
        rest = _collect(broker, queue, 5 - len(first))
        assert sorted(_ids(first + rest)) == sorted(e.id for e in sent)
        self._assert_empty(broker, queue)

    def test_receive_returns_ready_messages_without_waiting_for_max_messages(
        self, broker: Any, queue: str
    ) -> None:
        broker.publish_many([_env(), _env()], queue=queue)
        start = monotonic()
        got = broker.receive(queue, max_messages=10, timeout=5.0)
        assert 1 <= len(got) <= 2
        assert monotonic() - start < self.timing_slack

    def test_receive_from_several_queues_returns_messages_of_each(
        self, broker: Any, make_queue: Callable[[], str]
    ) -> None:
        first, second = make_queue(), make_queue()
        a, b = _env(b"a"), _env(b"b")
        broker.publish(a, queue=first)
        broker.publish(b, queue=second)
        got = _collect(broker, [first, second], 2)
        assert {(d.queue, d.envelope.id) for d in got} == {(first, a.id), (second, b.id)}

    def test_blocked_receive_wakes_up_when_a_message_arrives(
        self, broker: Any, new_broker: BrokerFactory, queue: str
    ) -> None:
        producer = new_broker()
        sent = _env()
        timer = threading.Timer(0.3, producer.publish, (sent,), {"queue": queue})
        start = monotonic()
        timer.start()
        try:
            got = broker.receive(queue, timeout=10.0)
        finally:
            timer.join()
        assert _ids(got) == [sent.id]
        assert monotonic() - start < 0.3 + self.timing_slack

    def test_receive_without_queues_raises_configuration_error(self, broker: Any) -> None:
        with pytest.raises(ConfigurationError):
            broker.receive([], timeout=0)

    def test_messages_of_one_priority_are_delivered_in_publish_order(
        self, broker: Any, queue: str
    ) -> None:
        sent = [_env(str(i).encode()) for i in range(100)]
        for envelope in sent:
            broker.publish(envelope, queue=queue)
        got = _collect(broker, queue, 100, ack=True)
        assert _ids(got) == [e.id for e in sent]

    @requires(PRIORITY)
    def test_higher_priority_messages_are_delivered_first(self, broker: Any, queue: str) -> None:
        sent = [_env(priority=p) for p in (0, 5, 9, 1, 3)]
        broker.publish_many(sent, queue=queue)
        got = _collect(broker, queue, len(sent), ack=True)
        assert [d.envelope.priority for d in got] == [9, 5, 3, 1, 0]

    @requires(PRIORITY)
    def test_fifo_holds_within_each_priority(self, broker: Any, queue: str) -> None:
        sent = [_env(f"{i}".encode(), priority=(0, 4, 8)[i % 3]) for i in range(60)]
        for envelope in sent:
            broker.publish(envelope, queue=queue)
        got = _collect(broker, queue, len(sent), ack=True)
        priorities = [d.envelope.priority for d in got]
        assert priorities == sorted(priorities, reverse=True)
        for level in (0, 4, 8):
            expected = [e.id for e in sent if e.priority == level]
            assert [d.envelope.id for d in got if d.envelope.priority == level] == expected

    def test_purge_returns_how_many_messages_it_removed(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env() for _ in range(5)], queue=queue)
        assert broker.purge(queue) == 5
        assert broker.purge(queue) == 0
        self._assert_empty(broker, queue)

    def test_purge_leaves_held_messages_alone(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env() for _ in range(3)], queue=queue)
        [held] = _collect(broker, queue, 1)
        assert broker.purge(queue) == 2
        broker.ack(held)
        self._assert_empty(broker, queue)

    @requires(QUEUE_SIZE)
    def test_size_counts_ready_messages_only(self, broker: Any, queue: str) -> None:
        assert broker.size(unique_name("never-used")) == 0
        broker.publish_many([_env() for _ in range(3)], queue=queue)
        eventually(lambda: broker.size(queue) == 3, 10)
        [held] = _collect(broker, queue, 1)
        # Servers may report counts with a short lag; the memory broker is exact at once.
        eventually(lambda: broker.size(queue) == 2, 10, message="size 2 with one held")
        broker.ack(held)
        assert broker.size(queue) == 2
        broker.purge(queue)
        eventually(lambda: broker.size(queue) == 0, 10, message="size 0 after purge")
