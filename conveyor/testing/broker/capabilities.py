"""Broker suite, feature capabilities in both directions: declared, the feature works;
undeclared, it raises ``UnsupportedFeature`` naming the capability. These tests never skip.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import pytest

from conveyor.core.errors import ConfigurationError, UnsupportedFeature
from conveyor.testing.broker.base import (
    DEAD_LETTER,
    DELAYED,
    LEASE_EXTENSION,
    PRIORITY,
    QUEUE_SIZE,
    BrokerSuite,
    _collect,
    _env,
    _ids,
)
from conveyor.testing.support import eventually


class CapabilityChecks(BrokerSuite):
    """Each feature capability, declared or not, checked both ways."""

    def test_priority_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        low, high = _env(b"low"), _env(b"high", priority=5)
        broker.publish(low, queue=queue)
        if PRIORITY in broker.capabilities:
            broker.publish(high, queue=queue)
            got = _collect(broker, queue, 2, ack=True)
            assert _ids(got) == [high.id, low.id]
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.publish(high, queue=queue)
            assert info.value.capability == "priority"
            assert _ids(_collect(broker, queue, 1, ack=True)) == [low.id]
            self._assert_empty(broker, queue)

    def test_delayed_delivery_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        broker.publish(_env(b"zero"), queue=queue, delay=0)
        broker.publish(_env(b"none"), queue=queue, delay=None)
        assert len(_collect(broker, queue, 2, ack=True)) == 2
        later = _env(b"later")
        if DELAYED in broker.capabilities:
            start = monotonic()
            broker.publish(later, queue=queue, delay=0.3)
            [got] = _collect(broker, queue, 1, ack=True)
            assert monotonic() - start >= 0.3
            assert got.envelope.id == later.id
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.publish(later, queue=queue, delay=0.3)
            assert info.value.capability == "delayed_delivery"
            with pytest.raises(UnsupportedFeature):
                broker.publish_many([later], queue=queue, delay=0.3)
            self._assert_empty(broker, queue, timeout=0.5)
        with pytest.raises((ConfigurationError, UnsupportedFeature)):
            broker.publish(_env(), queue=queue, delay=-1.0)

    def test_dead_letter_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        if DEAD_LETTER in broker.capabilities:
            dead_queue = broker.dead_letter_queue(queue)
            assert isinstance(dead_queue, str)
            assert dead_queue not in ("", queue)
            assert broker.receive(dead_queue, timeout=0) == []
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.dead_letter_queue(queue)
            assert info.value.capability == "dead_letter"

    def test_lease_extension_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        if LEASE_EXTENSION in broker.capabilities:
            broker.extend(got, 30.0)
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.extend(got, 30.0)
            assert info.value.capability == "lease_extension"
        broker.ack(got)

    def test_queue_size_capability_in_both_directions(self, broker: Any, queue: str) -> None:
        broker.publish_many([_env(), _env()], queue=queue)
        if QUEUE_SIZE in broker.capabilities:
            assert eventually(lambda: broker.size(queue) == 2, 10)
        else:
            with pytest.raises(UnsupportedFeature) as info:
                broker.size(queue)
            assert info.value.capability == "queue_size"
