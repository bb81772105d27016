"""The result backend conformance suite against MongoDBResultBackend.

Server: ``CONVEYOR_TEST_MONGODB_URL`` (``tests/support/mongo.py``). Every ``make()`` builds a
new client on the same database. The TTL monitor of MongoDB (and of SecantusDB) runs about
once a minute, so the expiry tests here prove the read-side rule (an expired document is
never returned); ``tests/backends/test_mongodb_backend.py`` proves the TTL index on a
private server that sweeps every second.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from support.mongo import is_real_mongodb, mongodb_url  # noqa: F401 - fixture

from conveyor.backends.mongodb import MongoDBResultBackend
from conveyor.testing.result_backend import ResultBackendConformance


class TestMongoDBResultBackend(ResultBackendConformance):
    if not is_real_mongodb():
        # A test server may take a good part of a second per write under load: give the
        # expiry tests' short ttl room for the two or three writes they make within it.
        short_ttl: ClassVar[float] = 2.0

    @pytest.fixture
    def make_result_backend(self, mongodb_url: str) -> Any:  # noqa: F811
        return lambda **options: MongoDBResultBackend.from_url(mongodb_url, **options)
