"""The broker conformance suite against MongoDBBroker.

Server: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/mongosupport.py``): SecantusDB from
``scripts/services.sh`` by default, or a real MongoDB. Every ``make_broker()`` builds a new
broker with its own ``MongoClient``, as a second worker process would.
"""

from __future__ import annotations

import pytest
from mongosupport import mongodb_url, unreachable_mongodb_url  # noqa: F401 - fixture

from conveyor.testing.broker import BrokerConformance, BrokerFactory
from conveyor.transports.mongodb import MongoDBBroker


class TestMongoDBBroker(BrokerConformance):
    @pytest.fixture
    def make_broker(self, mongodb_url: str) -> BrokerFactory:  # noqa: F811
        return lambda **options: MongoDBBroker.from_url(mongodb_url, **options)

    @pytest.fixture
    def unreachable_broker_url(self) -> str:
        return unreachable_mongodb_url()
