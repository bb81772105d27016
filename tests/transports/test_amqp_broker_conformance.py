"""The broker conformance suite against RabbitMQ (tox env ``amqp``).

Four configurations: the default one (exactly Celery's declarations: no priority, so the
suite checks that priorities are refused), ``max_priority=9`` (:class:`AMQPPriorityBroker`,
every priority test), quorum queues (delivery counts, per-consumer prefetch), and
``dead_letter="dlx"`` (queue arguments for RabbitMQ's own dead-lettering; the reject reason
is recorded all the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from support.amqp import UNREACHABLE_AMQP_URL, QueueJanitor, amqp_url, janitor  # noqa: F401

from conveyor.testing.broker import BrokerConformance, BrokerFactory
from conveyor.testing.processes import ProcessRecipe
from conveyor.transports.amqp import AMQPBroker, AMQPPriorityBroker


class TestAMQPBroker(BrokerConformance):
    options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def make_broker(self, janitor: QueueJanitor) -> BrokerFactory:  # noqa: F811
        def make(**options: Any) -> AMQPBroker:
            return janitor.track(AMQPBroker.from_url(janitor.url, **{**self.options, **options}))

        return make

    @pytest.fixture
    def broker_process_recipe(self, janitor: QueueJanitor) -> ProcessRecipe:  # noqa: F811
        # The options are not in the URL, and another process must declare the queues it
        # uses with the same arguments (a quorum queue refuses a classic declaration).
        return ProcessRecipe(
            "conveyor.transports.amqp:AMQPBroker.from_url", janitor.url, dict(self.options)
        )

    @pytest.fixture
    def unreachable_broker(self) -> Callable[[], AMQPBroker]:
        return lambda: AMQPBroker.from_url(UNREACHABLE_AMQP_URL, **self.options)

    def test_the_default_configuration_does_not_declare_priority(self, broker: Any) -> None:
        assert type(broker) is AMQPBroker


class TestAMQPPriorityBroker(TestAMQPBroker):
    options: ClassVar[dict[str, Any]] = {"max_priority": 9}

    def test_the_default_configuration_does_not_declare_priority(self, broker: Any) -> None:
        assert type(broker) is AMQPPriorityBroker


class TestAMQPQuorumBroker(TestAMQPBroker):
    options: ClassVar[dict[str, Any]] = {"queue_type": "quorum"}


class TestAMQPDeadLetterExchangeBroker(TestAMQPBroker):
    options: ClassVar[dict[str, Any]] = {"dead_letter": "dlx"}
