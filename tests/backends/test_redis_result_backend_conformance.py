"""The result backend conformance suite against RedisResultBackend on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support.redis import REDIS_URL, require_redis

from conveyor.backends.redis import RedisResultBackend
from conveyor.testing.result_backend import MakeResultBackend, ResultBackendConformance


class TestRedisResultBackend(ResultBackendConformance):
    @pytest.fixture
    def make_result_backend(self) -> Iterator[MakeResultBackend]:
        probe = require_redis(REDIS_URL)

        def make(**options: Any) -> RedisResultBackend:
            return RedisResultBackend.from_url(REDIS_URL, **options)

        yield make
        probe.close()
