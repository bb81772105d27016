"""Broker suite, errors: a closed broker raises ``ConnectionLost``, an unreachable server
``OperationalError`` within bounded time, and ``repr`` never shows a password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from time import monotonic
from typing import Any

import pytest

from conveyor.core.errors import ConnectionLost, ConveyorError, OperationalError
from conveyor.core.urls import parse_url
from conveyor.testing.broker.base import BrokerFactory, BrokerSuite, _collect, _env
from conveyor.testing.support import unique_name


class ErrorChecks(BrokerSuite):
    """Failures surface as conveyor's errors, never as driver exceptions, hangs or secrets."""

    def test_ack_after_close_raises_connection_lost(
        self, new_broker: BrokerFactory, broker: Any, queue: str
    ) -> None:
        consumer = new_broker()
        broker.publish(_env(), queue=queue)
        [got] = _collect(consumer, queue, 1)
        consumer.close()
        with pytest.raises(ConnectionLost):
            consumer.ack(got)

    def test_every_operation_after_close_raises_connection_lost(
        self, new_broker: BrokerFactory, broker: Any, queue: str
    ) -> None:
        closed = new_broker()
        broker.publish(_env(), queue=queue)
        [got] = _collect(broker, queue, 1)
        closed.close()
        calls: list[Callable[[], object]] = [
            lambda: closed.declare_queue(queue),
            lambda: closed.publish(_env(), queue=queue),
            lambda: closed.publish_many([_env()], queue=queue),
            lambda: closed.receive(queue, timeout=0),
            lambda: closed.purge(queue),
            lambda: closed.ack(got),
            lambda: closed.reject(got, requeue=True),
        ]
        for call in calls:
            with pytest.raises(ConnectionLost):
                call()
        broker.ack(got)

    def test_repr_never_shows_a_password(self, broker: Any) -> None:
        url = getattr(broker, "url", "") or ""
        password = parse_url(url).password if "://" in url else None
        for text in (repr(broker), str(broker)):
            if password:
                assert password not in text
        if password:
            assert "***" in repr(broker)

    def test_unreachable_server_raises_operational_error_within_bounded_time(
        self, unreachable_broker: Callable[[], Any]
    ) -> None:
        # Error translation (pain point 3.6): a dead server surfaces as the retryable
        # OperationalError, never as a driver exception, and never as a hang.
        start = monotonic()
        with pytest.raises(OperationalError):
            gone = unreachable_broker()
            try:
                name = unique_name("unreachable")
                gone.publish(_env(), queue=name)
                gone.receive(name, timeout=0)
            finally:
                with contextlib.suppress(ConveyorError):
                    gone.close()
        assert monotonic() - start < self.unreachable_timeout
