"""The broker conformance suite against RedisBroker on a real Redis.

The suite runs with ten priority steps (``priority_steps=0,...,9``): the contract orders ten
priority levels, while kombu's default steps (0, 3, 6, 9, which interoperate with a Celery
worker's defaults) give four; ``tests/transports/test_redis_broker.py`` covers the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support.redis import REDIS_URL, closed_port_url, delete_keys, require_redis

from conveyor.testing.broker import BrokerConformance, BrokerFactory
from conveyor.testing.processes import ProcessRecipe
from conveyor.transports.redis import RedisBroker

TEN_STEPS = "0,1,2,3,4,5,6,7,8,9"


class TestRedisBroker(BrokerConformance):
    @pytest.fixture
    def make_broker(self) -> Iterator[BrokerFactory]:
        probe = require_redis(REDIS_URL)

        def make(**options: Any) -> RedisBroker:
            options.setdefault("priority_steps", TEN_STEPS)
            return RedisBroker.from_url(REDIS_URL, **options)

        yield make
        delete_keys(probe, "_kombu.binding.conformance-*")
        probe.close()

    @pytest.fixture
    def broker_process_recipe(self) -> ProcessRecipe:
        return ProcessRecipe(
            "conveyor.transports.redis:RedisBroker.from_url",
            REDIS_URL,
            {"priority_steps": TEN_STEPS},
        )

    @pytest.fixture
    def unreachable_broker_url(self) -> str:
        return closed_port_url()
