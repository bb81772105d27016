"""The result backend conformance suite against MemcachedResultBackend.

Server: ``CONVEYOR_TEST_MEMCACHED_URL`` (``tests/support/memcached.py``). Memcached counts
expiry in whole seconds on a clock that ticks once a second; the backend stores ``ceil(ttl)
+ 1`` so nothing vanishes early, hence an entry may outlive its ttl by up to two seconds
(``expiry_tolerance``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from support.memcached import memcached_url  # noqa: F401 - fixture

from conveyor.backends.memcached import MemcachedResultBackend
from conveyor.testing.result_backend import ResultBackendConformance


class TestMemcachedResultBackend(ResultBackendConformance):
    short_ttl: ClassVar[float] = 1.0
    expiry_tolerance: ClassVar[float] = 2.2

    @pytest.fixture
    def make_result_backend(self, memcached_url: str) -> Any:  # noqa: F811
        return lambda **options: MemcachedResultBackend.from_url(memcached_url, **options)
