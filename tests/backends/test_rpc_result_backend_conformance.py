"""The result backend conformance suite against ``rpc://`` on RabbitMQ (tox env ``amqp``).

rpc:// has one reader per reply queue (``multi_reader`` is not declared, so the test that
reads one result from several clients skips). Every client the suite builds in one test
shares that test's reply queue: writers only publish to it, and the one reading client
consumes it, which is exactly Celery's arrangement (workers write, the sending client reads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.amqp import amqp_url  # noqa: F401

from conveyor.backends.rpc import RPCResultBackend
from conveyor.core.errors import ConveyorError
from conveyor.testing.processes import ProcessRecipe
from conveyor.testing.result_backend import ResultBackendConformance
from conveyor.testing.support import unique_name
from conveyor.transports.amqp import AMQPBroker


class TestRPCResultBackend(ResultBackendConformance):
    @pytest.fixture
    def reply_to(self) -> str:
        return unique_name("rpc-replies")

    @pytest.fixture
    def make_result_backend(
        self,
        amqp_url: str,  # noqa: F811
        reply_to: str,
    ) -> Iterator[Callable[..., Any]]:
        def make(**options: Any) -> RPCResultBackend:
            return RPCResultBackend.from_url(
                "rpc://", broker_url=amqp_url, reply_to=reply_to, **options
            )

        yield make
        deleter = AMQPBroker.from_url(amqp_url)
        try:
            with contextlib.suppress(ConveyorError):
                deleter.delete_queue(reply_to, dead_letters=False)
        finally:
            deleter.close()

    @pytest.fixture
    def result_backend_process_recipe(
        self,
        amqp_url: str,  # noqa: F811
        reply_to: str,
    ) -> ProcessRecipe:
        # A writer in another process: a worker publishing to this test's reply queue.
        return ProcessRecipe(
            "conveyor.backends.rpc:RPCResultBackend.from_url",
            "rpc://",
            {"broker_url": amqp_url, "reply_to": reply_to},
        )
