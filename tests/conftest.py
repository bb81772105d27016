"""Settings shared by every test run of this repository (not shipped; see conveyor.testing).

Hypothesis: no per-example deadline. Two tox envs and two xdist workers share two cores under
`make test`, so wall-clock deadlines would fail on load, not on bugs. Under CI the failing
example's reproduction blob is printed. HYPOTHESIS_PROFILE=dev gives fewer examples for quick
local runs.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("default", deadline=None)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)


@pytest.fixture
def redis_bin() -> str:
    """Path of redis-server, for tests that start private Redis servers."""
    from support.redis import redis_server_binary  # lazily: the unit env has no redis

    from conveyor.testing.support import requirement_missing

    binary = redis_server_binary()
    if binary is None:
        requirement_missing("redis-server is not installed")
    return binary
