"""The broker conformance suite against MongoDBBroker.

Server: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/support/mongo.py``): SecantusDB from
``scripts/services.sh`` by default, or a real MongoDB. Every ``make_broker()`` builds a new
broker with its own ``MongoClient``, as a second worker process would.

On a MongoDB-protocol test server the suite's slow-server knobs apply: SecantusDB 0.7 never
serves a sort from an index and evaluates filters document by document, so a claim on a
queue of N ready messages costs O(N) (0.2-1 s at N = 2000 on a loaded 2-core machine,
against well under a millisecond on MongoDB). The many-producers-and-consumers test then
moves 400 messages instead of 2000 (the environment notes' "around 200 documents"), and
lease tests use 2 s leases so a slow round trip cannot eat a whole lease. A real MongoDB
runs the full-size suite.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
from support.mongo import (  # noqa: F401 - fixture
    is_real_mongodb,
    mongodb_url,
    unreachable_mongodb_url,
)

from conveyor.testing.broker import BrokerConformance, BrokerFactory
from conveyor.transports.mongodb import MongoDBBroker

_TEST_SERVER = not is_real_mongodb()


class TestMongoDBBroker(BrokerConformance):
    if _TEST_SERVER:
        short_lease: ClassVar[float] = 2.0
        timing_slack: ClassVar[float] = 2.0
        concurrency_messages: ClassVar[int] = 400

    @pytest.fixture
    def make_broker(self, mongodb_url: str) -> BrokerFactory:  # noqa: F811
        return lambda **options: MongoDBBroker.from_url(mongodb_url, **options)

    @pytest.fixture
    def unreachable_broker_url(self) -> str:
        return unreachable_mongodb_url()
