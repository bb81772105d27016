"""The broker conformance suite against the in-process memory broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conveyor.testing.broker import BrokerConformance, BrokerFactory
from conveyor.transports.memory import MemoryBroker, MemoryStore

# A password in the URL lets the suite's repr test prove it is masked.
URL = "memory://conformance:s3cret-Pa55@localhost/"


class TestMemoryBroker(BrokerConformance):
    @pytest.fixture
    def make_broker(self) -> BrokerFactory:
        store = MemoryStore()  # one store per test: every broker of the test shares it

        def make(**options: object) -> MemoryBroker:
            return MemoryBroker.from_url(URL, store=store, **options)

        return make

    @pytest.fixture
    def unreachable_broker(self) -> Callable[[], MemoryBroker]:
        # memory:// has no server; a closed store is its "server gone" (it raises
        # ConnectionLost, an OperationalError), so the error-translation test runs here too.
        store = MemoryStore()
        store.close()
        return lambda: MemoryBroker.from_url(URL, store=store)
