"""Broker suite, messages: the protocol's shape, envelopes that round-trip, ``publish_many``,
queue declaration and what ``publish`` refuses.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from conveyor.core.capabilities import BROKER_CAPABILITIES, Capability
from conveyor.core.errors import ConfigurationError, UnsupportedFeature
from conveyor.core.protocols import Broker, DeadLetters, LeaseExtension, QueueSize
from conveyor.testing.broker.base import (
    DEAD_LETTER,
    LEASE_EXTENSION,
    PRIORITY,
    QUEUE_SIZE,
    BrokerSuite,
    _collect,
    _env,
    _ids,
)
from conveyor.testing.support import requires


class MessageChecks(BrokerSuite):
    """What goes in comes out unchanged, and what may not go in is refused at publish."""

    def test_broker_satisfies_the_broker_protocol(self, broker: Any) -> None:
        assert isinstance(broker, Broker)
        caps = broker.capabilities
        assert isinstance(broker, LeaseExtension) or LEASE_EXTENSION not in caps
        assert isinstance(broker, QueueSize) or QUEUE_SIZE not in caps
        assert isinstance(broker, DeadLetters) or DEAD_LETTER not in caps

    def test_declared_capabilities_are_known_broker_capabilities(self, broker: Any) -> None:
        caps = type(broker).capabilities
        assert isinstance(caps, frozenset)
        assert all(isinstance(c, Capability) for c in caps), caps
        assert caps <= BROKER_CAPABILITIES, caps - BROKER_CAPABILITIES

    def test_envelope_round_trip_preserves_every_field(self, broker: Any, queue: str) -> None:
        sent = _env(
            b'{"args": [1, 2], "kwargs": {}}',
            content_type="application/x-conveyor-test",
            content_encoding="binary",
            headers={"task": "tasks.add", "retries": 3, "eta": None, "ok": True, "f": 0.5},
            correlation_id="corr-" + uuid.uuid4().hex,
            reply_to="replies-" + uuid.uuid4().hex,
        )
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope == sent
        assert got.queue == queue
        assert got.redelivered is False
        assert got.delivery_count in (None, 1)
        broker.ack(got)

    def test_binary_body_with_all_256_byte_values_round_trips(
        self, broker: Any, queue: str
    ) -> None:
        body = bytes(range(256)) + bytes(reversed(range(256)))
        sent = _env(body, content_type="application/octet-stream", content_encoding="binary")
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.body == body
        assert got.envelope.id == sent.id

    def test_empty_body_round_trips(self, broker: Any, queue: str) -> None:
        sent = _env(b"")
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.body == b""
        assert got.envelope == sent

    def test_one_mebibyte_body_round_trips(self, broker: Any, queue: str) -> None:
        body = random.Random(1234).randbytes(1 << 20)
        sent = _env(body, content_type="application/octet-stream", content_encoding="binary")
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.body == body

    def test_unicode_and_nested_headers_round_trip(self, broker: Any, queue: str) -> None:
        headers = {
            "ünïcødé": "値 ✓ 🚀 — ¿qué?",
            "nested": {"list": [1, "two", {"three": [3.5, None, False]}], "empty": {}},
            "emoji-🔑": ["a", [], {"ß": "ẞ"}],
            "big": 2**53,
            "negative": -7,
        }
        sent = _env(headers=headers)
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert dict(got.envelope.headers) == headers

    @requires(PRIORITY)
    def test_priority_is_preserved_on_the_envelope(self, broker: Any, queue: str) -> None:
        sent = _env(priority=7)
        broker.publish(sent, queue=queue)
        [got] = _collect(broker, queue, 1)
        assert got.envelope.priority == 7
        assert got.envelope == sent

    def test_priority_outside_zero_to_nine_is_refused(self, broker: Any, queue: str) -> None:
        expected: tuple[type[Exception], ...] = (
            (ConfigurationError,)
            if PRIORITY in broker.capabilities
            else (ConfigurationError, UnsupportedFeature)
        )
        for priority in (10, -1, 255):
            with pytest.raises(expected):
                broker.publish(_env(priority=priority), queue=queue)
        self._assert_empty(broker, queue)

    def test_an_envelope_id_that_is_not_a_string_is_refused_at_publish(
        self, broker: Any, queue: str
    ) -> None:
        """Ids are data, never queries: a dict id would be an operator to a document store."""
        for bad in (123, b"bytes", {"$ne": None}, None):
            with pytest.raises(ConfigurationError):
                broker.publish(_env(id=bad), queue=queue)
            with pytest.raises(ConfigurationError):
                broker.publish_many([_env(id=bad)], queue=queue)
        self._assert_empty(broker, queue)

    def test_a_delay_that_is_not_a_finite_non_negative_number_is_refused_at_publish(
        self, broker: Any, queue: str
    ) -> None:
        """Whether or not ``delayed_delivery`` is declared: such a delay is a mistake, never
        a message to hold for ever (or to loop on)."""
        for bad in (float("inf"), float("nan"), -1.0, float("-inf"), True, "10"):
            with pytest.raises(ConfigurationError):
                broker.publish(_env(), queue=queue, delay=bad)
            with pytest.raises(ConfigurationError):
                broker.publish_many([_env()], queue=queue, delay=bad)
        self._assert_empty(broker, queue)

    def test_publish_many_returns_the_count_and_keeps_order(self, broker: Any, queue: str) -> None:
        sent = [_env(bytes([i])) for i in range(50)]
        assert broker.publish_many(iter(sent), queue=queue) == 50
        got = _collect(broker, queue, 50, ack=True)
        assert _ids(got) == [e.id for e in sent]

    def test_publish_many_of_nothing_publishes_nothing(self, broker: Any, queue: str) -> None:
        assert broker.publish_many([], queue=queue) == 0
        self._assert_empty(broker, queue)

    def test_declaring_a_queue_twice_is_harmless(self, broker: Any, queue: str) -> None:
        broker.publish(_env(), queue=queue)
        broker.declare_queue(queue)
        broker.declare_queue(queue)
        assert len(_collect(broker, queue, 1)) == 1

    def test_invalid_queue_names_raise_configuration_error(self, broker: Any) -> None:
        for bad in ("", "nul\x00inside", "tab\tinside", "x" * 201):
            with pytest.raises(ConfigurationError):
                broker.declare_queue(bad)
            with pytest.raises(ConfigurationError):
                broker.publish(_env(), queue=bad)
            with pytest.raises(ConfigurationError):
                broker.receive(bad, timeout=0)
